"""The serving engine on a tiny random-weight model: reproducibility under batching, stop strings,
n choices, cancellation, limits, failure isolation and zero compiles after warm-up."""

import asyncio
import concurrent.futures
import dataclasses
import random
import time

import jax
import numpy as np
import pytest

from llama_jax import bitmask, running, steps
from llama_jax.choice_text import ChoiceText
from llama_jax.compiles import CompileCounter
from llama_jax.engine import Engine, EngineConfig
from llama_jax.hf_checkpoint import load_hf_model
from llama_jax.request import EngineError, QueueFullError, Request, RequestError, SamplingOptions
from llama_jax.tokenizer import Tokenizer

MAX_LEN = 128
BF16_LOGPROB_TOLERANCE = 0.1  # nats: chosen-token logprobs of a bf16 request alone vs batched


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    with Engine(model, tokenizer, EngineConfig(max_slots=8, max_seq_len=MAX_LEN)) as e:
        yield e


@pytest.fixture(scope="module")
def engine_bf16(tiny_checkpoint, tokenizer):
    model = load_hf_model(tiny_checkpoint("tiny-gqa"), dtype="bfloat16")
    with Engine(model, tokenizer, EngineConfig(max_slots=8, max_seq_len=MAX_LEN)) as e:
        yield e


@pytest.fixture(params=["float32", "bfloat16"])
def any_engine(request):
    """The float32 engine and a bfloat16 one (on CPU: bit-pattern weights and cache, XLA paths)."""
    return request.getfixturevalue("engine" if request.param == "float32" else "engine_bf16")


def ids(completion, choice=0):
    return [t.token_id for t in completion.choices[choice].tokens]


def random_prompt(rng, lo=2, hi=40):
    return [1, *rng.integers(3, 32000, int(rng.integers(lo, hi))).tolist()]


def test_greedy_matches_reference_loop(any_engine):
    """The same tokens as the reference loop over the same model (same dtype, same programs' math)."""
    prompt = [1, 518, 25580, 29962, 15043, 29991]
    out = any_engine.generate([prompt], max_tokens=24, sampling=SamplingOptions(temperature=0))[0]
    assert ids(out) == steps.greedy_generate(any_engine.model, prompt, 24)
    assert out.choices[0].finish_reason == "length"


def test_seeded_request_is_identical_alone_and_in_a_busy_batch(any_engine):
    rng = np.random.default_rng(0)
    request = Request(prompt=random_prompt(rng), max_tokens=20,
                      sampling=SamplingOptions(temperature=0.9, top_p=0.95, top_k=50, seed=1234, repetition_penalty=1.1))
    alone = any_engine.submit(request).result()
    for trial in range(3):  # the seeded request lands in different slots next to different work
        others = [any_engine.submit(Request(prompt=random_prompt(rng), max_tokens=int(rng.integers(5, 30)),
                                        sampling=SamplingOptions(temperature=float(rng.uniform(0.1, 2)))))
                  for _ in range(trial * 2)]
        handle = any_engine.submit(request)
        others += [any_engine.submit(Request(prompt=random_prompt(rng), max_tokens=15)) for _ in range(7 - trial * 2)]
        assert ids(handle.result()) == ids(alone)
        for h in others:
            h.result()


def test_stop_string_across_tokens_is_never_leaked(any_engine, tokenizer):
    prompt = [1, 518, 25580, 29962, 15043, 29991]
    full = any_engine.generate([prompt], max_tokens=40, sampling=SamplingOptions(temperature=0))[0]
    tokens = ids(full)
    # a stop string that starts inside token 5 and ends inside token 6
    head = tokenizer.decode(tokens[:5])
    text = full.choices[0].text
    assert text.startswith(head) and len(text) > len(head) + 2
    stop = text[len(head) - 2: len(head) + 2]
    expected = text[: text.find(stop)]
    deltas = [e.text for e in any_engine.submit(Request(prompt=prompt, max_tokens=40, stop=["zzz-never", stop],
                                                    sampling=SamplingOptions(temperature=0)))]
    assert "".join(deltas) == expected
    assert stop not in "".join(deltas)


