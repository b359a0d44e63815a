"""The serving engine's device core: the decode state of every slot and the pure jitted programs
that update it (prefill straight into slots, decode and sample, slot copy and swap, reset, clear a row).

All device state lives in one donated `DecodeState`, updated in place; `Programs.build` jits
every program once per model graph with the state's shardings fixed on output, and the set of
shapes they run at is fixed up front (`program_shapes`: one prefill per (rows, length) shape,
one decode and one sample per busy-slot bucket, the sum of the buckets, not their product), so no
request mix ever compiles. A decode step is two programs, the forward (`decode`: keys written,
logits left on the device) and `sample` (with the grammar masks), so the host can build a
constrained slot's mask while the device runs the forward. On a GPU each prefill shape has two
variants, fresh prompts and prompts after a cached prefix, chosen on the host
(`prefill_variants`): no program waits on the host.
Host-side state (slots, queue, text) is the scheduler's, in engine.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax import attention, bitmask, kv_cache, platform, sampling, sharding, step_masks, steps
from llama_jax.attention import AttentionConfig
from llama_jax.config import EngineConfig, LlamaConfig
from llama_jax.kv_cache import KVCache
from llama_jax.model import Llama
from llama_jax.packed import pack
from llama_jax.platform import Platform
from llama_jax.request import Constraint
from llama_jax.sampling import SamplerState, SamplingParams
from llama_jax.sharding import cache_sharding, replicated


@partial(jax.tree_util.register_dataclass, data_fields=["cache", "tokens", "sampler", "params"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the device keeps per slot between steps."""

    cache: KVCache
    tokens: jax.Array  # int32 [slots]: the last sampled token, the next step's input
    sampler: SamplerState
    params: SamplingParams


def prefill_shapes(config: EngineConfig, max_seq_len: int) -> list[tuple[int, int]]:
    """The (rows, length) shapes prefill compiles: one row at every length bucket, plus for each
    larger row bucket the longest length that fits `max_prefill_tokens`. Their number is the sum
    of the row and length buckets, never their product."""
    buckets = steps.length_buckets(max_seq_len, min(config.min_prefill_bucket, max_seq_len))
    shapes = [(1, b) for b in buckets]
    for rows in steps.length_buckets(config.max_slots, 1)[1:]:
        fitting = [b for b in buckets if rows * b <= config.max_prefill_tokens]
        if fitting:
            shapes.append((rows, fitting[-1]))
    return shapes


def smallest_prefill_shape(shapes: Sequence[tuple[int, int]], prompts: Sequence[Sequence[int]]) -> tuple[int, int] | None:
    """The smallest of the compiled (rows, length) `shapes` that holds these prompts, if any."""
    rows, longest = len(prompts), max(map(len, prompts))
    fitting = [(r, t) for r, t in shapes if r >= rows and t >= longest]
    return min(fitting, key=lambda s: s[0] * s[1]) if fitting else None


def prefill_inputs(prompts: Sequence[Sequence[int]], starts: Sequence[int], slots: Sequence[int],
                   rows: Sequence[SamplingParams], constraints: Sequence[Constraint | None],
                   shapes: Sequence[tuple[int, int]], pad_id: int, vocab: int, max_slots: int) -> tuple:
    """The host arrays of one prefill: each prompt's tokens from its start into its slot, padded to
    the smallest compiled shape of `shapes` that holds them (padding rows go to slot `max_slots`: they
    write nothing), with its sampling row, prompt-token mask and allowed tokens (its constraint's packed
    mask; None: every token). Returns (tokens, starts, lengths, slots, sampling params, prompt mask,
    allowed masks), the prefill's order."""
    n_rows, bucket = smallest_prefill_shape(shapes, [p[s:] for p, s in zip(prompts, starts)])
    pad = n_rows - len(prompts)
    tokens, lengths = steps.pad_prompts([*[p[s:] for p, s in zip(prompts, starts)], *[[pad_id]] * pad], bucket)
    allowed = bitmask.everything(n_rows, vocab)
    prompt_mask = np.zeros((n_rows, vocab), bool)
    for i, (prompt, constraint) in enumerate(zip(prompts, constraints)):
        prompt_mask[i, np.asarray(prompt)] = True
        if constraint is not None:
            constraint.fill_mask(allowed[i])
    params = sampling.stack_params([*rows, *[rows[0]] * pad])
    slot_ids = np.array([*slots, *[max_slots] * pad], np.int32)
    return tokens, np.array([*starts, *[0] * pad], np.int32), lengths, slot_ids, params, prompt_mask, allowed


