"""Jitted model steps with static shapes: bucketed prefill, decode for all rows, cache insert.

Each function takes the model's `GraphDef` (static, hashable) and its parameter `State`
(traced), merges them at trace time, and runs the forward. Prompt lengths are padded to a
bucket and the true lengths are traced, so the set of compiled programs is fixed: one per
prefill bucket, one per decode attention window, one insert. Decode caches are donated.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import kv_cache
from llama_jax.kv_cache import KVCache
from llama_jax.model import Llama


PREFILL_QUERY_BLOCK = 128  # prefill attention runs in causal query blocks of this many tokens


def length_buckets(max_len: int, smallest: int = 16, midpoints: bool = False) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `max_len` (which is always the last bucket); with
    `midpoints`, also 1.5x each power of two."""
    buckets, b = [], smallest
    while b < max_len:
        buckets.append(b)
        if midpoints and b * 3 // 2 < max_len:
            buckets.append(b * 3 // 2)
        b *= 2
    return (*buckets, max_len)


def decode_windows(max_len: int, smallest: int = 128) -> tuple[int, ...]:
    """Attention windows of decode steps: two per octave, so a step reads at most 1.5x the keys
    it needs (and copies no more of the cache) instead of 2x, for twice the compiled programs."""
    return length_buckets(max_len, min(smallest, max_len), midpoints=True)


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `length` tokens."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def pad_prompts(prompts: list[list[int]], bucket: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists to `[len(prompts), bucket]`; returns (tokens, lengths) as numpy."""
    tokens = np.full((len(prompts), bucket), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


@partial(jax.jit, static_argnums=0)
def prefill(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, lengths: jax.Array) -> tuple[jax.Array, KVCache]:
    """Run padded prompts `[B, bucket]` with true `lengths` `[B]` through a fresh bucket-sized cache.

    Returns the logits at each prompt's last true token `[B, V]` and the prompts' cache, ready to
    `insert` into decode slots.
    """
    model: Llama = nnx.merge(graphdef, params)
    b, t = tokens.shape
    cache = kv_cache.init_cache(model.cfg, b, t)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return model(tokens, positions, cache, lengths, logits_at=lengths - 1, causal_block=PREFILL_QUERY_BLOCK)


@partial(jax.jit, static_argnums=0, static_argnames="kv_len", donate_argnames="cache")
def decode_step(
    graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, tokens: jax.Array, *, kv_len: int | None = None
) -> tuple[jax.Array, KVCache]:
    """One token `[B]` for each of the first B rows of the cache, each at its own position
    `cache.lengths[b]`.

    Attention reads the first `kv_len` cache entries: every row's length must be below it.
    Returns logits `[B, V]` and the cache with each row one longer (rows at the end of the
    cache stay there: their last entry is overwritten).
    """
    model: Llama = nnx.merge(graphdef, params)
    positions = jnp.minimum(cache.lengths[: tokens.shape[0]], cache.max_len - 1)[:, None]
    logits, cache = model(tokens[:, None], positions, cache, kv_len=kv_len)
    return logits[:, 0], cache


@partial(jax.jit, donate_argnames="cache")
def insert(prefix: KVCache, cache: KVCache, slot: jax.Array, row: jax.Array) -> KVCache:
    """Copy prefill row `row` into decode slot `slot` (both traced: one compile serves all)."""
    return kv_cache.insert(prefix, cache, slot, row)


def greedy_generate(model: Llama, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy decoding of one prompt through the cache: a reference loop for tests and notebooks."""
    graphdef, params = nnx.split(model)
    max_len = model.cfg.max_seq_len
    if len(prompt) + max_new_tokens > max_len:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len {max_len}")
    bucket = bucket_for(len(prompt), length_buckets(max_len))
    tokens, lengths = pad_prompts([prompt], bucket)
    logits, prefix = prefill(graphdef, params, tokens, lengths)
    cache = insert(prefix, kv_cache.init_cache(model.cfg, 1, max_len), jnp.int32(0), jnp.int32(0))
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(jnp.argmax(logits[0]))
        out.append(token)
        if token in stop_ids:
            break
        logits, cache = decode_step(graphdef, params, cache, jnp.array([token], jnp.int32))
    return out
