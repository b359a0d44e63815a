"""Static-shape KV cache: one fixed-size buffer per layer, each row written at its own position.

Every row (a decode slot, or one prompt of a prefill batch) has its own length; attention masks
are built from those lengths, so one row's result never depends on what other rows hold. Shapes
never change, so the steps that use the cache compile once.
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
    """Keys and values per layer, `[rows, n_kv_heads, max_len, head_dim]`, and valid lengths `[rows]`.

    Heads before positions: attention is then a batched matmul with leading batch dims, which
    the XLA CPU backend runs 4x faster than the positions-first layout (GPUs do not mind).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def replace(self, **changes) -> KVCache:
        return dataclasses.replace(self, **changes)


def init_cache(cfg: LlamaConfig, rows: int, max_len: int, dtype: jnp.dtype | str | None = None) -> KVCache:
    """A zeroed cache for `rows` sequences of up to `max_len` tokens each."""
    shape = (rows, cfg.n_kv_heads, max_len, cfg.head_dim)
    dtype = dtype or cfg.dtype
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
    return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
                   lengths=jnp.zeros((rows,), jnp.int32))


def write(buffer: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Write `new[b]` (`[T, heads, head_dim]`) into `buffer[b]` (`[heads, max_len, head_dim]`) at
    positions `starts[b]...starts[b] + T - 1`, for the first `len(new)` rows of the buffer.

    One in-place scatter (the buffer is donated); positions past the end are dropped.
    """
    rows = jnp.arange(new.shape[0])[:, None]
    positions = starts[:, None] + jnp.arange(new.shape[1])[None, :]
    return buffer.at[rows, :, positions].set(new.astype(buffer.dtype), mode="drop")


def insert(prefix: KVCache, cache: KVCache, slot: jax.Array, row: int | jax.Array = 0) -> KVCache:
    """Copy row `row` of a (shorter) prefill cache into row `slot` of the decode cache.

    `slot` is traced, so one compiled insert serves every slot; jit it with the cache donated.
    """
    def put(dst: jax.Array, src: jax.Array) -> jax.Array:
        piece = jax.lax.dynamic_index_in_dim(src, row, axis=0, keepdims=True).astype(dst.dtype)
        return jax.lax.dynamic_update_slice(dst, piece, (slot, 0, 0, 0))

    length = jax.lax.dynamic_index_in_dim(prefix.lengths, row, keepdims=False)
    return KVCache(
        k=tuple(put(d, s) for d, s in zip(cache.k, prefix.k)),
        v=tuple(put(d, s) for d, s in zip(cache.v, prefix.v)),
        lengths=cache.lengths.at[slot].set(length),
    )


def attention_mask(q_positions: jax.Array, lengths: jax.Array, kv_len: int) -> jax.Array:
    """`[rows, T, kv_len]` mask: key j is visible to a query at position p iff j <= p and j < length."""
    j = jnp.arange(kv_len)[None, None, :]
    return (j <= q_positions[:, :, None]) & (j < lengths[:, None, None])
