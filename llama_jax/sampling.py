"""Pure-functional token sampler: every OpenAI sampling field, per row, reproducible from the seed.

One row per decode slot. `SamplingParams` holds the knobs and the key material, `SamplerState`
the penalty state (both in sampling_params.py); both are pytrees of arrays, so `sample` compiles once per shape and never
again whatever the values.

Processing order inside `sample`, per row:

0. logit_bias (OpenAI's): each (token id, bias) pair of the row is added to that token's logit
   (`apply_logit_bias`), so -100 all but bans a token and +100 all but forces it.
1. allowed_mask: disallowed tokens get -inf. A row with no allowed token ignores its mask and
   is decoded greedily (argmax of its unmasked, penalised logits). Then vLLM's `min_tokens`
   (`ban_stop_ids`): while a row has generated fewer than its `min_tokens`, its stop ids get
   -inf too (unless that would leave it no token at all).
2. penalties (`apply_penalties`): repetition (HF/CTRL, over prompt and generated tokens:
   positive logits divided, negative multiplied), then presence/frequency (OpenAI, generated
   tokens only: ``logit -= presence * [count > 0] + frequency * count``).
   The returned logprobs are ``log_softmax`` of these logits: the model's distribution after
   mask and penalties, before temperature and truncation (OpenAI reports the model's distribution).
3. temperature: logits / T. T < `MIN_TEMPERATURE` (0 included) means greedy: the token is the
   argmax of the step-2 logits whatever the other knobs.
4. top_k (0 = off): keep tokens whose scaled logit is >= the k-th largest (ties kept).
5. top_p (1 = off): over the top_k survivors, renormalised, keep token j iff the mass of tokens
   strictly more probable than j is < top_p. This is the smallest descending prefix with mass
   >= top_p, plus every token tied with its last member.
6. min_p (0 = off): keep tokens with p >= min_p * p_max (p of the temperature-scaled
   distribution; truncation does not change the ratio).
7. sample from softmax(scaled logits) restricted to the kept set: argmax of p / Exp(1) noise
   (the exponential race, i.e. Gumbel-max; one uniform per token from the row's key).

The argmax always survives 4-6, so the kept set is never empty. Two ways to find the thresholds
of 4 and 5, the same set up to the float32 rounding of the mass sums, chosen by `branch_free`:

* CPU (default): without sorting, a bitwise binary search over order-preserving uint32 keys of
  the float values (32 passes over the vocabulary, 8-23x faster than a sort there). Each search,
  the noise and the top-20 logprobs run only when some row of the batch uses them (`lax.cond`),
  and so do the logit bias, the min_tokens ban and the penalties, together (each a pass over the
  batch's logits: a greedy step of 64 rows costs less than half what it did, docs/benchmarks.md).
* GPU/TPU (`branch_free=True`): one descending sort per row, a cumulative sum, and no control
  flow at all: every step is the same straight-line program, so the device never waits on the
  host for a predicate and the step stays one graph of a few kernels.

Keys: the key for step t of choice i of a request is
``fold_in(fold_in(wrap_key_data([seed_hi, seed_lo], threefry2x32), i), t)`` where
seed = seed_hi * 2**32 + seed_lo (uint32 words, since JAX x64 is off); the base key equals
``jax.random.key(seed)`` under x64. It depends on nothing else, so given the same logits a
request samples the same tokens in any slot next to any neighbours (within one JAX version).

Cost per step at vocab 32000, float32, per row: reads logits (128 KB), counts (128 KB) and the
prompt mask (32 KB), plus the allowed mask (32 KB) when given; writes one count (in place when the
caller's jit donates the state, else a copy of counts). The state holds 160 KB per row. Measured
on a 2-core Intel Xeon (JAX 0.10.2, tools/bench_sampling.py, median ms per step, 2026-12-06):
batch 1: 0.52 default knobs (temperature 1), 0.92 with top_k+top_p+min_p, 7.4 for a full-sort
sampler; batch 32: 8.7 default, 29.9 with top_k+top_p+min_p, 252 full sort; penalties + count
alone: 0.19 (batch 1) and 2.3 (batch 32). Greedy rows skip the draw: docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from llama_jax.sampling_params import (MAX_BIAS, MAX_LOGIT_BIAS, MAX_STOP_IDS, MAX_TOP_K, MAX_TOP_LOGPROBS,
                                       MIN_TEMPERATURE, NO_TOKEN, SamplerState, SamplingParams, init_state,
                                       make_params, prompt_state, random_seed, reset_row, set_row, stack_params)

# the rows' inputs are re-exported: `sampling` is the one module callers use
__all__ = ["MAX_BIAS", "MAX_LOGIT_BIAS", "MAX_STOP_IDS", "MAX_TOP_K", "MAX_TOP_LOGPROBS", "MIN_TEMPERATURE",
           "SamplerState", "SamplingParams", "init_state", "make_params", "prompt_state", "random_seed",
           "reset_row", "set_row", "stack_params", "SampleResult", "sample", "truncation_mask",
           "truncation_mask_sorted", "apply_penalties", "apply_logit_bias", "ban_stop_ids"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleResult:
    """What one `sample` call returns per row (besides the new state)."""

    tokens: jax.Array  # int32 [rows]
    logprobs: jax.Array  # float32 [rows]: logprob of the chosen token (see module docstring)
    top_ids: jax.Array  # int32 [rows, num_top_logprobs], most probable first (all 0 if no row asked)
    top_logprobs: jax.Array  # float32 [rows, num_top_logprobs] (all -inf if no row asked)


# ---------------------------------------------------------------------------------------------
# The sampler


def apply_penalties(logits: jax.Array, params: SamplingParams, state: SamplerState) -> jax.Array:
    """Repetition (prompt + generated, multiplicative) then presence/frequency (generated, additive)."""
    counts = state.counts
    generated = counts > 0
    r = params.repetition_penalty[:, None]
    seen = state.prompt_mask | generated
    x = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    additive = params.presence_penalty[:, None] * generated + params.frequency_penalty[:, None] * counts
    return x - additive


def apply_logit_bias(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """logits [rows, vocab] plus each row's sparse bias (padding adds 0.0 to token 0)."""
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, params.bias_ids].add(params.bias_values, mode="drop")


