"""Static-shape KV cache: keys and values of every layer, every row written at its own positions.

One `[n_layers, ...]` buffer for k and one for v on every platform: the model's layer scan
carries them and writes each layer's keys in place; attention reads a layer's keys (in blocks)
by its index.

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

from llama_jax.bits import to_bits
from llama_jax.config import LlamaConfig
from llama_jax.platform import Platform, resolve


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

    @property
    def bits(self) -> bool:
        """True when keys are stored as `to_bits` patterns (16-bit floats on CPU, `storage_dtype`)."""
        return self.k.dtype == jnp.uint16

    def replace(self, **changes) -> KVCache:
        return dataclasses.replace(self, **changes)


def cache_shape(cfg: LlamaConfig, rows: int, max_len: int) -> tuple[int, ...]:
    """The shape of the k (and v) buffer."""
    return (cfg.n_layers, rows, cfg.n_kv_heads, max_len, cfg.head_dim)


def storage_dtype(dtype, platform: Platform | None = None) -> jnp.dtype:
    """How the cache stores keys of `dtype` on `platform` (default: the host's): as `to_bits`
    patterns on CPU for 16-bit floats (no upcast of the whole buffer around each step), as
    themselves elsewhere."""
    cpu16 = resolve(platform).cpu and jnp.dtype(dtype).itemsize == 2
    return jnp.dtype(jnp.uint16) if cpu16 else jnp.dtype(dtype)


def init_cache(cfg: LlamaConfig, rows: int, max_len: int, platform: Platform | None = None) -> KVCache:
    """A zeroed cache for `rows` sequences of up to `max_len` tokens each, in `platform`'s storage
    form (see `storage_dtype`)."""
    shape, dtype = cache_shape(cfg, rows, max_len), storage_dtype(cfg.dtype, platform)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((rows,), jnp.int32))


def write(buffer: jax.Array, layer: jax.Array, new: jax.Array, rows: jax.Array, positions: jax.Array) -> jax.Array:
    """Write `new[b]` (`[T, heads, head_dim]`) into layer `layer`, row `rows[b]` of the stacked
    buffer (float, or its `to_bits` patterns) at `positions[b]` (`[B, T]`).

    One in-place scatter (the buffer is donated or loop-carried); rows or positions out of range
    are dropped, which is how padding rows of a prefill batch write nothing.
    """
    new = to_bits(new) if buffer.dtype == jnp.uint16 else new.astype(buffer.dtype)
    return buffer.at[layer, rows[:, None], :, positions].set(new, mode="drop")


def attention_mask(q_positions: jax.Array, lengths: jax.Array, kv_len: int) -> jax.Array:
    """`[rows, T, kv_len]` mask: key j is visible to a query at position p iff j <= p and j < length."""
    j = jnp.arange(kv_len)[None, None, :]
    return (j <= q_positions[:, :, None]) & (j < lengths[:, None, None])