def test_a_stop_string_frees_its_slot_within_a_few_steps(engine, tokenizer, monkeypatch):
    """Stop strings are looked for in the consumer's thread (choice_text.ChoiceStream): the scheduler learns of a hit
    and frees the slot a step or two later, not at max_tokens, and the consumer sees nothing past the stop."""
    prompt = [1, 518, 25580, 29962, 15043, 29991]
    full = engine.generate([prompt], max_tokens=12, stop_token_ids=[], sampling=SamplingOptions(temperature=0))[0]
    head, text = tokenizer.decode(ids(full)[:5]), full.choices[0].text
    assert text.startswith(head) and len(text) > len(head) + 2
    stop = text[len(head): len(head) + 2]
    steps_taken = []  # decode steps: a token each after the prefill's (the last may be dispatched before the free)
    real_decode = engine._decode
    monkeypatch.setattr(engine, "_decode", lambda *a, **k: steps_taken.append(1) or real_decode(*a, **k))
    out = engine.submit(Request(prompt=prompt, max_tokens=MAX_LEN - len(prompt), stop=[stop], stop_token_ids=[],
                                sampling=SamplingOptions(temperature=0))).result()
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.text == text[: text.find(stop)]
    assert len(choice.tokens) <= 7 and len(steps_taken) <= len(choice.tokens) + 4, (len(choice.tokens), len(steps_taken))
    assert engine.busy_slots == 0


def test_a_failure_in_the_consumers_text_fails_its_request_alone(engine, monkeypatch):
    real_add = ChoiceText.add

    def add(self, token_id, stops=True):  # the third token of the faulty request's text
        self.fed = getattr(self, "fed", 0) + 1
        if self.fed == 3 and faulty:
            raise RuntimeError("injected text fault")
        return real_add(self, token_id, stops)

    monkeypatch.setattr(ChoiceText, "add", add)
    faulty = True
    handle = engine.submit(Request(prompt=[1, 15043, 29991], max_tokens=100, stop_token_ids=[]))
    with pytest.raises(EngineError, match="processing a token failed: injected text fault"):
        handle.result()
    faulty = False
    deadline = time.monotonic() + 30
    while engine.busy_slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.busy_slots == 0
    assert engine.generate([[1, 15043, 29991]], max_tokens=5, stop_token_ids=[])[0].completion_tokens == 5


def test_stop_token_ends_with_stop(any_engine):
    prompt = [1, 518, 25580, 29962, 15043, 29991]
    tokens = ids(any_engine.generate([prompt], max_tokens=10, sampling=SamplingOptions(temperature=0))[0])
    out = any_engine.generate([prompt], max_tokens=10, stop_token_ids=[tokens[3]], sampling=SamplingOptions(temperature=0))[0]
    assert ids(out) == tokens[:4] and out.choices[0].finish_reason == "stop"


def _spy_prefill_shapes(engine, monkeypatch) -> list[tuple[int, int]]:
    """The (rows, length) shape of every prefill the engine runs from now on."""
    shapes = []
    real = engine._prefill_rows
    monkeypatch.setattr(engine, "_prefill_rows", lambda params, state, tokens, *a, **kw: shapes.append(tokens.shape)
                        or real(params, state, tokens, *a, **kw))
    return shapes


def test_n_choices_are_prefilled_in_one_call(engine, monkeypatch):
    shapes = _spy_prefill_shapes(engine, monkeypatch)
    request = Request(prompt=[1, 450, 4996, 17354], max_tokens=16, n=3, sampling=SamplingOptions(seed=7))
    out = engine.submit(request).result()
    assert shapes == [(4, 128)], "one row per choice, padded to the 4-row shape, in one prefill"
    choices = [tuple(ids(out, i)) for i in range(3)]
    assert len(set(choices)) == 3, "each choice has its own key stream"
    again = engine.submit(request).result()
    assert [tuple(ids(again, i)) for i in range(3)] == choices


