"""`tools/bench_engine.py --host`: the scheduler's host time per decode step (issue 30), at 1, 8
and 64 busy slots, with and without one grammar-constrained slot, on a model small enough that
the device step is short (tiny-gqa: 2 layers, the real 32000-piece vocabulary and tokenizer).

Host time is the CPU time of the engine's scheduler thread (`pthread_getcpuclockid`) over a run,
divided by its decode steps (every request gets `--host-tokens` tokens, EOS ignored; the requests'
queues read in turn by the caller's thread, or with `--host-async` on one asyncio loop as the server
does): admission, dispatch, the host copies of each step's results, token items, and the
constrained slot's mask and matcher. XLA:CPU runs much of each program in the dispatching
thread (its CPU time per call grows with the rows: docs/benchmarks.md), so on a CPU part of the
device work is in it too: `..._outside_programs_ms_per_step` is the thread's CPU time outside the
calls of the compiled programs (on a GPU such a call is a launch), the wall time per step beside
both, and `..._consumer_ms_per_step` the CPU time of the thread reading the requests, where
their text is made (detokenizing, stop strings: choice_text.py; the scheduler deals in token ids).
With `--rounds` R, each kind of run (plain, then each constraint) is repeated R times in turn: the host
figures are from each kind's round of least scheduler time, the wall time a step is the median over rounds,
and what a constraint adds is the median of its rounds' ratios to the plain round run just before.
Goals (issue 30): <= 0.4 ms a step at 64 unconstrained slots; a constrained slot adds <= 10 % to a
step. Two constraints are measured: a JSON schema (what `response_format` sends; llguidance's mask ~5 us a
step) and a counted regex, `[a-z ]{0,4000}`, whose every step is a new lexer state (~140 us a mask): the
grammar's own cost, which no scheduling hides at 1 busy slot. Each one's mask time alone is reported.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_jax import bitmask  # noqa: E402
from llama_jax.config import preset  # noqa: E402
from llama_jax.engine import Engine, EngineConfig  # noqa: E402
from llama_jax.model import init_model  # noqa: E402
from llama_jax.request import Request, SamplingOptions  # noqa: E402
from llama_jax.tokenizer import Tokenizer  # noqa: E402


def thread_seconds(thread) -> float:
    """CPU seconds (user + system) `thread` has used so far."""
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def time_programs(engine: Engine) -> list[float]:
    """Wrap the engine's compiled-program calls so that the CPU seconds the calling thread spends in them add
    up in the returned one-element list."""
    spent = [0.0]

    def timed(program):
        def call(*args, **kwargs):
            start = time.thread_time()
            try:
                return program(*args, **kwargs)
            finally:
                spent[0] += time.thread_time() - start
        return call

    for attr in [*Engine._CALLS.values(), "_clear_row", "_reset"]:
        setattr(engine, attr, timed(getattr(engine, attr)))
    return spent


class HostRun(NamedTuple):
    scheduler: float  # the scheduler thread's CPU seconds
    wall: float  # seconds
    steps: int  # decode steps
    inside: float  # of the scheduler's CPU seconds, those inside program calls
    consumer: float  # the consumer thread's CPU seconds: the choices' text (detokenizing, stop strings) is made there


def run(engine: Engine, busy: int, tokens: int, constraint=None, in_programs: Sequence[float] = (0.0,),
        consume_async: bool = False) -> HostRun:
    """`busy` requests of `tokens` tokens each (the first constrained, if `constraint`), read in turn
    from their queues by this thread or on an asyncio loop (`consume_async`); inside program calls is counted
    by `in_programs` (from `time_programs`)."""
    cpu, start, inside, consumer = thread_seconds(engine._thread), time.perf_counter(), in_programs[0], time.thread_time()
    request = lambda i: Request(prompt=[1, 450, 4996, 17354 + i], max_tokens=tokens, stop_token_ids=[],
                                constraint=constraint if i == 0 else None, sampling=SamplingOptions(temperature=0))
    if consume_async:  # as the server does: one event loop, events handed over once per scheduler iteration
        async def replies():
            loop = asyncio.get_running_loop()
            return await asyncio.gather(*[engine.submit(request(i), loop=loop).aresult() for i in range(busy)])
        completions = asyncio.run(replies())
    else:  # this thread reads each request's queue in turn (a thread-safe put per token)
        completions = [h.result() for h in [engine.submit(request(i)) for i in range(busy)]]
    steps = max(c.completion_tokens for c in completions) - 1  # the first token comes from the prefill
    return HostRun(thread_seconds(engine._thread) - cpu, time.perf_counter() - start, steps, in_programs[0] - inside,
                   time.thread_time() - consumer)


# a constrained reply that runs to about --host-tokens with random weights (its budget closes it)
SCHEMA = {"type": "object", "required": ["name", "notes"],
          "properties": {"name": {"type": "string"}, "notes": {"type": "array", "items": {"type": "string"}}}}


def grammars(tokenizer: Tokenizer) -> dict:
    """The constrained slot's grammars by name: a JSON schema (what `response_format` sends) and a counted regex."""
    from llama_jax.structured import json_grammar, regex_grammar

    return {"json_schema": json_grammar(tokenizer, SCHEMA), "regex": regex_grammar(tokenizer, "[a-z ]{0,4000}")}


