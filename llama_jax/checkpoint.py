"""Converted checkpoints: orbax parameter groups written tensor-group by tensor-group, and restored
straight onto a device mesh.

Layout of a converted directory::

    OUT_DIR/
      manifest.json            format, source, dtype, parameter count, groups (written last)
      config.json              our LlamaConfig (LlamaConfig.to_json)
      tokenizer.model          the SentencePiece model, when the source had one; or
      tokenizer.json, tokenizer_config.json, chat_template.jinja
                               a Hugging Face tokenizer and chat template (copied, or built from a GGUF)
      generation_config.json   copied from the source, when present
      params/<group>/          one orbax checkpoint per group: "embed", "layer_0" … "layer_{N-1}", "head"

An int8 checkpoint (`convert-weights --quantize int8`, see quantize.py) stores each matrix as
`{"q": int8, "scale": float32}` under its key (one scale per block of 32 inputs), records the
scheme in config.json (`quantization`) and in the manifest, and has format version 4, which older
readers refuse. Version 3 (one scale per output channel, before 2026-12-04) is refused with the
command that re-converts it.

Groups keep memory bounded: conversion holds at most one group (one decoder layer, or the
embedding, or norm + LM head) in memory. Each group is a flat dict of string keys; `group_key`
maps each HF tensor (`model.tensors`) to its (group, key).

Loading builds, for every group, an abstract tree of `jax.ShapeDtypeStruct`s carrying the
sharding from `sharding.param_shardings`, so orbax reads each device's shard directly and no
full tensor is ever assembled on one device. The model's stacked layer weights are allocated
already sharded and filled one restored layer at a time, in place: loading never holds more
than the model plus one layer. The whole directory is written under a temporary
name and renamed at the end: an interrupted run leaves nothing that `load` accepts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama_jax import quantize
from llama_jax.config import DTYPES, QUANTIZATIONS, LlamaConfig
from llama_jax.hf_checkpoint import CheckpointError, param_count, state_from_arrays
from llama_jax.model import Tensor, abstract_model, is_quantized, tensors, weight_specs
from llama_jax.quantize import Int8Weight
from llama_jax.sharding import param_shardings

FORMAT = "llama-jax-orbax"
FORMAT_VERSION = 2  # 2: matrices stored [out, in]
QUANTIZED_FORMAT_VERSION = 4  # 4: version 2 with int8 matrices (q, block scales); older readers refuse it
PER_CHANNEL_INT8_VERSION = 3  # int8 with one scale per output channel: refused, re-convert
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # the tokenizer itself, in order of preference
GENERATION_CONFIG_FILE = "generation_config.json"


def group_key(tensor: Tensor) -> tuple[str, str]:
    """(orbax group, key inside the group) of one tensor, e.g. layer 3 of ('layers', 'wq') -> ('layer_3', 'wq')."""
    if tensor.layer is not None:
        return f"layer_{tensor.layer}", tensor.path[-1]
    if tensor.path == ("embed",):
        return "embed", "embed"
    if tensor.path in (("norm",), ("lm_head",)):
        return "head", tensor.path[0]
    raise KeyError(f"no checkpoint group for parameter path {tensor.path}")


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def write_params(
    params_dir: Path,
    weights: Iterable[tuple[Tensor, np.ndarray | Int8Weight]],
    on_tensor: Callable[[Tensor, np.ndarray | Int8Weight], None] | None = None,
) -> list[str]:
    """Write (tensor, array) pairs, in `model.tensors` order, as one orbax checkpoint per group.

    Holds one group at a time. Returns the group names in write order.
    """
    import orbax.checkpoint as ocp

    ckpt = _checkpointer()
    groups: list[str] = []
    current: str | None = None
    items: dict[str, np.ndarray] = {}

    def flush() -> None:
        if current is not None:
            ckpt.save(params_dir / current, args=ocp.args.StandardSave(items))
            groups.append(current)

    for tensor, array in weights:
        group, key = group_key(tensor)
        if group != current:
            flush()
            if group in groups:
                raise ValueError(f"weights of group {group} are not contiguous")
            current, items = group, {}
        array = array if quantize.is_int8(array) else np.asarray(array)
        items[key] = {"q": array.q, "scale": array.scale} if quantize.is_int8(array) else array
        if on_tensor is not None:
            on_tensor(tensor, array)
        del array
    flush()
    return groups


def save(
    out_dir: str | Path,
    cfg: LlamaConfig,
    weights: Iterable[tuple[Tensor, np.ndarray | Int8Weight]],
    *,
    write_tokenizer: Callable[[Path], list[str]] | None = None,
    generation_config: dict | None = None,
    source: str | None = None,
    name: str | None = None,
    force: bool = False,
    on_tensor: Callable[[Tensor, np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """Write a converted checkpoint to `out_dir` atomically; returns the manifest.

    Everything goes to `<out_dir>.tmp-<pid>` first, manifest last, and is renamed into place at the
    end (replacing an existing `out_dir` only with `force`). On any failure, including
    KeyboardInterrupt, the temporary directory is removed. `write_tokenizer(dir)` puts the
    tokenizer and chat-template files beside the weights and returns their names. With
    `cfg.quantization`, every matrix must come as a host `Int8Weight` (numpy q and scale) and
    every norm as an array.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not force:
        raise CheckpointError(f"{out_dir} already exists (pass --force to replace it)")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    start = time.time()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shapes = {group_key(t): t.shape for t in tensors(cfg)}
        seen: set[tuple[str, str]] = set()

        specs = weight_specs(cfg)

        def track(tensor: Tensor, array: np.ndarray | Int8Weight) -> None:
            want = shapes.get(group_key(tensor))
            if tuple(array.shape) != want:
                raise CheckpointError(f"tensor {tensor.hf_name} has shape {array.shape}, expected {want}")
            if quantize.is_int8(array) != is_quantized(cfg, specs[tensor.path]):
                raise CheckpointError(f"tensor {tensor.hf_name}: int8 where the config says otherwise, or the reverse")
            if quantize.is_int8(array) and tuple(array.scale.shape) != quantize.scale_shape(want):
                raise CheckpointError(f"tensor {tensor.hf_name}: scales of shape {array.scale.shape}, expected "
                                      f"{quantize.scale_shape(want)} (one per block of its inputs)")
            seen.add(group_key(tensor))
            if on_tensor is not None:
                on_tensor(tensor, array)

        groups = write_params(tmp / PARAMS_DIR, weights, track)
        if seen != set(shapes):
            raise CheckpointError(f"incomplete parameters: {len(set(shapes) - seen)} missing")
        (tmp / CONFIG_FILE).write_text(cfg.to_json())
        tokenizer_files = write_tokenizer(tmp) if write_tokenizer is not None else []
        if generation_config is not None:
            (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation_config, indent=2))
        manifest = {
            "format": FORMAT,
            "format_version": QUANTIZED_FORMAT_VERSION if cfg.quantization else FORMAT_VERSION,
            "source": source,
            "name": name,  # the model's own name, e.g. the GGUF's or HF directory's, for serving
            "dtype": cfg.dtype,
            "quantization": quantize.MANIFEST_ENTRY if cfg.quantization else None,
            "param_count": param_count(cfg),
            "groups": groups,
            "tokenizer": tokenizer_files or None,
            "bytes": dir_size(tmp),
            "seconds": round(time.time() - start, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        if out.exists() or out.is_symlink():
            if not force:
                raise CheckpointError(f"{out_dir} already exists (pass --force to replace it)")
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a converted directory; CheckpointError if it is not one."""
    path = Path(path).expanduser()
    file = path / MANIFEST_FILE
    if not file.exists():
        hint = " (an HF checkpoint? convert it with `convert-weights`)" if (path / "config.json").exists() else ""
        raise CheckpointError(f"{path} is not a converted checkpoint: no {MANIFEST_FILE}{hint}")
    manifest = json.loads(file.read_text())
    if manifest.get("format") == FORMAT and manifest.get("format_version") == PER_CHANNEL_INT8_VERSION:
        raise CheckpointError(
            f"{path}: an int8 checkpoint with one scale per output channel (format v3, from an older llama-jax), "
            "which this version no longer reads: its blocks of 32 cost far less quality. Convert the source again "
            f"with `convert-weights SOURCE {path} --quantize int8 --force`")
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in (FORMAT_VERSION, QUANTIZED_FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: unknown checkpoint format {manifest.get('format')!r} v{manifest.get('format_version')}"
        )
    return manifest


def read_config(path: str | Path) -> LlamaConfig:
    return LlamaConfig.from_json((Path(path) / CONFIG_FILE).read_text())


@dataclasses.dataclass
class LoadedModel:
    """A restored model: config, the NNX graph definition and (possibly sharded) parameter State."""

    cfg: LlamaConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    mesh: Mesh | None
    path: Path
    tokenizer_path: Path | None
    generation_config: dict | None
    manifest: dict

    @property
    def model(self):
        """The NNX `Llama` with these parameters (arrays shared, not copied)."""
        return nnx.merge(self.graphdef, self.params)


def layer_sharding(stacked: jax.sharding.Sharding | Int8Weight) -> jax.sharding.Sharding | Int8Weight:
    """The sharding of one layer's slice of a stacked weight (the layer axis is never split)."""
    if quantize.is_int8(stacked):
        return Int8Weight(layer_sharding(stacked.q), layer_sharding(stacked.scale))
    if isinstance(stacked, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(stacked.mesh, jax.sharding.PartitionSpec(*stacked.spec[1:]))
    return stacked


def _zeros(shape: tuple[int, ...], dtype: str, sharding) -> jax.Array | Int8Weight:
    """A zero array (or, for an Int8Weight of shardings, zero q and scales) created already
    sharded: no device ever holds more than its own shard."""
    if quantize.is_int8(sharding):
        return Int8Weight(_zeros(shape, "int8", sharding.q), _zeros(quantize.scale_shape(shape), "float32", sharding.scale))
    return jax.jit(lambda: jax.numpy.zeros(shape, dtype), out_shardings=sharding)()


@partial(jax.jit, donate_argnums=0)
def _put_layer(stacked, layer, i: jax.Array):
    """`stacked[i] = layer` for an array or both arrays of an Int8Weight, in place (donated)."""
    return jax.tree.map(lambda s, a: jax.lax.dynamic_update_index_in_dim(s, a.astype(s.dtype), i, axis=0), stacked, layer)


def _target(shape: tuple[int, ...], dtype: str, sharding, int8: bool):
    """What orbax restores one tensor into: an array, or the {"q", "scale"} pair of an int8 one."""
    if int8:
        return {"q": jax.ShapeDtypeStruct(shape, np.int8, sharding=sharding.q),
                "scale": jax.ShapeDtypeStruct(quantize.scale_shape(shape), np.float32, sharding=sharding.scale)}
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.q if quantize.is_int8(sharding) else sharding)


def _quantizer(sharding: Int8Weight):
    """Quantize one restored float matrix on the device, placed as `sharding` says (load time)."""
    return jax.jit(quantize.quantize, out_shardings=sharding)


def load(path: str | Path, mesh: Mesh | None = None, dtype: str | None = None,
         quantization: str | None = None) -> LoadedModel:
    """Restore a converted checkpoint, each parameter placed by `sharding.param_shardings`.

    `mesh=None` puts everything on the first device; a ("tp",) mesh from `sharding.make_mesh`
    shards by the tensor-parallel rules, each device reading only its own slices. `dtype` casts
    on restore (default: the dtype the checkpoint was converted to); int8 matrices stay int8. An
    int8 checkpoint loads as int8 with no flag. `quantization="int8"` quantizes a float
    checkpoint while loading, one group at a time (memory: the int8 model plus one group in
    float32); on an int8 checkpoint it changes nothing.
    """
    import orbax.checkpoint as ocp

    path = Path(path).expanduser()
    manifest = read_manifest(path)
    cfg = read_config(path)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        cfg = cfg.replace(dtype=dtype)
    if (manifest["format_version"] == QUANTIZED_FORMAT_VERSION) != (cfg.quantization is not None):
        raise CheckpointError(f"{path}: manifest and config.json disagree on quantization")
    stored = cfg  # what the files hold
    if quantization is not None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        cfg = cfg.replace(quantization=quantization)
    shardings = param_shardings(cfg, mesh)
    specs = weight_specs(cfg)
    targets: dict[str, dict[str, Any]] = {}
    for t in tensors(cfg):
        group, key = group_key(t)
        sharding = layer_sharding(shardings[t.path]) if t.layer is not None else shardings[t.path]
        int8_on_disk = is_quantized(stored, specs[t.path])
        # a matrix quantized at load is restored in float32, so the scales see the stored values exactly
        dtype_on_disk = "float32" if is_quantized(cfg, specs[t.path]) and not int8_on_disk else cfg.dtype
        targets.setdefault(group, {})[key] = _target(t.shape, dtype_on_disk, sharding, int8_on_disk)
    arrays = {p: _zeros(s.shape, cfg.dtype, shardings[p]) for p, s in specs.items() if s.stacked}
    quantizers = {p: _quantizer(layer_sharding(sh) if specs[p].stacked else sh)
                  for p, sh in shardings.items() if is_quantized(cfg, specs[p]) and not is_quantized(stored, specs[p])}
    ckpt = _checkpointer()
    for group, target in targets.items():
        group_dir = path / PARAMS_DIR / group
        if not group_dir.exists():
            raise CheckpointError(f"{path}: parameter group {group} is missing (incomplete or different model)")
        try:
            restored = ckpt.restore(group_dir, args=ocp.args.StandardRestore(target))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot restore parameter group {group}: {e}") from e
        for key, array in restored.items():
            p = ("layers", key) if group.startswith("layer_") else ("embed",) if key == "embed" else (key,)
            if isinstance(array, dict):
                array = Int8Weight(array["q"], array["scale"])
            elif p in quantizers:
                array = quantizers[p](array)
            if group.startswith("layer_"):
                arrays[p] = _put_layer(arrays[p], array, np.int32(group.removeprefix("layer_")))
            else:
                arrays[p] = array
        del restored
    graphdef, _ = nnx.split(abstract_model(cfg))
    params = state_from_arrays(cfg, arrays)
    tokenizer = next((path / name for name in TOKENIZER_FILES if (path / name).exists()), None)
    gen_file = path / GENERATION_CONFIG_FILE
    return LoadedModel(
        cfg=cfg,
        graphdef=graphdef,
        params=params,
        mesh=mesh,
        path=path,
        tokenizer_path=tokenizer,
        generation_config=json.loads(gen_file.read_text()) if gen_file.exists() else None,
        manifest=manifest,
    )
