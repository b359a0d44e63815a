"""The one script run when a GPU is lent: random bf16 Llama-2-7B weights built on the device, the
real engine warmed up, and one table of what matters, within 10 minutes from a cold start.

    PYTHONUNBUFFERED=1 python tools/gpu_check.py                     # on an H200, 7B bf16
    PYTHONUNBUFFERED=1 python tools/gpu_check.py --slots 32 --concurrency 8 32   # an H100 (64 slots' KV would not fit)
    python tools/gpu_check.py --preset tiny-gqa --max-seq-len 256    # the same path on CPU (tests)
    PYTHONUNBUFFERED=1 python tools/gpu_check.py --quantize int8     # 7B with int8 weights (goal: >= 520 tok/s on an H200)

Needs only jax/flax/orbax/safetensors/sentencepiece (the GPU image): no Litestar, no torch, no
weights on disk; the Llama 2 tokenizer.model (`--tokenizer`, default ../shared's) and, for the
real SmolLM2 check, `gguf` and the GGUF (over one device call's 64 MiB: it went in two parts over
two calls in the first GPU run, docs/benchmarks.md). Ran on an H200 on 2026-12-04: about 3.5
minutes for 7B bf16 with a cold compilation cache. Steps, each printed as it ends:
0. the custom kernels `llama-jax plan --target` lists (compiled without the device for the
   matching target, h100/h200) must be the ones this device's own compile puts into the same
   programs (the longest prefill, the widest decode); on other devices the expectation is the
   platform's attention choice (on CPU: none); on a GPU neither program may hold a conditional
   or a loop of unknown trip count (each waits on the host: `no_host_syncs_ok`);
1. the kernels checked against the XLA path on this device (Pallas decode, cuDNN prefill);
   a kernel that fails or disagrees is reported and the engine falls back to XLA for it;
1b. logits on this device (its kernels) against the CPU's XLA paths, both in the model's dtype
   (what differs is the backend, not the precision), for the real SmolLM2-135M-Instruct and a
   random model of the preset's shape with 2 layers;
2. random weights on the device and a measured device copy bandwidth (the decode ceiling is
   weight bytes / bandwidth);
3. warm-up of every serving program, per program, with the persistent compilation cache;
4. batch-1 decode tok/s (raw steps, and % of the ceiling), TTFT at 128 and 1024 tokens (and at
   1024 with 896 of them in the prefix cache: a chat's next turn), aggregate tok/s at 8 and 64
   concurrent requests of `--context` tokens, what one constrained request (a JSON schema, a
   counted regex) adds to a step at 1, 8 and all busy slots (its mask is built while the forward
   runs; needs llguidance), the host time of the grammar masks' two ways to the device
   (tools/bench_mask_upload.py), peak device memory.
A failed check (steps 0 and 1b) is reported, the run goes on, and the script exits 1 at the end.
With `--quantize int8` the weights are int8 with block scales (quantized on the device) and
step 2 also compiles the batch-1 decode program with int8 and with float weights and compares
their temporaries (`int8_fusion_check`): no matrix dequantized whole means the dequantization
happens inside the dot (the Pallas kernel on GPU).
Writes the table as JSON to `--out` (default $OUT/gpu_check.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import bench_mask_upload  # noqa: E402
from bench_engine import prompt, run_concurrent, ttft  # noqa: E402
from llama_jax import attention, platform  # noqa: E402
from llama_jax.attention import AttentionConfig  # noqa: E402
from llama_jax.config import preset  # noqa: E402
from llama_jax.compiles import enable_compilation_cache  # noqa: E402
from llama_jax.engine import Engine, EngineConfig  # noqa: E402
from llama_jax.kv_cache import init_cache  # noqa: E402
from llama_jax.model import abstract_model, init_model  # noqa: E402
from llama_jax.platform import Platform  # noqa: E402
from llama_jax.request import Request  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMOLLM2_GGUF = SHARED / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA2_TOKENIZER = SHARED / "llama2-tokenizer" / "tokenizer.model"
LOGIT_TEXT = ("The Apache License, Version 2.0, lets anyone use, modify and distribute the work, provided that "
              "they keep the copyright notices and state the changes they made. Paris is the capital of France.")
LOGIT_TOKENS = 64
MAX_REL_DIFF, MIN_TOP1 = 0.05, 0.9  # device vs CPU, same dtype: max |diff| / max |logit|, argmax agreement


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def target_of(host: Platform) -> str | None:
    """The shipped target config (`platform.TARGETS`) matching this device, if any."""
    kind = host.device_kind.lower()
    return next((name for name in platform.TARGETS if not host.cpu and name in kind), None)


def check_planned_kernels(cfg, config: EngineConfig, host: Platform) -> dict:
    """Step 0: the custom kernels per program that `plan --target` lists (compiled without a
    device) against those this device's compile puts in, for the longest prefill and the widest
    decode. Without a matching target the expectation is the platform's attention choice. On a
    GPU also that neither program has control flow that waits on the host (`plan.host_sync_ops`)."""
    from llama_jax import plan

    max_len = min(config.max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
    largest = lambda kind, shape: (kind in ("prefill", "decode") and not shape.get("suffix")  # a GPU's fresh prefill
                                   # (its suffix one has no kernel), the forward of a decode step (its sampling has none)
                                   and {k: v for k, v in shape.items() if k != "suffix"} in
                                   ({"rows": 1, "bucket": max_len}, {"rows": config.max_slots}))
    plain = dataclasses.replace(config, attention=None)
    device_programs = plan.compile_programs(cfg, plain, select=largest)
    on_device = {c.name: c.kernels for c in device_programs}
    syncs = {} if host.cpu else {"device_host_syncs": {c.name: c.host_syncs for c in device_programs},
                                 "no_host_syncs_ok": all(not any(c.host_syncs.values()) for c in device_programs)}
    name, planned = target_of(host), None
    if name:
        try:
            target, devices = platform.target(name)
            compiled = plan.compile_programs(cfg, dataclasses.replace(plain, platform=target), plan.target_mesh(devices),
                                             select=largest)
            planned = {c.name: c.kernels for c in compiled}
        except Exception as e:  # noqa: BLE001 - reported; the expectation falls back to the platform's choice
            say(f"plan --target {name} failed here ({type(e).__name__}: {str(e)[:300]})")
    if planned is None:
        choice = attention.choose(host, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dtype).kernels
        planned = {n: [k for k in choice if k.startswith("cudnn" if n.startswith("prefill") else "triton")]
                   for n in on_device}
    ok = planned == on_device
    say(f"planned kernels ({name or 'this platform'}): {planned}; compiled on the device: {on_device}: "
        f"{'the same' if ok else 'DIFFERENT'}")
    return {"planned_kernels": planned, "device_kernels": on_device, "planned_target": name, "kernels_as_planned": ok,
            **syncs}


def _logits(cfg, params, tokens: np.ndarray, device, on: Platform, attn: AttentionConfig) -> np.ndarray:
    """Prefill logits `[T, vocab]` of one prompt, computed on `device` (the platform `on`)."""
    graphdef = nnx.split(abstract_model(cfg))[0]
    params = jax.device_put(params, device)
    with jax.default_device(device):
        cache = init_cache(cfg, 1, len(tokens), platform=on)
        run = jax.jit(lambda p, c, t: nnx.merge(graphdef, p).prefill(t, jnp.arange(t.shape[1])[None], c, attn=attn)[0])
        return np.asarray(run(params, cache, jnp.asarray(tokens[None], jnp.int32))[0], np.float32)


def compare_logits(label: str, cfg, params_f32, tokens: np.ndarray, host: Platform, attn: AttentionConfig,
                   strict_top1: bool) -> dict:
    """Logits on this device with its kernels against XLA on the CPU, both in `cfg.dtype`."""
    cpu = jax.devices("cpu")[0]
    tokens = np.resize(tokens, LOGIT_TOKENS)  # a bucket's length (the text repeated to fill it)
    cast = jax.tree.map(lambda a: a.astype(cfg.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params_f32)
    want = _logits(cfg, cast, tokens, cpu, Platform(kind="cpu", device_kind="cpu"), AttentionConfig())
    got = _logits(cfg, cast, tokens, jax.devices()[0], host, dataclasses.replace(attn, mesh=None))
    rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    top1 = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    ok = rel < MAX_REL_DIFF and (top1 >= MIN_TOP1 or not strict_top1)
    say(f"logits {label}: {len(tokens)} tokens in {cfg.dtype}, device vs CPU: max |diff| / max |logit| = "
        f"{rel:.2e}, argmax agreement {top1:.2f}: {'ok' if ok else 'FAILED'}")
    return {f"logits_{label}_rel_max_diff": round(rel, 5), f"logits_{label}_top1": round(top1, 3), f"logits_{label}_ok": ok}


def check_logits(cfg, host: Platform, attn: AttentionConfig, smollm2: Path) -> dict:
    """Step 1b: the real SmolLM2 (where its GGUF and `gguf` are here) and a random model of the
    preset's shape with 2 layers (argmax not asserted there: random logits are near ties)."""
    out: dict = {}
    if smollm2.exists():
        try:
            from llama_jax.gguf_checkpoint import load_gguf_model, open_reader
            from llama_jax.gguf_vocab import tokenizer_from_gguf

            with jax.default_device(jax.devices("cpu")[0]):  # dequantized in float32, read straight from the file
                model = load_gguf_model(smollm2, "float32")
            tokens = np.array(tokenizer_from_gguf(open_reader(smollm2)).encode(LOGIT_TEXT).ids)
            params = jax.device_get(nnx.split(model)[1])
            out.update(compare_logits("smollm2", model.cfg.replace(dtype=cfg.dtype), params, tokens, host, attn, True))
        except ImportError as e:
            say(f"logits smollm2: skipped ({e})")
            out["logits_smollm2_skipped"] = str(e)
        except Exception as e:  # noqa: BLE001 - a failed check, reported; the run goes on
            say(f"logits smollm2: FAILED ({type(e).__name__}: {str(e)[:300]})")
            out["logits_smollm2_ok"] = False
    else:
        say(f"logits smollm2: skipped (no GGUF at {smollm2})")
        out["logits_smollm2_skipped"] = f"no GGUF at {smollm2}"
    shaped = cfg.replace(n_layers=2, quantization=None)
    with jax.default_device(jax.devices("cpu")[0]):
        params = jax.device_get(nnx.split(init_model(shaped.replace(dtype="float32"), seed=1))[1])
    tokens = np.random.default_rng(0).integers(3, shaped.vocab_size, LOGIT_TOKENS)
    try:
        out.update(compare_logits("random_2_layers", shaped, params, tokens, host, attn, False))
    except Exception as e:  # noqa: BLE001
        say(f"logits random_2_layers: FAILED ({type(e).__name__}: {str(e)[:300]})")
        out["logits_random_2_layers_ok"] = False
    return out


