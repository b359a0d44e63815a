"""The sampler's per-row inputs: `SamplingParams` (every OpenAI sampling knob and the seed's key
material) and `SamplerState` (penalty counts), built on the host (`make_params`, checked) and
updated one row at a time on the device (`set_row`, `reset_row`). sampling.py consumes them."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MAX_TOP_LOGPROBS = 20  # OpenAI's top_logprobs is at most 20
MAX_TOP_K = 999
MAX_LOGIT_BIAS = 300  # (token, bias) pairs per request; each row carries exactly this many
MAX_BIAS = 100.0  # OpenAI's logit_bias values are in [-100, 100]
MAX_STOP_IDS = 64  # stop token ids (EOS included) a row bans until its min_tokens
NO_TOKEN = np.iinfo(np.int32).max  # padding of stop_ids: out of range, so a scatter drops it
MIN_TEMPERATURE = 1e-5  # below this, temperature is greedy (and x / T cannot overflow)
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1  # OpenAI seeds are int64


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-row sampling knobs and key material; every field is an array with one entry per row."""

    temperature: jax.Array  # float32, [0, 2]; < MIN_TEMPERATURE = greedy
    top_p: jax.Array  # float32, (0, 1]; 1 = off
    min_p: jax.Array  # float32, [0, 1]; 0 = off
    top_k: jax.Array  # int32, [0, 999]; 0 = off
    repetition_penalty: jax.Array  # float32, [0.01, 5]; 1 = off
    presence_penalty: jax.Array  # float32, [-2, 2]
    frequency_penalty: jax.Array  # float32, [-2, 2]
    seed_hi: jax.Array  # uint32, high word of the 64-bit seed
    seed_lo: jax.Array  # uint32, low word
    choice: jax.Array  # uint32, index of the choice within the request (0..n-1)
    top_logprobs: jax.Array  # int32, [0, 20]: alternatives the row reports; none in the batch = no top-k
    # logit_bias as a fixed-size sparse pair, [MAX_LOGIT_BIAS] per row, padded with (0, 0.0): a
    # request biases a handful of tokens, so this costs 2.4 KB per row and one scatter of
    # rows x 300 per step, where a dense [vocab] row would cost 128 KB per slot and a full add; the
    # shape never depends on the request, so no bias ever recompiles.
    bias_ids: jax.Array  # int32 [MAX_LOGIT_BIAS]: token ids
    bias_values: jax.Array  # float32 [MAX_LOGIT_BIAS]: in [-100, 100], 0 for padding
    min_tokens: jax.Array  # int32: the stop ids are banned while fewer tokens than this were generated
    stop_ids: jax.Array  # int32 [MAX_STOP_IDS]: the row's stop token ids, padded with an out-of-range id


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerState:
    """Per-row penalty state, advanced by `sample` and cleared by `reset_row`."""

    counts: jax.Array  # int32 [rows, vocab]: times each token was generated
    prompt_mask: jax.Array  # bool [rows, vocab]: token occurs in the prompt
    step: jax.Array  # int32 [rows]: tokens generated so far = position in the key derivation


# ---------------------------------------------------------------------------------------------
# Host-side helpers


def random_seed() -> int:
    """A fresh seed for a request that gave none (OS entropy, in the int64 range the API uses)."""
    return secrets.randbits(63)