def test_queued_requests_share_one_prefill_and_match_alone(any_engine, monkeypatch):
    rng = np.random.default_rng(11)
    requests = [Request(prompt=random_prompt(rng), max_tokens=12, n=n,
                        sampling=SamplingOptions(temperature=0.8, seed=i, repetition_penalty=1.2))
                for i, n in enumerate([1, 2, 1, 1])]
    alone = [any_engine.submit(r).result() for r in requests]
    shapes = _spy_prefill_shapes(any_engine, monkeypatch)
    with any_engine._wake:  # hold the scheduler off while the requests queue up
        handles = [any_engine.submit(r) for r in requests]
    together = [h.result() for h in handles]
    assert max(len(r.prompt) for r in requests) <= 64 and any_engine.config.max_prefill_tokens == 512
    assert shapes == [(8, 64)], "five rows (one per choice) in the 8-row shape that fits the budget"
    for a, t, r in zip(alone, together, requests):
        if any_engine.model.cfg.dtype == "float32":  # exact: the same tokens alone or batched
            assert [ids(t, c) for c in range(r.n)] == [ids(a, c) for c in range(r.n)]
        else:  # 16-bit: a different prefill batch shape rounds differently, so a sampled stream may
            for c in range(r.n):  # fork; until it does, the distributions agree within bf16 rounding
                pairs = list(zip(a.choices[c].tokens, t.choices[c].tokens))
                assert pairs[0][0].token_id == pairs[0][1].token_id, "the first token is the same"
                for x, y in pairs:
                    if x.token_id != y.token_id:
                        break
                    assert abs(x.logprob - y.logprob) <= BF16_LOGPROB_TOLERANCE


def test_prefill_batches_stay_within_the_token_budget(engine, monkeypatch):
    assert engine.config.max_prefill_tokens == 512 and MAX_LEN == 128
    rng = np.random.default_rng(12)
    shapes = _spy_prefill_shapes(engine, monkeypatch)
    with engine._wake:
        handles = [engine.submit(Request(prompt=random_prompt(rng, 70, 100), max_tokens=3)) for _ in range(6)]
    for h in handles:
        assert len(h.result().choices[0].tokens) == 3
    assert shapes == [(4, 128), (2, 128)]  # 8 x 128 would pass the budget: 4 rows, then the other 2


def test_many_random_cancellations_leak_no_slot(engine):
    rng = random.Random(0)
    handles = []
    for i in range(1500):
        try:
            handles.append(engine.submit(Request(prompt=[1, 3 + i % 1000, 5], max_tokens=rng.randint(1, 12))))
        except QueueFullError:
            time.sleep(0.001)
        if handles and rng.random() < 0.7:
            rng.choice(handles).cancel()
    for h in handles:
        h.cancel()
    deadline = time.time() + 30
    while (engine.busy_slots or engine.queue_depth) and time.time() < deadline:
        time.sleep(0.01)
    assert engine.busy_slots == 0 and engine.queue_depth == 0
    out = engine.generate([[1, 15043]], max_tokens=5)[0]  # still serving
    assert len(out.choices[0].tokens) == 5


def test_async_consumption(engine):
    async def run():
        handle = engine.submit(Request(prompt=[1, 15043], max_tokens=6, n=2), loop=asyncio.get_running_loop())
        return [e async for e in handle]

    events = asyncio.run(run())
    assert sorted(e.choice for e in events if e.finish_reason) == [0, 1]
    assert sum(len(e.tokens) for e in events) == 12


def test_limits_are_request_errors(engine):
    with pytest.raises(RequestError) as e:
        engine.submit(Request(prompt=[1] * MAX_LEN))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(RequestError) as e:
        engine.submit(Request(prompt=[1] * 100, max_tokens=29))
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(RequestError) as e:
        engine.submit(Request(prompt=[1, 2], sampling=SamplingOptions(temperature=3)))
    assert e.value.param == "temperature"
    with pytest.raises(RequestError) as e:
        engine.submit(Request(prompt=[1, 2], n=129))
    assert e.value.param == "n" and e.value.code == "invalid_value"
    # default max_tokens: the rest of the context
    out = engine.submit(Request(prompt=[1] * 100, stop_token_ids=[])).result()
    assert len(out.choices[0].tokens) == MAX_LEN - 100 and out.choices[0].finish_reason == "length"
    zero = engine.submit(Request(prompt=[1, 2], max_tokens=0, n=2)).result()
    assert [c.finish_reason for c in zero.choices] == ["length", "length"] and zero.completion_tokens == 0


def test_full_queue_is_refused(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig(max_slots=1, max_seq_len=MAX_LEN, max_queue=2))
    engine.submit(Request(prompt=[1, 2]))
    engine.submit(Request(prompt=[1, 2]))
    with pytest.raises(QueueFullError):
        engine.submit(Request(prompt=[1, 2]))


