"""Scoring: the log-probability the model gives each token of a sequence (and, optionally, the
k likeliest alternatives at each position), for perplexity, evals and prompt logprobs.

Sequences are padded to a length bucket (rows to a power of two) and run in chunks of
`chunk` tokens at increasing positions against a KV cache of the bucket's size: each chunk's
queries see the keys of the earlier chunks in the cache. `log_softmax` is taken per chunk inside
the jitted program, so only `[rows, chunk, vocab]` float32 logits ever exist at once, never
`[rows, T, vocab]`; one program is compiled per (rows, bucket, chunk, top_k).
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import executables, kv_cache, steps
from llama_jax.model import Llama

SCORE_CHUNK = 128  # tokens per chunk: [rows, 128, 32000] float32 logits is 16 MB per row
MAX_ROWS = 8  # sequences scored together in one program


@dataclasses.dataclass(frozen=True)
class TokenScores:
    """Scores of one sequence of T tokens. `logprobs[i]` is log p(token i | tokens before i);
    position 0 has no context, so its logprob is NaN, its `top_ids` -1 and `top_logprobs` NaN.
    `top_ids[i]` / `top_logprobs[i]` are the k likeliest tokens at position i, most likely first."""

    token_ids: np.ndarray  # int32 [T]
    logprobs: np.ndarray  # float32 [T]
    top_ids: np.ndarray  # int32 [T, k]
    top_logprobs: np.ndarray  # float32 [T, k]

    @property
    def total(self) -> float:
        """Log-likelihood of tokens 1..T-1 given what precedes each."""
        return float(np.sum(self.logprobs[1:], dtype=np.float64))

    @property
    def perplexity(self) -> float:
        """exp of the mean negative logprob of tokens 1..T-1 (NaN for a single token)."""
        n = len(self.logprobs) - 1
        return math.exp(-self.total / n) if n else math.nan


@partial(jax.jit, static_argnums=0, static_argnames=("chunk", "top_k"))
def _score_padded(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, lengths: jax.Array, *,
                  chunk: int, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Padded sequences `[B, L]` (L a multiple of `chunk`) with true `lengths` `[B]`: the logprob
    of token i + 1 at position i `[B, L]`, and the top-k ids and logprobs there `[B, L, top_k]`."""
    model: Llama = nnx.merge(graphdef, params)
    b, length = tokens.shape
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)

    def step(cache, start):
        piece = jax.lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1)
        positions = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
        logits, cache = model(piece, positions, cache, jnp.minimum(lengths, start + chunk))
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        wanted = jax.lax.dynamic_slice_in_dim(targets, start, chunk, axis=1)
        chosen = jnp.take_along_axis(logprobs, wanted[..., None], axis=-1)[..., 0]
        top_lp, top_ids = jax.lax.top_k(logprobs, top_k)
        return cache, (chosen, top_ids, top_lp)

    starts = jnp.arange(0, length, chunk, dtype=jnp.int32)
    _, (chosen, top_ids, top_lp) = jax.lax.scan(step, kv_cache.init_cache(model.cfg, b, length), starts)
    join = lambda a: jnp.moveaxis(a, 0, 1).reshape(b, length, *a.shape[3:])  # [chunks, B, chunk, ...] -> [B, L, ...]
    return join(chosen), join(top_ids), join(top_lp)


def _padded(group: list[list[int]], buckets: list[int], chunk: int, max_rows: int) -> tuple[np.ndarray, np.ndarray, int]:
    """A group's tokens and lengths padded to its length bucket (a whole number of chunks) and its
    rows to a power of two, and the chunk size: the shapes its scoring program is compiled for."""
    bucket = steps.bucket_for(max(map(len, group)), buckets)
    size = min(chunk, bucket)
    rows = steps.bucket_for(len(group), steps.length_buckets(max_rows, 1))
    tokens, lengths = steps.pad_prompts(group + [[0]] * (rows - len(group)), -(-bucket // size) * size)
    return tokens, lengths, size


def score_batch(model: Llama, sequences: Sequence[Sequence[int]], *, top_k: int = 0, chunk: int = SCORE_CHUNK,
                max_rows: int = MAX_ROWS, programs: Mapping[tuple, jax.stages.Compiled] | None = None) -> list[TokenScores]:
    """Per-token logprobs of each token sequence (each within the model's context), `max_rows` at a
    time; run by `programs` (`warm_up`'s) where one has the shape, else compiled by jit."""
    graphdef, params = nnx.split(model)
    cfg = model.cfg
    if not 0 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k must be in [0, {cfg.vocab_size}]")
    buckets = steps.length_buckets(cfg.max_seq_len)
    out: list[TokenScores] = []
    for first in range(0, len(sequences), max_rows):
        group = [list(s) for s in sequences[first:first + max_rows]]
        if any(not s or len(s) > cfg.max_seq_len or not all(0 <= t < cfg.vocab_size for t in s) for s in group):
            raise ValueError(f"sequences must be 1..{cfg.max_seq_len} token ids in [0, {cfg.vocab_size})")
        tokens, lengths, size = _padded(group, buckets, chunk, max_rows)
        executable = (programs or {}).get(_program_id(tokens.shape, size, top_k))
        chosen, top_ids, top_lp = jax.device_get(
            _score_padded(graphdef, params, tokens, lengths, chunk=size, top_k=top_k) if executable is None
            else executable(params, tokens, lengths))
        for i, s in enumerate(group):
            n = len(s)
            out.append(TokenScores(
                token_ids=np.asarray(s, np.int32),
                logprobs=np.concatenate([[np.nan], chosen[i, :n - 1]]).astype(np.float32),
                top_ids=np.concatenate([np.full((1, top_k), -1), top_ids[i, :n - 1]]).astype(np.int32),
                top_logprobs=np.concatenate([np.full((1, top_k), np.nan), top_lp[i, :n - 1]]).astype(np.float32)))
    return out


def score(model: Llama, token_ids: Sequence[int], *, top_k: int = 0, chunk: int = SCORE_CHUNK) -> TokenScores:
    """Per-token logprobs of one token sequence (BOS included if the text should start with it)."""
    return score_batch(model, [token_ids], top_k=top_k, chunk=chunk)[0]


def _program_id(shape: tuple[int, ...], chunk: int, top_k: int) -> tuple:
    return (*shape, chunk, top_k)


def warm_up(model: Llama, max_len: int, *, top_k: int, threads: int | None = None,
            progress: Callable[[int, int, str, float], None] | None = None,
            directory: Path | None = None) -> dict[tuple, jax.stages.Compiled]:
    """The one-row scoring program of every length bucket a sequence of up to `max_len` tokens
    lands in, with `top_k` alternatives: what the server's prompt scoring runs (pass them to
    `score_batch`), so that no request compiles one while others stream. Compiled several at once
    (or loaded from the persistent cache), or loaded from the executables stored in `directory`."""
    graphdef, params = nnx.split(model)
    buckets = steps.length_buckets(model.cfg.max_seq_len)
    needed = buckets[:buckets.index(steps.bucket_for(max_len, buckets)) + 1]
    lower = types.SimpleNamespace(lower=partial(_score_padded.lower, graphdef))  # graphdef: in the key's context
    calls = {}
    for bucket in needed:
        tokens, lengths, size = _padded([[0] * min(bucket, max_len)], buckets, SCORE_CHUNK, 1)
        calls[_program_id(tokens.shape, size, top_k)] = (f"prompt scoring at {bucket} tokens", lower,
                                                         (params, tokens, lengths), {"chunk": size, "top_k": top_k})
    return executables.build(calls, directory, repr(model.cfg), threads, progress)