def prefill_example(shape: dict, pad_id: int, max_seq_len: int, max_slots: int) -> tuple[list, list, list, list, list]:
    """A warm-up prefill of `program_shapes`' `shape`: (prompts, starts, slots, sampling rows, constraints) for
    `prefill_inputs`, full-length prompts of `pad_id` in padding rows only, so nothing is written."""
    rows, bucket = shape["rows"], shape["bucket"]
    return ([[pad_id] * min(bucket, max_seq_len - 1)] * rows, [0] * rows, [max_slots] * rows,
            [sampling.make_params(seed=0)] * rows, [None] * rows)


def prefill_variants(target: Platform) -> tuple[bool | None, ...]:
    """The prefill programs compiled per shape, by their static `suffix`. A GPU gets two, fresh
    (False) and after a cached prefix (True), chosen on the host by the rows' starts: a choice on
    the device is a conditional per layer, which XLA:GPU runs by waiting for the host. The CPU
    gets one that chooses on the device (None): half the prefill compiles, and no sync to avoid."""
    return (None,) if target.cpu else (False, True)


def prefill_variant(variants: tuple[bool | None, ...], starts: Sequence[int]) -> bool | None:
    """The variant of `variants` that runs rows starting at `starts` (a prefix cached before them)."""
    return None if variants == (None,) else bool(np.any(np.asarray(starts)))


def sample_variants(target: Platform) -> tuple[bool | None, ...]:
    """The sample programs compiled per row bucket, by their static `greedy`. An accelerator gets
    two, any rows (None) and greedy rows without alternatives (True: no sort, no top-k), chosen on
    the host by the busy rows' requests; the CPU gets one, whose sampler skips both on the device
    (`lax.cond`, no host round trip there): no more programs to compile at start-up."""
    return (None,) if target.cpu else (None, True)


def program_shapes(config: EngineConfig, max_seq_len: int) -> list[tuple[str, dict]]:
    """Every program serving runs on `config.platform` (default: the host's), as (kind, shape):
    one prefill per (rows, length) shape and variant (`prefill_variants`; "suffix" in the shape
    where there are two), one decode forward per busy-slot bucket and one sample per bucket and
    variant (`sample_variants`; "greedy" in the shape of the second), one verify per bucket with
    speculation on, the slot copy of the prefix cache and the slot swap that moves busy slots down
    (`admission.compaction`), and where the grammar masks live on the device, their upload per row
    bucket (step_masks.py). Warm-up compiles exactly these."""
    target = platform.resolve(config.platform)
    variants, buckets = prefill_variants(target), steps.length_buckets(config.max_slots, 1)
    return ([("prefill", {"rows": r, "bucket": t} | ({} if v is None else {"suffix": v}))
             for r, t in prefill_shapes(config, max_seq_len) for v in variants]
            + [("decode", {"rows": r}) for r in buckets]
            + [("sample", {"rows": r} | ({} if g is None else {"greedy": g})) for r in buckets for g in sample_variants(target)]
            + [("verify", {"rows": r}) for r in buckets if config.speculative.enabled]
            + [("copy", {}), ("swap", {})]
            + [("put_masks", {"rows": r}) for r in buckets if step_masks.mode(config.mask_upload, target.cpu) == "rows"])


def program_id(kind: str, args: tuple, static: dict) -> tuple:
    """Which of `program_shapes`' programs a call of `kind` with these arguments runs: a prefill
    by its (rows, length) shape and variant, the others by their busy-slot bucket (and a sample's
    greedy variant), a mask upload by its rows."""
    if kind == "prefill":
        return (kind, *np.shape(args[2]), static.get("suffix"))
    if kind == "put_masks":
        return (kind, len(args[1]), None)
    return (kind, static.get("rows"), static.get("greedy") or None)


def decode_state_shardings(cfg: LlamaConfig, mesh: Mesh | None) -> DecodeState:
    """Where each part of the state lives: the KV cache split like the k/v projections, the rest replicated."""
    rep = replicated(mesh)
    return DecodeState(cache=cache_sharding(cfg, mesh), tokens=rep,
                       sampler=SamplerState(counts=rep, prompt_mask=rep, step=rep),
                       params=jax.tree.map(lambda _: rep, sampling.make_params(seed=0)))


