"""Serving engine: continuous batching over a fixed number of decode slots, JetStream style.

Queued requests are prefilled together (prompts padded to a length bucket, rows to a power of
two, up to `max_prefill_tokens`), each inserted into one free slot per choice (which samples its
first token), and then advanced by `generate` steps that run every busy slot at once. All
device state lives in one donated `DecodeState`; the set of compiled programs is fixed at
warm-up (one prefill and one insert per (rows, length) bucket, one generate per (busy slots,
attention window) bucket), so no request mix ever compiles.

A background thread schedules: each iteration admits at most one prefill batch (so running
streams stall for at most one bucketed prefill), then dispatches a generate step before it
processes the previous step's tokens on the host, so the device never waits for Python.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax import kv_cache, sampling, steps
from llama_jax.kv_cache import KVCache
from llama_jax.model import Llama
from llama_jax.request import (ChoiceText, Completion, Constraint, EngineError, Event, QueueFullError, Request,
                               RequestError, RequestHandle, SamplingOptions, TokenLogprob, validate)
from llama_jax.sampling import SampleResult, SamplerState, SamplingParams
from llama_jax.sharding import shard_cache
from llama_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Serving shape: slots, context, buckets and queue. Everything here fixes a compiled shape."""

    max_slots: int = 8
    max_seq_len: int | None = None  # default: the model's context (4096 for Llama 2)
    min_prefill_bucket: int = 16
    max_prefill_tokens: int = 512  # queued prompts are prefilled together up to rows x bucket tokens
    min_decode_window: int = 128
    max_queue: int = 64
    compilation_cache_dir: str | None = None  # JAX's persistent cache: restarts skip compiling


