"""compiles.compile_in_threads: the warm-up's parallel compile (and plan's)."""

import threading

import jax
import jax.numpy as jnp
import pytest

from llama_jax.compiles import CompileCounter, compile_in_threads


def lowered(n: int, depth: int = 1) -> list[tuple[str, jax.stages.Lowered]]:
    """`n` distinct programs; `depth` chained steps each (deeper: slower to compile)."""
    def program(a, i):
        for _ in range(depth):
            a = jnp.tanh(a @ a) * i
        return a

    x = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    return [(f"program {i}", jax.jit(program, static_argnums=1).lower(x, i)) for i in range(n)]


def test_every_program_compiles_once_in_threads_with_progress_as_each_finishes():
    seen, threads = [], set()

    def progress(done, total, name, seconds):
        seen.append((done, total, name))
        threads.add(threading.current_thread().name)
        assert seconds >= 0

    out = compile_in_threads(lowered(5), threads=3, progress=progress)
    assert sorted(out) == [f"program {i}" for i in range(5)]
    assert [d for d, _, _ in seen] == [1, 2, 3, 4, 5] and {t for _, t, _ in seen} == {5}
    assert sorted(n for _, _, n in seen) == sorted(out)
    assert float(out["program 2"][0](jnp.ones((8, 8)))[0, 0]) == pytest.approx(2 * float(jnp.tanh(8.0)))
    assert threads == {threading.current_thread().name}  # progress runs in the caller's thread


def test_a_progress_callback_that_raises_cancels_the_compiles_not_started():
    class Stop(Exception):
        pass

    calls = []

    def progress(done, total, name, seconds):
        calls.append(name)
        raise Stop

    programs = lowered(12, depth=40)
    with CompileCounter() as counter, pytest.raises(Stop):
        compile_in_threads(programs, threads=1, progress=progress)
    assert len(calls) == 1
    assert counter.count <= 6, "the compiles queued when it raised are cancelled"