def empty_state(cfg: LlamaConfig, slots: int, max_len: int, platform: Platform | None = None) -> DecodeState:
    """Empty slots: zero cache (in `platform`'s storage form), neutral sampling rows (trace it
    under jit to build it in place)."""
    neutral = sampling.make_params(seed=0)
    return DecodeState(
        cache=kv_cache.init_cache(cfg, slots, max_len, platform),
        tokens=jnp.zeros((slots,), jnp.int32),
        sampler=sampling.init_state(slots, cfg.vocab_size),
        params=jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a), (slots, *np.shape(a))), neutral),
    )


def init_decode_state(cfg: LlamaConfig, slots: int, max_len: int, mesh: Mesh | None = None,
                      platform: Platform | None = None) -> DecodeState:
    """Empty slots created directly with their shardings: no device ever holds the whole state
    unless the sharding says so."""
    return jax.jit(partial(empty_state, cfg, slots, max_len, platform),
                   out_shardings=decode_state_shardings(cfg, mesh))()


def _scatter_rows(tree, slots: jax.Array, rows):
    """`tree[slots[r]] = rows[r]` for every leaf; slots past the end are dropped (padding rows)."""
    return jax.tree.map(lambda a, r: a.at[slots].set(r.astype(a.dtype), mode="drop"), tree, rows)