def mask_us(factory, vocab: int, steps: int = 100) -> float:
    """Median microseconds of one `fill_mask` of a constraint from `factory`, alone, over `steps` steps that each
    take an allowed token at random (seeded), EOS aside (the grammar's own cost, without the engine)."""
    constraint, row, times, rng = factory(), bitmask.everything(1, vocab)[0], [], np.random.default_rng(0)
    for _ in range(steps):
        start = time.perf_counter()
        constraint.fill_mask(row)
        times.append(time.perf_counter() - start)
        allowed = np.flatnonzero(bitmask.unpack(row, vocab))
        constraint.advance(int(rng.choice(allowed[allowed != constraint.vocab.eos_id])))
        if constraint.done():
            break
    return round(1e6 * float(np.median(times)), 1)


def bench_host(args) -> dict:
    cfg = preset("tiny-gqa")
    tokenizer = Tokenizer(args.tokenizer)
    slots = max(args.host_slots)
    engine = Engine(init_model(cfg, seed=0), tokenizer, EngineConfig(max_slots=slots, max_seq_len=cfg.max_seq_len,
                                                                    min_prefill_bucket=16)).start()
    in_programs = time_programs(engine)
    constraints = {name: g.factory(args.host_tokens, cfg.vocab_size) for name, g in grammars(tokenizer).items()}
    out: dict = {"model": "tiny-gqa (random weights, 2 layers, 32000 vocab)", "tokens": args.host_tokens,
                 "consumers": "asyncio" if args.host_async else "queues read in turn",
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "mask_us_alone": {name: mask_us(f, cfg.vocab_size) for name, f in constraints.items()}}
    try:
        for constraint in constraints.values():  # compiles nothing (warm), but warms the grammars' first masks
            run(engine, 2, 8, constraint)
        for busy in args.host_slots:
            runs: dict[str, list[HostRun]] = {"plain": [], **{name: [] for name in constraints}}
            for _ in range(args.rounds):  # the kinds in turn, so that the box's drift falls on all of them alike
                for name, constraint in (("plain", None), *constraints.items()):
                    runs[name].append(run(engine, busy, args.host_tokens, constraint, in_programs, args.host_async))
            row = {}
            for name, rounds in runs.items():
                r = min(rounds, key=lambda r: r.scheduler / r.steps)  # the host's figures: its least disturbed round
                row[f"{name}_host_ms_per_step"] = round(1000 * r.scheduler / r.steps, 3)
                row[f"{name}_outside_programs_ms_per_step"] = round(1000 * (r.scheduler - r.inside) / r.steps, 3)
                row[f"{name}_consumer_ms_per_step"] = round(1000 * r.consumer / r.steps, 3)
                row[f"{name}_wall_ms_per_step"] = round(1000 * statistics.median(r.wall / r.steps for r in rounds), 3)
            for name in constraints:  # the median over rounds of each round's ratio to the plain run just before it
                ratios = [c.wall / c.steps / (p.wall / p.steps) for c, p in zip(runs[name], runs["plain"])]
                row[f"{name}_adds_pct"] = round(100 * (statistics.median(ratios) - 1), 1)
            out[f"busy_{busy}"] = row
            print(f"busy {busy}: {row}", file=sys.stderr, flush=True)
    finally:
        engine.stop()
    return out