class ExplodingTokenizer(Tokenizer):
    """Fault injection: decoding one particular token id raises."""

    bad_id = None

    def decode(self, ids):
        if self.bad_id in list(ids):
            raise RuntimeError("injected fault")
        return super().decode(ids)


@pytest.mark.slow  # its own engine(s) to build: CI only
def test_a_failing_request_does_not_stop_the_others(model, tokenizer_path):
    tokenizer = ExplodingTokenizer(tokenizer_path)
    with Engine(model, tokenizer, EngineConfig(max_slots=4, max_seq_len=MAX_LEN)) as engine:
        prompt, other = [1, 450, 4996], Request(prompt=[1, 15043, 29991], max_tokens=30, stop_token_ids=[],
                                                sampling=SamplingOptions(seed=7))
        doomed = engine.generate([prompt], max_tokens=8, sampling=SamplingOptions(temperature=0))[0]
        fine = set(ids(engine.submit(other).result()))  # seeded: the healthy request draws these again
        tokenizer.bad_id = next(t for t in ids(doomed)[2:] if t not in fine)  # (unseeded, it once drew the bad id)
        tokenizer.piece_texts.clear()  # the detokenizer's memo of piece texts: decode the bad id afresh
        healthy = engine.submit(other)
        failing = engine.submit(Request(prompt=prompt, max_tokens=8, sampling=SamplingOptions(temperature=0)))
        with pytest.raises(Exception, match="injected fault"):
            failing.result()
        assert len(healthy.result().choices[0].tokens) == 30
        assert engine.busy_slots == 0


def test_no_compiles_after_warmup_under_any_mix(any_engine):
    rng = np.random.default_rng(3)
    with CompileCounter() as counter:
        handles = []
        for _ in range(24):
            n = int(rng.integers(1, 4))
            prompt = random_prompt(rng, 1, MAX_LEN - 30)
            handles.append(any_engine.submit(Request(
                prompt=prompt, n=n, max_tokens=int(rng.integers(1, 28)), top_logprobs=int(rng.integers(0, 21)),
                stop=["a", "the"][: int(rng.integers(0, 3))],
                constraint=(lambda: OnlyTheseTokens([450, 4996, 29871], 3)) if rng.random() < 0.3 else None,
                sampling=SamplingOptions(temperature=float(rng.uniform(0, 2)), top_p=float(rng.uniform(0.1, 1)),
                                         top_k=int(rng.integers(0, 100)), min_p=float(rng.uniform(0, 0.5)),
                                         presence_penalty=float(rng.uniform(-2, 2)), seed=int(rng.integers(0, 2**62))))))
        for h in handles:
            h.result()
    assert counter.count == 0


@pytest.mark.slow  # its own engine(s) to build: CI only
def test_engine_on_a_tensor_parallel_mesh_matches_one_device(engine, model, tokenizer):
    from flax import nnx

    from llama_jax.sharding import make_mesh, shard_params

    mesh = make_mesh(2)
    graphdef, params = nnx.split(model)
    sharded = nnx.merge(graphdef, shard_params(model.cfg, params, mesh))
    prompts = [[1, 450, 4996, 17354], [1, 15043, 29991, 1724, 338]]
    expected = [ids(c) for c in engine.generate(prompts, max_tokens=12, sampling=SamplingOptions(temperature=0))]
    config = EngineConfig(max_slots=2, max_seq_len=MAX_LEN)
    with Engine(sharded, tokenizer, config, mesh=mesh) as tp_engine:
        layers = jax.tree.leaves((tp_engine._state.cache.k, tp_engine._state.cache.v))
        assert all(b.sharding.spec[2] == "tp" for b in layers)  # KV heads split over the mesh, every layer
        assert all(w.sharding.spec[1] == "tp" for w in jax.tree.leaves(tp_engine.params["layers"]["wq"]))
        got = [ids(c) for c in tp_engine.generate(prompts, max_tokens=12, sampling=SamplingOptions(temperature=0))]
        with CompileCounter() as counter:  # the sharded state keeps its placement from step to step
            for _ in range(2):
                tp_engine.generate(prompts + [[1, 450] * 30], max_tokens=5, n=2, sampling=SamplingOptions(seed=1))
            allowed = [450, 4996, 17354]  # a constrained step's masks go to the sharded programs as host arrays
            constrained = tp_engine.submit(Request(prompt=prompts[0], max_tokens=9, sampling=SamplingOptions(seed=2),
                                                   constraint=lambda: OnlyTheseTokens(allowed, 6))).result()
    assert got == expected
    assert {t.token_id for t in constrained.choices[0].tokens} <= set(allowed) and len(constrained.choices[0].tokens) == 6
    assert counter.count == 0


