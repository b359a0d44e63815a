"""Serving engine: continuous batching over a fixed number of decode slots, JetStream style.

Queued requests are prefilled together, one row per choice (prompts padded to a length bucket, rows to a power of
two; which requests, in which prefills: admission.py), straight into free decode slots, where each row samples its
first token; decode steps then advance every busy slot at once, moved down as others finish so the batch shrinks.
Device programs and state: device.py; the running choices and their bookkeeping: running.py (a plain step's tokens
are taken for all its slots at once); text and stop strings: each consumer's thread (choice_text.py; a stop string
frees its slot). A background thread schedules: each iteration admits one prefill batch and dispatches a step's
forward before it reads the last tokens (constrained slots' first: their masks go to the step's sampling), so the
device never waits for Python; no step when every busy choice ends with the tokens in flight. While any slot drafts
(speculative.py), all are read first; a step verifies drafts when their expected accepted tokens pay.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import operator
import threading
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama_jax import admission, executables, layers, platform, speculative, step_masks, steps
from llama_jax.compiles import enable_compilation_cache
from llama_jax.config import EngineConfig
from llama_jax.device import (Programs, VerifyResult, example_call, init_decode_state, prefill_example, prefill_inputs,
                              prefill_shapes, prefill_variant, program_id, program_shapes, smallest_prefill_shape, step_kind,
                              with_lengths)
from llama_jax.model import Llama, storage_params
from llama_jax.outbox import Outbox
from llama_jax.packed import copy_soon, unpack
from llama_jax.prefix_cache import PrefixCache
from llama_jax.request import (Admission, Completion, Constraint, EngineError, Event, QueueFullError, Request,
                               RequestHandle, prepared, stop_ids_of)
from llama_jax.running import RunningChoice, SlotTable, hand_out, start_choice, wants_a_step
from llama_jax.sampling import SamplingParams
from llama_jax.tokenizer import Tokenizer

__all__ = ["Engine", "EngineConfig"]

log = logging.getLogger(__name__)


class Engine:
    """Continuous-batching server of one model. `start()` warms up and runs the scheduler thread."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(), mesh: Mesh | None = None):
        """`model` may be sharded over `mesh` (`checkpoint.load`), the slots follow; its programs are jitted here once."""
        if config.compilation_cache_dir:  # before this engine compiles anything
            enable_compilation_cache(config.compilation_cache_dir)
        self.tokenizer, self.mesh, cfg = tokenizer, mesh, model.cfg
        if config.max_seq_len is not None and config.max_seq_len > cfg.max_seq_len:  # never clamp silently
            raise ValueError(f"max_seq_len {config.max_seq_len} exceeds the model's context of {cfg.max_seq_len} tokens")
        self.config, self.max_seq_len = config, config.max_seq_len or cfg.max_seq_len
        self.graphdef, params = nnx.split(model)
        self.platform = platform.resolve(config.platform)
        self.split = layers.split_layers(cfg, self.platform) if config.split_layers is None else config.split_layers
        # a one-time copy on CPU (split, 16-bit as bits); int8 weights get their compute mode
        self.params = storage_params(cfg, params, self.split, self.platform, sharded=mesh is not None and mesh.size > 1)
        self.model = nnx.merge(self.graphdef, self.params)  # the engine's own copy: the caller's may be freed
        self.row_buckets = steps.length_buckets(config.max_slots, 1)
        self.prefill_shapes = prefill_shapes(config, self.max_seq_len)
        self._fits_prefill = lambda prompts: smallest_prefill_shape(self.prefill_shapes, prompts) is not None
        self.table = SlotTable(config.max_slots, self.max_seq_len)  # the slots' token ids, counts and limits
        self.slots: list[RunningChoice | None] = self.table.choices  # each slot's running choice, if busy
        self.ready = False
        self.error: str | None = None  # why the scheduler stopped for good, if it failed
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drops = False  # whether a handle was cancelled or a choice stopped since `_drop_cancelled` last looked
        self._outbox = Outbox()  # asyncio consumers' events, handed over once per iteration
        programs = self._programs = Programs.build(self.graphdef, cfg, config, mesh)
        # compiled programs stored beside the compilation cache (executables.py); also scoring's
        self.executables_dir = Path(config.compilation_cache_dir) / "executables" if config.compilation_cache_dir else None
        self._state = init_decode_state(cfg, config.max_slots, self.max_seq_len, mesh, self.platform)
        self._prefill_rows, self._decode, self._sample = programs.prefill, programs.decode, programs.sample
        self._verify, self._copy, self._swap, self._put_masks = programs.verify, programs.copy, programs.swap, programs.put_masks
        self.speculative = config.speculative.for_platform(self.platform.cpu)
        self.verify_costs = dict.fromkeys(self.row_buckets, self.speculative.verify_cost)  # per row bucket: warm-up measures them
        self._step_times = speculative.StepTimes()  # then the steps served, unless the config fixes them
        self._no_drafts = speculative.draft_rows([None] * config.max_slots, self.speculative)[:2]  # a verify step's, at warm-up
        self.drafted_tokens = self.accepted_tokens = self.verify_steps = 0  # speculative totals, all requests (metrics)
        self._acceptance = speculative.Acceptance()  # what the drafts held, by matched context: a draft's expectation
        self._reset, self._clear_row = programs.reset, programs.clear_row  # idle rows: no top-k/top-p search
        self._prefill_variants, self._lean_variant = programs.prefill_variants, True in programs.sample_variants
        self.prefix = PrefixCache(config.max_slots, self.max_seq_len, config.prefix_cache)
        self.masks = step_masks.StepMasks(config.max_slots, cfg.vocab_size, step_masks.mode(config.mask_upload, self.platform.cpu),
                                          self.row_buckets, programs.shardings.tokens)  # grammar masks, host and device

    def start(self, warmup: bool = True, progress: Callable[[int, int, str, float], None] | None = None) -> Engine:
        if warmup:
            self.warmup(progress)
        self._thread = threading.Thread(target=self._run, name="llama-jax-engine", daemon=True)
        self._thread.start()
        self.ready = True
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread:
            self._thread.join()
        self.ready = False

    def __enter__(self) -> Engine:
        return self if self._thread else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Validate and queue a request; raises RequestError or QueueFullError at once. Pass the running
        event loop to consume the handle with `async for`."""
        request, max_tokens, rows = prepared(request, vocab_size=self.model.cfg.vocab_size, max_seq_len=self.max_seq_len,
                                             stop_ids=(stop_ids := stop_ids_of(request, self.tokenizer.eos_ids)),
                                             speculative=self.speculative.enabled)
        handle = RequestHandle(request, loop, self._outbox, self.tokenizer, stop_ids)
        handle.max_tokens, handle.rows = max_tokens, rows
        with self._wake:
            if self._stopping:
                raise EngineError("the engine is stopped")
            if len(self._queue) >= self.config.max_queue:
                raise QueueFullError(f"the request queue is full ({self.config.max_queue} waiting)")
            self._queue.append(handle)
            handle._on_drop = self._look_for_drops
            self._wake.notify()
        return handle

    def generate(self, prompts: Sequence[Sequence[int] | str], **request_fields) -> list[Completion]:
        """Run prompts (token ids, or raw text: `tokenizer.prompt_ids`) to completion: for notebooks and scripts."""
        ids = [self.tokenizer.prompt_ids(p) if isinstance(p, str) else list(p) for p in prompts]
        return [h.result() for h in [self.submit(Request(prompt=p, **request_fields)) for p in ids]]  # all queued first

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def busy_slots(self) -> int:
        return self.table.busy_count

    def warmup(self, progress: Callable[[int, int, str, float], None] | None = None) -> None:
        """Build every program serving can run: loaded from the executables stored beside the compilation cache
        (executables.py: no tracing), or compiled several at once and stored; `progress(done, total, what, its seconds)`
        as each is ready. Each runs once on an accelerator (a CPU's first run, ~1 s a multi-row program, is a request's)."""
        calls = {program_id(kind, c[2], c[3]): c for kind, c in
                 ((p[0], self._warmup_call(p)) for p in program_shapes(self.config, self.max_seq_len))}
        context = repr((self.model.cfg, dataclasses.replace(self.config, compilation_cache_dir=None, compile_threads=None),
                        self.max_seq_len, self.split, self.platform, self.mesh))  # what fixes them beyond their arguments
        built = executables.build(calls, self.executables_dir, context, self.config.compile_threads, progress)
        for kind, name in self._CALLS.items():  # serving calls these executables from now on
            setattr(self, name, executables.calls_through(getattr(self._programs, kind), built, partial(program_id, kind)))
        for program in [] if self.platform.cpu else program_shapes(self.config, self.max_seq_len):  # an accelerator
            _, _, args, static = self._warmup_call(program)  # initialises a program on its first run (modules, cuDNN
            out = jax.block_until_ready(getattr(self, self._CALLS[program[0]])(*args, **static))  # plans): not in a request
            if program[0] != "put_masks":  # a mask upload's table is its own (`example_call`)
                self._state = out[0] if isinstance(out, tuple) else out  # the state, alone or first
        if self.speculative.enabled and self.config.speculative.verify_cost is None:
            start = speculative.measured_length(self.max_seq_len, len(self.row_buckets), self.speculative.tokens)
            self._state = with_lengths(self._state, start)
            step = lambda rows, drafts: jax.block_until_ready(self._finish(rows, self._forward(rows, drafts))[1])
            self.verify_costs = speculative.measure_costs(step, self._no_drafts, self.row_buckets)
        self._free(0)  # compiles clear_row, which every finished request runs
        self._state = self._reset(self._state)

    _CALLS = {"prefill": "_prefill_rows", "decode": "_decode", "sample": "_sample", "verify": "_verify", "copy": "_copy",
              "swap": "_swap", "put_masks": "_put_masks"}

    def _warmup_call(self, program: tuple[str, dict]) -> tuple[str, Callable, tuple, dict]:
        """One serving program as (what, jitted function, arguments, static arguments) over the engine's buffers."""
        kind, shape = program
        if kind == "prefill":
            example = prefill_example(shape, self.tokenizer.bos_id, self.max_seq_len, self.config.max_slots)
            return (f"prefill {shape['rows']} x {shape['bucket']} tokens" + (" after a prefix" if shape.get("suffix") else ""),
                    self._programs.prefill, *self._prefill_args(*example, shape.get("suffix")))
        return example_call(self._programs, kind, shape, self.params, self._state,
                            self.masks.example(shape.get("rows")), self._no_drafts if kind == "verify" else None)

    def _replace_state(self) -> None:
        """Fresh empty slots after a failure, freeing the old buffers first: never two states at once."""
        for leaf in [x for x in jax.tree.leaves(self._state) if not x.is_deleted()]:
            leaf.delete()
        self._state = init_decode_state(self.model.cfg, self.config.max_slots, self.max_seq_len, self.mesh, self.platform)
        self.masks.renew()
        self.prefix.forget()

    def _move(self, program: Callable, source: int, slot: int) -> None:  # a slot copy or swap
        self._state = program(self._state, np.int32(source), np.int32(slot))

    def _prefill_args(self, prompts: Sequence[Sequence[int]], starts: Sequence[int], slots: Sequence[int],
                      rows: Sequence[SamplingParams], constraints: Sequence[Constraint | None],
                      suffix: bool | None = None) -> tuple[tuple, dict]:
        """The arguments of a prefill of `prompts` straight into their slots, each from its start (the tokens before it
        are in the slot already). Its variant follows the starts unless `suffix` names it (warm-up)."""
        inputs = prefill_inputs(prompts, starts, slots, rows, constraints, self.prefill_shapes, self.tokenizer.bos_id,
                                self.model.cfg.vocab_size, self.config.max_slots)
        variant = prefill_variant(self._prefill_variants, inputs[1]) if suffix is None else suffix
        return (self.params, self._state, *inputs), {"suffix": variant}

    def _look_for_drops(self) -> None:  # a handle was cancelled or a stop string ended a choice (any thread)
        with self._wake:
            self._drops = True
            self._wake.notify()

    def _run(self) -> None:
        pending: tuple[list[RunningChoice | None], jax.Array | VerifyResult] | None = None
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._stopping or self._queue or self.table.busy_count or pending)
                if self._stopping:
                    break
            try:
                pending = self._iterate(pending)
            except Exception as e:  # a bug or a device error: fail what is running, keep serving
                log.exception("engine step failed")
                pending = None
                try:
                    self._fail_running(f"engine step failed: {e}")
                except Exception as fatal:  # recovery failed too: stop for good rather than hang every request
                    log.exception("engine recovery failed; the engine stops")
                    self.error, self.ready = f"engine recovery failed: {fatal}", False
                    with self._wake:
                        self._stopping = True
                    break
            finally:
                self._outbox.flush()
        with self._wake:
            queued, self._queue = list(self._queue), collections.deque()
        for handle in {a.handle for a in self.slots if a} | set(queued):
            handle.put(Event(choice=0, error=self.error or "the engine stopped"))
            handle.put(None)
        self._outbox.flush()

    def _iterate(self, pending):
        """One scheduler iteration: admit, start a step, read the last tokens (constrained slots' while the forward
        runs, for the step's sampling masks), finish it. While any slot drafts, all are read first (drafts follow them)."""
        if self._drops:  # some handle was cancelled or some choice stopped since the last look
            self._drop_cancelled()
        admitted = self._admit()
        results = [pending, *admitted] if pending else admitted
        speculating = self.speculative.enabled and any(a and a.drafts_now() for a in self.slots)  # before the step moves them
        if reads_first := speculating or bool(pending and isinstance(pending[1], VerifyResult)):
            for result in results:
                self._process(*result)
            results = []
        if self.speculative.enabled and self.config.speculative.verify_cost is None:  # else fixed: costs follow the served steps
            self.verify_costs.update(self._step_times.lap(step_kind(pending[1]) if pending and not admitted else None, reads_first))
        step = self._start(speculating) if wants_a_step(self.slots, [r[0] for r in results]) else None
        for result in results:
            self._process(*result, constrained=True)
        dispatched = self._finish(*step) if step else None
        for result in results:
            self._process(*result, constrained=False)
        return dispatched

    def _free(self, slot: int) -> None:
        if (active := self.slots[slot]) is not None:  # the slot keeps its keys: all but the last sampled token's
            self.prefix.hold(slot, active.ids[:-1])
        self.table.clear(slot)
        self.masks.clear(slot)
        self._state = dataclasses.replace(self._state, params=self._clear_row(self._state.params, np.int32(slot)))

    def _fail_running(self, error: str) -> None:
        """Fail every request holding a slot and start from fresh device state."""
        for active in [a for a in self.slots if a]:
            self._release(active.handle, error)
        self._replace_state()

    def _drop_cancelled(self) -> None:  # and the choices a stop string ended
        self._drops = False  # before looking: a drop from now on is seen at the next iteration
        with self._wake:
            cancelled = [h for h in self._queue if h.cancelled.is_set()]
            self._queue = collections.deque(h for h in self._queue if not h.cancelled.is_set())
        for handle in cancelled + list({a.handle: None for a in self.slots if a and a.handle.cancelled.is_set()}):
            self._release(handle)  # frees its slots, if it holds any
            handle.put(None)
        for active in [a for a in self.slots if a and a.choice in a.handle.stopped]:
            self._end(active)

    def _release(self, handle: RequestHandle, error: str | None = None) -> None:
        """Free every slot of `handle`; with `error`, tell its consumer, end its stream, admit no more of its choices."""
        for active in [a for a in self.slots if a and a.handle is handle]:
            self._free(active.slot)
        if error is not None:
            handle.cancelled.set()
            self._drops = True  # its choices still queued, if any
            handle.put(Event(choice=0, error=error))
            handle.put(None)

    def _admit(self) -> list[tuple]:
        """Prefill the next queued requests straight into free slots, one row per choice, each from the
        longest prefix some slot holds (copied into its slot first if need be); their results unread."""
        if not self._queue:  # read unlocked: a request queued meanwhile is admitted next iteration
            return []
        free = [i for i, s in enumerate(self.slots) if s is None]
        with self._wake:
            batch = admission.take_batch(self._queue, len(free), self.prefix.reusable, self._fits_prefill)
        try:
            admissions = admission.place_batch(batch, free, self.prefix.place, partial(self._move, self._copy))
        except Exception as e:  # out of the queue and in no slot yet: fail them here, or they wait forever
            for handle, _ in batch:
                self._release(handle, f"admission failed: {e}")
            raise
        results = []
        for group in admission.prefill_groups(admissions, self._fits_prefill):
            rows = [r for r in group if not r.handle.cancelled.is_set()]  # an earlier group failed (or the client left)
            try:
                results.extend(self._admit_rows(rows))
            except Exception as e:  # a failed prefill fails this group's requests only
                for r in rows:
                    self._fail_admission(r, e)
        return results

    def _admit_rows(self, rows: list[Admission]) -> list[tuple]:
        """One prefill for these admissions, its result returned unread; each choice then owns its slot.
        A request whose own parts fail (its constraint) fails alone."""
        made = []
        for r in rows:
            try:
                made.append((r, r.handle.request.constraint() if r.handle.request.constraint else None))
            except Exception as e:
                self._fail_admission(r, e)
        made = [(r, c) for r, c in made if not r.handle.cancelled.is_set()]
        if not made:
            return []
        args, static = self._prefill_args(*zip(*[(r.handle.request.prompt, r.start, r.slot, r.handle.rows[r.choice], c)
                                                 for r, c in made]))
        self._state, result = self._prefill_rows(*args, **static)  # row i samples prompt i's first token
        owners: list[RunningChoice | None] = [None] * len(self.slots)
        for r, constraint in made:
            if r.handle.cancelled.is_set():  # another choice of it failed just now
                self.prefix.forget(r.slot)
                continue
            owners[r.slot] = start_choice(
                r, self.table, constraint, self.speculative.applies(r.handle.request.speculative, constraint is not None))
            self.prefix.hold(r.slot, r.handle.request.prompt)
        copy_soon(result, self.platform)
        return [(owners, result, {r.slot: i for i, (r, _) in enumerate(made)})]

    def _fail_admission(self, row: Admission, error: Exception) -> None:
        """Fail the request of `row` (once: its other choices may fail too) and free its slots."""
        log.exception("admission failed")
        self.prefix.forget(row.slot)
        self._release(row.handle, None if row.handle.cancelled.is_set() else f"admission failed: {error}")

    def _start(self, drafting: bool) -> tuple[int, jax.Array | VerifyResult]:
        """Dispatch a plain step's forward or, while slots draft and their drafts pay (speculative.choose_drafts), a verify
        step. Busy slots are kept low (`_compact`): the bucket of the highest, returned, sets the batch."""
        self._compact()
        rows = steps.bucket_for(int(np.flatnonzero(self.table.busy)[-1]) + 1, self.row_buckets)
        drafts = drafting and speculative.choose_drafts(self.slots, self.speculative, self.max_seq_len, self.busy_slots,
                                                        self.verify_costs[rows], self._acceptance)
        if drafts:
            self.drafted_tokens, self.verify_steps = self.drafted_tokens + int(drafts[1].sum()), self.verify_steps + 1
        return rows, self._forward(rows, drafts or None)

    def _compact(self) -> None:
        """Swap busy choices above their count's row bucket into free lower slots, unless queued requests will take those."""
        for high, low in [] if self._queue else admission.compaction(self.table.busy, self.row_buckets):
            self._move(self._swap, high, low)
            self.table.swap(high, low)
            self.masks.swap(high, low)
            self.prefix.swap(high, low)

    def _forward(self, rows: int, drafts: tuple[np.ndarray, np.ndarray] | None) -> jax.Array | VerifyResult:
        """A plain step's forward (its logits stay on the device), or a whole verify step of `drafts`."""
        if drafts is None:
            self._state, started = self._decode(self.params, self._state, rows=rows)
        else:  # constrained rows never draft: their tokens are read already
            allowed = self._allowed(rows)  # first: a failing constraint frees its slot, which updates the state
            self._state, started = self._verify(self.params, self._state, *drafts, allowed, rows=rows)
        return started

    def _finish(self, rows: int, result: jax.Array | VerifyResult) -> tuple[list[RunningChoice | None], jax.Array | VerifyResult]:
        """Sample a started plain step; the step's tokens (packed.py) are then copied to the host asynchronously."""
        if not isinstance(result, VerifyResult):  # else sampled already
            lean = self._lean_variant and not self.table.heavy_count  # no sort, no top-k: device.py
            allowed = self._allowed(rows)  # first: a failing constraint frees its slot, which updates the state
            self._state, result = self._sample(self._state, result, allowed, rows=rows, greedy=lean or None)
        copy_soon(result, self.platform)
        return list(self.slots), result

    def _allowed(self, rows: int) -> jax.Array | np.ndarray:
        """The step's packed masks (step_masks.py), constrained slots' filled first; a broken automaton fails its request only."""
        constrained = bool(self.table.constrained_count)
        for a, e in self.masks.fill(self.slots) if constrained else []:
            log.error("constraint failed", exc_info=e)
            self._release(a.handle, f"structured-output constraint failed: {e}")
        return self.masks.for_step(rows, constrained, self._put_masks)

    def _process(self, owners: list[RunningChoice | None], result: jax.Array | VerifyResult | None,
                 row_of: dict[int, int] | None = None, constrained: bool | None = None) -> None:
        """Hand one step's sampled tokens (a verify step's: 1 to k + 1 per slot) to the choices that still own their slot
        and their consumers (with `constrained` given, only those with or without one); a plain step's plain slots at once."""
        if result is None or (constrained and not self.table.constrained_count):
            return
        if (constrained is not True and row_of is None and not isinstance(result, VerifyResult) and self.table.at_once
                and all(map(operator.is_, owners, self.slots))):  # its plain slots at once (`running.hand_out`)
            if (packed := self._host_copy(result)) is not None:
                ended, stop = self.table.take_all(packed[:, 0, 0])
                for loop, its in self.table.receivers().items():
                    self._outbox.post(loop, hand_out, (its, packed, ended, stop))
                for slot in np.flatnonzero(ended).tolist():
                    self._end(self.slots[slot])
            if constrained is False or not self.table.constrained_count:
                return
            constrained = True  # the constrained rest, one by one
        if constrained is not None:
            owners = [a if a and (a.constraint is not None) == constrained else None for a in owners]
        if not any(owners) or (packed := self._host_copy(result)) is None:
            return
        out, verify = unpack(packed), isinstance(result, VerifyResult)  # a plain step has one position
        for slot, active in enumerate(owners):  # the slots at dispatch: a choice may have moved since (`_compact`)
            if active is None or self.slots[active.slot] is not active:
                continue  # finished or cancelled after this step was dispatched, or not this pass
            r = row_of[slot] if row_of else slot
            try:
                if verify:  # its drafter learns how many drafted tokens held (a plain step emits one token)
                    cost = self.verify_costs[len(out.emitted)]
                    self.accepted_tokens += active.verified(out.emitted[r] - 1, self.speculative, cost, self._acceptance)
                if active.take(out, r):
                    self._end(active)
            except Exception as e:
                log.exception("processing a token failed")
                self._release(active.handle, f"processing a token failed: {e}")

    def _host_copy(self, result: jax.Array | VerifyResult) -> np.ndarray | None:
        """A step's packed tokens on the host, or None after a device error of the step (it fails what is running)."""
        try:
            return np.asarray(result.packed if isinstance(result, VerifyResult) else result)
        except Exception as e:
            log.exception("decode step failed")
            self._fail_running(f"decode step failed: {e}")

    def _end(self, active: RunningChoice) -> None:  # done: its slot freed, its stream ended after its last choice
        self._free(active.slot)
        active.handle.unfinished -= 1
        if active.handle.unfinished == 0:
            active.handle.put(None)