def enable_compilation_cache(directory: str | Path) -> None:
    """Persist compiled programs in `directory`, so a restarted server skips compiling.

    JAX reads this setting when it first compiles: call it before anything is jitted.
    """
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@partial(jax.tree_util.register_dataclass, data_fields=["cache", "tokens", "sampler", "params"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the device keeps per slot between steps."""

    cache: KVCache
    tokens: jax.Array  # int32 [slots]: the last sampled token, the next step's input
    sampler: SamplerState
    params: SamplingParams


def init_decode_state(model: Llama, slots: int, max_len: int, mesh: Mesh | None = None) -> DecodeState:
    """Empty slots. On a mesh the KV cache is split like the k/v projections; the rest is replicated."""
    neutral = sampling.make_params(seed=0)
    state = DecodeState(
        cache=kv_cache.init_cache(model.cfg, slots, max_len),
        tokens=jnp.zeros((slots,), jnp.int32),
        sampler=sampling.init_state(slots, model.cfg.vocab_size),
        params=sampling.stack_params([neutral] * slots),
    )
    if mesh is None:  # committed to the device, like every state a step returns: one jit cache entry
        return jax.device_put(state, jax.devices()[0])
    replicated = NamedSharding(mesh, PartitionSpec())
    return dataclasses.replace(
        jax.device_put(state, replicated), cache=shard_cache(state.cache, mesh))


def _row(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1, axis=0), tree)


def _put_row(tree, i, row):
    return jax.tree.map(lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, i, axis=0), tree, row)


def insert(state: DecodeState, prefix: KVCache, logits: jax.Array, prompts: jax.Array, row: jax.Array,
           slot: jax.Array, params: SamplingParams, allowed: jax.Array) -> tuple[DecodeState, SampleResult]:
    """Put prompt `row` of a prefill batch (cache, last-token `logits` [rows, vocab], padded
    `prompts` [rows, bucket]) into `slot` with its sampling row, and sample its first token there
    (among the `allowed` [1, vocab] tokens). `row` and `slot` are traced: one program per batch shape."""
    cache = kv_cache.insert(prefix, state.cache, slot, row)
    all_params = sampling.set_row(state.params, slot, params)
    length = jax.lax.dynamic_index_in_dim(prefix.lengths, row, keepdims=False)
    sampler = sampling.reset_row(state.sampler, slot, jax.lax.dynamic_index_in_dim(prompts, row, keepdims=False), length)
    result, row_state = sampling.sample(_row(logits, row), _row(all_params, slot), _row(sampler, slot), allowed)
    return DecodeState(
        cache=cache,
        tokens=state.tokens.at[slot].set(result.tokens[0]),
        sampler=_put_row(sampler, slot, row_state),
        params=all_params,
    ), result


def generate(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, allowed: jax.Array,
             *, rows: int, kv_len: int) -> tuple[DecodeState, SampleResult]:
    """One decode step and one sampled token for each of the first `rows` slots, among the
    `allowed` [slots, vocab] tokens. Slots past `rows` are idle and cost nothing; a busy slot
    attends over the first `kv_len` positions, so the cost follows the real context."""
    head = lambda tree: jax.tree.map(lambda a: a[:rows], tree)
    logits, cache = steps.decode_step(graphdef, params, state.cache, state.tokens[:rows], kv_len=kv_len)
    result, sampler = sampling.sample(logits, head(state.params), head(state.sampler), allowed[:rows])
    return DecodeState(
        cache=cache,
        tokens=state.tokens.at[:rows].set(result.tokens),
        sampler=jax.tree.map(lambda a, r: a.at[:rows].set(r), state.sampler, sampler),
        params=state.params,
    ), result


@dataclasses.dataclass
class _Active:
    """Host-side bookkeeping of one choice running in a slot."""

    handle: RequestHandle
    choice: int
    max_tokens: int
    text: ChoiceText
    stop_ids: frozenset[int]
    length: int  # tokens in the slot's cache once the in-flight steps land
    constraint: Constraint | None = None
    generated: int = 0


class Engine:
    """Continuous-batching server of one model. `start()` warms up and runs the scheduler thread."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(), mesh: Mesh | None = None):
        """`model`'s parameters may be sharded over `mesh` (see `checkpoint.load`); the slots follow.

        `insert` and `generate` are jitted here, bound to this model's graph (no per-call hashing
        of the static GraphDef) and with the decode state's shardings fixed on output, so a step
        never hands the next one a differently sharded state (which would recompile)."""
        if config.compilation_cache_dir:  # before this engine compiles anything
            enable_compilation_cache(config.compilation_cache_dir)
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        if config.max_seq_len is not None and config.max_seq_len > model.cfg.max_seq_len:  # never clamp silently
            raise ValueError(f"max_seq_len {config.max_seq_len} exceeds the model's context of "
                             f"{model.cfg.max_seq_len} tokens")
        self.max_seq_len = config.max_seq_len or model.cfg.max_seq_len
        self.config = config
        self.graphdef, self.params = nnx.split(model)
        self.buckets = steps.length_buckets(self.max_seq_len, config.min_prefill_bucket)
        self.windows = steps.decode_windows(self.max_seq_len, config.min_decode_window)
        self.row_buckets = steps.length_buckets(config.max_slots, 1)
        self.prefill_shapes = [(rows, bucket) for bucket in self.buckets for rows in self.row_buckets
                               if rows == 1 or rows * bucket <= config.max_prefill_tokens]
        self.slots: list[_Active | None] = [None] * config.max_slots
        self.ready = False
        self.error: str | None = None  # why the scheduler stopped for good, if it failed
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._state = self._fresh_state()
        shardings = jax.tree.map(lambda a: a.sharding, self._state)
        self._insert = jax.jit(insert, donate_argnames="state", out_shardings=(shardings, None))
        self._generate = jax.jit(partial(generate, self.graphdef), static_argnames=("rows", "kv_len"),
                                 donate_argnames="state", out_shardings=(shardings, None))
        neutral = sampling.make_params(seed=0)  # idle rows: no top-k/top-p search runs for them
        self._clear_row = jax.jit(lambda params, slot: sampling.set_row(params, slot, neutral),
                                  donate_argnums=0, out_shardings=shardings.params)
        self._everything = jax.device_put(  # the mask of unconstrained steps, resident on the device
            np.ones((config.max_slots, model.cfg.vocab_size), bool), shardings.tokens)

    # ---- public API -------------------------------------------------------------------------

    def start(self, warmup: bool = True, progress: Callable[[int, int, str], None] | None = None) -> Engine:
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
        """Validate and queue a request; raises RequestError or QueueFullError at once.

        Pass the running event loop to consume the handle with `async for`.
        """
        max_tokens = validate(request, vocab_size=self.model.cfg.vocab_size, max_seq_len=self.max_seq_len)
        if request.n > self.config.max_slots:
            raise RequestError(f"n={request.n} exceeds this server's {self.config.max_slots} decode slots", param="n")
        if request.sampling.seed is None:  # one random seed for the request: its choices differ by index
            request = dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, seed=sampling.random_seed()))
        rows = [self._sampling_row(request.sampling, i, request.top_logprobs)  # range errors name the field
                for i in range(request.n)]
        handle = RequestHandle(request, loop)
        handle.max_tokens, handle.rows = max_tokens, rows
        with self._wake:
            if self._stopping:
                raise EngineError("the engine is stopped")
            if len(self._queue) >= self.config.max_queue:
                raise QueueFullError(f"the request queue is full ({self.config.max_queue} waiting)")
            self._queue.append(handle)
            handle._on_cancel = self._notify
            self._wake.notify()
        return handle

    def generate(self, prompts: Sequence[Sequence[int] | str], **request_fields) -> list[Completion]:
        """Run prompts (token ids, or text encoded with BOS) to completion: for notebooks and scripts."""
        ids = [[self.tokenizer.bos_id, *self.tokenizer.encode(p)] if isinstance(p, str) else list(p) for p in prompts]
        handles = [self.submit(Request(prompt=p, **request_fields)) for p in ids]
        return [h.result() for h in handles]

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def busy_slots(self) -> int:
        return sum(s is not None for s in self.slots)

    # ---- device steps -------------------------------------------------------------------------

    def warmup(self, progress: Callable[[int, int, str], None] | None = None) -> None:
        """Compile every program serving can need: prefill + insert per (rows, length) bucket,
        generate per (busy-slot bucket, attention window)."""
        total, done = len(self.prefill_shapes) + len(self.row_buckets) * len(self.windows), 0
        row = self._sampling_row(SamplingOptions(seed=0), 0)
        for rows, bucket in self.prefill_shapes:
            prefix = self._prefill([[self.tokenizer.bos_id] * min(bucket, self.max_seq_len - 1)] * rows)
            np.asarray(self._insert_row(prefix, rows - 1, 0, row).tokens)
            done += 1
            self._report(progress, done, total, f"prefill {rows} x {bucket} tokens")
        for rows in self.row_buckets:
            for window in self.windows:
                self._state, result = self._generate(self.params, self._state, self._everything,
                                                     rows=rows, kv_len=window)
                np.asarray(result.tokens)
                done += 1
                self._report(progress, done, total, f"decode {rows} slots, window {window}")
        self._free(0)
        self._state = self._fresh_state()

    def _fresh_state(self) -> DecodeState:
        return init_decode_state(self.model, self.config.max_slots, self.max_seq_len, self.mesh)

    @staticmethod
    def _report(progress, done: int, total: int, what: str) -> None:
        log.info("warm-up %d/%d: %s", done, total, what)
        if progress:
            progress(done, total, what)

    def _sampling_row(self, options: SamplingOptions, choice: int, top_logprobs: int = 0) -> SamplingParams:
        try:
            return sampling.make_params(**dataclasses.asdict(options), choice=choice, top_logprobs=top_logprobs)
        except ValueError as e:
            raise RequestError(str(e), param=str(e).split()[0]) from None

    def _prefill(self, prompts: list[list[int]]) -> tuple[jax.Array, KVCache, np.ndarray]:
        """Prefill prompts together, padded to a (rows, length) bucket; returns (logits, cache, tokens)."""
        rows = steps.bucket_for(len(prompts), self.row_buckets)
        prompts = prompts + [[self.tokenizer.bos_id]] * (rows - len(prompts))  # padding rows: one token
        tokens, lengths = steps.pad_prompts(prompts, steps.bucket_for(max(map(len, prompts)), self.buckets))
        logits, cache = steps.prefill(self.graphdef, self.params, tokens, lengths)
        return logits, cache, tokens

    def _insert_row(self, prefix, row: int, slot: int, params: SamplingParams,
                    constraint: Constraint | None = None) -> SampleResult:
        """Insert prompt `row` of a prefill batch into `slot`; returns its first sampled token."""
        logits, cache, tokens = prefix
        allowed = constraint.allowed()[None] if constraint else np.ones((1, self.model.cfg.vocab_size), bool)
        self._state, result = self._insert(self._state, cache, logits, tokens, np.int32(row), np.int32(slot), params, allowed)
        return result

    # ---- scheduler ----------------------------------------------------------------------------

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def _run(self) -> None:
        pending: tuple[list[_Active | None], SampleResult] | None = None
        while True:
            with self._wake:
                while not (self._stopping or self._queue or any(self.slots) or pending):
                    self._wake.wait()
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
        with self._wake:
            queued, self._queue = list(self._queue), collections.deque()
        for handle in {a.handle for a in self.slots if a} | set(queued):
            handle.put(Event(choice=0, error=self.error or "the engine stopped"))
            handle.put(None)

    def _iterate(self, pending):
        """One scheduler iteration: admit, dispatch a step, process the previous one."""
        self._drop_cancelled()
        self._admit()
        if pending:  # constrained slots need their last token before the next mask: only they wait
            self._process(*pending, which=lambda a: a.constraint is not None)
        dispatched = self._dispatch() if any(self.slots) else None
        if pending:
            self._process(*pending, which=lambda a: a.constraint is None)
        return dispatched

    def _free(self, slot: int) -> None:
        self.slots[slot] = None
        self._state = dataclasses.replace(self._state, params=self._clear_row(self._state.params, np.int32(slot)))

    def _fail_running(self, error: str) -> None:
        """Fail every request holding a slot and start from fresh device state."""
        for active in list(self.slots):
            if active:
                self._release(active.handle, error)
        self._state = self._fresh_state()

    def _drop_cancelled(self) -> None:
        with self._wake:
            cancelled = [h for h in self._queue if h.cancelled.is_set()]
            self._queue = collections.deque(h for h in self._queue if not h.cancelled.is_set())
        for handle in cancelled:
            handle.put(None)
        for active in self.slots:
            if active and active.handle.cancelled.is_set():
                self._release(active.handle)
                active.handle.put(None)

    def _release(self, handle: RequestHandle, error: str | None = None) -> None:
        """Free every slot of `handle`; with `error`, tell its consumer, end its stream and stop
        admitting its remaining choices."""
        for i, active in enumerate(self.slots):
            if active and active.handle is handle:
                self._free(i)
        if error is not None:
            handle.cancelled.set()
            handle.put(Event(choice=0, error=error))
            handle.put(None)

    def _take_batch(self, free: int) -> list[RequestHandle]:
        """Pop the queued requests (in order) to prefill together: all their choices fit in the
        `free` slots and their padded batch in `max_prefill_tokens` (a lone prompt always fits)."""
        batch: list[RequestHandle] = []
        with self._wake:
            while self._queue and sum(h.request.n for h in batch) + self._queue[0].request.n <= free:
                candidate = [*batch, self._queue[0]]
                longest = max(len(h.request.prompt) for h in candidate)
                rows = steps.bucket_for(len(candidate), self.row_buckets)
                if batch and (rows, steps.bucket_for(longest, self.buckets)) not in self.prefill_shapes:
                    break
                batch.append(self._queue.popleft())
        return batch

    def _admit(self) -> None:
        """Prefill the next queued requests together and insert each choice into a free slot."""
        free = [i for i, s in enumerate(self.slots) if s is None]
        batch = []
        for handle in self._take_batch(len(free)):
            if handle.max_tokens == 0:  # nothing to generate: every choice ends at once
                for choice in range(handle.request.n):
                    handle.put(Event(choice, finish_reason="length"))
                handle.unfinished = 0
                handle.put(None)
            else:
                batch.append(handle)
        if not batch:
            return
        try:
            prefix = self._prefill([list(h.request.prompt) for h in batch])
        except Exception as e:  # a failed prefill fails these requests only
            log.exception("prefill failed")
            for handle in batch:
                self._release(handle, f"prefill failed: {e}")
            return
        free_slots = iter(free)
        for row, handle in enumerate(batch):
            request = handle.request
            stop_ids = frozenset(request.stop_token_ids if request.stop_token_ids is not None else (self.tokenizer.eos_id,))
            try:
                for choice, slot in zip(range(request.n), free_slots):
                    if handle.cancelled.is_set():  # an earlier choice failed (or the client left)
                        break
                    constraint = request.constraint() if request.constraint else None
                    first = self._insert_row(prefix, row, slot, handle.rows[choice], constraint)
                    active = _Active(handle, choice, handle.max_tokens, ChoiceText(self.tokenizer, request.stop),
                                     stop_ids, len(request.prompt), constraint)
                    self.slots[slot] = active
                    self._process([active if i == slot else None for i in range(len(self.slots))], first, row_of={slot: 0})
            except Exception as e:  # a failed insert fails this request only
                log.exception("insert failed")
                self._release(handle, f"prefill failed: {e}")

    def _dispatch(self) -> tuple[list[_Active | None], SampleResult]:
        """Launch one generate step for the busy slots; its tokens are copied to the host asynchronously.

        Slots are taken lowest first, so the busy ones sit in a prefix whose bucketed size sets
        the batch; the longest busy context sets the attention window.
        """
        longest = max(a.length for a in self.slots if a)
        window = steps.bucket_for(min(longest + 1, self.max_seq_len), self.windows)
        rows = steps.bucket_for(max(i for i, a in enumerate(self.slots) if a) + 1, self.row_buckets)
        allowed = self._everything
        if any(a and a.constraint for a in self.slots):
            allowed = np.ones((len(self.slots), self.model.cfg.vocab_size), bool)
            for i, a in enumerate(self.slots):
                if a and a.constraint:
                    try:
                        allowed[i] = a.constraint.allowed()
                    except Exception as e:  # a broken automaton fails its request only
                        log.exception("constraint failed")
                        self._release(a.handle, f"structured-output constraint failed: {e}")
            if not any(self.slots):
                return [None] * len(self.slots), None
            allowed = jax.device_put(allowed, self._everything.sharding)  # same placement: same program
        self._state, result = self._generate(self.params, self._state, allowed, rows=rows, kv_len=window)
        for leaf in jax.tree.leaves(result):
            leaf.copy_to_host_async()
        for active in self.slots:
            if active:
                active.length += 1
        return list(self.slots), result

    def _process(self, owners: list[_Active | None], result: SampleResult | None, row_of: dict[int, int] | None = None,
                 which: Callable[[_Active], bool] = lambda a: True) -> None:
        """Turn one step's sampled tokens into events for the choices (those `which` selects) that
        still own their slot."""
        if result is None or not any(a and which(a) for a in owners):
            return
        try:  # device errors of an asynchronously dispatched step surface here
            tokens, logprobs = np.asarray(result.tokens), np.asarray(result.logprobs)
            top_ids, top_lp = np.asarray(result.top_ids), np.asarray(result.top_logprobs)
        except Exception as e:
            log.exception("generate step failed")
            self._fail_running(f"generate step failed: {e}")
            return
        for slot, active in enumerate(owners):
            if active is None or self.slots[slot] is not active or not which(active):
                continue  # finished or cancelled after this step was dispatched, or not this pass
            r = row_of[slot] if row_of else slot
            try:
                self._advance(slot, active, int(tokens[r]), float(logprobs[r]), top_ids[r], top_lp[r])
            except Exception as e:
                log.exception("processing a token failed")
                self._release(active.handle, f"processing a token failed: {e}")

    def _advance(self, slot: int, active: _Active, token: int, logprob: float, top_ids, top_lp) -> None:
        k = active.handle.request.top_logprobs
        info = TokenLogprob(token, logprob, tuple(zip(top_ids[:k].tolist(), top_lp[:k].tolist())))
        active.generated += 1
        if active.constraint:
            active.constraint.advance(token)
        if token in active.stop_ids:
            text, finish = active.text.finish(), "stop"
        else:
            text, hit = active.text.add(token)
            complete = active.constraint is not None and active.constraint.done()
            finish = "stop" if hit or complete else "length" if active.generated >= active.max_tokens else None
            if finish and not hit:
                text += active.text.finish()
        active.handle.put(Event(active.choice, text, (info,), finish))
        if finish:
            self._free(slot)
            active.handle.unfinished -= 1
            if active.handle.unfinished == 0:
                active.handle.put(None)