def ban_stop_ids(logits: jax.Array, params: SamplingParams, step: jax.Array) -> jax.Array:
    """-inf for each row's stop ids while it has generated fewer than its `min_tokens` (`step`
    tokens so far), except in a row where that would leave no finite logit."""
    rows = jnp.arange(logits.shape[0])[:, None]
    ids = jnp.where((step < params.min_tokens)[:, None], params.stop_ids, NO_TOKEN)
    banned = logits.at[rows, ids].set(-jnp.inf, mode="drop")
    return jnp.where(jnp.any(banned > -jnp.inf, axis=-1, keepdims=True), banned, logits)


def _sortable(x: jax.Array) -> jax.Array:
    """uint32 keys with the order of the float32 values (-0.0 and 0.0 share a key)."""
    bits = lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _threshold(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the largest t with sum(weights[keys >= t]) >= target (bitwise binary search).

    Exact when the masked sum is monotone in t, which holds for non-negative weights.
    """

    def bit(i: jax.Array, t: jax.Array) -> jax.Array:
        cand = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        mass = jnp.sum(jnp.where(keys >= cand[:, None], weights, 0.0), axis=-1)
        return jnp.where(mass >= target, cand, t)

    return lax.fori_loop(0, 32, bit, jnp.zeros(keys.shape[:1], jnp.uint32))


def truncation_mask(
    scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array
) -> jax.Array:
    """bool [rows, vocab]: tokens surviving top_k, then top_p, then min_p on temperature-scaled logits.

    Never empty when a row has a finite logit: the argmax always survives.
    """
    rows = scaled.shape[0]
    off = jnp.zeros((rows,), jnp.uint32)  # threshold that keeps everything
    finite = scaled > -jnp.inf

    s_keys = _sortable(scaled)
    k_target = jnp.where(top_k > 0, top_k, 1).astype(jnp.float32)
    k_cut = lax.cond(
        jnp.any(top_k > 0), lambda: _threshold(s_keys, finite.astype(jnp.float32), k_target), lambda: off
    )
    keep = finite & ((top_k <= 0)[:, None] | (s_keys >= k_cut[:, None]))

    p = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))  # unnormalised, max is 1
    w = jnp.where(keep, p, 0.0)
    p_keys = _sortable(p)
    p_target = top_p * jnp.sum(w, axis=-1)
    p_cut = lax.cond(jnp.any(top_p < 1), lambda: _threshold(p_keys, w, p_target), lambda: off)
    keep &= (top_p >= 1)[:, None] | (p_keys >= p_cut[:, None])

    return keep & (p >= min_p[:, None])


def truncation_mask_sorted(
    scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array
) -> jax.Array:
    """`truncation_mask` from one descending sort per row, with no control flow (the GPU path)."""
    vocab = scaled.shape[-1]
    finite = scaled > -jnp.inf
    desc = -jnp.sort(-scaled, axis=-1)
    kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    use_k = (top_k > 0)[:, None]
    keep = finite & (~use_k | (scaled >= kth))

    top = desc[:, :1]
    p = jnp.exp(scaled - top)  # unnormalised, max is 1; the same values as the sorted ones below
    p_desc = jnp.where(~use_k | (desc >= kth), jnp.exp(desc - top), 0.0)  # top_k survivors, still descending
    mass = jnp.cumsum(p_desc, axis=-1)
    target = top_p[:, None] * mass[:, -1:]
    first = jnp.argmax(mass >= target, axis=-1)  # the shortest descending prefix with mass >= top_p
    p_cut = jnp.take_along_axis(p_desc, first[:, None], axis=-1)
    keep &= (top_p >= 1)[:, None] | (p >= p_cut)
    return keep & (p >= min_p[:, None])


def _token_keys(params: SamplingParams, step: jax.Array) -> jax.Array:
    """One PRNG key per row from (seed, choice, step) only."""

    def one(hi: jax.Array, lo: jax.Array, choice: jax.Array, t: jax.Array) -> jax.Array:
        key = jax.random.wrap_key_data(jnp.stack([hi, lo]), impl="threefry2x32")
        return jax.random.fold_in(jax.random.fold_in(key, choice), t)

    return jax.vmap(one)(params.seed_hi, params.seed_lo, params.choice, step)


def _argmax(x: jax.Array) -> jax.Array:
    """First index of the row maximum, as two plain reductions (faster than a variadic one on
    CPU); always in range, even for a row of NaN."""
    vocab = x.shape[-1]
    is_max = x == jnp.max(x, axis=-1, keepdims=True)
    return jnp.minimum(jnp.min(jnp.where(is_max, jnp.arange(vocab), vocab), axis=-1), vocab - 1)


def _exponential_noise(keys: jax.Array, vocab: int) -> jax.Array:
    """-log(U), U uniform in [tiny, 1): argmax(p / noise) is Gumbel-max sampling with one log fewer.

    The same noise as jax.random.gumbel before its second (monotone) log, so never 0 or inf.
    """
    tiny = jnp.finfo(jnp.float32).tiny
    return jax.vmap(lambda k: -jnp.log(jax.random.uniform(k, (vocab,), minval=tiny, maxval=1.0)))(keys)


@partial(jax.jit, static_argnames=("num_top_logprobs", "branch_free", "greedy_only"))
def sample(
    logits: jax.Array,
    params: SamplingParams,
    state: SamplerState,
    allowed_mask: jax.Array | None = None,
    *,
    num_top_logprobs: int = MAX_TOP_LOGPROBS,
    branch_free: bool = False,
    greedy_only: bool = False,
) -> tuple[SampleResult, SamplerState]:
    """Sample one token per row of logits [rows, vocab]; returns the result and the advanced state.

    Compiles once per (shapes, mask given or not, num_top_logprobs, branch_free); parameter
    values never recompile. The new state counts the sampled tokens and has step + 1 in every
    row. `branch_free` selects the sort-based, control-flow-free path for accelerators;
    `greedy_only` (the caller knows every row is greedy and none reports alternatives) drops the
    draw and the top-k: the argmax alone, no sort, and top fields of width 0.
    """
    x = logits.astype(jnp.float32)
    rows = x.shape[0]
    dead = jnp.zeros((rows,), bool)
    if allowed_mask is not None:  # before the bias here, which is the same: no bias lifts a masked token's -inf
        dead = ~jnp.any(allowed_mask, axis=-1)
        x = jnp.where(allowed_mask | dead[:, None], x, -jnp.inf)

    def passes(y: jax.Array) -> jax.Array:  # each a pass over [rows, vocab]: on the CPU path only if a row needs one
        return apply_penalties(ban_stop_ids(apply_logit_bias(y, params), params, state.step), params, state)

    penalised = (params.repetition_penalty != 1) | (params.presence_penalty != 0) | (params.frequency_penalty != 0)
    needed = jnp.any(penalised) | jnp.any(params.bias_values != 0) | jnp.any(state.step < params.min_tokens)
    x = passes(x) if branch_free else lax.cond(needed, passes, lambda y: y, x)
    norm = jax.nn.logsumexp(x, axis=-1, keepdims=True)  # logprobs are x - norm, never written out (a pass less)

    greedy = dead | (params.temperature < MIN_TEMPERATURE)

    def draw() -> jax.Array:
        scaled = x / jnp.where(greedy, 1.0, params.temperature)[:, None]
        mask_fn = truncation_mask_sorted if branch_free else truncation_mask
        keep = mask_fn(scaled, params.top_k, params.top_p, params.min_p)
        weights = jnp.where(keep, jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True)), 0.0)
        return _argmax(weights / _exponential_noise(_token_keys(params, state.step), x.shape[1]))

    def top() -> tuple[jax.Array, jax.Array]:
        values, ids = lax.top_k(x, num_top_logprobs)
        return values - norm, ids

    argmax = _argmax(x)
    if greedy_only:
        tokens = argmax.astype(jnp.int32)
        top_logprobs, top_ids = jnp.zeros((rows, 0), jnp.float32), jnp.zeros((rows, 0), jnp.int32)
    elif branch_free:
        tokens = jnp.where(greedy, argmax, draw()).astype(jnp.int32)
        top_logprobs, top_ids = top()
    else:  # an all-greedy batch skips the noise and truncation (half the sampler's time on CPU)
        tokens = jnp.where(greedy, argmax, lax.cond(jnp.all(greedy), lambda: argmax, draw)).astype(jnp.int32)
        top_logprobs, top_ids = lax.cond(  # the top-20 search is skipped when no row reports alternatives
            jnp.any(params.top_logprobs > 0), top,
            lambda: (jnp.full((rows, num_top_logprobs), -jnp.inf), jnp.zeros((rows, num_top_logprobs), jnp.int32)))
    result = SampleResult(
        tokens=tokens,
        logprobs=jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0] - norm[:, 0],
        top_ids=top_ids.astype(jnp.int32),
        top_logprobs=top_logprobs,
    )
    new_state = dataclasses.replace(
        state, counts=state.counts.at[jnp.arange(rows), tokens].add(1), step=state.step + 1
    )
    return result, new_state
