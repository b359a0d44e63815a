"""The sampler against numpy references: distributions, truncation sets, penalties, keys, extremes.

Statistical tests use chi-square at a false-alarm rate of 1e-6 each (the only flaky part, and
with fixed seeds they are deterministic: a given JAX version either always passes or always fails).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import sampling
from llama_jax.compiles import CompileCounter


class _BranchFree:
    """`sampling` with the accelerator path: sort-based truncation, no control flow."""

    def __getattr__(self, name):
        if name == "sample":
            return lambda *a, **k: sampling.sample(*a, branch_free=True, **k)
        if name == "truncation_mask":
            return sampling.truncation_mask_sorted
        return getattr(sampling, name)


S = sampling  # rebound per test by the `path` fixture: every test runs on both sampler paths


@pytest.fixture(autouse=True, params=["cpu-path", "branch-free"])
def path(request):
    """Run each test against the CPU path (bisection, lax.cond) and the branch-free GPU path."""
    global S
    S = sampling if request.param == "cpu-path" else _BranchFree()
    yield request.param
    S = sampling

# scipy.stats.chi2.isf(1e-6, df): a chi-square statistic above this happens with p <= 1e-6.
CHI2_CRITICAL_1E6 = {2: 27.631, 3: 30.665, 4: 33.377, 5: 35.888, 6: 38.2, 7: 40.522}
MARGIN = 1e-4  # reference rows closer than this to a top_p / min_p boundary are skipped


# ---------------------------------------------------------------------------------------------
# numpy references


def np_penalties(logits, rep, presence, frequency, counts, prompt_mask):
    """HF repetition penalty over prompt + generated, then OpenAI presence/frequency, in float32."""
    rep, presence, frequency = (np.asarray(a, np.float32)[:, None] for a in (rep, presence, frequency))
    counts_f = counts.astype(np.float32)
    generated = counts > 0
    seen = prompt_mask | generated
    x = np.where(seen, np.where(logits > 0, logits / rep, logits * rep), logits)
    return x - (presence * generated.astype(np.float32) + frequency * counts_f)


def np_keep(s, top_k, top_p, min_p):
    """Full-sort definition on one row of scaled logits, in float64; None if a boundary is too close."""
    s = s.astype(np.float64)
    keep = np.isfinite(s)
    if top_k > 0:
        kth = np.sort(s[keep])[::-1][min(top_k, keep.sum()) - 1]
        keep &= s >= kth
    p = np.where(keep, np.exp(s - s[keep].max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        above = np.array([p[p > pj].sum() for pj in p])  # mass strictly more probable than j
        if np.any(np.abs(above[keep & (above > 0)] - top_p) < MARGIN):  # the argmax (0) is exact
            return None
        keep &= above < top_p
    ratio = p / p.max()
    if min_p > 0 and np.any(np.abs(ratio[keep & (ratio < 1)] - min_p) < MARGIN):  # the argmax (1) is exact
        return None
    return keep & (ratio >= min_p)


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def distinct_logits(rng, rows, vocab, spread=6.0):
    """Rows of logits with no ties and >= 1% gaps between probabilities."""
    grid = np.arange(vocab) * (spread / vocab) + 0.01 * rng.random((rows, vocab))
    return np.stack([rng.permutation(g) for g in grid]).astype(np.float32) - spread / 2


def batch_params(**columns):
    """SamplingParams from per-row lists/arrays (other fields default; seed defaults to the row index)."""
    rows = len(next(iter(columns.values())))
    columns.setdefault("seed", list(range(rows)))
    return S.stack_params([S.make_params(**{k: v[i] for k, v in columns.items()}) for i in range(rows)])


def chi_square(observed, probs):
    expected = probs * observed.sum()
    assert expected.min() >= 20, "chi-square needs enough expected counts per cell"
    return float(np.sum((observed - expected) ** 2 / expected))


# ---------------------------------------------------------------------------------------------
# host helpers


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1), ("temperature", 2.01), ("temperature", float("nan")),
        ("top_p", 0.0), ("top_p", 1.1), ("min_p", -0.01), ("min_p", 1.5),
        ("top_k", -1), ("top_k", 1000), ("top_k", 2.5),
        ("repetition_penalty", 0.0), ("repetition_penalty", 5.5),
        ("presence_penalty", -2.1), ("frequency_penalty", 2.1),
        ("seed", 2**63), ("seed", -(2**63) - 1), ("seed", 1.5), ("choice", -1), ("top_logprobs", 21),
    ],
)
def test_make_params_rejects_out_of_range(field, value):
    with pytest.raises(ValueError, match=field):
        S.make_params(**{field: value})


def test_make_params_defaults_and_seed_words():
    row = S.make_params(seed=(7 << 32) | 9, choice=3)
    assert (row.temperature, row.top_p, row.min_p, row.top_k) == (1.0, 1.0, 0.0, 0)
    assert (row.repetition_penalty, row.presence_penalty, row.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (row.seed_hi, row.seed_lo, row.choice) == (7, 9, 3)
    top = S.make_params(seed=2**63 - 1)
    assert (top.seed_hi, top.seed_lo) == (2**31 - 1, 2**32 - 1)
    neg = S.make_params(seed=-1)
    assert (neg.seed_hi, neg.seed_lo) == (2**32 - 1, 2**32 - 1)
    seeds = {S.random_seed() for _ in range(16)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)


def test_set_row_and_reset_row_take_a_traced_index():
    rows, vocab = 4, 16
    params = batch_params(temperature=[1.0] * rows)
    params = jax.jit(S.set_row)(params, jnp.int32(2), S.make_params(temperature=0.5, top_k=7, seed=5))
    assert params.temperature.tolist() == [1.0, 1.0, 0.5, 1.0]
    assert params.top_k.tolist() == [0, 0, 7, 0] and int(params.seed_lo[2]) == 5

    state = S.init_state(rows, vocab)
    state = dataclasses.replace(state, counts=state.counts + 3, step=state.step + 5)
    prompt = jnp.array([1, 4, 4, 15, 99, -1, 2, 2], jnp.int32)  # 99, -1: out of vocab; 2: padding
    new = jax.jit(S.reset_row)(state, jnp.int32(1), prompt, jnp.int32(6))
    assert np.flatnonzero(new.prompt_mask[1]).tolist() == [1, 4, 15]
    assert int(new.counts[1].sum()) == 0 and int(new.step[1]) == 0
    np.testing.assert_array_equal(np.delete(np.asarray(new.counts), 1, 0), 3)
    assert new.step.tolist() == [5, 0, 5, 5]


def test_sample_advances_state():
    rows, vocab = 3, 10
    state = S.init_state(rows, vocab)
    params = batch_params(top_k=[0, 2, 0])
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(rows, vocab)), jnp.float32)
    tokens = []
    for _ in range(4):
        result, state = S.sample(logits, params, state, num_top_logprobs=5)
        tokens.append(np.asarray(result.tokens))
    expected = np.zeros((rows, vocab), int)
    for t in tokens:
        expected[np.arange(rows), t] += 1
    np.testing.assert_array_equal(state.counts, expected)
    assert state.step.tolist() == [4, 4, 4]


# ---------------------------------------------------------------------------------------------
# penalties and truncation against numpy


def test_penalties_match_numpy_reference():
    rng = np.random.default_rng(1)
    rows, vocab = 64, 50
    logits = rng.normal(0, 4, (rows, vocab)).astype(np.float32)
    logits[:, :3] = [0.0, -0.0, 1e-30]  # signs and zeros
    counts = rng.integers(0, 4, (rows, vocab)) * (rng.random((rows, vocab)) < 0.3)
    prompt_mask = rng.random((rows, vocab)) < 0.2
    rep, (presence, frequency) = rng.choice([0.01, 0.5, 1.0, 1.3, 5.0], rows), rng.uniform(-2, 2, (2, rows))
    params = batch_params(
        repetition_penalty=rep.tolist(), presence_penalty=presence.tolist(), frequency_penalty=frequency.tolist()
    )
    state = S.SamplerState(jnp.asarray(counts, jnp.int32), jnp.asarray(prompt_mask), jnp.zeros(rows, jnp.int32))
    got = np.asarray(jax.jit(S.apply_penalties)(jnp.asarray(logits), params, state))
    want = np_penalties(logits, rep, presence, frequency, counts, prompt_mask)
    # Equal up to float32 rounding: XLA may contract multiply-adds and rewrite divisions (a few ulps).
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    untouched = ~(prompt_mask | (counts > 0))
    np.testing.assert_array_equal(got[untouched], logits[untouched])  # neutral where nothing was seen


def test_truncation_mask_matches_full_sort_reference():
    rng = np.random.default_rng(2)
    rows, vocab = 400, 64
    s = distinct_logits(rng, rows, vocab, spread=rng.choice([2.0, 8.0, 30.0]))
    s[rng.random((rows, vocab)) < 0.1] = -np.inf  # masked tokens
    top_k = rng.choice([0, 0, 1, 2, 5, 40, 63, 64, 999], rows)
    top_p = rng.choice([1.0, 1.0, 1e-6, 0.3, 0.9, 0.99], rows) * rng.uniform(0.8, 1.0, rows)
    top_p = np.where(top_p > 0.99, 1.0, top_p).astype(np.float32)
    min_p = (rng.choice([0.0, 0.0, 0.05, 0.5, 1.0], rows) * rng.uniform(0.5, 1.0, rows)).astype(np.float32)
    got = np.asarray(
        jax.jit(S.truncation_mask)(
            jnp.asarray(s), jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p), jnp.asarray(min_p)
        )
    )
    checked = 0
    for r in range(rows):
        want = np_keep(s[r], top_k[r], top_p[r], min_p[r])
        assert got[r, np.argmax(s[r])], "the argmax is always kept"
        if want is not None:
            np.testing.assert_array_equal(got[r], want, err_msg=f"row {r}: k={top_k[r]} p={top_p[r]} min_p={min_p[r]}")
            checked += 1
    assert checked > 0.9 * rows


def test_truncation_ties_are_kept():
    s = jnp.array([[3.0, 2.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 1.0, -jnp.inf]])  # p = .965, .017, .017
    mask = S.truncation_mask(s, jnp.array([2, 0, 0]), jnp.array([1.0, 0.1, 0.97]), jnp.zeros(3))
    np.testing.assert_array_equal(
        mask, [[True, True, True, False], [True, True, True, True], [True, True, True, False]]
    )


def test_samples_stay_in_their_set():
    rng = np.random.default_rng(3)
    rows, vocab, steps = 256, 32, 6
    logits = distinct_logits(rng, rows, vocab, spread=10.0)
    allowed = rng.random((rows, vocab)) < 0.7
    allowed[np.arange(rows), rng.integers(0, vocab, rows)] = True
    knobs = dict(
        temperature=rng.choice([0.3, 1.0, 2.0], rows).tolist(),
        top_k=rng.choice([0, 1, 3, 10], rows).tolist(),
        top_p=rng.choice([1.0, 0.5, 0.9], rows).tolist(),
        min_p=rng.choice([0.0, 0.1, 0.3], rows).tolist(),
    )
    params = batch_params(**knobs)
    keep_sets = []
    for r in range(rows):
        scaled = np.where(allowed[r], logits[r], -np.inf).astype(np.float32) / np.float32(knobs["temperature"][r])
        keep_sets.append(np_keep(scaled, knobs["top_k"][r], knobs["top_p"][r], knobs["min_p"][r]))
    state = S.init_state(rows, vocab)
    for _ in range(steps):  # neutral penalties: every step samples the same distribution, new keys
        result, state = S.sample(jnp.asarray(logits), params, state, jnp.asarray(allowed), num_top_logprobs=4)
        tokens = np.asarray(result.tokens)
        for r, keep in enumerate(keep_sets):
            if keep is not None:
                assert keep[tokens[r]], f"row {r} sampled {tokens[r]} outside its set"
    assert sum(k is not None for k in keep_sets) > 0.9 * rows


# ---------------------------------------------------------------------------------------------
# distributions (chi-square, each test false-alarm probability 1e-6)


@pytest.mark.parametrize("temperature, vary", [(0.7, "step"), (1.0, "seed"), (1.6, "choice")])
def test_samples_follow_softmax_at_temperature(temperature, vary):
    """4000 draws of one vocab-8 distribution in one call; rows differ only by step, seed or choice."""
    n, logits = 4000, np.array([1.0, 0.5, 0.0, -0.3, 0.8, -0.6, 0.2, 0.4], np.float32)
    knobs = {"temperature": [temperature] * n, "seed": [123] * n, "choice": [0] * n}
    state = S.init_state(n, 8)
    if vary == "step":
        state = dataclasses.replace(state, step=jnp.arange(n, dtype=jnp.int32))
    else:
        knobs[vary] = list(range(n))
    result, _ = S.sample(jnp.tile(logits, (n, 1)), batch_params(**knobs), state, num_top_logprobs=1)
    observed = np.bincount(np.asarray(result.tokens), minlength=8)
    # Flake probability 1e-6 per case (3 cases), were the seeds not fixed.
    assert chi_square(observed, np_softmax(logits.astype(np.float64) / temperature)) < CHI2_CRITICAL_1E6[7]


def test_truncated_samples_follow_renormalised_softmax():
    """top_k=6 then top_p=0.8 then min_p=0.3 on vocab 8: the survivors keep their relative odds."""
    n, logits = 4000, np.array([1.0, 0.5, 0.0, -0.3, 0.8, -0.6, 0.2, 0.4], np.float32)
    params = batch_params(top_k=[6] * n, top_p=[0.8] * n, min_p=[0.3] * n, seed=list(range(n)))
    result, _ = S.sample(jnp.tile(logits, (n, 1)), params, S.init_state(n, 8), num_top_logprobs=1)
    keep = np_keep(logits, 6, 0.8, 0.3)
    assert keep is not None and 2 < keep.sum() < 6
    observed = np.bincount(np.asarray(result.tokens), minlength=8)
    assert observed[~keep].sum() == 0
    probs = np_softmax(np.where(keep, logits, -np.inf).astype(np.float64))
    # Flake probability 1e-6, were the seeds not fixed.
    assert chi_square(observed[keep], probs[keep]) < CHI2_CRITICAL_1E6[int(keep.sum()) - 1]


# ---------------------------------------------------------------------------------------------
# keys: a request's tokens depend only on (seed, choice, step, logits, its own params and state)


def _requests(rng, rows, vocab):
    """Per-row (logits, param row, counts, prompt mask, step) with nothing shared between rows."""
    return [
        (
            rng.normal(0, 2, vocab).astype(np.float32),
            S.make_params(
                seed=int(rng.integers(-(2**63), 2**63 - 1)), choice=int(rng.integers(0, 4)),
                temperature=float(rng.choice([0.0, 0.8, 1.5])), top_k=int(rng.choice([0, 20])),
                top_p=float(rng.choice([1.0, 0.9])), min_p=float(rng.choice([0.0, 0.02])),
                repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3,
            ),
            rng.integers(0, 3, vocab).astype(np.int32),
            rng.random(vocab) < 0.1,
            int(rng.integers(0, 1000)),
        )
        for _ in range(rows)
    ]


def _sample_batch(requests, num_top_logprobs=3):
    logits, rows, counts, prompt, step = zip(*requests)
    state = S.SamplerState(jnp.asarray(np.stack(counts)), jnp.asarray(np.stack(prompt)), jnp.asarray(step, jnp.int32))
    result, _ = S.sample(jnp.asarray(np.stack(logits)), S.stack_params(rows), state, num_top_logprobs=num_top_logprobs)
    return np.asarray(result.tokens), np.asarray(result.logprobs)


def test_same_request_same_token_in_any_row_of_any_batch():
    rng = np.random.default_rng(4)
    vocab = 128
    requests = _requests(rng, 8, vocab)
    tokens, logprobs = _sample_batch(requests)
    perm = rng.permutation(8)
    permuted, _ = _sample_batch([requests[i] for i in perm])
    np.testing.assert_array_equal(permuted, tokens[perm])
    neighbours = _requests(rng, 8, vocab)
    for i, request in enumerate(requests):
        alone, alone_lp = _sample_batch([request])
        assert alone[0] == tokens[i]
        np.testing.assert_allclose(alone_lp[0], logprobs[i], rtol=1e-5)
        mixed = neighbours[:5] + [request] + neighbours[5:7]
        assert _sample_batch(mixed)[0][5] == tokens[i]


def test_choices_steps_and_seed_words_give_different_streams():
    vocab, steps = 64, 48
    flat = jnp.zeros((4, vocab), jnp.float32)
    high_word = (1 << 32) | 5  # same low word as seed 5
    params = batch_params(seed=[5, 5, high_word, 6], choice=[0, 1, 0, 0])
    state = S.init_state(4, vocab)
    streams = []
    for _ in range(steps):
        result, state = S.sample(flat, params, state, num_top_logprobs=1)
        streams.append(np.asarray(result.tokens))
    streams = np.stack(streams, axis=1)
    assert len({tuple(s) for s in streams}) == 4  # P(two equal streams) = 64**-48
    assert len(set(streams[0])) > 10  # successive steps draw fresh keys


# ---------------------------------------------------------------------------------------------
# greedy, extremes, compilation


def test_temperature_zero_is_argmax_whatever_the_knobs():
    rng = np.random.default_rng(5)
    rows, vocab = 64, 100
    logits = rng.normal(0, 3, (rows, vocab)).astype(np.float32)
    counts = (rng.integers(0, 3, (rows, vocab)) * (rng.random((rows, vocab)) < 0.2)).astype(np.int32)
    prompt = rng.random((rows, vocab)) < 0.1
    allowed = rng.random((rows, vocab)) < 0.5
    allowed[:, 0] = True
    rep, (presence, frequency) = rng.choice([0.01, 1.0, 5.0], rows), rng.uniform(-2, 2, (2, rows))
    params = batch_params(
        temperature=rng.choice([0.0, 1e-6], rows).tolist(), top_k=rng.choice([0, 1, 7], rows).tolist(),
        top_p=rng.choice([1.0, 1e-6, 0.5], rows).tolist(), min_p=rng.choice([0.0, 0.9], rows).tolist(),
        repetition_penalty=rep.tolist(), presence_penalty=presence.tolist(), frequency_penalty=frequency.tolist(),
    )
    state = S.SamplerState(jnp.asarray(counts), jnp.asarray(prompt), jnp.zeros(rows, jnp.int32))
    result, _ = S.sample(jnp.asarray(logits), params, state, jnp.asarray(allowed), num_top_logprobs=2)
    masked = np.where(allowed, logits, -np.inf).astype(np.float32)
    want = np.argmax(np_penalties(masked, rep, presence, frequency, counts, prompt), axis=-1)
    np.testing.assert_array_equal(result.tokens, want)
    # one sampled row makes the batch take the drawing path: the greedy rows must not change
    mixed = dataclasses.replace(params, temperature=params.temperature.at[0].set(1.0))
    result, _ = S.sample(jnp.asarray(logits), mixed, state, jnp.asarray(allowed), num_top_logprobs=2)
    np.testing.assert_array_equal(result.tokens[1:], want[1:])


def test_top_logprobs_only_when_a_row_asks(path):
    rng = np.random.default_rng(6)
    logits = rng.normal(0, 3, (3, 50)).astype(np.float32)
    state = S.init_state(3, 50)
    result, _ = S.sample(jnp.asarray(logits), batch_params(top_logprobs=[0, 3, 0]), state, num_top_logprobs=4)
    want = np.log(np.exp(logits[1]) / np.exp(logits[1]).sum())
    np.testing.assert_array_equal(result.top_ids[1], np.argsort(-want)[:4])
    np.testing.assert_allclose(result.top_logprobs[1], np.sort(want)[::-1][:4], rtol=1e-5)
    result, _ = S.sample(jnp.asarray(logits), batch_params(top_logprobs=[0, 0, 0]), state, num_top_logprobs=4)
    if path == "cpu-path":
        assert np.all(np.isneginf(result.top_logprobs)), "no row asked: the search is skipped"
    else:  # branch-free: always computed (cheaper on a GPU than a branch), the same values
        np.testing.assert_allclose(result.top_logprobs[1], np.sort(want)[::-1][:4], rtol=1e-5)
    np.testing.assert_allclose(result.logprobs, np.take_along_axis(
        logits - np.log(np.exp(logits).sum(-1, keepdims=True)), np.asarray(result.tokens)[:, None], -1)[:, 0], rtol=1e-5)


def test_extremes_never_give_nan_or_out_of_vocab():
    rng = np.random.default_rng(6)
    vocab = 257
    extremes = [
        dict(top_p=1e-6), dict(top_k=1), dict(temperature=2.0), dict(temperature=2.0, top_p=1e-6),
        dict(repetition_penalty=5.0), dict(repetition_penalty=0.01), dict(repetition_penalty=0.01, temperature=2.0),
        dict(presence_penalty=2.0, frequency_penalty=2.0), dict(presence_penalty=-2.0, frequency_penalty=-2.0),
        dict(min_p=1.0), dict(top_k=999, top_p=1e-6, min_p=1.0), dict(temperature=1e-5), dict(temperature=0.0),
    ]
    rows = len(extremes) * 3
    params = S.stack_params([S.make_params(seed=i, **extremes[i % len(extremes)]) for i in range(rows)])
    logits = rng.normal(0, 1, (rows, vocab)).astype(np.float32) * rng.choice([1e-3, 1.0, 1e4], (rows, 1))
    logits = logits.astype(np.float32)
    allowed = np.ones((rows, vocab), bool)
    only = rng.integers(0, vocab, rows)
    one_left = np.arange(rows) % 3 == 1  # all masked but one
    allowed[one_left] = False
    allowed[one_left, only[one_left]] = True
    dead = np.arange(rows) % 3 == 2  # all masked: greedy over the unmasked logits
    allowed[dead] = False
    state = S.init_state(rows, vocab)
    state = dataclasses.replace(
        state,
        counts=jnp.asarray(rng.integers(0, 1000, (rows, vocab)) * (rng.random((rows, vocab)) < 0.5), jnp.int32),
        prompt_mask=jnp.asarray(rng.random((rows, vocab)) < 0.5),
    )
    for _ in range(3):
        result, new_state = S.sample(jnp.asarray(logits), params, state, jnp.asarray(allowed), num_top_logprobs=5)
        tokens = np.asarray(result.tokens)
        assert ((0 <= tokens) & (tokens < vocab)).all()
        assert np.isfinite(result.logprobs).all() and (np.asarray(result.logprobs) <= 0).all()
        assert not np.isnan(result.top_logprobs).any()
        np.testing.assert_array_equal(tokens[one_left], only[one_left])
        penalised = np.asarray(S.apply_penalties(jnp.asarray(logits), params, state))
        np.testing.assert_array_equal(tokens[dead], np.argmax(penalised[dead], axis=-1))
        state = new_state


def test_compiles_once_for_any_parameter_values():
    rng = np.random.default_rng(7)
    rows, vocab = 8, 96

    def inputs():
        params = batch_params(
            temperature=rng.uniform(0, 2, rows).tolist(), top_k=rng.integers(0, 999, rows).tolist(),
            top_p=rng.uniform(0.01, 1, rows).tolist(), min_p=rng.uniform(0, 1, rows).tolist(),
            repetition_penalty=rng.uniform(0.01, 5, rows).tolist(), presence_penalty=rng.uniform(-2, 2, rows).tolist(),
            frequency_penalty=rng.uniform(-2, 2, rows).tolist(), seed=rng.integers(0, 2**62, rows).tolist(),
            choice=rng.integers(0, 9, rows).tolist(),
        )
        state = S.SamplerState(
            jnp.asarray(rng.integers(0, 3, (rows, vocab)), jnp.int32),
            jnp.asarray(rng.random((rows, vocab)) < 0.5),
            jnp.asarray(rng.integers(0, 100, rows), jnp.int32),
        )
        logits = jnp.asarray(rng.normal(size=(rows, vocab)), jnp.float32)
        return logits, params, state, jnp.asarray(rng.random((rows, vocab)) < 0.9)

    batches = [inputs() for _ in range(4)]
    logits, params, state, allowed = batches[0]
    jax.block_until_ready(S.sample(logits, params, state, allowed))  # warm-up: one compile
    jax.block_until_ready(S.sample(logits, params, state))  # the no-mask variant: one more
    with CompileCounter() as compiles:
        for logits, params, state, allowed in batches[1:]:
            jax.block_until_ready(S.sample(logits, params, state, allowed))
            jax.block_until_ready(S.sample(logits, params, state))
    assert compiles.count == 0


def test_logit_bias_steers_every_step_and_never_recompiles():
    """OpenAI's logit_bias: +100 forces a token, -100 bans it, under greedy and sampled rows alike;
    the bias is a fixed-size traced field, so new biases reuse the compiled sampler."""
    vocab = 50
    logits = jnp.zeros((3, vocab)).at[:, 7].set(5.0)
    state = S.init_state(3, vocab)

    def tokens(*biases):
        rows = [S.make_params(temperature=t, seed=1, logit_bias=b) for t, b in zip((0.0, 1.0, 0.0), biases)]
        return S.sample(logits, S.stack_params(rows), state)[0].tokens.tolist()

    assert tokens({}, {}, {}) == [7, 7, 7]
    with CompileCounter() as compiles:
        assert tokens({3: 100}, {3: 100.0}, {7: -100})[:2] == [3, 3]
        assert tokens({}, {}, {7: -100})[2] != 7
        assert tokens({i: 0.5 for i in range(S.MAX_LOGIT_BIAS)}, [(7, -100), (9, 100)], {})[1:] == [9, 7]
    assert compiles.count == 0


def test_a_pass_one_row_needs_leaves_its_neighbours_as_a_batch_without_it():
    """The CPU path skips the logit bias, the min_tokens ban and the penalties for a batch where no row needs them
    (`lax.cond`); a batch where one row does runs them for all, and its other rows get the same tokens and logprobs."""
    rng = np.random.default_rng(3)
    vocab = 40
    logits = jnp.asarray(rng.normal(0, 3, (3, vocab)), jnp.float32)
    counts = jnp.asarray(rng.integers(0, 3, (3, vocab)), jnp.int32)
    state = S.SamplerState(counts, jnp.asarray(rng.random((3, vocab)) < 0.3), jnp.zeros(3, jnp.int32))
    neutral = [S.make_params(temperature=0.0, seed=1, top_logprobs=3), S.make_params(temperature=0.8, seed=2)]
    needs = {"penalties": dict(presence_penalty=1.5, repetition_penalty=1.3), "bias": dict(logit_bias={5: 30.0}),
             "ban": dict(min_tokens=2, stop_ids=[int(jnp.argmax(logits[2]))])}
    alone, _ = S.sample(logits, S.stack_params([*neutral, S.make_params(temperature=0.0)]), state, num_top_logprobs=3)
    for what, knobs in needs.items():
        mixed, _ = S.sample(logits, S.stack_params([*neutral, S.make_params(temperature=0.0, **knobs)]), state,
                            num_top_logprobs=3)
        for field in ("tokens", "logprobs", "top_ids", "top_logprobs"):
            np.testing.assert_array_equal(getattr(mixed, field)[:2], getattr(alone, field)[:2], f"{what} {field}")
        assert float(mixed.logprobs[2]) != float(alone.logprobs[2]), what  # the row that needs it got it


@pytest.mark.parametrize("bias", [{1: 100.5}, {1: -101}, {-1: 1}, {"1": 1}, {1: True}, [(1, 1), (1, 2)],
                                  {i: 1 for i in range(S.MAX_LOGIT_BIAS + 1)}])
def test_bad_logit_bias_is_a_value_error_naming_it(bias):
    with pytest.raises(ValueError, match="^logit_bias"):
        S.make_params(logit_bias=bias)