def prefill(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, tokens: jax.Array, starts: jax.Array,
            lengths: jax.Array, slots: jax.Array, rows: SamplingParams, prompt_mask: jax.Array, allowed: jax.Array,
            *, attn: AttentionConfig, branch_free: bool, suffix: bool | None = None) -> tuple[DecodeState, jax.Array]:
    """Prefill padded prompts `[R, bucket]` (true `lengths` `[R]`) straight into decode slots
    `slots` `[R]` at positions from `starts` `[R]` (a prefix the slot holds already: the prompt's
    suffix is given), and sample each row's first token there (with its sampling row, among its
    `allowed` tokens, packed `[R, words]` (bitmask.py); `prompt_mask` marks the whole prompt's ids, prefix included).

    The keys are written into the slots' cache in place: no prefill cache, no insert copy. A
    slot index past the end marks a padding row, which writes nothing anywhere. `suffix` (static,
    `prefill_variants`): whether some start may be past 0; None: the program checks."""
    model: Llama = nnx.merge(graphdef, params)
    positions = starts[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    logits, cache = model.prefill(tokens, positions, state.cache, starts + lengths, rows=slots,
                                  logits_at=jnp.maximum(lengths - 1, 0), attn=attn, suffix=suffix)
    logits = replicate(logits, attn.mesh)
    zeros = jnp.zeros(prompt_mask.shape, jnp.int32)
    fresh = sampling.SamplerState(counts=zeros, prompt_mask=prompt_mask, step=jnp.zeros(tokens.shape[:1], jnp.int32))
    result, sampled = sampling.sample(logits, rows, fresh, bitmask.expand(allowed, logits.shape[-1]),
                                      branch_free=branch_free)
    return DecodeState(
        cache=cache,
        tokens=state.tokens.at[slots].set(result.tokens, mode="drop"),
        sampler=_scatter_rows(state.sampler, slots, sampled),
        params=_scatter_rows(state.params, slots, rows),
    ), pack(result)


def decode(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState,
           *, rows: int, attn: AttentionConfig) -> tuple[DecodeState, jax.Array]:
    """The forward of one decode step for the first `rows` slots, each from its last token: the
    state with their keys written, and their next-token logits `[rows, vocab]`, left on the device
    for `sample`. Slots past `rows` are idle and cost nothing; each busy slot reads its own keys in
    place up to its length, so the cost follows the real context."""
    logits, cache = steps.decode_step(graphdef, params, state.cache, state.tokens[:rows], attn=attn)
    return dataclasses.replace(state, cache=cache), replicate(logits, attn.mesh)


def sample(state: DecodeState, logits: jax.Array, allowed: jax.Array, *, rows: int, branch_free: bool,
           greedy: bool | None = None) -> tuple[DecodeState, jax.Array]:
    """The first `rows` slots' next tokens from `decode`'s `logits`, among the `allowed` tokens
    (packed `[rows or more, words]`: bitmask.py, step_masks.py), returned `pack`ed; the cache passes through (donated: in
    place). `greedy` (static, `sample_variants`): every busy row is greedy without alternatives,
    so the sampler takes the argmax alone (no sort, no top-k)."""
    head = lambda tree: jax.tree.map(lambda a: a[:rows], tree)
    result, sampler = sampling.sample(logits, head(state.params), head(state.sampler),
                                      bitmask.expand(allowed[:rows], logits.shape[-1]), branch_free=branch_free,
                                      greedy_only=bool(greedy))
    return DecodeState(
        cache=state.cache,
        tokens=state.tokens.at[:rows].set(result.tokens),
        sampler=jax.tree.map(lambda a, r: a.at[:rows].set(r), state.sampler, sampler),
        params=state.params,
    ), pack(result)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """What one verify step returns: per slot, the sampled token at each of its k + 1 positions
    and how many lead the output (1 + the drafted tokens accepted), `pack`ed."""

    packed: jax.Array  # int32 [rows, k + 1, PACKED_COLUMNS]


def with_lengths(state: DecodeState, length: int) -> DecodeState:
    """`state` with every slot `length` tokens long (warm-up times steps there: speculative.measure_costs)."""
    lengths = jax.device_put(np.full(state.cache.lengths.shape, length, np.int32), state.cache.lengths.sharding)
    return dataclasses.replace(state, cache=state.cache.replace(lengths=lengths))


def step_kind(result: jax.Array | VerifyResult) -> tuple[int, bool]:
    """A dispatched step's rows and whether it verified drafts, from its result (for its timing)."""
    verify = isinstance(result, VerifyResult)
    return (result.packed if verify else result).shape[0], verify


def verify(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, drafts: jax.Array, n_drafts: jax.Array,
           allowed: jax.Array, *, rows: int, attn: AttentionConfig, branch_free: bool) -> tuple[DecodeState, VerifyResult]:
    """One speculative step for the first `rows` slots: each runs its last token and its first
    `n_drafts` `[slots]` of `drafts` `[slots, k]` at its current length in one forward (the
    prefill-after-a-prefix attention: causal over the new tokens, reading the row's cache), and
    samples every position exactly as `sample` would there (same key, step and penalty counts,
    as if the drafted tokens before it had been sampled). The longest prefix of drafts equal to
    the samples is accepted, plus the sample after it (rejection sampling with a point-mass
    draft: see speculative.py). Keys are written for all k + 1 positions; the row's length then
    counts only the accepted ones (later steps overwrite the rest). Rows without a draft (n = 0,
    idle or not speculating) take one plain decode step here. `allowed` (packed, its first `rows` rows) masks
    every position of a row (constrained rows never draft)."""
    model: Llama = nnx.merge(graphdef, params)
    k = drafts.shape[1]
    width, max_len = k + 1, state.cache.max_len
    head = lambda tree: jax.tree.map(lambda a: a[:rows], tree)
    starts = jnp.minimum(state.cache.lengths[:rows], max_len - 1)
    tokens = jnp.concatenate([state.tokens[:rows, None], drafts[:rows]], axis=1)  # [R, k + 1]
    offsets = jnp.arange(width, dtype=jnp.int32)
    positions = starts[:, None] + offsets[None]  # positions past the cache write nothing
    logits, cache = model.prefill(tokens, positions, state.cache, jnp.minimum(starts + width, max_len),
                                  rows=jnp.arange(rows, dtype=jnp.int32), attn=attn, suffix=True)
    logits = replicate(logits, attn.mesh)
    vocab = logits.shape[-1]
    sampler, row_params = head(state.sampler), head(state.params)
    # position j sees the drafts before it as generated tokens: counts + one-hot of drafts[:j]
    r, j, i = jnp.meshgrid(jnp.arange(rows), offsets, jnp.arange(k), indexing="ij")  # [R, k + 1, k]
    counts = jnp.broadcast_to(sampler.counts[:, None], (rows, width, vocab))
    counts = counts.at[r, j, drafts[:rows][r, i]].add((i < j).astype(jnp.int32), mode="drop")
    flat = lambda a: a.reshape(rows * width, *a.shape[2:])
    spread = lambda a: flat(jnp.broadcast_to(a[:, None], (rows, width, *a.shape[1:])))
    at_positions = sampling.SamplerState(counts=flat(counts), prompt_mask=spread(sampler.prompt_mask),
                                         step=flat(sampler.step[:, None] + offsets[None]))
    result, _ = sampling.sample(flat(logits), jax.tree.map(spread, row_params), at_positions,
                                bitmask.expand(spread(allowed[:rows]), vocab), branch_free=branch_free)
    sampled = jax.tree.map(lambda a: a.reshape(rows, width, *a.shape[1:]), result)
    drafted = offsets[None, :k] < jnp.minimum(n_drafts[:rows], k)[:, None]
    agree = (sampled.tokens[:, :k] == drafts[:rows]) & drafted
    accepted = jnp.sum(jnp.cumprod(agree.astype(jnp.int32), axis=1), axis=1)  # [R]
    emitted = accepted + 1
    last = jnp.take_along_axis(sampled.tokens, accepted[:, None], axis=1)[:, 0]
    kept = (offsets[None] < emitted[:, None]).astype(jnp.int32)
    new_counts = sampler.counts.at[jnp.arange(rows)[:, None], sampled.tokens].add(kept)
    new_sampler = sampling.SamplerState(counts=new_counts, prompt_mask=sampler.prompt_mask, step=sampler.step + emitted)
    lengths = cache.lengths.at[:rows].set(jnp.minimum(starts + emitted, max_len))
    return DecodeState(
        cache=cache.replace(lengths=lengths),
        tokens=state.tokens.at[:rows].set(last),
        sampler=jax.tree.map(lambda a, n: a.at[:rows].set(n), state.sampler, new_sampler),
        params=state.params,
    ), VerifyResult(pack(sampled, emitted))


def example_call(programs: Programs, kind: str, shape: dict, params: nnx.State, state: DecodeState,
                 allowed: jax.Array | None, drafts: tuple[np.ndarray, np.ndarray] | None) -> tuple[str, Callable, tuple, dict]:
    """A decode, sample, verify, copy, swap or mask-upload program of `program_shapes` as (what, jitted
    function, arguments, static arguments) over these buffers, for warm-up: `allowed` is all-ones masks
    as a step passes them (step_masks.py), `drafts` (and counts, a verify's only) are empty, the logits
    to sample are zeros."""
    rows, greedy = shape.get("rows"), shape.get("greedy")
    if kind == "decode":
        return f"decode {rows} slots", programs.decode, (params, state), {"rows": rows}
    if kind == "sample":
        logits = jax.device_put(np.zeros((rows, state.sampler.prompt_mask.shape[-1]), np.float32), programs.shardings.tokens)
        return (f"sample {rows} slots" + (" (greedy)" if greedy else ""), programs.sample, (state, logits, allowed),
                {"rows": rows, "greedy": greedy})
    if kind == "verify":
        return (f"verify {rows} slots x {drafts[0].shape[1] + 1} tokens", programs.verify,
                (params, state, *drafts, allowed), {"rows": rows})
    if kind == "swap":
        return "slot swap", programs.swap, (state, np.int32(0), np.int32(0)), {}
    if kind == "put_masks":  # a table of its own: the one `allowed` is would be donated
        table = jax.device_put(np.full(allowed.shape, bitmask.EVERYTHING, np.int32), programs.shardings.tokens)
        return (f"mask upload {rows} rows", programs.put_masks,
                (table, np.zeros(rows, np.int32), bitmask.everything(rows, 32 * allowed.shape[1])), {})
    return "slot copy", programs.copy, (state, np.int32(0), np.int32(0)), {}


def copy_slot(state: DecodeState, source: jax.Array, slot: jax.Array) -> DecodeState:
    """Slot `slot` takes slot `source`'s keys, values and length in every layer (jit it with the
    state donated: in place), one layer at a time so the scratch is one layer of one slot."""
    def copy(buffer):
        return jax.lax.fori_loop(0, buffer.shape[0], lambda l, b: b.at[l, slot].set(b[l, source]), buffer)

    cache = state.cache
    return dataclasses.replace(state, cache=cache.replace(k=jax.tree.map(copy, cache.k), v=jax.tree.map(copy, cache.v),
                                                          lengths=cache.lengths.at[slot].set(cache.lengths[source])))


def swap_slots(state: DecodeState, a: jax.Array, b: jax.Array) -> DecodeState:
    """Slots `a` and `b` trade everything they keep: keys, values, lengths, last tokens, sampler rows
    (jit it with the state donated: in place). A choice's draws do not depend on its slot, so it
    runs on unchanged in the other one; the keys go one layer at a time (scratch: two slots of one layer)."""
    pair, swapped = jnp.stack([a, b]), jnp.stack([b, a])

    def rows(x):
        return x.at[pair].set(x[swapped])

    def layered(buffer):  # [layers, slots, ...]
        return jax.lax.fori_loop(0, buffer.shape[0], lambda l, x: x.at[l, pair].set(x[l, swapped]), buffer)

    cache = state.cache
    return DecodeState(cache=cache.replace(k=jax.tree.map(layered, cache.k), v=jax.tree.map(layered, cache.v),
                                           lengths=rows(cache.lengths)),
                       tokens=rows(state.tokens), sampler=jax.tree.map(rows, state.sampler),
                       params=jax.tree.map(rows, state.params))


def replicate(logits: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Gather the LM head's vocab-sharded logits once, on purpose, before the replicated sampler."""
    return logits if mesh is None else jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, PartitionSpec()))


