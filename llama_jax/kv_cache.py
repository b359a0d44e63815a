"""Static-shape KV cache: keys and values of every layer stacked in one buffer each, every row
written at its own positions.

Every row (a decode slot, or one prompt of a prefill batch) has its own length; attention masks
are built from those lengths, so one row's result never depends on what other rows hold. Shapes
never change, so the steps that use the cache compile once, and the buffers are donated to every
step that writes them: the cache is updated in place, never copied.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig


@partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "lengths"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values `[n_layers, rows, n_kv_heads, max_len, head_dim]` and valid lengths `[rows]`.

    Layers first, so the scan over layers indexes one layer with a scalar; heads before positions,
    so one (row, head)'s keys are contiguous: attention is a batched matmul with leading batch
    dims (4x faster on XLA's CPU backend than positions-first) and the GPU kernel reads a row's
    keys as one strided block.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def replace(self, **changes) -> KVCache:
        return dataclasses.replace(self, **changes)


def cache_shape(cfg: LlamaConfig, rows: int, max_len: int) -> tuple[int, ...]:
    """The shape of the k (and v) buffer."""
    return (cfg.n_layers, rows, cfg.n_kv_heads, max_len, cfg.head_dim)


def init_cache(cfg: LlamaConfig, rows: int, max_len: int, dtype: jnp.dtype | str | None = None) -> KVCache:
    """A zeroed cache for `rows` sequences of up to `max_len` tokens each."""
    shape, dtype = cache_shape(cfg, rows, max_len), dtype or cfg.dtype
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((rows,), jnp.int32))


def abstract_cache(cfg: LlamaConfig, rows: int, max_len: int, dtype: str | None = None, sharding=None) -> KVCache:
    """The cache as ShapeDtypeStructs (with `sharding`, a KVCache of shardings, if given): for AOT compiles."""
    shape, dtype = cache_shape(cfg, rows, max_len), dtype or cfg.dtype
    s = sharding or KVCache(k=None, v=None, lengths=None)
    return KVCache(k=jax.ShapeDtypeStruct(shape, dtype, sharding=s.k), v=jax.ShapeDtypeStruct(shape, dtype, sharding=s.v),
                   lengths=jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=s.lengths))


def write(buffer: jax.Array, layer: jax.Array, new: jax.Array, rows: jax.Array, positions: jax.Array) -> jax.Array:
    """Write `new[b]` (`[T, heads, head_dim]`) into layer `layer`, row `rows[b]` of the stacked
    buffer at `positions[b]` (`[B, T]`).

    One in-place scatter (the buffer is donated or loop-carried); rows or positions out of range
    are dropped, which is how padding rows of a prefill batch write nothing.
    """
    return buffer.at[layer, rows[:, None], :, positions].set(new.astype(buffer.dtype), mode="drop")


def attention_mask(q_positions: jax.Array, lengths: jax.Array, kv_len: int) -> jax.Array:
    """`[rows, T, kv_len]` mask: key j is visible to a query at position p iff j <= p and j < length."""
    j = jnp.arange(kv_len)[None, None, :]
    return (j <= q_positions[:, :, None]) & (j < lengths[:, None, None])