def check_kernels(host: Platform, cfg, slots: int, max_len: int) -> AttentionConfig:
    """Run the platform's kernels next to the XLA path, decode on a cache of the engine's own
    size (large offsets included: the last layer and slot); keep the kernels that agree."""
    chosen = attention.choose(host, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dtype)
    interpret = host.cpu  # the Pallas kernel runs interpreted on CPU: same code, slow
    h, kv, d, layers = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 2  # 2 layers: the XLA reference transposes it whole
    b = min(4, slots)
    keys = jax.random.split(jax.random.key(0), 3)
    shape = (layers, slots, kv, max_len, d)
    q = jax.random.normal(keys[0], (b, h, d), jnp.bfloat16)
    k = jax.jit(lambda key: jax.random.normal(key, shape, jnp.bfloat16))(keys[1])
    v = jax.jit(lambda key: jax.random.normal(key, shape, jnp.bfloat16))(keys[2])
    lengths = jnp.array([1, max_len // 3, max_len - 7, max_len][-b:], jnp.int32)
    last = jnp.int32(layers - 1)
    want = jax.jit(lambda *a: attention.decode_attention(*a, AttentionConfig()))(q, k, v, last, lengths)
    decode = "xla"
    try:
        pallas = dataclasses.replace(chosen, decode="pallas", interpret=interpret)
        got = jax.jit(lambda *a: attention.decode_attention(*a, pallas))(q, k, v, last, lengths)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
        say(f"kernel check: Pallas decode attention max |diff| vs XLA = {err:.2e}")
        decode = "pallas" if err < 3e-2 else "xla"
    except Exception as e:  # noqa: BLE001 - report, then serve with the XLA path
        say(f"kernel check: Pallas decode attention FAILED ({type(e).__name__}: {str(e)[:300]}): using XLA")
    del k, v
    rng = np.random.default_rng(0)
    prefill = "xla"
    if chosen.prefill == "cudnn":
        t = 256
        qp = jnp.asarray(rng.normal(size=(2, t, h, d)), jnp.bfloat16)
        kp = jnp.asarray(rng.normal(size=(2, t, kv, d)), jnp.bfloat16)
        vp = jnp.asarray(rng.normal(size=(2, t, kv, d)), jnp.bfloat16)
        plens = jnp.array([t, 77], jnp.int32)
        ref = attention.prefill_attention(qp, kp, vp, plens, AttentionConfig())
        try:
            got = jax.jit(lambda *a: attention.prefill_attention(*a, AttentionConfig(prefill="cudnn")))(qp, kp, vp, plens)
            valid = (jnp.arange(t)[None, :] < plens[:, None])[..., None, None]
            err = float(jnp.max(jnp.where(valid, jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32)), 0)))
            say(f"kernel check: cuDNN prefill attention max |diff| vs XLA = {err:.2e}")
            prefill = "cudnn" if err < 3e-2 else "xla"
        except Exception as e:  # noqa: BLE001
            say(f"kernel check: cuDNN prefill attention FAILED ({type(e).__name__}: {str(e)[:300]}): using XLA")
    if host.cpu:  # checked interpreted; the engine keeps the CPU's own XLA paths
        return chosen
    return dataclasses.replace(chosen, decode=decode, prefill=prefill)