def reset(state: DecodeState) -> DecodeState:
    """Every slot empty again, in place (jit it with the state donated): zero lengths, counts and
    tokens, neutral sampling rows. Stale keys stay: lengths mask them."""
    neutral = sampling.make_params(seed=0)
    return DecodeState(
        cache=state.cache.replace(lengths=jnp.zeros_like(state.cache.lengths)),
        tokens=jnp.zeros_like(state.tokens),
        sampler=jax.tree.map(jnp.zeros_like, state.sampler),
        params=jax.tree.map(lambda a, n: jnp.broadcast_to(jnp.asarray(n, a.dtype), a.shape), state.params, neutral),
    )


def clear_row(params: SamplingParams, slot: jax.Array) -> SamplingParams:
    """Slot `slot`'s sampling row back to neutral (jit it with `params` donated), so an idle slot
    runs no top-k/top-p search."""
    return sampling.set_row(params, slot, sampling.make_params(seed=0))


@dataclasses.dataclass(frozen=True)
class Programs:
    """The engine's jitted device programs for one model graph and serving shape, with the decode
    state donated and its shardings fixed on output (so a step updates the state in place and
    never hands the next one a differently placed state, which would recompile)."""

    prefill: Callable  # (params, state, tokens, starts, lengths, slots, rows, prompt_mask, allowed, *, suffix) -> (state, packed)
    decode: Callable  # (params, state, *, rows) -> (state, logits)
    sample: Callable  # (state, logits, allowed, *, rows, greedy) -> (state, packed: packed.py)
    verify: Callable  # (params, state, drafts, n_drafts, allowed, *, rows) -> (state, VerifyResult)
    copy: Callable  # (state, source, slot) -> state
    swap: Callable  # (state, a, b) -> state
    reset: Callable  # (state) -> state
    clear_row: Callable  # (params, slot) -> params
    put_masks: Callable  # (table, slots, rows) -> table: step_masks.put_rows
    shardings: DecodeState
    prefill_variants: tuple[bool | None, ...]  # the values of prefill's static `suffix` compiled
    sample_variants: tuple[bool | None, ...]  # the values of sample's static `greedy` compiled

    @staticmethod
    def build(graphdef: nnx.GraphDef, cfg: LlamaConfig, config: EngineConfig, mesh: Mesh | None) -> Programs:
        """Jit every program once for `graphdef` on `mesh`, with the attention and sampler of
        `config.platform` (default: the host's) unless `config` names them."""
        target = platform.resolve(config.platform)
        attn = config.attention or attention.choose(target, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dtype)
        attn = dataclasses.replace(attn, mesh=mesh if sharding.tp_size(mesh) > 1 else None)
        branch_free = not target.cpu if config.branch_free_sampler is None else config.branch_free_sampler
        shardings = decode_state_shardings(cfg, mesh)
        static = dict(attn=attn, branch_free=branch_free)
        return Programs(
            prefill=jax.jit(partial(prefill, graphdef, **static), static_argnames="suffix", donate_argnames="state",
                            out_shardings=(shardings, None)),
            decode=jax.jit(partial(decode, graphdef, attn=attn), static_argnames="rows", donate_argnames="state",
                           out_shardings=(shardings, shardings.tokens)),  # logits replicated, as the sampler reads them
            sample=jax.jit(partial(sample, branch_free=branch_free), static_argnames=("rows", "greedy"),
                           donate_argnames="state", out_shardings=(shardings, None)),
            verify=jax.jit(partial(verify, graphdef, **static), static_argnames="rows", donate_argnames="state",
                           out_shardings=(shardings, None)),
            copy=jax.jit(copy_slot, donate_argnums=0, out_shardings=shardings),
            swap=jax.jit(swap_slots, donate_argnums=0, out_shardings=shardings),
            reset=jax.jit(reset, donate_argnums=0, out_shardings=shardings),
            clear_row=jax.jit(clear_row, donate_argnums=0, out_shardings=shardings.params),
            put_masks=jax.jit(step_masks.put_rows, donate_argnums=0, out_shardings=shardings.tokens),
            shardings=shardings, prefill_variants=prefill_variants(target), sample_variants=sample_variants(target))
