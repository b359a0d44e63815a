"""How grammar masks reach a step's sampling (step_masks.py): in "rows" mode (an accelerator's default) the device
table always equals the host's after a step's upload, which carries only the rows changed since the last one; an
engine in that mode, forced on a CPU, samples exactly what the CPU's "batch" mode samples, verify steps included."""

import jax
import numpy as np
import pytest

from llama_jax import bitmask, step_masks
from llama_jax.compiles import CompileCounter
from llama_jax.engine import Engine, EngineConfig
from llama_jax.request import Request, SamplingOptions
from llama_jax.speculative import SpeculativeConfig
from test_engine import MAX_LEN, OnlyTheseTokens, ids, random_prompt

VOCAB = 1000


class Pattern:
    """A constraint stand-in for the table's bookkeeping: fills its row with its own words."""

    def __init__(self, seed):
        self.words = np.random.default_rng(seed).integers(-2**31, 2**31, bitmask.words(VOCAB), dtype=np.int64).astype(np.int32)

    def fill_mask(self, row):
        row[:] = self.words


class Choice:
    def __init__(self, constraint=None):
        self.constraint = constraint


def test_the_device_table_follows_the_host_uploading_only_changed_rows():
    slots, buckets = 8, (1, 2, 4, 8)
    masks = step_masks.StepMasks(slots, VOCAB, "rows", buckets)
    put = jax.jit(step_masks.put_rows, donate_argnums=0)
    uploads = []
    counted = lambda table, which, rows: (uploads.append(which.tolist()), put(table, which, rows))[1]
    rng = np.random.default_rng(0)
    choices: list = [None] * slots
    for step in range(60):
        touched = set()  # slots freed or moved this step: their rows changed on the host
        for slot in rng.choice(slots, int(rng.integers(0, 3)), replace=False).tolist():
            if choices[slot] is None:  # admitted: constrained or not
                choices[slot] = Choice(Pattern(step * slots + slot) if rng.random() < 0.5 else None)
            else:  # finished
                choices[slot] = None
                masks.clear(slot)
                touched.add(slot)
        if rng.random() < 0.2:  # compaction moves two slots' choices and masks
            a, b = rng.choice(slots, 2, replace=False).tolist()
            choices[a], choices[b] = choices[b], choices[a]
            masks.swap(a, b)
            touched |= {a, b}
        constrained = [i for i, c in enumerate(choices) if c and c.constraint]
        assert masks.fill(choices) == []
        before = len(uploads)
        table = np.asarray(masks.for_step(8, bool(constrained), counted))
        np.testing.assert_array_equal(table, masks.host)
        for i, c in enumerate(choices):
            expected = c.constraint.words if c and c.constraint else np.full(bitmask.words(VOCAB), bitmask.EVERYTHING)
            np.testing.assert_array_equal(table[i], expected)
        if len(uploads) > before:  # the changed rows alone, padded to a bucket by repeating the last
            which = uploads[-1]
            assert len(which) in buckets and set(which) == set(constrained) | touched
            assert which[len(set(which)):] == [which[len(set(which)) - 1]] * (len(which) - len(set(which)))
        else:
            assert not constrained and not touched
    masks.table.delete()  # a failed step may have taken it with it
    masks.renew()
    np.testing.assert_array_equal(np.asarray(masks.for_step(8, False, counted)), masks.host)


def test_batch_mode_passes_the_steps_rows():
    masks = step_masks.StepMasks(4, VOCAB, "batch", (1, 2, 4))
    masks.fill([None, Choice(Pattern(1)), None, None])
    rows = masks.for_step(2, True, None)
    assert isinstance(rows, np.ndarray) and rows.shape == (2, bitmask.words(VOCAB))
    np.testing.assert_array_equal(rows[1], Pattern(1).words)
    masks.host[1] = 0  # filled again for the next step: the step's copy is its own
    assert (rows[1] == Pattern(1).words).all()
    plain = masks.for_step(2, False, None)
    assert isinstance(plain, jax.Array) and (np.asarray(plain) == bitmask.EVERYTHING).all()


def test_modes():
    assert step_masks.mode(None, cpu=True) == "batch" and step_masks.mode(None, cpu=False) == "rows"
    assert step_masks.mode("rows", cpu=True) == "rows"
    with pytest.raises(ValueError, match="mask_upload"):
        step_masks.mode("some", cpu=True)


@pytest.fixture(scope="module")
def reference(tiny_model, tokenizer):
    """The CPU's own mode, "batch"."""
    with Engine(tiny_model, tokenizer, EngineConfig(max_slots=4, max_seq_len=MAX_LEN)) as e:
        assert e.masks.upload == "batch"
        yield e


@pytest.fixture(scope="module")
def rows_engine(tiny_model, tokenizer):
    """An accelerator's mode, with speculation on: a verify step reads the masks too (every draft is verified)."""
    config = EngineConfig(max_slots=4, max_seq_len=MAX_LEN, mask_upload="rows",
                          speculative=SpeculativeConfig(tokens=3, min_n=1, verify_cost=1.0))
    with Engine(tiny_model, tokenizer, config) as e:
        assert e.masks.upload == "rows"
        yield e


def mixed_requests():
    """Constrained choices with different allowed tokens beside plain ones, finishing at different steps: later
    choices take slots a constrained one left (a stale device row would constrain them) and busy ones move down."""
    rng = np.random.default_rng(11)
    sets = [[450, 4996, 17354], [1701, 29871, 15043, 338], [3, 4, 5, 6, 7]]
    out = []
    for i in range(10):
        allowed, count = sets[i % len(sets)], int(rng.integers(2, 20))
        constraint = (lambda a=allowed, n=count: OnlyTheseTokens(a, n)) if i % 3 != 2 else None
        out.append(Request(prompt=random_prompt(rng, 2, 30), max_tokens=int(rng.integers(3, 25)) if constraint else 40,
                           stop_token_ids=[], n=1 + i % 2, constraint=constraint,  # a plain one greedy: it repeats, drafts
                           sampling=SamplingOptions(seed=i, temperature=0.8 if constraint else 0)))
    return out


def test_rows_mode_samples_what_batch_mode_samples(reference, rows_engine):
    requests = mixed_requests()
    every = lambda handles: [[ids(out, c) for c in range(len(out.choices))] for out in (h.result() for h in handles)]
    expected = every([reference.submit(r) for r in requests])
    with CompileCounter() as counter:
        got = every([rows_engine.submit(r) for r in requests])
    assert got == expected
    assert rows_engine.verify_steps > 0, "some steps verified drafts, with the device table's masks"
    assert counter.count == 0, "every mask upload shape is compiled at warm-up"
    for request, choices in zip(requests, got):
        if request.constraint:
            allowed = set(np.flatnonzero(request.constraint().mask).tolist())
            assert all(set(c) <= allowed for c in choices)
    assert rows_engine.busy_slots == 0
    np.testing.assert_array_equal(np.asarray(rows_engine.masks.for_step(4, False, rows_engine._put_masks)),
                                  bitmask.everything(4, 32000))  # every row freed and uploaded as all-ones