class OnlyTheseTokens:
    """A minimal Constraint: any of `tokens`, exactly `count` of them, then done."""

    def __init__(self, tokens, count, vocab=32000):
        self.mask = np.zeros(vocab, bool)
        self.mask[list(tokens)] = True
        self.left = count

    def fill_mask(self, row):
        row[:] = bitmask.pack(self.mask)

    def advance(self, token_id):
        assert self.mask[token_id], "the engine sampled a disallowed token"
        self.left -= 1

    def done(self):
        return self.left == 0


def test_constrained_choices_only_sample_allowed_tokens(engine):
    allowed = [450, 4996, 17354, 1701, 29871]
    rng = np.random.default_rng(5)
    free = [engine.submit(Request(prompt=random_prompt(rng), max_tokens=20, stop_token_ids=[])) for _ in range(3)]
    constrained = engine.submit(Request(prompt=[1, 15043], max_tokens=20, n=2, sampling=SamplingOptions(seed=3),
                                        constraint=lambda: OnlyTheseTokens(allowed, 7)))
    out = constrained.result()
    for choice in out.choices:
        assert choice.finish_reason == "stop" and len(choice.tokens) == 7
        assert {t.token_id for t in choice.tokens} <= set(allowed)
    assert all(len(h.result().choices[0].tokens) == 20 for h in free)


@pytest.mark.slow  # its own engine(s) to build: CI only
def test_more_choices_than_slots_wait_for_slots(model, tokenizer, engine):
    """n=5 on 2 slots: the choices beyond the free slots wait in the queue and get theirs as
    earlier choices finish; each choice is the one it is on 8 slots (same seed, same index)."""
    request = Request(prompt=[1, 15043], max_tokens=6, n=5, stop_token_ids=[], sampling=SamplingOptions(seed=4))
    with Engine(model, tokenizer, EngineConfig(max_slots=2, max_seq_len=MAX_LEN)) as small:
        handle = small.submit(request)
        assert small.queue_depth <= 1
        out = handle.result()
    wide = engine.submit(request).result()
    assert [ids(out, i) for i in range(5)] == [ids(wide, i) for i in range(5)]
    assert all(c.finish_reason == "length" and len(c.tokens) == 6 for c in out.choices)


RESTART_SCRIPT = """
import collections, sys
import jax
events = collections.Counter()
jax.monitoring.register_event_listener(lambda name, **kw: events.update([name]))
from llama_jax.config import preset
from llama_jax.engine import Engine, EngineConfig
from llama_jax.model import init_model
from llama_jax.tokenizer import Tokenizer
config = EngineConfig(max_slots=2, max_seq_len=64, compilation_cache_dir=sys.argv[1])
Engine(init_model(preset("tiny-gqa")), Tokenizer(sys.argv[2]), config).start().stop()
print(events["/jax/compilation_cache/cache_hits"], events["/jax/compilation_cache/cache_misses"])
"""


@pytest.mark.slow
def test_restart_reuses_the_persistent_compilation_cache(tmp_path, tokenizer_path):
    import os
    import subprocess
    import sys

    def warm_up() -> tuple[int, int]:
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", RESTART_SCRIPT, str(tmp_path / "xla"), str(tokenizer_path)],
                             capture_output=True, text=True, env=env, timeout=300, check=True)
        hits, misses = map(int, out.stdout.split())
        return hits, misses

    first_hits, first_misses = warm_up()
    assert first_misses > 0 and first_hits == 0
    hits, misses = warm_up()
    # nothing compiles: the serve programs load from the stored executables (test_executables.py),
    # the small ones (empty state, reset, a row cleared) from JAX's cache
    assert misses == 0 and 0 < hits < first_misses


class BreaksAfter(OnlyTheseTokens):
    """Fault injection: a constraint whose automaton raises after `ok` tokens."""

    def __init__(self, ok, where):
        super().__init__([450, 4996, 29871], 50)
        self.ok, self.where = ok, where

    def fill_mask(self, row):
        if self.where == "fill_mask" and self.left <= 50 - self.ok:
            raise RuntimeError("injected automaton fault")
        super().fill_mask(row)

    def advance(self, token_id):
        if self.where == "advance" and self.left <= 50 - self.ok:
            raise RuntimeError("injected automaton fault")
        super().advance(token_id)


