"""Capacity planning without weights: compile the serving programs ahead of time from abstract
shapes and read what they need from the compiler.

`plan(cfg, config, mesh)` lowers every program warm-up would compile (`device.program_shapes`)
on `jax.ShapeDtypeStruct`s that carry the real shardings, compiles them for this machine's
backend, and reports per-device bytes: weights and KV cache (from the shardings, exact) and the
largest program's temporaries (`compiled.memory_analysis()`). No weight is ever allocated, so a
70B plan at tp 8 runs on a laptop (`--xla_force_host_platform_device_count` gives the devices).
The programs are compiled in the layer layout `EngineConfig.split_layers` asks for; unset, in the
engine's default (`layers.split_layers`). `copies`
counts the bytes a program moves without computing, e.g. weights copied out of a stack. An int8 config
(`quantization="int8"`, `plan --quantize int8`) counts its int8 matrices and float32 scales.

`config.platform` says what the programs are built for: the host's devices by default, or a
GPU target (`platform.target("h200", tp)`, whose abstract devices `mesh` must span): then XLA's
real GPU compiler builds them here, with the target's kernels (Triton, cuDNN), and
`custom_kernels` lists the ones each program calls. Deviceless compiles do not autotune: they
plan memory, not speed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama_jax import bitmask, layers, platform, quantize, sampling, step_masks
from llama_jax.compiles import compile_in_threads
from llama_jax.config import EngineConfig, LlamaConfig
from llama_jax.device import DecodeState, Programs, decode_state_shardings, empty_state, program_shapes
from llama_jax.layers import SplitWeight
from llama_jax.model import abstract_model, storage_params
from llama_jax.sharding import make_mesh, param_shardings

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One AOT-compiled serving program and what the compiler says it needs (per device)."""

    name: str
    compiled: jax.stages.Compiled
    seconds: float

    @property
    def memory(self):
        return self.compiled.memory_analysis()

    @property
    def kernels(self) -> list[str]:
        return custom_kernels(self.compiled.as_text())

    @property
    def host_syncs(self) -> dict[str, int]:
        """`{"conditionals", "dynamic_whiles"}`: the control flow XLA:GPU runs by reading a
        predicate back to the host (`host_sync_ops`)."""
        return host_sync_ops(self.compiled.as_text())

    @property
    def copies(self) -> dict[str, int]:
        """`{"count", "bytes"}` of the buffers filled only by moving bytes (`copies`)."""
        return copies(self.compiled.as_text())


def custom_kernels(hlo: str) -> list[str]:
    """The custom kernels a compiled program calls, as `family:name`: Pallas-Triton kernels by
    their name (`triton:decode_attention`), cuDNN calls by kind (`cudnn:fmha`). Library GEMMs and
    XLA's own fusions are not listed."""
    found = set()
    for line in hlo.splitlines():
        target = re.search(r'custom_call_target="([^"]+)"', line)
        if target is None:
            continue
        if target.group(1) == "__gpu$xla.gpu.triton":
            name = re.search(r', name = \"?(\w+)', line)
            found.add(f"triton:{name.group(1) if name else 'unnamed'}")
        elif target.group(1).startswith("__cudnn$"):
            kind = target.group(1).removeprefix("__cudnn$")
            found.add("cudnn:fmha" if kind.startswith("fmha") else f"cudnn:{kind}")
    return sorted(found)


def host_sync_ops(hlo: str) -> dict[str, int]:
    """The control flow of an optimized HLO module that XLA:GPU runs by copying a predicate to the
    host and waiting for it: `conditional` ops, and `while` loops whose trip count XLA does not
    know (no `known_trip_count` in their backend_config). Both should be 0 in a GPU serve program."""
    conditionals = whiles = 0
    for line in hlo.splitlines():
        if re.search(r"\sconditional\(", line) and "_computation" in line:
            conditionals += 1
        elif re.search(r"\swhile\(", line) and "body=" in line and "known_trip_count" not in line:
            whiles += 1
    return {"conditionals": conditionals, "dynamic_whiles": whiles}


COPY_MIN_BYTES = 64 << 10  # smaller moves (a layer's index, a norm's scale row) are not counted


