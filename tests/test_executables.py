"""executables: compiled programs stored beside the compilation cache, loaded by a restart
without tracing or lowering, and never loaded under a key that changed."""

import collections
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import executables
from llama_jax.compiles import CACHE_HIT_EVENT, CompileCounter

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


class Traces:
    """Counts the jaxprs traced while open."""

    def __init__(self):
        self.count = 0

    def _event(self, event, duration, **_):
        self.count += event == TRACE_EVENT

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._event)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._event)


def programs(salt: float, rows: int = 4) -> dict:
    """Two programs over `[rows, 8]`; `salt` (a constant in their HLO) keeps them out of the
    session's JAX compilation cache, so that their compiles are fresh."""
    def scale(x, *, power):
        return jnp.tanh(x) ** power * salt

    fn = jax.jit(scale, static_argnames="power")
    x = np.linspace(0, 1, rows * 8, dtype=np.float32).reshape(rows, 8)
    return {("scale", p): (f"scale to the power {p}", fn, (x,), {"power": p}) for p in (1, 2)}


def run(built: dict, calls: dict) -> dict:
    return {ident: np.asarray(built[ident](*args)) for ident, (_, _, args, _) in calls.items()}


def test_a_second_build_loads_the_stored_programs_without_tracing_and_runs_them_alike(tmp_path):
    salt, seen = float(np.random.default_rng().uniform(2, 3)), []
    calls = programs(salt)
    with Traces() as traces:
        first = executables.build(calls, tmp_path, "context", progress=lambda d, t, what, s: seen.append((d, t, what)))
    assert traces.count == 2 and len(list(tmp_path.glob("*.exe"))) == 2
    assert [(d, t) for d, t, _ in seen] == [(1, 2), (2, 2)]  # in the order the compiles finish
    assert sorted(w for _, _, w in seen) == ["compiled scale to the power 1", "compiled scale to the power 2"]
    seen.clear()
    with Traces() as traces, CompileCounter() as compiles:
        again = executables.build(calls, tmp_path, "context", progress=lambda d, t, what, s: seen.append((d, t, what)))
        outputs = run(again, calls)
    assert traces.count == 0 and compiles.count == 0, "loaded: neither traced, lowered nor compiled"
    assert [(d, t) for d, t, _ in seen] == [(1, 2), (2, 2)]  # loaded several at once, in the order they finish
    assert sorted(w for _, _, w in seen) == ["loaded scale to the power 1", "loaded scale to the power 2"]
    expected = run(first, calls)
    assert all(np.array_equal(outputs[i], expected[i]) for i in calls)
    assert np.allclose(outputs[("scale", 2)], np.tanh(calls[("scale", 2)][2][0]) ** 2 * salt)


def test_a_changed_key_loads_nothing_stale(tmp_path, monkeypatch):
    """Another context (model or engine config), other argument shapes, another static argument
    or edited source: each compiles its own program rather than load the stored one."""
    salt = float(np.random.default_rng().uniform(3, 4))
    executables.build(programs(salt), tmp_path, "context")
    stored = set(tmp_path.glob("*.exe"))

    def loads(calls, context="context") -> int:
        seen = []
        built = executables.build(calls, tmp_path, context, progress=lambda d, t, what, s: seen.append(what))
        outputs = run(built, calls)
        for ident, (_, _, (x,), static) in calls.items():  # whatever was built computes its own program
            assert np.allclose(outputs[ident], np.tanh(x) ** static["power"] * salt)
        return sum(what.startswith("loaded") for what in seen)

    assert loads(programs(salt), context="another model config") == 0
    assert loads(programs(salt, rows=2)) == 0
    fn = jax.jit(lambda x, *, power: jnp.tanh(x) ** power * salt, static_argnames="power")
    x = programs(salt)[("scale", 1)][2]
    assert loads({("scale", 3): ("scale to the power 1", fn, x, {"power": 3})}) == 0, "same name, other static"
    monkeypatch.setattr(executables, "source_digest", lambda: "an edited source")
    assert loads(programs(salt)) == 0
    monkeypatch.undo()
    assert loads(programs(salt)) == 2, "the original key still loads its own programs"
    assert stored < set(tmp_path.glob("*.exe"))


def test_an_unreadable_entry_is_compiled_again(tmp_path):
    calls = programs(float(np.random.default_rng().uniform(4, 5)))
    executables.build(calls, tmp_path, "context")
    for path in tmp_path.glob("*.exe"):
        path.write_bytes(path.read_bytes()[:100])
    seen = []
    built = executables.build(calls, tmp_path, "context", progress=lambda d, t, what, s: seen.append(what))
    assert all(what.startswith("compiled") for what in seen) and len(built) == 2
    assert len(run(built, calls)) == 2