def random_params(cfg, seed: int = 0) -> nnx.State:
    """Random weights created on the device by one jitted program (nothing on the host)."""
    return jax.jit(lambda: nnx.split(init_model(cfg, seed))[1])()


def copy_bandwidth(nbytes: int = 2 << 30, iters: int = 10) -> float:
    """Device memory bandwidth in bytes/s from timing a large copy (read + write)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    f(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(iters):
        y = f(x)
    y.block_until_ready()
    seconds = (time.perf_counter() - start) / iters
    del x, y
    return 2 * nbytes / seconds


def decode_steps(engine: Engine, rows: int, context: int, steps: int = 64) -> float:
    """Seconds per raw decode step (forward and sampling) at `rows` busy slots holding `context` tokens."""
    state = engine._state
    engine._state = dataclasses.replace(state, cache=state.cache.replace(lengths=state.cache.lengths.at[:rows].set(context)))
    for i in range(steps + 3):
        if i == 3:
            jax.block_until_ready(engine._state)
            start = time.perf_counter()
        engine._state, logits = engine._decode(engine.params, engine._state, rows=rows)
        engine._state, result = engine._sample(engine._state, logits, engine.masks.example(rows), rows=rows, greedy=None)
    result.block_until_ready()
    seconds = (time.perf_counter() - start) / steps
    engine._state = engine._reset(engine._state)
    engine.prefix.forget()  # the lengths are zero again: no slot holds what its record says
    return seconds


def constrained_cost(engine: Engine, tokenizer, vocab: int, tokens: int, slots: int) -> dict:
    """What one constrained request (llguidance's mask every step) adds to a decode step at 1, 8 and all busy slots,
    greedy, EOS ignored, for a JSON schema (a mask of ~5 us) and a counted regex (~140 us: bench_host.py): its mask
    is built while the step's forward runs, so on a GPU it should add next to nothing (issue 30's goal: <= 10 %).
    Skipped without llguidance."""
    from bench_host import grammars, run

    try:
        constraints = grammars(tokenizer)
    except ImportError as e:  # llguidance is not in every GPU image
        say(f"constrained decode: skipped ({e})")
        return {"constrained_skipped": str(e)}
    out = {}
    adds = lambda constrained, plain: 100 * (constrained.wall / constrained.steps / (plain.wall / plain.steps) - 1)
    for busy in sorted({b for b in (1, 8, slots) if b <= slots}):
        plain = run(engine, busy, tokens)
        for name, grammar in constraints.items():
            out[f"{name}_adds_pct_{busy}"] = round(adds(run(engine, busy, tokens, grammar.factory(tokens, vocab)), plain), 1)
            say(f"{busy} busy slots, one of them constrained ({name}): a step takes {out[f'{name}_adds_pct_{busy}']:+.1f} % "
                f"({1000 * plain.wall / plain.steps:.2f} ms plain, masks uploaded: {engine.masks.upload})")
    return out


def int8_fusion_check(cfg, config: EngineConfig, host: Platform) -> dict:
    """Compile the batch-1 decode program ahead of time with int8 and with float weights (no
    memory) and compare their temporaries: had a matrix been dequantized whole, the int8 program
    would need at least one float copy of the smallest layer matrix more than the float one. On a
    GPU for this device; on a CPU host for the H200 target without a device (the CPU's own path
    dequantizes small matrices whole by design, see quantize.linear)."""
    from llama_jax import plan
    from llama_jax.model import weight_specs

    one_row = lambda kind, shape: kind == "decode" and shape == {"rows": 1}
    mesh, name = None, target_of(host) if not host.cpu else "h200"
    if host.cpu:
        target, devices = platform.target(name)
        config, mesh = dataclasses.replace(config, platform=target), plan.target_mesh(devices)
    (int8,) = plan.compile_programs(cfg, config, mesh, select=one_row)
    (flt,) = plan.compile_programs(cfg.replace(quantization=None), config, mesh, select=one_row)
    extra = int8.memory.temp_size_in_bytes - flt.memory.temp_size_in_bytes
    smallest = min(int(np.prod(s.tensor_shape)) for s in weight_specs(cfg).values() if len(s.tensor_shape) == 2)
    matrix = smallest * jnp.dtype(cfg.dtype).itemsize
    ok = extra < matrix
    say(f"int8 decode temporaries ({name or host.name}) {int8.memory.temp_size_in_bytes / 2**20:.1f} MiB vs "
        f"{flt.memory.temp_size_in_bytes / 2**20:.1f} MiB with {cfg.dtype} weights; one {cfg.dtype} copy of the smallest "
        f"matrix is {matrix / 2**20:.1f} MiB: {'no matrix dequantized whole' if ok else 'A MATRIX MAY BE DEQUANTIZED WHOLE'}")
    return {"int8_decode_temp_mib": round(int8.memory.temp_size_in_bytes / 2**20, 2),
            "float_decode_temp_mib": round(flt.memory.temp_size_in_bytes / 2**20, 2), "int8_check_target": name,
            "int8_kernels": int8.kernels, "smallest_matrix_mib": round(matrix / 2**20, 2),
            "int8_no_whole_matrix_copy": bool(ok)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", choices=["int8"], default=None, help="int8 weights, one scale per block of 32 inputs")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--context", type=int, default=1024, help="tokens of context per concurrent request")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--mask-upload", choices=["batch", "rows"], default=None,
                    help="how grammar masks reach the device (step_masks.py; default: the platform's)")
    ap.add_argument("--tokenizer", type=Path, default=LLAMA2_TOKENIZER, help="the Llama 2 tokenizer.model")
    ap.add_argument("--smollm2", type=Path, default=SMOLLM2_GGUF, help="the real SmolLM2 GGUF (step 1b)")
    ap.add_argument("--compilation-cache", default=str(Path(__file__).resolve().parents[1] / ".jax_cache"))
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    args = ap.parse_args(argv)

    enable_compilation_cache(args.compilation_cache)
    device = jax.devices()[0]
    host = platform.host()
    cfg = preset(args.preset).replace(dtype=args.dtype, quantization=args.quantize)
    result: dict = {"device": host.device_kind, "jax": jax.__version__,
                    "preset": args.preset, "dtype": cfg.dtype, "quantization": cfg.quantization,
                    "date": time.strftime("%Y-%m-%d")}
    say(f"{result['device']} ({host.kind}), jax {jax.__version__}, {args.preset} {cfg.dtype}")
    t0 = time.perf_counter()
    max_len = min(args.max_seq_len, cfg.max_seq_len)
    shape = dict(max_slots=args.slots, max_seq_len=max_len, min_prefill_bucket=128, max_prefill_tokens=1024,
                 max_queue=max(64, 2 * args.slots), mask_upload=args.mask_upload)
    result.update(check_planned_kernels(cfg, EngineConfig(**shape), host))
    attn = check_kernels(host, cfg, args.slots, max_len)
    result["kernels"] = {"decode": attn.decode, "prefill": attn.prefill}
    result.update(check_logits(cfg, host, attn, args.smollm2))

    params = random_params(cfg)
    jax.block_until_ready(params)
    weight_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
    bandwidth = copy_bandwidth(min(2 << 30, max(weight_bytes, 1 << 24)))
    result.update(weight_gb=round(weight_bytes / 1e9, 2), copy_bandwidth_gb_s=round(bandwidth / 1e9, 1))
    say(f"weights {weight_bytes / 1e9:.2f} GB on the device; copy bandwidth {bandwidth / 1e9:.0f} GB/s")

    from llama_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer(args.tokenizer)
    model = nnx.merge(nnx.split(abstract_model(cfg))[0], params)
    config = EngineConfig(**shape, attention=attn)
    if cfg.quantization:
        result.update(int8_fusion_check(cfg, config, host))
    engine = Engine(model, tokenizer, config)
    per_program = []
    start = time.perf_counter()

    def progress(done: int, total: int, what: str, seconds: float) -> None:  # compiled several at once
        per_program.append((what, round(seconds, 2)))
        say(f"warm-up {done}/{total}: {what} ({seconds:.1f} s; {time.perf_counter() - start:.1f} s in all)")

    engine.start(progress=progress)
    result.update(programs=len(per_program), warmup_s=round(time.perf_counter() - start, 1),
                  warmup_per_program_s=dict(per_program))
    try:
        rng = np.random.default_rng(0)
        step = decode_steps(engine, 1, 128)
        ceiling = bandwidth / weight_bytes
        result.update(batch1_step_ms=round(1000 * step, 3), batch1_decode_tok_s=round(1 / step, 1),
                      ceiling_tok_s=round(ceiling, 1), pct_of_ceiling=round(100 / step / ceiling, 1))
        say(f"batch 1 decode: {1 / step:.1f} tok/s ({100 / step / ceiling:.0f}% of {ceiling:.0f} tok/s ceiling)")
        wall, n = run_concurrent(engine, [prompt(rng, 128)], args.decode_tokens)
        result["batch1_engine_tok_s"] = round(n / wall, 1)
        for length in (128, 1024):
            if length < config.max_seq_len:
                times = [ttft(engine, prompt(rng, length)) for _ in range(5)]
                result[f"ttft_ms_{length}"] = round(1000 * statistics.median(times), 1)
                say(f"TTFT at {length} tokens: {result[f'ttft_ms_{length}']} ms")
        total = min(1024, config.max_seq_len // 2)  # the next turn of a chat: 7/8 of the prompt cached
        base, times = prompt(rng, total * 7 // 8), []
        for i in range(6):
            start = time.perf_counter()
            handle = engine.submit(Request(prompt=base + prompt(rng, total // 8 + 1)[1:], max_tokens=1, stop_token_ids=[]))
            next(iter(handle))
            times.append(time.perf_counter() - start)
            handle.result()
        key = f"ttft_ms_{total}_prefix_cached_{len(base)}"
        result.update({key: round(1000 * statistics.median(times[1:]), 1), "prefix_cached_tokens": handle.cached_tokens})
        say(f"TTFT at {total} tokens, {handle.cached_tokens} of them cached: {result[key]} ms")
        context = min(args.context, config.max_seq_len - args.decode_tokens)
        for c in args.concurrency:
            if c <= args.slots:
                wall, n = run_concurrent(engine, [prompt(rng, context) for _ in range(c)], args.decode_tokens)
                result[f"aggregate_tok_s_{c}"] = round(n / wall, 1)
                result[f"step_ms_{c}x{context}"] = round(1000 * decode_steps(engine, c, context), 2)
                say(f"{c} concurrent x {context} tokens: {result[f'aggregate_tok_s_{c}']} tok/s "
                    f"(raw step {result[f'step_ms_{c}x{context}']} ms)")
        result.update(constrained_cost(engine, tokenizer, cfg.vocab_size, args.decode_tokens, args.slots))
        result.update(bench_mask_upload.compare(args.slots, cfg.vocab_size, calls=200))  # step_masks.py's two modes
        say("grammar masks, host us a step (p10, median): " + ", ".join(f"{k[15:]} {v}" for k, v in result.items()
                                                                         if k.startswith("mask_upload_us_")))
    finally:
        engine.stop()
    stats = device.memory_stats() or {}
    result["peak_device_gb"] = round(stats.get("peak_bytes_in_use", 0) / 1e9, 2) if stats else None
    result["total_s"] = round(time.perf_counter() - t0, 1)
    table = [(k, v) for k, v in result.items() if k != "warmup_per_program_s"]
    width = max(len(k) for k, _ in table)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in table), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


def failed_checks(result: dict) -> list[str]:
    """The checks of a result that did not pass (planned kernels, logits)."""
    return [k for k, v in result.items() if (k == "kernels_as_planned" or k.endswith("_ok")) and v is not True]


if __name__ == "__main__":
    failed = failed_checks(main())
    if failed:
        say(f"FAILED: {', '.join(failed)}")
    sys.exit(1 if failed else 0)