@pytest.mark.parametrize("where", ["fill_mask", "advance"])
def test_a_broken_constraint_fails_its_request_and_frees_every_slot(engine, where):
    healthy = engine.submit(Request(prompt=[1, 15043, 29991], max_tokens=40, stop_token_ids=[]))
    broken = engine.submit(Request(prompt=[1, 450, 4996], max_tokens=60, n=3, stop_token_ids=[],
                                   constraint=lambda: BreaksAfter(0 if where == "advance" else 2, where)))
    with pytest.raises(Exception, match="injected automaton fault"):
        broken.result()
    assert len(healthy.result().choices[0].tokens) == 40
    deadline = time.time() + 10
    while engine.busy_slots and time.time() < deadline:
        time.sleep(0.01)
    assert engine.busy_slots == 0, "no choice of the failed request may keep generating"
    assert engine._thread.is_alive()
    assert len(engine.generate([[1, 15043]], max_tokens=3)[0].choices[0].tokens) == 3


def test_submit_after_stop_is_refused(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig(max_slots=1, max_seq_len=MAX_LEN)).start(warmup=False)
    engine.stop()
    with pytest.raises(EngineError):
        engine.submit(Request(prompt=[1, 2]))


def test_a_finished_slot_goes_back_to_neutral_sampling(engine):
    out = engine.submit(Request(prompt=[1, 15043], max_tokens=4, sampling=SamplingOptions(top_k=40, top_p=0.5))).result()
    assert len(out.choices[0].tokens) == 4
    params = engine._state.params
    assert int(np.max(np.asarray(params.top_k))) == 0 and float(np.min(np.asarray(params.top_p))) == 1.0


def test_a_failing_admission_fails_its_request_instead_of_hanging(engine):
    """A request that breaks while being admitted (here its constraint factory) is out of the
    queue and in no slot yet: it must get the error, and the engine must go on serving."""
    def broken_factory():
        raise RuntimeError("injected admission fault")

    healthy = engine.submit(Request(prompt=[1, 15043, 29991], max_tokens=20, stop_token_ids=[]))
    broken = engine.submit(Request(prompt=[1, 450, 4996], max_tokens=10, n=2, constraint=broken_factory))
    with concurrent.futures.ThreadPoolExecutor(1) as pool, pytest.raises(Exception, match="injected admission fault"):
        pool.submit(broken.result).result(timeout=60)  # before the fix: waited forever
    assert len(healthy.result().choices[0].tokens) == 20
    assert len(engine.generate([[1, 15043]], max_tokens=3)[0].choices[0].tokens) == 3
    assert engine.busy_slots == 0


@pytest.mark.parametrize("at_once_from", [1, running.AT_ONCE_FROM], ids=["at_once", "one_by_one"])
def test_a_plain_steps_tokens_are_taken_for_all_its_slots_at_once_from_enough_slots(engine, monkeypatch, at_once_from):
    """issue 30: once the slots are settled, a plain step's tokens are taken in one `SlotTable.take_all` for all its
    unconstrained slots (running.py) when at least `running.AT_ONCE_FROM` are busy, else one by one (a few cost less
    that way); the replies are the greedy replies of each prompt alone either way."""
    monkeypatch.setattr(running, "AT_ONCE_FROM", at_once_from)
    prompts = [[1, 450, 4996], [1, 15043, 29991, 3118], [1, 910, 338]]
    alone = [engine.generate([p], max_tokens=8, stop_token_ids=[], sampling=SamplingOptions(temperature=0))[0]
             for p in prompts]
    taken, real = [], engine.table.take_all
    monkeypatch.setattr(engine.table, "take_all", lambda tokens: taken.append(int(engine.table.plain[:len(tokens)].sum()))
                        or real(tokens))
    together = engine.generate(prompts, max_tokens=8, stop_token_ids=[], sampling=SamplingOptions(temperature=0))
    assert [ids(c) for c in together] == [ids(c) for c in alone]
    if at_once_from > len(prompts):
        assert taken == []
    else:  # 21 decode-step tokens (the first of each from the prefill); a step after a later admission goes one by one
        assert sum(taken) >= 21 - 2 * len(prompts) and max(taken) == len(prompts), taken


