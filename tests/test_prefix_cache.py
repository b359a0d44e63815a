"""Prefix caching: the slot bookkeeping on its own, then a cached engine against an uncached one on
the same weights (multi-turn conversations greedy and seeded, n=2, JSON mode, a shared system
prompt, eviction, cancellation mid-prefill, zero compiles), and `cached_tokens` through the API."""

import json

import httpx
import numpy as np
import pytest
from live_server import LiveServer

from llama_jax.compiles import CompileCounter
from llama_jax.engine import Engine, EngineConfig
from llama_jax.prefix_cache import MIN_REUSE, PrefixCache, common_prefixes
from llama_jax.request import Request, SamplingOptions

MAX_LEN = 256
SEEDED = SamplingOptions(temperature=0.9, seed=7, repetition_penalty=1.3, presence_penalty=0.4)
GREEDY = SamplingOptions(temperature=0)


# ---- the bookkeeping alone --------------------------------------------------------------------

def test_common_prefixes():
    rows = np.array([[1, 2, 9, -1, -1], [1, 2, 3, -1, -1], [1, 2, 3, 4, 5], [-1, -1, -1, -1, -1], [7, 2, 3, 4, -1]])
    assert common_prefixes(rows, np.array([1, 2, 3, 4])).tolist() == [2, 3, 4, 0, 0]
    assert common_prefixes(rows, np.array([1, 2, 3, 4, 5, 6, 7])).tolist() == [2, 3, 5, 0, 0]  # longer than a row
    assert common_prefixes(rows, np.array([], np.int32)).tolist() == [0] * 5


def test_placement_reuses_in_place_copies_from_busy_and_keeps_evicted_prefixes():
    cache = PrefixCache(slots=4, max_len=100)
    long = list(range(1, 41))
    first = cache.place(long, free=[0, 1, 2, 3])
    assert (first.slot, first.start, first.copies) == (0, 0, ())
    cache.hold(0, long)  # prefilled; slot 0 now busy
    # a prompt sharing 30 tokens with busy slot 0: copied into the lowest free slot
    second = cache.place(long[:30] + [99] * 5, free=[1, 2, 3])
    assert (second.slot, second.start, second.copies) == (1, 30, ((0, 1),))
    cache.hold(1, long[:30] + [99] * 5)
    cache.hold(0, long + [7, 8])  # slot 0's request finished: prompt and reply minus the last token
    # the next turn of slot 0's conversation reuses it in place, one token always left to prefill
    turn = cache.place(long + [7, 8], free=[0, 2, 3])
    assert (turn.slot, turn.start, turn.copies) == (0, 41, ())
    cache.hold(0, long + [7, 8])
    # an unrelated prompt takes the lowest free slot; what that slot held moves to a spare first
    cache.hold(2, [5] * 20)
    other = cache.place([3] * 30, free=[2, 3])
    assert (other.slot, other.start, other.copies) == (2, 0, ((2, 3),))
    assert cache.place([5] * 25, free=[3]).start == 20  # the moved prefix is still found
    assert cache.hits == 3 and cache.reused_tokens == 30 + 41 + 20


def test_short_matches_and_disabled_cache_reuse_nothing():
    cache = PrefixCache(slots=2, max_len=100)
    cache.hold(1, list(range(MIN_REUSE - 1)))
    assert cache.place(list(range(40)), free=[0]).start == 0
    off = PrefixCache(slots=2, max_len=100, enabled=False)
    off.hold(0, list(range(50)))
    assert off.place(list(range(50)), free=[0, 1]).start == 0 and off.cached_tokens == 0


def test_the_last_cache_position_is_never_reused():
    cache = PrefixCache(slots=1, max_len=32)
    cache.hold(0, list(range(40)))
    assert cache.cached_tokens == 31


# ---- a cached engine against an uncached one ----------------------------------------------------

def _config(**kw):
    return EngineConfig(max_slots=4, max_seq_len=MAX_LEN, max_prefill_tokens=256, **kw)


@pytest.fixture(scope="module")
def cached(tiny_model, tokenizer):
    with Engine(tiny_model, tokenizer, _config()) as e:
        yield e