def copies(hlo: str, min_bytes: int = COPY_MIN_BYTES) -> dict[str, int]:
    """`{"count", "bytes"}`: the buffers of at least `min_bytes` that an optimized HLO module fills
    by only moving bytes (a fusion of slices, copies, concatenations, transposes), e.g. a layer's
    weight matrix copied out of the stacked weights before its dot. `count` counts them as
    written, `bytes` is what they write per run, loop bodies times their known trip counts."""
    comps: dict[str, list[str]] = {}
    for line in hlo.splitlines():
        if head := re.match(r"^(?:ENTRY )?%(\S+) \(.*\{$", line):
            comps[head.group(1)] = lines = []
        elif comps:
            lines.append(line)
    op = lambda line: (m.group(1) if (m := re.search(r"= \S+ ([\w-]+)\(", line)) else None)
    moves = {"parameter", "constant", "slice", "dynamic-slice", "copy", "bitcast", "reshape", "transpose", "concatenate"}
    moving = {name for name, lines in comps.items() if {op(line) for line in lines} - {None} <= moves}
    runs = dict.fromkeys(comps, 1)  # how often each computation runs per execution (nested loops multiplied)
    for _ in range(4):
        for name, lines in comps.items():
            for line in lines:
                if (body := re.search(r"\swhile\(.*body=%([\w.\-]+)", line)) and body.group(1) in runs:
                    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                    runs[body.group(1)] = runs[name] * (int(trips.group(1)) if trips else 1)
    count = total = 0
    for name, lines in comps.items():
        for line in lines:
            called = re.search(r"= (\w+)\[([\d,]*)\]\S* fusion\(.*calls=%([\w.\-]+)", line)
            if called and called.group(3) in moving:
                size = jnp.dtype(_HLO_DTYPES.get(called.group(1), called.group(1))).itemsize * math.prod(
                    int(d) for d in called.group(2).split(",") if d)
                if size >= min_bytes:
                    count, total = count + 1, total + size * runs[name]
    return {"count": count, "bytes": total}


_HLO_DTYPES = {"pred": "bool", "s8": "int8", "s16": "int16", "s32": "int32", "s64": "int64", "u8": "uint8", "u16": "uint16",
               "u32": "uint32", "u64": "uint64", "f16": "float16", "bf16": "bfloat16", "f32": "float32", "f64": "float64"}


def per_device_bytes(abstract) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each)."""
    total = 0
    for leaf in jax.tree.leaves(abstract):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def abstract_params(cfg: LlamaConfig, mesh: Mesh | None, target: platform.Platform | None = None,
                    split: bool = False) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and its parameters as sharded ShapeDtypeStructs (no memory), in the
    form the engine runs them on `target` (default: the host); `split`: one buffer per layer."""
    graphdef, state = nnx.split(abstract_model(cfg))
    shardings = param_shardings(cfg, mesh)
    sharded = mesh is not None and mesh.size > 1
    stored = jax.eval_shape(lambda s: storage_params(cfg, s, split, platform=target, sharded=sharded), state)
    flat = nnx.to_flat_state(stored)
    place = lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)

    def place_weight(w, sh):
        if isinstance(w, SplitWeight):  # each layer's buffer sharded as the stack
            return dataclasses.replace(w, parts=tuple(place_weight(x, sh) for x in w.parts))
        if quantize.is_int8(w):
            return dataclasses.replace(w, q=place(w.q, sh.q), scale=place(w.scale, sh.scale))
        return place(w, sh)

    return graphdef, nnx.from_flat_state({p: v.replace(place_weight(v.get_value(), shardings[p])) for p, v in flat})


def abstract_state(cfg: LlamaConfig, slots: int, max_len: int, shardings: DecodeState,
                   target: platform.Platform | None = None) -> DecodeState:
    """The decode state as sharded ShapeDtypeStructs (in `target`'s storage form)."""
    shapes = jax.eval_shape(lambda: empty_state(cfg, slots, max_len, platform=target))
    return jax.tree.map(lambda sh, s: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), s),
                        shardings, shapes)


def _rows_params(rows: int, sharding) -> sampling.SamplingParams:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((rows, *np.shape(a)), np.asarray(a).dtype, sharding=sharding),
                        sampling.make_params(seed=0))


