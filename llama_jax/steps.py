"""Jitted model steps with static shapes: bucketed prefill (into a fresh cache or straight into
decode rows) and decode for the first rows of a cache.

Each function takes the model's `GraphDef` (static, hashable) and its parameter `State`
(traced), merges them at trace time, and runs the forward. Prompt lengths are padded to a
bucket and the true lengths are traced, so the set of compiled programs is fixed: one per
prefill (rows, bucket) shape and one per decode row count. Caches are donated: written in place.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import kv_cache
from llama_jax.attention import PREFILL_QUERY_BLOCK, AttentionConfig
from llama_jax.kv_cache import KVCache
from llama_jax.model import Llama

__all__ = ["PREFILL_QUERY_BLOCK", "bucket_for", "decode_step", "greedy_generate", "length_buckets", "pad_prompts",
           "prefill", "prefill_into"]


def length_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `max_len` (which is always the last bucket)."""
    buckets, b = [], smallest
    while b < max_len:
        buckets.append(b)
        b *= 2
    return (*buckets, max_len)


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


def _prefill(model: Llama, cache: KVCache, tokens: jax.Array, lengths: jax.Array, rows: jax.Array,
             attn: AttentionConfig) -> tuple[jax.Array, KVCache]:
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return model.prefill(tokens, positions, cache, lengths, rows=rows, logits_at=jnp.maximum(lengths - 1, 0),
                         attn=attn, suffix=False)  # every row starts at 0


@partial(jax.jit, static_argnums=0, static_argnames="attn")
def prefill(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, lengths: jax.Array,
            *, attn: AttentionConfig = AttentionConfig()) -> tuple[jax.Array, KVCache]:
    """Run padded prompts `[B, bucket]` with true `lengths` `[B]` through a fresh bucket-sized cache.

    Returns the logits at each prompt's last true token `[B, V]` and the prompts' cache.
    """
    model: Llama = nnx.merge(graphdef, params)
    b, t = tokens.shape
    return _prefill(model, kv_cache.init_cache(model.cfg, b, t), tokens, lengths, jnp.arange(b), attn)


@partial(jax.jit, static_argnums=0, static_argnames="attn", donate_argnames="cache")
def prefill_into(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, tokens: jax.Array, lengths: jax.Array,
                 rows: jax.Array, *, attn: AttentionConfig = AttentionConfig()) -> tuple[jax.Array, KVCache]:
    """Prefill padded prompts `[B, bucket]` straight into cache rows `rows` `[B]` (a row index past
    the cache writes nothing: padding rows). Returns last-token logits `[B, V]` and the cache."""
    model: Llama = nnx.merge(graphdef, params)
    return _prefill(model, cache, tokens, lengths, rows, attn)


@partial(jax.jit, static_argnums=0, static_argnames="attn", donate_argnames="cache")
def decode_step(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, tokens: jax.Array,
                *, attn: AttentionConfig = AttentionConfig()) -> tuple[jax.Array, KVCache]:
    """One token `[B]` for each of the first B rows of the cache, each at its own position
    `cache.lengths[b]`. Returns logits `[B, V]` and the cache with each row one longer (a row
    at the end of the cache stays there: its last entry is overwritten)."""
    model: Llama = nnx.merge(graphdef, params)
    positions = jnp.minimum(cache.lengths[: tokens.shape[0]], cache.max_len - 1)[:, None]
    logits, cache = model.decode(tokens[:, None], positions, cache, attn=attn)
    return logits[:, 0], cache


def greedy_generate(model: Llama, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy decoding of one prompt through the cache: a reference loop for tests and notebooks."""
    graphdef, params = nnx.split(model)
    max_len = model.cfg.max_seq_len
    if len(prompt) + max_new_tokens > max_len:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len {max_len}")
    tokens, lengths = pad_prompts([prompt], bucket_for(len(prompt), length_buckets(max_len)))
    cache = kv_cache.init_cache(model.cfg, 1, max_len)
    logits, cache = prefill_into(graphdef, params, cache, tokens, lengths, np.zeros(1, np.int32))
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(jnp.argmax(logits[0]))
        out.append(token)
        if token in stop_ids:
            break
        logits, cache = decode_step(graphdef, params, cache, jnp.array([token], jnp.int32))
    return out