@pytest.fixture(scope="module")
def plain(tiny_model, tokenizer):
    with Engine(tiny_model, tokenizer, _config(prefix_cache=False)) as e:
        yield e


def ids(completion, choice=0):
    return [t.token_id for t in completion.choices[choice].tokens]


def run(engine, prompt, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("sampling", GREEDY)
    kw.setdefault("stop_token_ids", [])
    return engine.submit(Request(prompt=prompt, **kw)).result()


def conversation(engine, rng_seed, turns, sampling, n=1):
    """A token-level multi-turn chat: each turn's prompt is the last prompt, the reply's ids and
    ~20 new user tokens. Returns every turn's (choice ids, cached_tokens)."""
    rng = np.random.default_rng(rng_seed)
    prompt, out = [1, *rng.integers(3, 32000, 30).tolist()], []
    for _ in range(turns):
        done = run(engine, prompt, sampling=sampling, n=n)
        replies = [ids(done, c) for c in range(n)]
        out.append((replies, done.cached_tokens))
        prompt = prompt + replies[0] + rng.integers(3, 32000, 20).tolist()
    return out


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_multi_turn_replies_match_the_uncached_engine(cached, plain, sampling):
    seed = 1 if sampling is GREEDY else 11  # a conversation of its own: nothing of it is cached yet
    got, want = conversation(cached, seed, 5, sampling), conversation(plain, seed, 5, sampling)
    assert [r for r, _ in got] == [r for r, _ in want]
    assert all(c == 0 for _, c in want)
    # every later turn reuses the whole history but the previous reply's last token
    prompt_len, expected = 31, [0]
    for replies, _ in got[:-1]:
        expected.append(prompt_len + len(replies[0]) - 1)
        prompt_len += len(replies[0]) + 20
    assert [c for _, c in got] == expected


def test_two_choices_on_a_cached_prefix(cached, plain):
    got, want = conversation(cached, 2, 3, SEEDED, n=2), conversation(plain, 2, 3, SEEDED, n=2)
    assert [r for r, _ in got] == [r for r, _ in want]
    assert got[-1][1] > 0 and got[-1][0][0] != got[-1][0][1]


def test_json_mode_on_a_cached_prefix(cached, plain, tokenizer):
    from llama_jax.structured import json_grammar

    grammar = json_grammar(tokenizer)
    prompt = [1, *np.random.default_rng(3).integers(3, 32000, 60).tolist()]
    run(cached, prompt, max_tokens=4)  # leaves the prompt in a slot
    kw = dict(max_tokens=40, sampling=SamplingOptions(seed=3), stop_token_ids=None,
              constraint=grammar.factory(40, 32000))
    got, want = run(cached, prompt + [29871], **kw), run(plain, prompt + [29871], **kw)
    assert got.cached_tokens == len(prompt) and want.cached_tokens == 0
    assert ids(got) == ids(want)
    json.loads(got.choices[0].text)


def test_shared_system_prompt_is_copied_to_concurrent_users(cached, plain):
    rng = np.random.default_rng(4)
    system = [1, *rng.integers(3, 32000, 100).tolist()]
    users = [system + rng.integers(3, 32000, 10).tolist() for _ in range(4)]
    run(cached, system, max_tokens=2)
    handles = [cached.submit(Request(prompt=u, max_tokens=6, stop_token_ids=[], sampling=SEEDED)) for u in users]
    got = [h.result() for h in handles]
    want = [run(plain, u, max_tokens=6, sampling=SEEDED) for u in users]
    assert [ids(g) for g in got] == [ids(w) for w in want]
    assert all(g.cached_tokens >= len(system) for g in got)


def test_eviction_under_pressure_keeps_replies_exact(cached, plain):
    """Six conversations, one after another, over four slots; then their next turns, newest
    first. The least recently used prefixes were evicted (those turns are prefilled in full),
    the three newest are reused, and every reply still equals the uncached one."""
    rng = np.random.default_rng(5)
    prompts = [[1, *rng.integers(3, 32000, 40).tolist()] for _ in range(6)]
    for p in prompts:
        run(cached, p)
    follow = [p + [42] * 3 for p in reversed(prompts)]
    got = [run(cached, f) for f in follow]
    want = [run(plain, f) for f in follow]
    assert [ids(g) for g in got] == [ids(w) for w in want]
    assert [g.cached_tokens for g in got] == [41, 41, 41, 0, 0, 0]
    assert cached.prefix.cached_slots == 4


def test_cancel_during_a_cached_prefill_leaves_no_stale_keys(cached, plain):
    rng = np.random.default_rng(6)
    prompt = [1, *rng.integers(3, 32000, 120).tolist()]
    run(cached, prompt, max_tokens=2)
    for _ in range(3):  # cancelled while queued or in its (suffix) prefill
        handle = cached.submit(Request(prompt=prompt + rng.integers(3, 32000, 50).tolist(), max_tokens=50))
        handle.cancel()
        list(handle)
    after = prompt + [7, 7, 7]
    assert ids(run(cached, after)) == ids(run(plain, after))


def test_no_compiles_after_warmup_with_the_cache_on(cached):
    rng = np.random.default_rng(8)
    base = [1, *rng.integers(3, 32000, 70).tolist()]
    run(cached, base)
    with CompileCounter() as counter:
        for extra in (5, 40, 100):
            run(cached, base + rng.integers(3, 32000, extra).tolist(), sampling=SEEDED)
        handles = [cached.submit(Request(prompt=base + [i] * 9, max_tokens=4)) for i in range(3, 9)]
        for h in handles:
            h.result()
    assert counter.count == 0


def test_gpu_prefill_variants_chosen_on_the_host_match_the_uncached_engine(tiny_model, tokenizer, plain, monkeypatch):
    """A GPU's programs on this CPU: each prefill shape compiled fresh and after a cached prefix
    (`device.prefill_variants`), the engine picking by the rows' starts, and the static-trip-count
    loops. Same replies as the uncached engine; nothing compiles after warm-up."""
    from llama_jax import device
    from llama_jax.attention import AttentionConfig

    monkeypatch.setattr(device, "prefill_variants", lambda target: (False, True))
    with Engine(tiny_model, tokenizer, _config(attention=AttentionConfig(static_loops=True))) as gpu_like:
        ran = []
        real = gpu_like._prefill_rows
        monkeypatch.setattr(gpu_like, "_prefill_rows", lambda *a, suffix: ran.append(suffix) or real(*a, suffix=suffix))
        with CompileCounter() as counter:
            got = conversation(gpu_like, 21, 3, SEEDED)
        assert counter.count == 0
    assert [r for r, _ in got] == [r for r, _ in conversation(plain, 21, 3, SEEDED)]
    assert ran == [False, True, True] and got[-1][1] > 0  # the first turn fresh, the next ones after their prefix


# ---- through the HTTP API -----------------------------------------------------------------------

def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.split("{")[0].split()[0] == name)