def _check(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    ok = (lo < value if lo_open else lo <= value) and value <= hi  # False for NaN
    if not ok:
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")
    return value


def make_params(
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    seed: int | None = None,
    choice: int = 0,
    top_logprobs: int = 0,
    logit_bias: Mapping[int, float] | Sequence[tuple[int, float]] = (),
    min_tokens: int = 0,
    stop_ids: Sequence[int] = (),
) -> SamplingParams:
    """One row of host (numpy) scalars from API values; raises ValueError naming a bad field.

    `seed=None` draws a random seed. `choice` is the index of the choice when the request asks
    for n > 1 (each choice gets its own key stream from the same seed). `logit_bias`: (token id,
    bias) pairs; ids are checked against the vocabulary by the caller (`request.validate`).
    """
    _check("temperature", temperature, 0.0, 2.0)
    _check("top_p", top_p, 0.0, 1.0, lo_open=True)
    _check("min_p", min_p, 0.0, 1.0)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise ValueError(f"top_k must be an integer, got {top_k!r}")
    _check("top_k", top_k, 0, MAX_TOP_K)
    _check("repetition_penalty", repetition_penalty, 0.01, 5.0)
    _check("presence_penalty", presence_penalty, -2.0, 2.0)
    _check("frequency_penalty", frequency_penalty, -2.0, 2.0)
    if seed is None:
        seed = random_seed()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    _check("seed", seed, _SEED_MIN, _SEED_MAX)
    if isinstance(choice, bool) or not isinstance(choice, (int, np.integer)):
        raise ValueError(f"choice must be an integer, got {choice!r}")
    _check("choice", choice, 0, 2**31 - 1)
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, (int, np.integer)):
        raise ValueError(f"top_logprobs must be an integer, got {top_logprobs!r}")
    _check("top_logprobs", top_logprobs, 0, MAX_TOP_LOGPROBS)
    bias_ids, bias_values = _bias_arrays(logit_bias)
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, (int, np.integer)):
        raise ValueError(f"min_tokens must be an integer, got {min_tokens!r}")
    _check("min_tokens", min_tokens, 0, 2**31 - 1)
    stops = sorted(set(stop_ids))
    if len(stops) > MAX_STOP_IDS or any(not 0 <= t < 2**31 - 1 for t in stops):
        raise ValueError(f"stop_ids must be at most {MAX_STOP_IDS} token ids >= 0, got {stops!r}")
    seed64 = int(seed) % 2**64  # two's complement for negative seeds
    f32 = np.float32
    return SamplingParams(
        temperature=f32(temperature),
        top_p=f32(top_p),
        min_p=f32(min_p),
        top_k=np.int32(top_k),
        repetition_penalty=f32(repetition_penalty),
        presence_penalty=f32(presence_penalty),
        frequency_penalty=f32(frequency_penalty),
        seed_hi=np.uint32(seed64 >> 32),
        seed_lo=np.uint32(seed64 & 0xFFFFFFFF),
        choice=np.uint32(choice),
        top_logprobs=np.int32(top_logprobs),
        bias_ids=bias_ids,
        bias_values=bias_values,
        min_tokens=np.int32(min_tokens),
        stop_ids=np.array([*stops, *[NO_TOKEN] * (MAX_STOP_IDS - len(stops))], np.int32),
    )


def _bias_arrays(logit_bias: Mapping[int, float] | Sequence[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """logit_bias pairs as the padded (ids, values) arrays of one row; ValueError names the field."""
    pairs = list(logit_bias.items() if isinstance(logit_bias, Mapping) else logit_bias)
    if len(pairs) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(pairs)}")
    ids = np.zeros(MAX_LOGIT_BIAS, np.int32)
    values = np.zeros(MAX_LOGIT_BIAS, np.float32)
    for k, (token, bias) in enumerate(pairs):
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < 2**31:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
        ids[k] = token
        values[k] = _check(f"logit_bias[{token}]", bias, -MAX_BIAS, MAX_BIAS)
    if len(set(ids[: len(pairs)].tolist())) < len(pairs):
        raise ValueError("logit_bias lists a token more than once")
    return ids, values


def stack_params(rows: Sequence[SamplingParams]) -> SamplingParams:
    """Stack single rows (from `make_params`) into a batch, one row per slot."""
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *rows)


def init_state(rows: int, vocab: int) -> SamplerState:
    """Empty penalty state (no prompt, nothing generated) for `rows` slots."""
    return SamplerState(
        counts=jnp.zeros((rows, vocab), jnp.int32),
        prompt_mask=jnp.zeros((rows, vocab), bool),
        step=jnp.zeros((rows,), jnp.int32),
    )


# ---------------------------------------------------------------------------------------------
# Device-side row updates (jittable with a traced row index)


@jax.jit
def set_row(params: SamplingParams, i: jax.Array | int, row: SamplingParams) -> SamplingParams:
    """`params` with row i replaced by the single row `row`."""
    return jax.tree.map(lambda a, r: a.at[i].set(jnp.asarray(r, a.dtype)), params, row)


def prompt_state(prompts: jax.Array, lengths: jax.Array, vocab: int) -> SamplerState:
    """Fresh penalty state for rows starting on `prompts` `[rows, T]` (ids past `lengths` or
    outside the vocabulary ignored): no counts, step 0, the prompt mask set."""
    ids = jnp.asarray(prompts, jnp.int32)
    valid = (jnp.arange(ids.shape[1])[None] < lengths[:, None]) & (ids >= 0) & (ids < vocab)
    rows = jnp.arange(ids.shape[0])[:, None]
    mask = jnp.zeros((ids.shape[0], vocab), bool).at[rows, jnp.where(valid, ids, vocab)].set(True, mode="drop")
    return SamplerState(counts=jnp.zeros((ids.shape[0], vocab), jnp.int32), prompt_mask=mask,
                        step=jnp.zeros((ids.shape[0],), jnp.int32))


@jax.jit
def reset_row(
    state: SamplerState, i: jax.Array | int, prompt_ids: jax.Array, prompt_len: jax.Array | int
) -> SamplerState:
    """Clear row i for a new request: no counts, step 0, prompt mask from prompt_ids[:prompt_len].

    prompt_ids is padded to any fixed length (one compile per padded length); ids past
    prompt_len or outside the vocabulary are ignored.
    """
    fresh = prompt_state(jnp.asarray(prompt_ids)[None], jnp.asarray(prompt_len)[None], state.counts.shape[1])
    return jax.tree.map(lambda a, r: a.at[i].set(r[0]), state, fresh)