def test_a_build_deletes_what_no_build_used_for_keep_days_and_keeps_what_it_loads(tmp_path):
    """An upgrade's old executables and cut-short writes do not pile up: a build deletes entries
    no build loaded or stored for KEEP_DAYS (and `.tmp` files over an hour old), and loading an
    entry marks it used."""
    calls = programs(float(np.random.default_rng().uniform(5, 6)))
    executables.build(calls, tmp_path, "context")
    ours = set(tmp_path.glob("*.exe"))
    old = time.time() - (executables.KEEP_DAYS + 1) * 86400
    for name in ("stale.exe", "recent.exe", "cut.123.456.tmp", "writing.123.456.tmp"):
        (tmp_path / name).write_bytes(b"x")
    for path in [*ours, tmp_path / "stale.exe", tmp_path / "cut.123.456.tmp"]:
        os.utime(path, (old, old))
    os.utime(tmp_path / "writing.123.456.tmp", (time.time() - 600,) * 2)  # ten minutes old: maybe still written
    seen = []
    executables.build(calls, tmp_path, "context", progress=lambda d, t, what, s: seen.append(what))
    assert all(what.startswith("loaded") for what in seen), "old but still used: loaded, not compiled"
    assert set(tmp_path.iterdir()) == {*ours, tmp_path / "recent.exe", tmp_path / "writing.123.456.tmp"}
    assert all(time.time() - path.stat().st_mtime < 60 for path in ours), "loading marks them used"


def test_a_program_loaded_from_jax_cache_is_not_stored(tmp_path, monkeypatch):
    """On CPU such an executable serializes without its kernels (its copy fails when run), so a
    compile that JAX's persistent cache answered (it records a cache hit in its thread) stores nothing."""
    class FromJaxCache:
        def __init__(self, lowered, key):
            self.lowered = lowered

        def compile(self, options=None):
            jax.monitoring.record_event(CACHE_HIT_EVENT)
            return self.lowered.compile(options)

    monkeypatch.setattr(executables, "_named", FromJaxCache)
    calls = programs(float(np.random.default_rng().uniform(5, 6)))
    built = executables.build(calls, tmp_path, "context")
    assert len(run(built, calls)) == 2 and not list(tmp_path.glob("*.exe"))


def test_a_program_jax_cache_holds_still_compiles_fresh_and_is_stored(tmp_path):
    """A program JAX's cache already holds (an older version or another process compiled it)
    compiles fresh under its key's module name, so it is stored, and the stored copy runs."""
    salt = float(np.random.default_rng().uniform(6, 7))
    calls = programs(salt)
    for _, fn, args, static in calls.values():
        fn.lower(*args, **static).compile()  # now in the session's JAX cache
    executables.build(calls, tmp_path, "context")
    assert len(list(tmp_path.glob("*.exe"))) == 2
    seen = []
    built = executables.build(calls, tmp_path, "context", progress=lambda d, t, what, s: seen.append(what))
    assert len(seen) == 2 and all(what.startswith("loaded") for what in seen)
    for ident, (_, _, (x,), static) in calls.items():
        assert np.allclose(np.asarray(built[ident](x)), np.tanh(x) ** static["power"] * salt)


RESTART = """
import collections, sys
import jax
traces = collections.Counter()
jax.monitoring.register_event_duration_secs_listener(lambda name, d, **kw: traces.update([name]))
from llama_jax.config import preset
from llama_jax.engine import Engine, EngineConfig
from llama_jax.model import init_model
from llama_jax.request import SamplingOptions
from llama_jax.tokenizer import Tokenizer
config = EngineConfig(max_slots=1, max_seq_len=int(sys.argv[3]), compilation_cache_dir=sys.argv[1])
engine = Engine(init_model(preset("tiny-gqa")), Tokenizer(sys.argv[2]), config)
seen = []
before = traces["/jax/core/compile/jaxpr_trace_duration"]
engine.warmup(lambda done, total, what, s: seen.append(what))
traced = traces["/jax/core/compile/jaxpr_trace_duration"] - before
with engine.start(warmup=False):
    out = engine.generate([[1, 450, 4996], [1, 29871, 13]], max_tokens=8, sampling=SamplingOptions(seed=3))
print(sum(w.startswith("loaded") for w in seen), sum(w.startswith("compiled") for w in seen), traced)
print([[t.token_id for t in c.choices[0].tokens] for c in out])
"""


@pytest.mark.slow
def test_an_engine_restart_loads_its_programs_and_replies_the_same(tmp_path, tokenizer_path):
    """The second start of an engine with the same cache folder loads every serve program (no
    trace: only the two small jits warm-up calls trace) and generates the same tokens; another
    max_seq_len loads none of them."""
    def start(max_seq_len: int = 64) -> tuple[int, int, int, str]:
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", RESTART, str(tmp_path / "xla"), str(tokenizer_path),
                              str(max_seq_len)], capture_output=True, text=True, env=env, timeout=300, check=True)
        counts, tokens = out.stdout.splitlines()
        return (*map(int, counts.split()), tokens)

    loaded, compiled, traced, tokens = start()
    assert loaded == 0 and compiled > 0 and traced >= compiled
    again = start()
    assert again == (compiled, 0, traced - compiled, tokens)
    assert start(max_seq_len=32)[0] == 0, "another context length: its own programs"