def test_a_mixed_batch_gets_the_same_choices_taken_at_once_or_one_by_one(engine, monkeypatch):
    """issue 30: the two ways a plain step's tokens are taken (running.py) give the same choices: tokens, logprobs, top
    alternatives, text and finish reasons, over a batch mixing greedy and seeded rows, n = 2, top logprobs, stop ids
    (each choice's first stops on a token it samples at its fifth position), min_tokens and max_tokens."""
    rng = np.random.default_rng(11)
    sampling = [SamplingOptions(temperature=0), SamplingOptions(temperature=0.9, seed=7)]
    base = [Request(prompt=random_prompt(rng, 2, 12), max_tokens=12, stop_token_ids=[], n=1 + i % 2,
                    top_logprobs=3 * (i % 3 == 0), sampling=sampling[i % 2]) for i in range(6)]  # < 16: no prefix reuse
    first = [engine.submit(r).result() for r in base]
    requests = [dataclasses.replace(r, stop_token_ids=[ids(c)[4]], min_tokens=3 * (i % 2))
                for i, (r, c) in enumerate(zip(base, first))]
    taken, real = [], engine.table.take_all
    monkeypatch.setattr(engine.table, "take_all", lambda tokens: taken.append(len(tokens)) or real(tokens))

    def run(at_once_from: int) -> list:
        monkeypatch.setattr(running, "AT_ONCE_FROM", at_once_from)
        return [h.result().choices for h in [engine.submit(r) for r in requests]]

    def exact(choices: list) -> list:  # a row's logprobs move in the last bits with the batch it ran in: compared apart
        return [[(c.text, c.finish_reason, [(t.token_id, [i for i, _ in t.top]) for t in c.tokens]) for c in cs]
                for cs in choices]

    def logprobs(choices: list) -> np.ndarray:
        return np.array([x for cs in choices for c in cs for t in c.tokens for x in (t.logprob, *(lp for _, lp in t.top))])

    at_once, steps_at_once = run(1), len(taken)
    one_by_one = run(10**6)
    assert exact(one_by_one) == exact(at_once) and len(taken) == steps_at_once > 0
    np.testing.assert_allclose(logprobs(one_by_one), logprobs(at_once), atol=1e-4)
    reasons = [c.finish_reason for choices in at_once for c in choices]
    assert "stop" in reasons and "length" in reasons and any(c.tokens[0].top for choices in at_once for c in choices)


def _spy_pipeline(engine, monkeypatch) -> list[str]:
    """The engine's device calls and result reads, in order: "prefill", "decode", "sample", "read"."""
    log: list[str] = []
    logged = lambda name, f: lambda *a, **k: (log.append(name), f(*a, **k))[1]
    monkeypatch.setattr(engine, "_prefill_rows", logged("prefill", engine._prefill_rows))
    monkeypatch.setattr(engine, "_decode", logged("decode", engine._decode))
    monkeypatch.setattr(engine, "_sample", logged("sample", engine._sample))
    monkeypatch.setattr(engine, "_host_copy", logged("read", engine._host_copy))
    return log


def test_admission_is_read_after_the_next_dispatch_and_no_step_is_wasted(engine, monkeypatch):
    """issue 30: a prefill's tokens are read like a step's, after the next step is dispatched (the
    device never idles while the host reads them), and a choice's last token ends it without a
    step dispatched after it: max_tokens N costs one prefill and N - 1 decode steps."""
    log = _spy_pipeline(engine, monkeypatch)
    for max_tokens in (1, 2, 5):
        log.clear()
        out = engine.submit(Request(prompt=[1, 450, 4996], max_tokens=max_tokens)).result()
        assert len(out.choices[0].tokens) == max_tokens
        assert log == ["prefill", *["decode", "sample", "read"] * (max_tokens - 1), "read"], (max_tokens, log)
    log.clear()
    running = engine.submit(Request(prompt=[1, 450, 4996], max_tokens=60))
    deadline = time.monotonic() + 60
    while "read" not in log:  # it is decoding
        assert time.monotonic() < deadline, log
        time.sleep(0.001)
    engine.submit(Request(prompt=[1, 17354, 29871], max_tokens=4)).result()
    running.result()
    admitted = log.index("prefill", 1)
    assert log[admitted + 1: admitted + 3] == ["decode", "sample"], log[admitted - 3: admitted + 4]


