"""The running choices' bookkeeping (running.py, issue 30): a plain step's tokens taken for all slots at once
(`SlotTable.take_all`) end the same choices for the same reasons as one by one (`RunningChoice.step`), and
`hand_out` gives each consumer its token item; checked on random streams against the one-by-one path."""

from __future__ import annotations

import random

import numpy as np

from llama_jax.outbox import Outbox
from llama_jax.packed import unpack
from llama_jax.request import Admission, Request, RequestHandle, SamplingOptions
from llama_jax.running import RunningChoice, SlotTable, hand_out, start_choice

SLOTS, MAX_LEN, VOCAB = 8, 64, 6  # a tiny vocabulary: stop ids come up often


class Anything:
    """A constraint that allows every token and is never done (its tokens are taken one by one)."""

    def fill_mask(self, row: np.ndarray) -> None:
        row[:] = -1

    def advance(self, token_id: int) -> None:
        pass

    def done(self) -> bool:
        return False


def run(table: SlotTable, slot: int, rng: random.Random, constrained: bool = False, outbox: Outbox | None = None
        ) -> RunningChoice:
    request = Request(prompt=[1] + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 6))],
                      sampling=SamplingOptions(temperature=rng.choice([0.0, 0.7])), min_tokens=rng.randrange(3),
                      top_logprobs=rng.choice([0, 2]))
    handle = RequestHandle(request, None, outbox, stop_ids=frozenset(rng.sample(range(VOCAB), rng.randrange(3))))
    handle.max_tokens = rng.randrange(max(request.min_tokens, 1), MAX_LEN - len(request.prompt))
    return start_choice(Admission(handle, 0, slot, 0), table, Anything() if constrained else None, False)


def test_a_step_taken_for_all_slots_at_once_ends_the_same_choices_as_one_by_one():
    rng = random.Random(0)
    at_once, one_by_one = SlotTable(SLOTS, MAX_LEN), SlotTable(SLOTS, MAX_LEN)
    ends = {"stop": 0, "length": 0}
    for step in range(400):
        for slot in range(SLOTS):  # idle slots start a choice now and then, the same in both tables
            if at_once.choices[slot] is None and rng.random() < 0.5:
                seed, constrained = rng.random(), slot == 3
                run(at_once, slot, random.Random(seed), constrained), run(one_by_one, slot, random.Random(seed), constrained)
        rows = 1 + max([s for s in range(SLOTS) if at_once.choices[s]], default=0)
        tokens = np.array([rng.randrange(VOCAB) for _ in range(rows)], np.int32)
        assert at_once.busy_count == one_by_one.busy_count and at_once.constrained_count == (at_once.choices[3] is not None)
        ended, stop = at_once.take_all(tokens)
        for slot in range(rows):
            a, b = at_once.choices[slot], one_by_one.choices[slot]
            if a is None:
                assert not ended[slot]
                continue
            finish = a.step(int(tokens[slot])) if a.constraint else ("stop" if stop[slot] else "length") if ended[slot] else None
            assert finish == b.step(int(tokens[slot])), (step, slot)
            assert a.generated == b.generated and a.ids.tolist() == b.ids.tolist()
            if finish:
                ends[finish] += 1
                at_once.clear(slot), one_by_one.clear(slot)
    assert ends["stop"] > 50 and ends["length"] > 20, ends  # both kinds of end were exercised


def test_a_swap_moves_each_choice_with_its_row_and_consumer():
    rng, table = random.Random(1), SlotTable(SLOTS, MAX_LEN)
    high = run(table, 6, rng)
    table.take_all(np.array([0] * 7, np.int32))
    ids, receivers = high.ids.tolist(), table.receivers()[None]
    assert [r[2] for r in receivers] == [6]
    table.swap(6, 2)
    assert high.slot == 2 and table.choices[2] is high and table.choices[6] is None
    assert high.ids.tolist() == ids and high.generated == 1 and table.busy.tolist() == [i == 2 for i in range(SLOTS)]
    assert [r[2] for r in table.receivers()[None]] == [2]


def test_hand_out_gives_each_consumer_its_token_and_finish_in_order():
    rng, table, outbox = random.Random(2), SlotTable(SLOTS, MAX_LEN), Outbox()
    choices = [run(table, slot, rng, outbox=outbox) for slot in range(3)]
    tokens = np.array([4, 5, 0], np.int32)
    packed = np.zeros((3, 1, 3 + 2 * 2), np.int32)
    packed[:, 0, 0], packed[:, 0, 1] = tokens, np.float32(-0.5).view(np.int32)
    packed[:, 0, 3:5], packed[:, 0, 5:] = [[4, 1]] * 3, np.float32(-0.25).view(np.int32)
    for choice in choices:
        choice.handle.put((choice.choice, 9, 0.0, (), None))  # an item sent before the step: it comes first
    ended, stop = table.take_all(tokens)
    for loop, receivers in table.receivers().items():
        outbox.post(loop, hand_out, (receivers, packed, ended, stop))
    for choice in choices:
        choice.handle.put(None)
    outbox.flush()  # thread consumers: put here, in order
    top = tuple(zip(unpack(packed).top_ids[0, 0].tolist(), [-0.25, -0.25]))
    for slot, choice in enumerate(choices):
        items = list(iter(choice.handle._queue.get, None))
        finish = ("stop" if stop[slot] else "length") if ended[slot] else None
        expected = (0, int(tokens[slot]), -0.5, top[:choice.top_logprobs], finish)
        assert items == [(0, 9, 0.0, (), None), expected]
