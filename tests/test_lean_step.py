"""The lean decode step's host side (issue 30): one packed result array per step (packed.py) and
one event-loop hand-off per scheduler iteration (outbox.py), checked on real arrays, a real
asyncio loop and a real engine."""

import asyncio

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.outbox import Outbox
from llama_jax.packed import pack, unpack
from llama_jax.sampling import SampleResult


def test_a_plain_step_packs_into_one_array_and_unpacks_exactly():
    result = SampleResult(tokens=jnp.array([7, 31999], jnp.int32), logprobs=jnp.array([-0.25, -jnp.inf]),
                          top_ids=jnp.array([[7, 3], [31999, 0]], jnp.int32),
                          top_logprobs=jnp.array([[-0.25, -1.5], [-3.0, -jnp.inf]]))
    packed = np.asarray(pack(result))
    assert packed.dtype == np.int32 and packed.shape == (2, 1, 3 + 2 * 2)
    out = unpack(packed)
    assert out.tokens == [[7], [31999]] and out.emitted == [1, 1]
    assert out.logprobs == [[-0.25], [float("-inf")]]
    assert out.top_ids[:, 0].tolist() == [[7, 3], [31999, 0]]
    assert out.top_logprobs[:, 0].tolist() == [[-0.25, -1.5], [-3.0, float("-inf")]]


def test_a_verify_step_packs_every_position_and_its_emitted_count():
    rows, width, top = 3, 4, 2
    tokens = jnp.arange(rows * width, dtype=jnp.int32).reshape(rows, width)
    result = SampleResult(tokens=tokens, logprobs=-tokens.astype(jnp.float32) / 8,
                          top_ids=jnp.stack([tokens, tokens + 1], -1), top_logprobs=jnp.zeros((rows, width, top)))
    out = unpack(np.asarray(pack(result, jnp.array([1, 4, 2]))))
    assert out.tokens == tokens.tolist() and out.emitted == [1, 4, 2]
    assert out.logprobs == (-np.asarray(tokens, np.float32) / 8).tolist()
    assert out.top_ids[..., 1].tolist() == (tokens + 1).tolist()


def test_the_outbox_hands_each_loop_its_items_in_order_in_one_call():
    loop = asyncio.new_event_loop()
    calls, got = [], []
    real = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *a: calls.append(a) or real(*a)
    outbox = Outbox()
    send = outbox.sender(loop, got.append)
    for i in range(5):
        send(i)
    assert calls == [] and got == []  # nothing leaves before the flush
    outbox.flush()
    loop.run_until_complete(asyncio.sleep(0))
    assert len(calls) == 1 and got == [0, 1, 2, 3, 4]
    outbox.flush()  # nothing pending: no call
    assert len(calls) == 1
    loop.close()
    send(5)
    outbox.flush()  # a closed loop's items are dropped, not raised
    assert len(calls) == 1 and got == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def engine(tiny_model, tokenizer):
    from llama_jax.engine import Engine, EngineConfig

    with Engine(tiny_model, tokenizer, EngineConfig(max_slots=4, max_seq_len=64)) as e:
        yield e


@pytest.mark.parametrize("top_logprobs", [0, 3])
def test_async_streams_get_every_token_with_one_loop_wakeup_per_iteration(engine, top_logprobs):
    """Four concurrent streams through a real event loop: the events equal the plain-Python
    result token for token (alternatives only when asked), and the loop is woken about once per
    step for all of them, not once per token."""
    from llama_jax.request import Request, SamplingOptions

    prompts = [[1, 450, 4996 + i] for i in range(4)]
    request = lambda p: Request(prompt=p, max_tokens=12, stop_token_ids=[], top_logprobs=top_logprobs,
                                sampling=SamplingOptions(temperature=0))
    expected = [engine.submit(request(p)).result() for p in prompts]

    async def run():
        loop = asyncio.get_running_loop()
        wakeups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: wakeups.append(a) or real(*a)
        handles = [engine.submit(request(p), loop=loop) for p in prompts]
        return await asyncio.gather(*(h.aresult() for h in handles)), len(wakeups)

    got, wakeups = asyncio.run(run())
    for a, b in zip(got, expected):
        assert [t.token_id for t in a.choices[0].tokens] == [t.token_id for t in b.choices[0].tokens]
        assert a.choices[0].text == b.choices[0].text and a.choices[0].finish_reason == "length"
        assert all(len(t.top) == top_logprobs for t in a.choices[0].tokens)
    assert wakeups <= 12 + 4, f"{wakeups} loop wake-ups for 4 x 12 tokens"