def test_a_constrained_slot_is_read_while_the_next_forward_runs(engine, monkeypatch):
    """issue 30: with a grammar-constrained slot busy, each step's forward is dispatched before the
    slot's last token is read and its next mask built; only the step's sampling waits for the mask.
    Its tokens stay within the grammar's."""
    log = _spy_pipeline(engine, monkeypatch)
    allowed = [450, 4996, 17354, 1701, 29871]
    out = engine.submit(Request(prompt=[1, 15043], max_tokens=6, stop_token_ids=[], sampling=SamplingOptions(seed=3),
                                constraint=lambda: OnlyTheseTokens(allowed, 100))).result()
    assert len(out.choices[0].tokens) == 6 and {t.token_id for t in out.choices[0].tokens} <= set(allowed)
    assert log == ["prefill", *["decode", "read", "sample"] * 5, "read"], log


def test_choices_left_high_move_down_and_run_in_a_smaller_batch(engine, monkeypatch):
    """As choices finish, those left running above their count's row bucket swap into free lower slots
    (keys, sampler rows and masks with them): later steps run the smaller batch, each reply is the
    same as alone (greedy, seeded with penalties, constrained), and the idle slots' prefixes stay reusable."""
    rng = np.random.default_rng(5)
    allowed = [450, 4996, 17354, 1701, 29871]
    late = [Request(prompt=random_prompt(rng, 20, 40), max_tokens=30, stop_token_ids=[],
                    sampling=SamplingOptions(temperature=0)),
            Request(prompt=random_prompt(rng, 20, 40), max_tokens=30, stop_token_ids=[],
                    sampling=SamplingOptions(temperature=0.9, seed=9, repetition_penalty=1.3, presence_penalty=0.5)),
            Request(prompt=random_prompt(rng, 20, 40), max_tokens=30, stop_token_ids=[], sampling=SamplingOptions(seed=3),
                    constraint=lambda: OnlyTheseTokens(allowed, 30))]
    short = [Request(prompt=random_prompt(rng, 20, 40), max_tokens=3, stop_token_ids=[],
                     sampling=SamplingOptions(temperature=0)) for _ in range(5)]
    alone = [engine.submit(r).result() for r in late + short[:1]]
    rows, swaps = [], []
    decode, swap = engine._decode, engine._swap
    monkeypatch.setattr(engine, "_decode", lambda *a, **k: (rows.append(k["rows"]), decode(*a, **k))[1])
    monkeypatch.setattr(engine, "_swap", lambda *a: (swaps.append(tuple(map(int, a[1:]))), swap(*a))[1])
    with engine._wake:  # admitted together: the short ones in slots 0-4, the late ones in 5-7
        handles = [engine.submit(r) for r in short + late]
    together = [h.result() for h in handles]
    assert [ids(t) for t in together[5:]] == [ids(a) for a in alone[:3]]
    assert rows[:3] == [8, 8, 8] and set(rows[3:]) == {4}, rows  # the third dispatched before the second is read
    assert swaps == [(7, 0), (6, 1), (5, 2)], "the highest busy slot into the lowest free one, once each"
    hits = engine.prefix.hits
    again = engine.submit(short[0]).result()  # its keys were in slot 0, swapped out to an idle high slot
    assert engine.prefix.hits == hits + 1 and ids(again) == ids(together[0]) == ids(alone[3])
    assert engine.busy_slots == 0



@pytest.mark.parametrize("busy, moves", [
    ("........", []), ("#.......", []), ("##......", []), ("#.##....", []),  # inside their bucket
    (".#......", [(1, 0)]), ("#.#.....", [(2, 1)]), ("...#....", [(3, 0)]), ("#......#", [(7, 1)]), ("....###.", [(6, 0), (5, 1), (4, 2)]),
    ("#.#.#...", [(4, 1)]), ("###....#", [(7, 3)]), ("####...#", []), ("#####...", []), ("########", []),
])
def test_compaction_brings_the_busy_slots_under_their_bucket(busy, moves):
    from llama_jax.admission import compaction

    assert compaction(np.array([c == "#" for c in busy]), steps.length_buckets(8, 1)) == moves