def compile_programs(cfg: LlamaConfig, config: EngineConfig, mesh: Mesh | None = None,
                     progress: Callable[[str, float], None] | None = None,
                     select: Callable[[str, dict], bool] | None = None) -> list[Compiled]:
    """AOT-compile every serving program (or those `select(kind, shape)` picks) for
    `config.platform` (default: the host) from abstract shapes. A target's abstract devices
    need a `mesh` over them (`target_mesh`)."""
    max_len = min(config.max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
    target = platform.resolve(config.platform)
    split = layers.split_layers(cfg, target) if config.split_layers is None else config.split_layers  # the engine's
    graphdef, params = abstract_params(cfg, mesh, target, split)
    programs = Programs.build(graphdef, cfg, config, mesh)
    state = abstract_state(cfg, config.max_slots, max_len, programs.shardings, target)
    rep = programs.shardings.tokens  # replicated over the mesh (None without one)
    options = DEVICELESS_OPTIONS if target.target else None
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rep)
    words = bitmask.words(cfg.vocab_size)
    on_device = step_masks.mode(config.mask_upload, target.cpu) == "rows"  # a step's masks: the whole device table
    allowed = lambda rows: i32(config.max_slots if on_device else rows, words)
    lowered = []
    for kind, shape in program_shapes(config, max_len):
        if select is not None and not select(kind, shape):
            continue
        if kind == "prefill":
            r, t = shape["rows"], shape["bucket"]
            mask = jax.ShapeDtypeStruct((r, cfg.vocab_size), jnp.bool_, sharding=rep)
            lowered.append((f"prefill {r} x {t}" + (" (suffix)" if shape.get("suffix") else ""), programs.prefill.lower(
                params, state, i32(r, t), i32(r), i32(r), i32(r), _rows_params(r, rep), mask,
                i32(r, words), suffix=shape.get("suffix"))))
        elif kind == "copy":
            lowered.append(("slot copy", programs.copy.lower(state, i32(), i32())))
        elif kind == "swap":
            lowered.append(("slot swap", programs.swap.lower(state, i32(), i32())))
        elif kind == "put_masks":
            lowered.append((f"mask upload {shape['rows']} rows", programs.put_masks.lower(
                i32(config.max_slots, words), i32(shape["rows"]), i32(shape["rows"], words))))
        elif kind == "verify":
            k = config.speculative.tokens
            lowered.append((f"verify {shape['rows']} slots x {k + 1} tokens", programs.verify.lower(
                params, state, i32(config.max_slots, k), i32(config.max_slots), allowed(shape["rows"]), rows=shape["rows"])))
        elif kind == "decode":
            lowered.append((f"decode {shape['rows']} slots", programs.decode.lower(params, state, rows=shape["rows"])))
        else:
            r = shape["rows"]
            logits = jax.ShapeDtypeStruct((r, cfg.vocab_size), jnp.float32, sharding=rep)
            lowered.append((f"sample {r} slots" + (" (greedy)" if shape.get("greedy") else ""), programs.sample.lower(
                state, logits, allowed(r), rows=r, greedy=shape.get("greedy"))))

    report = (lambda done, total, name, seconds: progress(name, seconds)) if progress else None
    built = compile_in_threads(lowered, progress=report, **(options or {}))
    return [Compiled(name, *built[name]) for name, _ in lowered]