@pytest.mark.parametrize("branch_free", [False, True])
def test_the_greedy_only_sampler_takes_the_same_tokens_without_a_draw_or_top_k(branch_free):
    from llama_jax import sampling

    rows, vocab = 3, 500
    logits = jax.random.normal(jax.random.key(0), (rows, vocab)) * 3
    params = sampling.stack_params([sampling.make_params(seed=i, temperature=0.0, repetition_penalty=1.3)
                                    for i in range(rows)])
    state = sampling.init_state(rows, vocab)
    full, full_state = sampling.sample(logits, params, state, branch_free=branch_free)
    lean, lean_state = sampling.sample(logits, params, state, branch_free=branch_free, greedy_only=True)
    assert lean.tokens.tolist() == full.tokens.tolist() == jnp.argmax(logits, -1).tolist()
    assert np.allclose(lean.logprobs, full.logprobs)
    assert lean.top_ids.shape == lean.top_logprobs.shape == (rows, 0)
    assert (lean_state.counts == full_state.counts).all()


def test_an_accelerator_engine_runs_greedy_rows_in_the_greedy_variant_with_the_same_replies(
        engine, tiny_model, tokenizer, monkeypatch):
    """A GPU's sample variants on this CPU (`device.sample_variants`, the sort-based sampler):
    greedy rows without alternatives run the greedy program, any other row in the batch the full
    one; the replies equal the CPU engine's and nothing compiles after warm-up."""
    from llama_jax import device
    from llama_jax.compiles import CompileCounter
    from llama_jax.engine import Engine, EngineConfig
    from llama_jax.request import Request, SamplingOptions

    monkeypatch.setattr(device, "sample_variants", lambda target: (None, True))
    greedy = lambda p, k=0: Request(prompt=p, max_tokens=10, stop_token_ids=[], top_logprobs=k,
                                    sampling=SamplingOptions(temperature=0))
    sampled = Request(prompt=[1, 450, 4996], max_tokens=10, stop_token_ids=[], sampling=SamplingOptions(seed=5))
    config = EngineConfig(max_slots=4, max_seq_len=64, branch_free_sampler=True)
    with Engine(tiny_model, tokenizer, config) as gpu_like:
        ran = []
        real = gpu_like._sample
        monkeypatch.setattr(gpu_like, "_sample", lambda *a, rows, greedy: ran.append(greedy) or real(*a, rows=rows, greedy=greedy))
        with CompileCounter() as counter:
            alone = gpu_like.submit(greedy([1, 450, 4996])).result()
            assert set(ran) == {True}
            ran.clear()
            mixed = [gpu_like.submit(r) for r in (greedy([1, 450, 4997], 2), sampled)]
            mixed = [h.result() for h in mixed]
            assert None in ran and True not in ran[:5]  # the rows that need a draw or a top-k: the full program
        assert counter.count == 0
    expected = engine.submit(greedy([1, 450, 4996])).result()
    assert [t.token_id for t in alone.choices[0].tokens] == [t.token_id for t in expected.choices[0].tokens]
    assert alone.choices[0].tokens[0].top == () and len(mixed[0].choices[0].tokens[3].top) == 2
    assert [t.token_id for t in mixed[0].choices[0].tokens] == \
        [t.token_id for t in engine.submit(greedy([1, 450, 4997])).result().choices[0].tokens]
