"""Speculative decoding with prompt-lookup drafts (llama_jax/speculative.py, device.verify): the
drafts themselves; on a tiny random model with a 32-token vocabulary, the same tokens as plain
decoding for the same seed under every sampling knob, a chi-square test of the output
distribution against the target's computed exactly, and no compiles under any mix; on the real
SmolLM2 (../shared), greedy replies equal to plain decoding token for token under concurrency and
prefix-cache hits, with drafts accepted."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from llama_jax import steps
from llama_jax.compiles import CompileCounter
from llama_jax.config import LlamaConfig
from llama_jax.engine import Engine, EngineConfig
from llama_jax.model import init_model
from llama_jax.request import Request, RequestError, SamplingOptions
from llama_jax.speculative import (ACCELERATOR_VERIFY_COST, CPU_VERIFY_COST, MAX_CONTEXT, PRIOR_ACCEPTANCE, Acceptance,
                                   Drafting, SpeculativeConfig, StepTimes, after_verify, choose_drafts, context_bucket,
                                   draft_rows, measure_costs, propose, worth_verifying)
from llama_jax.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = REPO_ROOT.parent / "shared" / "llama2-tokenizer" / "tokenizer.model"
GGUF = REPO_ROOT.parent / "shared" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 32
K = 4
SIGNIFICANCE = 0.001  # the chi-square test fails when p < 0.001 (deterministic: fixed seeds, fixed tokens)
PROMPT = [1, 3, 4, 5, 6, 3, 4, 5, 6, 3, 4, 5]  # repeats, so every step has a draft


# ---- drafts -----------------------------------------------------------------------------------

def test_propose_takes_the_longest_ngram_at_its_most_recent_occurrence():
    # "7 8" occurred twice; the 2-gram wins over the 1-gram "8" (which also follows 9 below)
    ids = [7, 8, 1, 2, 3, 9, 8, 5, 7, 8, 4, 6, 0, 7, 8]
    assert propose(ids, 3) == ([4, 6, 0], 2)  # most recent earlier "7 8" is at 8..9, after 5 (not 0): 2 tokens matched
    assert propose(ids, 3, min_n=3, max_n=4) == ([], 0)  # no 3-gram "0 7 8" recurs
    assert propose(ids, 1) == ([4], 2)
    assert propose([5, 6, 5], 4) == ([6, 5], 1)  # what followed, up to the end
    assert propose([1, 2, 3], 4) == ([], 0) == propose([1], 4) == propose([1, 2, 1], 0)


def test_a_drafts_context_is_how_far_back_the_match_holds():
    """The n-gram is at most 4 tokens; the context counts on past it (copying: long), up to MAX_CONTEXT."""
    span = list(range(100, 120))
    assert propose([1, 2, *span, 9, 3, *span], 2) == ([9, 3], 20)  # "1 2" and "3" differ before the 20 copied tokens
    copied = list(range(100, 100 + 2 * MAX_CONTEXT))
    assert propose([*copied, 5, *copied], 1) == ([5], MAX_CONTEXT)
    assert [context_bucket(c) for c in (0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, MAX_CONTEXT)] == [0, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]


def test_draft_rows_pads_and_limits_each_row():
    config = SpeculativeConfig(tokens=3)
    drafts, counts, contexts = draft_rows([([1, 2, 3, 1, 2], 3), None, ([1, 2, 3, 1, 2], 1), ([4, 5], 3)], config)
    assert drafts.shape == (4, 3) and counts.tolist() == [3, 0, 1, 0] and contexts == [2, 0, 2, 0]
    assert drafts[0].tolist() == [3, 1, 2] and drafts[2].tolist() == [3, 0, 0]


def test_config_is_checked():
    with pytest.raises(ValueError):
        SpeculativeConfig(tokens=-1)
    with pytest.raises(ValueError):
        SpeculativeConfig(tokens=4, min_n=3, max_n=2)
    for bad in (dict(verify_cost=0.5), dict(smoothing=0.0), dict(backoff=8, max_backoff=4), dict(backoff=-1)):
        with pytest.raises(ValueError):
            SpeculativeConfig(tokens=4, **bad)
    assert not SpeculativeConfig().enabled


# ---- the policy: backoff and the cost decision -------------------------------------------------

def test_a_choice_whose_drafts_fail_backs_off_for_doubling_intervals_and_retries():
    config = SpeculativeConfig(tokens=4, backoff=4, max_backoff=16)
    record, generated, waits = Drafting(), 10, []
    assert record.may_draft(0) and record.acceptance == PRIOR_ACCEPTANCE == 1.0  # a fresh choice drafts at once, hoping
    for _ in range(5):  # every draft rejected
        record = after_verify(record, 4, 0, generated, config, 1.5)
        wait = record.resume_at - generated
        assert not record.may_draft(generated + wait - 1) and record.may_draft(generated + wait)
        assert record.acceptance == PRIOR_ACCEPTANCE  # the retry is judged afresh
        waits.append(wait)
        generated += wait
    assert waits == [4, 8, 16, 16, 16] and record.failures == 5
    record = after_verify(record, 4, 3, generated, config, 1.5)  # the retry holds: drafting resumes, no wait
    assert record.failures == 0 and record.may_draft(generated) and record.acceptance == pytest.approx(0.875)
    record = after_verify(record, 4, 0, generated + 1, config, 1.5)  # a failure after a success starts over at 4
    assert record.failures == 1 and record.resume_at == generated + 1 + 4


def test_the_verify_cost_until_measured_is_a_cpus_or_a_gpus_guess():
    assert SpeculativeConfig(tokens=4).for_platform(cpu=True).verify_cost == CPU_VERIFY_COST == 2.0
    assert SpeculativeConfig(tokens=4).for_platform(cpu=False).verify_cost == ACCELERATOR_VERIFY_COST == 1.5
    assert SpeculativeConfig(tokens=4, verify_cost=3).for_platform(cpu=True).verify_cost == 3  # a given one stays


def test_acceptance_is_a_moving_average_and_a_poor_one_backs_off_too():
    config = SpeculativeConfig(tokens=4, smoothing=0.5, backoff=4)
    record = after_verify(Drafting(1.0), 4, 2, 0, config, 1.5)
    assert record.acceptance == 0.75 and record.failures == 0
    record = after_verify(record, 4, 1, 0, config, 1.5)
    assert record.acceptance == 0.5 and record.failures == 0  # 0.5 x 4 pays for a row costing 0.5 more
    poor = after_verify(Drafting(0.5), 4, 1, 7, config, 3)  # 0.375 x 4 < 2: its own row's extra cost is not paid
    assert poor.failures == 1 and not poor.may_draft(7 + 3) and poor.may_draft(7 + 4)


def test_a_verify_step_is_taken_when_the_expected_tokens_pay_for_it():
    assert worth_verifying(2.0, 1, 3) and not worth_verifying(1.9, 1, 3)  # a verify step costs 2 plain steps more
    assert worth_verifying(16.0, 8, 3) and not worth_verifying(12.0, 8, 3)
    assert worth_verifying(20.8, 8, 3, margin=1.3) and not worth_verifying(20.7, 8, 3, margin=1.3)
    assert not worth_verifying(0.0, 1, 1)  # no draft, no verify


def test_the_server_expects_of_a_draft_what_drafts_with_as_long_a_context_held():
    """Each context bucket starts fully trusted (`prior` tokens all accepted), then follows what its drafts held,
    forgetting by half every `half_life` drafted tokens; other buckets keep their own."""
    acceptance = Acceptance(prior=8, half_life=64)
    assert acceptance.share(2) == acceptance.share(40) == 1.0
    acceptance.observe(2, 8, 0)  # a draft after a 2-gram failed whole
    assert acceptance.share(3) == 0.5 and acceptance.share(40) == 1.0  # 8 / (8 + 8): its bucket (2-3 tokens) only
    for _ in range(100):  # drafts after short matches hold a quarter of their tokens; after long ones all
        acceptance.observe(3, 8, 2)
        acceptance.observe(40, 8, 8)
    drafted = 8 / (1 - 0.5 ** (8 / 64))  # the decayed sum's limit; the prior's 8 tokens stay
    assert acceptance.share(2) == pytest.approx((drafted / 4 + 8) / (drafted + 8), rel=1e-3) and acceptance.share(40) == 1.0
    for _ in range(100):  # the short matches start to hold: the old record fades
        acceptance.observe(2, 8, 8)
    assert acceptance.share(2) > 0.95


class Choice:
    """What `choose_drafts` reads of a running choice, and what it tells it."""

    def __init__(self, ids: list[int], max_tokens: int = 100):
        self.ids, self.max_tokens, self.generated, self.told = np.asarray(ids), max_tokens, 0, None

    def drafts_now(self) -> bool:
        return True

    def drafted(self, n: int, context: int) -> None:
        self.told = (n, context)


def test_drafts_are_verified_when_their_contexts_acceptance_pays_with_the_margin():
    """Two slots at a verify cost of 2 (margin 1.3: 2.6 expected tokens needed): 4 drafted tokens after a long match
    whose bucket held 0.9 pay; after a 2-gram whose bucket held 0.25, 1 expected token does not."""
    config, acceptance = SpeculativeConfig(tokens=4), Acceptance(prior=1e-9)
    span = list(range(100, 120))
    copying, common = Choice([*span, 7, 8, 9, 1, *span]), Choice([5, 2, 3, 6, 6, 6, 2, 3])
    acceptance.observe(20, 10, 9)
    acceptance.observe(2, 4, 1)
    assert choose_drafts([common, None], config, 1000, 2, 2.0, acceptance) is None and common.told is None
    drafts, counts = choose_drafts([copying, None], config, 1000, 2, 2.0, acceptance)
    assert counts.tolist() == [4, 0] and drafts[0].tolist() == [7, 8, 9, 1] and copying.told == (4, 20)


def test_a_context_bucket_judged_poor_is_tried_again_after_enough_unverified_proposals():
    """A bucket whose drafts failed stops paying; proposals it declines make it forget (slowly: half every
    `unverified_half_life` tokens), so its drafts are verified again and judged afresh, rather than never."""
    config, acceptance = SpeculativeConfig(tokens=4), Acceptance(prior=8, half_life=256, unverified_half_life=64)
    common = Choice([5, 2, 3, 6, 6, 6, 2, 3])  # drafts [6, 6, 6, 2] after a 2-gram
    for _ in range(20):
        acceptance.observe(2, 4, 0)  # its bucket's drafts failed whole
    poor = acceptance.share(2)
    assert poor < 0.15
    declined = 0
    while choose_drafts([common], config, 1000, 1, 2.0, acceptance) is None:  # needs 1.3 of 4 tokens expected
        declined += 1
        assert acceptance.share(2) > poor and common.told is None
        poor = acceptance.share(2)
    assert 30 <= declined <= 40, declined  # 4 tokens a proposal: 8 / (76 f + 8) >= 0.325 at f <= 0.22, 2.2 half-lives
    assert common.told == (4, 2) and acceptance.share(2) >= 0.325 and acceptance.share(40) == 1.0


def test_the_cost_is_the_median_ratio_of_back_to_back_pairs_per_bucket():
    """Each step runs once untimed, then in `repeats` (plain, verify) pairs: a machine whose speed
    drifts between pairs, and one call slowed by something else, change nothing."""
    clock, calls = [0.0], []
    plain_s, verify_s = {1: 0.010, 8: 0.020}, {1: 0.015, 8: 0.060}

    def step(rows, drafts):
        calls.append((rows, drafts is not None))
        drift = 2 if (len(calls) - 1) // 4 % 2 else 1  # the machine halves its speed every 4 calls, then recovers
        slow = 5 if len(calls) == 5 else 1  # one plain step disturbed
        clock[0] += drift * slow * (verify_s if drafts is not None else plain_s)[rows]

    costs = measure_costs(step, (np.zeros((8, 4), np.int32), np.zeros(8, np.int32)), [1, 8], repeats=5,
                          clock=lambda: clock[0])
    assert costs == {1: pytest.approx(1.5), 8: pytest.approx(3.0)}
    assert calls == ([(1, False), (1, True)] * 6 + [(8, False), (8, True)] * 6)
    cheap = measure_costs(lambda rows, drafts: clock.__setitem__(0, clock[0] + (0.001 if drafts else 0.002)), (None, None),
                          [1], clock=lambda: clock[0])
    assert cheap == {1: 1.0}  # never below a plain step: a verify step does a plain step's work


def test_served_steps_set_the_cost_once_both_kinds_are_timed_alone():
    """A lap's time since the last is the step just read, counted only while steps are read one at a
    time (speculating) and nothing else ran between; medians, so one slow step changes nothing."""
    now = [0.0]
    times = StepTimes(window=5, min_steps=3)

    def lap(step, seconds, reading=True):
        now[0] += seconds
        return times.lap(step, reading, clock=lambda: now[0])

    assert lap(None, 0.0) == {}  # the first read: nothing to time yet
    assert [lap((1, False), 0.010) for _ in range(2)] == [{}, {}]
    assert lap(None, 5.0) == {}  # an admission ran between: not a step's time
    assert lap((1, False), 0.010) == {}
    assert lap((1, False), 0.010, reading=False) == {}  # pipelined: not timed, and the next lap has no start
    assert lap((1, True), 9.0) == {}
    assert [lap((1, True), 0.030) for _ in range(2)] == [{}, {}]  # 3 plain times, 2 verify times
    assert lap((1, True), 0.030) == {1: pytest.approx(3.0)}
    assert lap((1, False), 1.0) == {1: pytest.approx(3.0)}  # one slow plain step (a first run): the median holds
    assert [lap((1, True), 0.060) for _ in range(3)][-1] == {1: pytest.approx(6.0)}  # a lasting change moves it
    assert lap((2, True), 0.001) == {}  # another bucket has its own times
    assert times.observe(4, False, 0.02) is None and [times.observe(4, k, 0.01) for k in (True, True, True, False, False)][-1] == 1.0


# ---- a tiny random model: exactness of sampling -----------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    """A 2-layer float32 model over 32 tokens whose LM head is scaled up (peaked distributions, so
    drafts are often accepted and often rejected), served with 4-token drafts, fully warmed up."""
    if not TOKENIZER.exists():
        pytest.skip(f"the Llama 2 tokenizer is not at {TOKENIZER} (../shared)")
    cfg = LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                      dtype="float32")
    model = init_model(cfg, seed=0)
    model.lm_head.set_value(model.lm_head.get_value() * 40)
    config = EngineConfig(max_slots=8, max_seq_len=64, max_prefill_tokens=64, max_queue=2000,
                          speculative=SpeculativeConfig(tokens=K, min_n=1, verify_cost=1.0))  # 1-grams: the chi-square prompt; cost 1: any draft is verified
    engine = Engine(model, Tokenizer(TOKENIZER), config).start()
    yield model, engine
    engine.stop()


def tokens(completion, choice: int = 0) -> list[int]:
    return [t.token_id for t in completion.choices[choice].tokens]


KNOBS = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_p=0.8, top_k=5),
         dict(temperature=1.3, min_p=0.05, presence_penalty=1.5, frequency_penalty=0.5),
         dict(temperature=1.0, repetition_penalty=1.8, logit_bias=((4, 3.0), (5, -100.0)))]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(k))
def test_same_seed_gives_the_plain_tokens_and_the_same_tokens_run_to_run(tiny, knobs):
    _, engine = tiny
    drafted = accepted = 0
    for seed in range(12):
        run = lambda spec: engine.submit(Request(prompt=PROMPT, max_tokens=16, stop_token_ids=[], n=2, top_logprobs=3,
                                                 min_tokens=4, speculative=spec,
                                                 sampling=SamplingOptions(seed=seed, **knobs))).result()
        plain, first, again = run(False), run(True), run(True)
        for c in range(2):
            assert tokens(first, c) == tokens(plain, c) == tokens(again, c)
            np.testing.assert_allclose([t.logprob for t in first.choices[c].tokens],
                                       [t.logprob for t in plain.choices[c].tokens], atol=1e-4)
            assert [[i for i, _ in t.top] for t in first.choices[c].tokens] == \
                   [[i for i, _ in t.top] for t in plain.choices[c].tokens]
        assert plain.drafted_tokens == 0
        drafted, accepted = drafted + first.drafted_tokens, accepted + first.accepted_tokens
    assert drafted > 0 and 0 < accepted <= drafted


def exact_distribution(model, prompt: list[int], n_tokens: int) -> np.ndarray:
    """p(t1..tn | prompt) at temperature 1, `[VOCAB] * n`, from full forwards of every prefix."""
    graphdef, params = nnx.split(model)
    joint = np.ones(())
    for depth in range(n_tokens):
        seqs = [prompt + list(t) for t in itertools.product(range(VOCAB), repeat=depth)]
        padded, lengths = steps.pad_prompts(seqs, 64)
        logits, _ = steps.prefill(graphdef, params, padded, lengths)
        p = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
        p /= p.sum(-1, keepdims=True)
        joint = joint[..., None] * p.reshape((VOCAB,) * depth + (VOCAB,))
    return joint


def chained_prompt(model) -> list[int]:
    """BOS and every token once, each followed where possible by the model's likeliest next token
    after it: whatever the first sampled token, the second has a 1-gram draft, often accepted."""
    graphdef, params = nnx.split(model)
    padded, lengths = steps.pad_prompts([[1, t] for t in range(VOCAB)], 16)
    likeliest = np.asarray(steps.prefill(graphdef, params, padded, lengths)[0]).argmax(-1)
    order, unused, t = [], set(range(VOCAB)), 0
    while unused:
        order.append(t)
        unused.discard(t)
        t = int(likeliest[t]) if likeliest[t] in unused else min(unused, default=0)
    return [1, *order]


def test_output_distribution_is_the_targets_chi_square(tiny):
    """10,240 samples of 3 tokens (the 2nd and 3rd verified against a draft) against the exact
    joint distribution; cells expected below 5 pooled. Passes at p >= SIGNIFICANCE (2026-12-04:
    chi2 66.4 on 62 degrees of freedom, p = 0.36. The samples are
    the plain path's token for token, the seeds being the same, so the statistic is too)."""
    model, engine = tiny
    CHI_PROMPT = chained_prompt(model)
    n_requests, n = 1280, 8
    handles = [engine.submit(Request(prompt=CHI_PROMPT, max_tokens=3, stop_token_ids=[], n=n, speculative=True,
                                     sampling=SamplingOptions(temperature=1.0, seed=seed))) for seed in range(n_requests)]
    results = [h.result() for h in handles]
    samples = np.array([tokens(r, c) for r in results for c in range(n)])
    drafted, accepted = sum(r.drafted_tokens for r in results), sum(r.accepted_tokens for r in results)
    assert drafted >= n_requests * n * 0.5 and 0.1 * drafted < accepted < 0.9 * drafted, (drafted, accepted)  # both branches, often
    expected = exact_distribution(model, CHI_PROMPT, 3).ravel() * len(samples)
    observed = np.bincount(np.ravel_multi_index(samples.T, (VOCAB,) * 3), minlength=VOCAB**3)
    big = expected >= 5
    f_obs = np.append(observed[big], observed[~big].sum())
    f_exp = np.append(expected[big], expected[~big].sum())
    assert big.sum() >= 30  # enough cells for the test to have power
    chi2 = float(np.sum((f_obs - f_exp) ** 2 / f_exp))
    p = float(jax.scipy.special.gammaincc((len(f_obs) - 1) / 2, chi2 / 2))  # the chi-square survival function
    assert p >= SIGNIFICANCE, (chi2, p, big.sum())


def test_no_compiles_after_warmup_with_speculation_under_any_mix(tiny):
    _, engine = tiny
    rng = np.random.default_rng(5)
    with CompileCounter() as counter:
        handles = [engine.submit(Request(
            prompt=[1, *rng.integers(3, 8, size=int(rng.integers(2, 20))).tolist()], n=int(rng.integers(1, 4)),
            max_tokens=int(rng.integers(1, 10)), top_logprobs=int(rng.integers(0, 21)),
            speculative=bool(rng.random() < 0.7), stop_token_ids=[int(rng.integers(3, 8))],
            sampling=SamplingOptions(temperature=float(rng.uniform(0, 2)), top_k=int(rng.integers(0, 10)),
                                     seed=int(rng.integers(0, 2**62))))) for _ in range(40)]
        results = [h.result() for h in handles]
    assert counter.count == 0
    assert sum(r.accepted_tokens for r in results) > 0


def test_max_tokens_and_stop_ids_cut_where_plain_decoding_does(tiny):
    _, engine = tiny
    for max_tokens in range(1, 12):
        for stop in ([], [4], [5, 6]):
            run = lambda spec: tokens(engine.submit(Request(
                prompt=PROMPT, max_tokens=max_tokens, stop_token_ids=stop, speculative=spec,
                sampling=SamplingOptions(temperature=0))).result())
            assert run(True) == run(False)


def test_a_verify_step_needs_drafts_that_pay_for_every_busy_slot(tiny):
    """`verify_cost` 2.5: a verify step must expect 1.5 accepted tokens per busy slot. One fresh
    speculating choice among four busy slots (at most 4 expected) never makes every slot run k + 1
    positions; four of four do. The requests are queued before the engine starts: one prefill."""
    model, _ = tiny
    config = EngineConfig(max_slots=4, max_seq_len=64, max_prefill_tokens=64,
                          speculative=SpeculativeConfig(tokens=K, min_n=1, verify_cost=2.5))
    for speculating, drafts in ((1, False), (4, True)):
        engine = Engine(model, Tokenizer(TOKENIZER), config)
        handles = [engine.submit(Request(prompt=PROMPT, max_tokens=12, stop_token_ids=[], speculative=i < speculating,
                                         sampling=SamplingOptions(temperature=0))) for i in range(4)]
        with engine.start(warmup=False):
            results = [h.result() for h in handles]
        assert (sum(r.drafted_tokens for r in results) > 0) == drafts == (engine.verify_steps > 0)
        assert len({tuple(tokens(r)) for r in results}) == 1  # the same greedy reply in every slot


def replayed_draft_steps(prompt: list[int], reply: list[int], k: int = K, max_n: int = 4) -> int:
    """The steps that would verify a draft if every step drafted (no backoff), replayed on the host
    over a greedy `reply` (exact for greedy: a draft token holds while it equals the reply)."""
    steps, pos = 0, 1
    while pos < len(reply):
        draft, _ = propose(prompt + reply[:pos], min(k, len(reply) - pos - 1), 1, max_n)
        held = next((i for i, (d, t) in enumerate(zip(draft, reply[pos:])) if d != t), len(draft))
        steps, pos = steps + bool(draft), pos + held + 1
    return steps


def test_rejected_drafts_back_off_and_the_tokens_stay_the_same(tiny):
    """Greedy replies under a strong repetition penalty avoid the tokens they have seen, so drafts
    (which are seen tokens) mostly fail. A choice whose every draft failed verified at most 6 of
    its 40 steps (backoff 1, 2, 4, 8, 16 tokens), under half of what drafting at every step would
    verify; the tokens are plain decoding's."""
    _, engine = tiny
    rng = np.random.default_rng(0)
    max_tokens, never_accepted, verified, replayed = 40, 0, 0, 0  # the last two: of the choices never accepted
    for _ in range(8):
        prompt = [1, *rng.integers(3, VOCAB, size=10).tolist()]
        run = lambda spec: engine.submit(Request(prompt=prompt, max_tokens=max_tokens, stop_token_ids=[], speculative=spec,
                                                 sampling=SamplingOptions(temperature=0, repetition_penalty=2.0))).result()
        plain = run(False)
        before = engine.verify_steps
        fast = run(True)
        steps = engine.verify_steps - before
        assert tokens(fast) == tokens(plain) and len(tokens(fast)) == max_tokens
        if fast.accepted_tokens == 0:  # every draft failed
            never_accepted += 1
            assert 0 < steps <= 5, steps
            verified, replayed = verified + steps, replayed + replayed_draft_steps(prompt, tokens(plain))
    assert never_accepted >= 3  # the case this test is about occurred
    assert verified * 2 < replayed, (verified, replayed)


def test_warmup_measures_the_verify_cost_per_row_bucket_unless_one_is_given(tiny):
    """Left to the engine, a verify step's cost in plain steps is measured at warm-up for every row
    bucket (real program runs: at least 1, and finite); the slots are empty again afterwards, and
    nothing compiles when requests then run. A given cost is used as is."""
    model, fixed = tiny
    assert fixed.verify_costs == dict.fromkeys(fixed.row_buckets, 1.0)
    config = EngineConfig(max_slots=2, max_seq_len=64, max_prefill_tokens=64, speculative=SpeculativeConfig(tokens=K, min_n=1))
    engine = Engine(model, Tokenizer(TOKENIZER), config)
    assert engine.verify_costs == dict.fromkeys([1, 2], CPU_VERIFY_COST)  # the guess until warm-up
    with engine.start():
        assert set(engine.verify_costs) == {1, 2} and all(1.0 <= c < 100 for c in engine.verify_costs.values())
        assert engine.busy_slots == 0 and engine.verify_steps == 0 and engine.drafted_tokens == 0
        with CompileCounter() as counter:
            run = lambda spec: tokens(engine.submit(Request(prompt=PROMPT, max_tokens=12, stop_token_ids=[], speculative=spec,
                                                            sampling=SamplingOptions(temperature=0))).result())
            assert run(True) == run(False)
        assert counter.count == 0
        assert set(engine.verify_costs) == {1, 2} and all(1.0 <= c < 100 for c in engine.verify_costs.values())  # served


def test_speculative_request_on_a_server_without_it_is_refused(tiny):
    model, _ = tiny
    engine = Engine(model, Tokenizer(TOKENIZER), EngineConfig(max_slots=2, max_seq_len=64))  # never started
    with pytest.raises(RequestError) as e:
        engine.submit(Request(prompt=PROMPT, speculative=True))
    assert e.value.param == "speculative"


# ---- the real model: greedy replies unchanged ---------------------------------------------------

PARAGRAPH = ("The old lighthouse stood on the northern cliff for more than two hundred years. Every evening the "
             "keeper climbed the spiral stairs, trimmed the wick and polished the great lens until it shone. Ships "
             "passing in the night trusted its beam to guide them past the rocks.")
GROUNDED = [f"Repeat this text exactly: {PARAGRAPH}",
            f"Rewrite this paragraph, changing 'old' to 'ancient' and nothing else: {PARAGRAPH}",
            f"Copy the first sentence of this text: {PARAGRAPH}",
            "Repeat after me: one two three four five six seven eight nine ten.",
            "Write the word 'hello' five times.",
            'Convert to JSON with keys name and city: "Alice lives in Paris. Bob lives in Rome."',
            "Fix the typo and repeat the sentence: The cat sat on teh mat.",
            "List the days of the week, then list them again."]
OPEN = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
        "Explain what a CPU does in one sentence.", "Say hello in French.", "Give me two tips for sleeping better.",
        "What is 12 times 7?", "Name a famous painting and its painter.", "Describe a cat in one sentence.",
        "Why is the sky blue?", "Tell me a fun fact about octopuses.", "What is the boiling point of water?"]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real SmolLM2-135M-Instruct (float32, from ../shared's GGUF) served with 4-token drafts
    in 4 slots, compiled as requests need programs (no full warm-up), and its 20 chat prompts."""
    if not GGUF.exists():
        pytest.skip(f"the real SmolLM2 GGUF is not at {GGUF} (it lives in ../shared, never in the repo)")
    from llama_jax import checkpoint
    from llama_jax.convert import main
    from llama_jax.tokenizer import apply_chat_template, load_tokenizer

    out = tmp_path_factory.mktemp("smollm2") / "f32"
    assert main([str(GGUF), str(out), "--quiet"]) == 0
    loaded = checkpoint.load(out)
    tokenizer = load_tokenizer(loaded.tokenizer_path)
    config = EngineConfig(max_slots=4, max_seq_len=512, max_prefill_tokens=512,
                          speculative=SpeculativeConfig(tokens=K, verify_cost=1.5))  # a GPU's cost: drafts verified often
    engine = Engine(loaded.model, tokenizer, config).start(warmup=False)
    prompts = [apply_chat_template(tokenizer, [{"role": "user", "content": c}]) for c in GROUNDED + OPEN]
    yield engine, prompts
    engine.stop()


def greedy(engine, prompts, speculative) -> list:
    """All prompts submitted at once (so they run 4 at a time), speculation per prompt as given."""
    flags = speculative if isinstance(speculative, list) else [speculative] * len(prompts)
    handles = [engine.submit(Request(prompt=p, max_tokens=32, speculative=s, sampling=SamplingOptions(temperature=0)))
               for p, s in zip(prompts, flags)]
    return [h.result() for h in handles]


@pytest.mark.slow
def test_real_model_greedy_replies_are_unchanged_by_speculation(real):
    engine, prompts = real
    plain = greedy(engine, prompts, False)
    fast = greedy(engine, prompts, True)  # the same prompts again: prefix-cache hits for those slots still hold
    mixed_at = slice(len(GROUNDED) - 4, len(GROUNDED) + 4)  # 4 grounded and 4 open prompts, half of them speculating:
    mixed = greedy(engine, prompts[mixed_at], [i % 2 == 0 for i in range(8)])  # plain rows ride in the verify step
    assert len(prompts) >= 20
    for p, f, m in itertools.zip_longest(plain, fast, [None] * mixed_at.start + mixed):
        assert tokens(f) == tokens(p) == (tokens(m) if m else tokens(p))
        assert f.choices[0].text == p.choices[0].text and f.choices[0].finish_reason == p.choices[0].finish_reason
    assert any(f.cached_tokens for f in fast) and any(m.cached_tokens for m in mixed)
    grounded = fast[:len(GROUNDED)]
    drafted, accepted = sum(f.drafted_tokens for f in grounded), sum(f.accepted_tokens for f in grounded)
    assert accepted > 0.5 * drafted > 0  # the input-grounded replies copy their prompts: most drafts hold
    assert all(m.drafted_tokens == 0 for m in mixed[1::2])


# ---- the API: the request field, usage and metrics ----------------------------------------------

@pytest.mark.slow
def test_api_speculative_field_usage_and_metrics_on_the_real_model(real):
    import httpx

    from api.app import create_app
    from api.settings import ServerSettings
    from live_server import LiveServer

    engine, _ = real
    server = LiveServer(create_app(engine, ServerSettings()), engine)
    try:
        client = server.client()
        ask = lambda spec: client.chat.completions.create(
            model=ServerSettings().model_name, max_tokens=40, temperature=0, extra_body={"speculative": spec},
            messages=[{"role": "user", "content": GROUNDED[0]}])
        plain, fast = ask(False), ask(True)
        assert fast.choices[0].message.content == plain.choices[0].message.content
        details = fast.usage.completion_tokens_details
        assert details.accepted_prediction_tokens > details.rejected_prediction_tokens >= 0
        assert plain.usage.completion_tokens_details is None  # no drafts, no details
        cut = lambda spec: client.chat.completions.create(  # a stop string inside a verify step's tokens cuts there too
            model=ServerSettings().model_name, max_tokens=40, temperature=0, extra_body={"speculative": spec},
            stop=["keeper"], messages=[{"role": "user", "content": GROUNDED[0]}]).choices[0]
        plain_cut, fast_cut = cut(False), cut(True)
        assert fast_cut.message.content == plain_cut.message.content and "keeper" not in fast_cut.message.content
        assert fast_cut.finish_reason == plain_cut.finish_reason == "stop"
        metrics = httpx.get(server.url + "/metrics").text
        accepted = re.search(r'^llama_jax_spec_decode_num_accepted_tokens_total\{[^}]*\} (\S+)', metrics, re.M)
        assert accepted and float(accepted.group(1)) >= details.accepted_prediction_tokens
        drafted = re.search(r'^llama_jax_spec_decode_num_draft_tokens_total\{[^}]*\} (\S+)', metrics, re.M)
        rate = re.search(r'^llama_jax_spec_decode_draft_acceptance_rate\{[^}]*\} (\S+)', metrics, re.M)
        assert rate and float(rate.group(1)) == pytest.approx(float(accepted.group(1)) / float(drafted.group(1)))
        bad = httpx.post(server.url + "/v1/chat/completions", json={
            "model": ServerSettings().model_name, "messages": [{"role": "user", "content": "hi"}], "speculative": "yes"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculative"
    finally:
        server.stop()


@pytest.mark.slow
def test_api_responses_speculative_field_and_usage_on_the_real_model(real):
    """/v1/responses honours `speculative` like chat: the same text, and the drafts in
    `usage.output_tokens_details` under chat's names (only when there were drafts)."""
    import httpx

    from api.app import create_app
    from api.settings import ServerSettings
    from live_server import LiveServer

    engine, _ = real
    server = LiveServer(create_app(engine, ServerSettings()), engine)
    try:
        ask = lambda spec: server.client().responses.create(
            model=ServerSettings().model_name, max_output_tokens=40, temperature=0, extra_body={"speculative": spec},
            input=GROUNDED[0])
        plain, fast = ask(False), ask(True)
        assert fast.output_text == plain.output_text and fast.usage.output_tokens == plain.usage.output_tokens
        details = fast.usage.output_tokens_details.model_dump()
        assert details["reasoning_tokens"] == 0
        assert details["accepted_prediction_tokens"] > details["rejected_prediction_tokens"] >= 0
        assert plain.usage.output_tokens_details.model_dump() == {"reasoning_tokens": 0}  # no drafts, no details
        bad = httpx.post(server.url + "/v1/responses", json={
            "model": ServerSettings().model_name, "input": "hi", "speculative": "yes"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculative"
    finally:
        server.stop()


def test_api_refuses_speculative_on_a_server_without_it(model, tokenizer_path):
    import httpx

    from api.app import create_app
    from api.settings import ServerSettings
    from live_server import LiveServer

    engine = Engine(model, Tokenizer(tokenizer_path), EngineConfig(max_slots=2, max_seq_len=256)).start(warmup=False)
    server = LiveServer(create_app(engine, ServerSettings()), engine)
    try:
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/completions", {"prompt": "hi"}), ("/v1/responses", {"input": "hi"})):
            r = httpx.post(server.url + path, json={"model": ServerSettings().model_name, "speculative": True, **body})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == "speculative" and "--speculative-ngram" in error["message"]
    finally:
        server.stop()
        engine.stop()