def slot_bytes(cfg: LlamaConfig, max_len: int, tp_kv: int) -> int:
    """Per-device bytes one decode slot adds: its keys and values, plus its sampler row and grammar mask row."""
    kv = 2 * cfg.n_layers * (cfg.n_kv_heads // tp_kv) * max_len * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    return kv + cfg.vocab_size * (4 + 1) + 4 * bitmask.words(cfg.vocab_size) + 64


# Without a device XLA cannot size CUB's radix-sort scratch: a sampler sort it hands to CUB then
# fails to compile ("cudaErrorInvalidDevice", seen at tp > 1), so target compiles keep XLA's own sort.
DEVICELESS_OPTIONS = {"xla_gpu_enable_cub_radix_sort": False}


def target_mesh(devices: list[jax.Device]) -> Mesh:
    """The ("tp",) mesh over a target's abstract devices (`platform.target`), even at tp 1: the
    programs' shapes must name the target's devices to be compiled for them."""
    return make_mesh(len(devices), devices)


def plan(cfg: LlamaConfig, config: EngineConfig, mesh: Mesh | None = None, memory: int | None = None,
         progress: Callable[[str, float], None] | None = None,
         select: Callable[[str, dict], bool] | None = None) -> dict:
    """What serving this model with this config needs per device on `config.platform`, and how
    many slots fit `memory`. Weights and KV cache come from the shardings of the full shapes;
    temporaries and kernels from the programs compiled (all, or those `select` picks).

    Returns `{"platform", "device_kind", "programs", "compile_s", "devices", "per_device_bytes":
    {"weights", "kv_cache", "temp"}, "memory", "max_slots_that_fit", "kernels", "per_program":
    {name: {"compile_s", "temp", "alias", "kernels", "conditionals", "dynamic_whiles", "copy_bytes"}}}`
    (`host_sync_ops`, and the bytes `copies` writes per run); `max_slots_that_fit` is None without `memory`.
    """
    max_len = min(config.max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
    target = platform.resolve(config.platform)
    compiled = compile_programs(cfg, config, mesh, progress, select)
    _, params = abstract_params(cfg, mesh, target=target)
    state = abstract_state(cfg, config.max_slots, max_len, decode_state_shardings(cfg, mesh), target)
    weights = per_device_bytes(params)
    kv = per_device_bytes((state.cache.k, state.cache.v))
    temp = max(c.memory.temp_size_in_bytes for c in compiled)
    tp = 1 if mesh is None else mesh.size
    tp_kv = tp if cfg.n_kv_heads % tp == 0 else 1
    fit = None
    if memory is not None:
        fit = max(0, int((memory - weights - temp) // slot_bytes(cfg, max_len, tp_kv)))
    per_program = {c.name: {"compile_s": round(c.seconds, 2), "temp": c.memory.temp_size_in_bytes,
                            "alias": c.memory.alias_size_in_bytes, "kernels": c.kernels, **c.host_syncs,
                            "copy_bytes": c.copies["bytes"]}
                   for c in compiled}
    return {
        "platform": target.name,
        "device_kind": target.device_kind,
        "programs": len(compiled),
        "compile_s": round(sum(c.seconds for c in compiled), 2),
        "devices": tp,
        "per_device_bytes": {"weights": weights, "kv_cache": kv, "temp": temp},
        "memory": memory,
        "max_slots_that_fit": fit,
        "kernels": sorted({k for p in per_program.values() for k in p["kernels"]}),
        "per_program": per_program,
    }


def device_memory_free(device: jax.Device | None = None) -> int | None:
    """Bytes still free for this process on a device: the allocator's limit minus its use on an
    accelerator, the host's available memory on CPU (None where neither can be read)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '512MiB', '1.5T' or a plain byte count -> bytes."""
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
             "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in units or not num:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 80GiB, 24GB, 512MiB)")
    return int(float(num) * units[unit])


MAX_AUTO_SLOTS = 256


def auto_slots(cfg: LlamaConfig, max_seq_len: int | None, mesh: Mesh | None,
               free: int | None = None) -> tuple[int, dict | None]:
    """How many decode slots fit the device's free memory (weights already loaded): the largest
    programs' temporaries at 8 slots come off the top (less 5% headroom for the allocator), then
    each slot costs its KV and sampler row. Returns (slots, the numbers it used, or None when
    the free memory cannot be read and the default of 8 is kept)."""
    max_len = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
    free = device_memory_free() if free is None else free
    if free is None:
        return 8, None
    probe = EngineConfig(max_slots=8, max_seq_len=max_len)
    largest = lambda kind, shape: shape == ({"rows": 1, "bucket": max_len} if kind == "prefill" else {"rows": 8})
    temp = max(c.memory.temp_size_in_bytes for c in compile_programs(cfg, probe, mesh, select=largest))
    tp = 1 if mesh is None else mesh.size
    per_slot = slot_bytes(cfg, max_len, tp if cfg.n_kv_heads % tp == 0 else 1)
    slots = max(1, min(int((free * 0.95 - temp) // per_slot), MAX_AUTO_SLOTS))
    return slots, {"free": free, "temp": temp, "per_slot": per_slot, "max_len": max_len}