def test_cached_tokens_in_usage_and_metrics_through_the_api(cached):
    from api.app import create_app
    from api.settings import ServerSettings

    server = LiveServer(create_app(cached, ServerSettings()), cached)
    try:
        client = server.client()
        hits, reused = metric(server.url, "llama_jax_prefix_cache_hits_total"), \
            metric(server.url, "llama_jax_prefix_cache_reused_tokens_total")
        messages = [{"role": "system", "content": "You answer questions about the sea, briefly and kindly."},
                    {"role": "user", "content": "Why is the sea salty?"}]
        first = client.chat.completions.create(model="meta-llama/Llama-2-7b-chat-hf", messages=messages, max_tokens=6, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And why is it blue?"}]
        stream = client.chat.completions.create(model="meta-llama/Llama-2-7b-chat-hf", messages=messages, max_tokens=6, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        usage = [c for c in stream][-1].usage
        cached_tokens = usage.prompt_tokens_details.cached_tokens
        assert first.usage.prompt_tokens <= cached_tokens < usage.prompt_tokens
        assert metric(server.url, "llama_jax_prefix_cache_hits_total") == hits + 1
        assert metric(server.url, "llama_jax_prefix_cache_reused_tokens_total") == reused + cached_tokens
        assert metric(server.url, "llama_jax_prefix_cache_slots") >= 1
        assert metric(server.url, "llama_jax_prefix_cache_tokens") >= usage.prompt_tokens
    finally:
        server.stop()
