"""Tensor parallelism: the device mesh, the one table of partition rules, and placement helpers.

Megatron-style tensor parallelism over a 1-D mesh axis "tp":

* column-parallel q/k/v/gate/up: their output dimension ("heads", "kv_heads", "ffn") is split;
* row-parallel o/down: their input dimension ("heads", "ffn") is split, XLA adds the all-reduce;
* the LM head is vocab-parallel (its "vocab" rows are split); the embedding table is split along
  its columns ("table_embed"), so a token lookup is local and only the looked-up rows are gathered;
* norms, the stacked "layers" axis and the "embed" dimension everywhere else are replicated.

Every weight's logical axes come from `model.weight_specs`; `LOGICAL_AXIS_RULES` maps them to mesh
axes. That dict is the only place the partitioning is decided.

KV heads and tp: when `n_kv_heads` is not a multiple of tp (e.g. tiny-gqa's 2 KV heads on tp 4,
or Llama 2 70B's 8 on tp 16) the k/v projections and the KV cache are *replicated* on every
device rather than refused: each device then holds all KV heads, which costs k/v-projection
compute and cache memory but gives identical results. Query heads must divide evenly: a tp
that does not divide `n_heads` is refused with `ShardingError`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from llama_jax.config import LlamaConfig
from llama_jax.kv_cache import KVCache
from llama_jax.model import WeightSpec, is_quantized, weight_specs
from llama_jax.quantize import Int8Weight, block_size

TP = "tp"

# Logical axis (from model.weight_specs) -> mesh axis; None means replicated.
LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "vocab": TP,  # vocab-parallel LM head
    "table_embed": TP,  # the embedding table's columns
    "embed": None,  # the residual stream is replicated
    "layers": None,  # stacked layer weights: every device holds its slice of every layer
    "heads": TP,  # column-parallel q, row-parallel o
    "kv_heads": TP,  # column-parallel k/v and the KV cache (replicated when tp does not divide n_kv_heads)
    "ffn": TP,  # column-parallel gate/up, row-parallel down
}


class ShardingError(ValueError):
    """A tensor-parallel degree that this model or this machine cannot use."""


def _units(cfg: LlamaConfig, axis: str) -> int:
    """How many indivisible units a logical axis has (heads are split whole, never mid-head)."""
    return {
        "vocab": cfg.vocab_size,
        "embed": cfg.dim,
        "table_embed": cfg.dim,
        "layers": cfg.n_layers,
        "heads": cfg.n_heads,
        "kv_heads": cfg.n_kv_heads,
        "ffn": cfg.ffn_dim,
    }[axis]


def tp_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape.get(TP, 1))


def check_tp(cfg: LlamaConfig, tp: int, n_devices: int | None = None) -> None:
    """Refuse, with a message saying what would work, a tp this model or machine cannot use."""
    n_devices = len(jax.devices()) if n_devices is None else n_devices
    if tp < 1:
        raise ShardingError(f"--tp must be at least 1, got {tp}")
    if tp > n_devices:
        raise ShardingError(f"--tp {tp} needs {tp} devices but only {n_devices} are visible")
    if cfg.n_heads % tp:
        ok = [d for d in range(1, min(cfg.n_heads, n_devices) + 1) if cfg.n_heads % d == 0]
        raise ShardingError(
            f"--tp {tp} does not divide the model's {cfg.n_heads} attention heads; use one of {ok}"
        )


def kv_heads_replicated(cfg: LlamaConfig, tp: int) -> bool:
    """True when KV heads cannot be split over tp devices and are replicated instead."""
    return cfg.n_kv_heads % tp != 0


def make_mesh(tp: int = 1, devices: list | None = None) -> Mesh:
    """A 1-D ("tp",) mesh over the first `tp` devices with Auto axis types.

    Recent `jax.make_mesh` defaults to Explicit axes, where shardings become part of array types
    and ordinary jnp code can fail to trace; Auto keeps the GSPMD behaviour the model relies on.
    """
    devices = list(jax.devices() if devices is None else devices)
    if tp < 1 or tp > len(devices):
        raise ShardingError(f"--tp {tp} needs {tp} devices but only {len(devices)} are visible")
    devices = devices[:tp]
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:
        try:
            return jax.make_mesh((tp,), (TP,), axis_types=(axis_type.Auto,), devices=devices)
        except TypeError:  # a jax with AxisType but an older make_mesh signature
            pass
    return Mesh(np.array(devices), (TP,))


def partition_spec(cfg: LlamaConfig, axes: tuple[str | None, ...], tp: int) -> PartitionSpec:
    """The PartitionSpec of a tensor with these logical axes: rules, falling back to replication
    for an axis whose unit count tp does not divide (KV heads; vocab or ffn of odd shapes)."""
    out = []
    for axis in axes:
        mesh_axis = LOGICAL_AXIS_RULES.get(axis) if axis is not None else None
        if mesh_axis is not None and (tp == 1 or _units(cfg, axis) % tp):
            mesh_axis = None
        out.append(mesh_axis)
    return PartitionSpec(*out)


def param_shardings(cfg: LlamaConfig, mesh: Mesh | None) -> dict[tuple, Sharding | Int8Weight]:
    """Sharding of every weight, keyed by its NNX state path (as `model.weight_specs`); for an
    int8 weight, an `Int8Weight` of two shardings: the scales split like the weight, their block
    axis like its input axis when each device's share holds whole blocks (else replicated).

    With `mesh=None`: everything on the first device.
    """
    if mesh is not None:
        check_tp(cfg, tp_size(mesh), mesh.size)

    def place(spec: WeightSpec) -> Sharding | Int8Weight:
        if mesh is None:
            one = SingleDeviceSharding(jax.devices()[0])
            return Int8Weight(one, one) if is_quantized(cfg, spec) else one
        tp = tp_size(mesh)
        weight = partition_spec(cfg, spec.axes, tp)
        if not is_quantized(cfg, spec):
            return NamedSharding(mesh, weight)
        cols = spec.shape[-1]
        whole_blocks = weight[-1] is None or (cols // tp) % block_size(cols) == 0
        scale = weight if whole_blocks else PartitionSpec(*weight[:-1], None)
        return Int8Weight(NamedSharding(mesh, weight), NamedSharding(mesh, scale))

    return {path: place(s) for path, s in weight_specs(cfg).items()}


def shard_params(cfg: LlamaConfig, params, mesh: Mesh | None):
    """Place an NNX parameter State (e.g. from `nnx.split(model)`) on the mesh by the rules."""
    from flax import nnx

    shardings = param_shardings(cfg, mesh)
    flat = nnx.to_flat_state(params)
    return nnx.from_flat_state({p: v.replace(jax.device_put(v[...], shardings[p])) for p, v in flat})


def cache_sharding(cfg: LlamaConfig, mesh: Mesh | None) -> KVCache:
    """A KVCache-shaped tree of shardings: `[layers, rows, kv_heads, max_len, head_dim]` buffers
    split on kv_heads over tp (replicated when tp does not divide n_kv_heads), lengths replicated."""
    if mesh is None:
        single = SingleDeviceSharding(jax.devices()[0])
        return KVCache(k=single, v=single, lengths=single)
    heads = TP if tp_size(mesh) > 1 and cfg.n_kv_heads % tp_size(mesh) == 0 else None
    kv = NamedSharding(mesh, PartitionSpec(None, None, heads, None, None))
    return KVCache(k=kv, v=kv, lengths=replicated(mesh))


def replicated(mesh: Mesh | None) -> Sharding:
    """Every device holds the whole array (the first device when there is no mesh)."""
    return SingleDeviceSharding(jax.devices()[0]) if mesh is None else NamedSharding(mesh, PartitionSpec())


def shard_cache(cache: KVCache, cfg: LlamaConfig, mesh: Mesh | None) -> KVCache:
    """Place an existing KV cache on the mesh as `cache_sharding` says (tests, small caches)."""
    return jax.device_put(cache, cache_sharding(cfg, mesh))
