"""Attention, one entry point per use, each with an implementation chosen per platform.

* `prompt_attention`: prompts, or prompt suffixes after a cached prefix (queries at positions
  start..start+T-1). A batch of fresh prompts takes `prefill_attention`: CPU: XLA in causal query
  blocks; GPU: cuDNN flash attention (`jax.nn.dot_product_attention`) with the true lengths, whose
  causal mask is top-left aligned, right only for queries starting at position 0. A batch with a
  suffix takes `suffix_attention`: an XLA loop over the cache rows' key blocks up to each query
  block's last position (the prefix's keys are in the cache, the suffix's were just written).
  Which of the two runs is static where the caller knows (`suffix`: a GPU engine chooses on the
  host, by the rows' starts) or else chosen on the device (a `lax.cond`: CPU).
* `decode_attention`: one new token per row against the stacked KV cache, read in place up to
  each row's length, never copied out as a window. CPU: a loop over key blocks whose trip count
  follows the longest row (plain XLA, online softmax). GPU: a Pallas (Triton) kernel that reads
  the layer and row it needs straight out of the stacked cache, split over the key axis.
* `cached_attention`: any queries at any positions against the cache with an explicit mask (for
  scoring chunks and suffix prefills): reads the whole layer, off the serving hot path.

No host round trips on a GPU: XLA:GPU runs a `lax.cond`, or a `while` loop whose trip count it
cannot infer, by copying the predicate to the host and waiting for it each time. With
`AttentionConfig.static_loops` (every platform but the CPU) the XLA loops run a static number of
key blocks, the whole cache row, masking what lies past a row's length or a query's position;
the CPU keeps its data-dependent trip counts, which follow the real context.

All score arithmetic is float32; values beyond a row's length are zeroed before they meet a
probability, so a stale NaN in an idle part of the cache can never leak in through 0 x NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from llama_jax.bits import from_bits
from llama_jax.platform import Platform, resolve

log = logging.getLogger(__name__)

PREFILL_QUERY_BLOCK = 128  # XLA prefill runs causal query blocks of this many tokens
_MASKED = -1e30  # finite: exp(_MASKED - m) is exactly 0 and never NaN
PALLAS_MIN_KEYS = 16  # Triton's dots need 16 keys a block: shorter cache rows take the XLA loop


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Which implementation each attention entry point uses; static (part of the compiled program).

    `prefill`: "xla" or "cudnn"; `decode`: "xla" or "pallas" (with `interpret` the Pallas kernel
    runs on any backend, for tests); `block` is the key block of the decode loop; `splits` how
    many programs share one row's keys in the Pallas kernel (parallelism at batch 1). `mesh`:
    the tensor-parallel mesh, over which the kernels run per device on their own KV heads.
    `static_loops`: the XLA key-block loops run over the whole cache row, masked, instead of up to
    the longest row: a trip count XLA knows, so no host round trip per iteration on a GPU; they
    then take blocks of `static_block` keys (each iteration is a few kernel launches there, and
    every block of the row is visited: fewer, larger ones; not yet measured on a GPU).
    """

    prefill: str = "xla"
    decode: str = "xla"
    block: int = 64  # CPU: 64-128 keys per block cost 2.4x less than 256 at 8 rows x 128 context
    splits: int = 8
    interpret: bool = False
    mesh: Mesh | None = None
    static_loops: bool = False
    static_block: int = 512

    @property
    def loop_block(self) -> int:
        """The key block of the XLA loops (decode fallback, suffix prefill)."""
        return self.static_block if self.static_loops else self.block

    @staticmethod
    def for_platform(platform: Platform | None = None) -> AttentionConfig:
        """The fast choice for a platform (default: the host's): its kernels where it has them
        (Pallas-Triton decode, cuDNN prefill), XLA elsewhere; static loop trip counts everywhere
        but on the CPU (whose data-dependent ones follow the real context and cost no sync)."""
        platform = resolve(platform)
        return AttentionConfig(prefill="cudnn" if platform.has("cudnn") else "xla",
                               decode="pallas" if platform.has("triton") else "xla", static_loops=not platform.cpu)

    @property
    def kernels(self) -> tuple[str, ...]:
        """The custom kernels these choices put into a serving program, as compiled programs name
        them (`plan.custom_kernels`)."""
        return tuple(k for k, on in (("triton:decode_attention", self.decode == "pallas"),
                                     ("cudnn:fmha", self.prefill == "cudnn")) if on)


def cudnn_refusal(platform: Platform, heads: int, kv_heads: int, head_dim: int, dtype) -> str | None:
    """Why cuDNN flash attention cannot run this model's prefill on `platform` (None: it can).

    Traced at the model's head shape and dtype (cuDNN refuses e.g. float32 and some head sizes
    while tracing); on the real devices also compiled and run once on a small batch."""
    t = 128
    q, k = (jax.ShapeDtypeStruct((1, t, n, head_dim), dtype) for n in (heads, kv_heads))
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    fn = jax.jit(functools.partial(prefill_attention, config=AttentionConfig(prefill="cudnn")))
    try:
        traced = fn.trace(q, k, k, lengths)
        if platform.target is None:
            zeros = lambda s: jnp.zeros(s.shape, s.dtype)
            traced.lower().compile()(zeros(q), zeros(k), zeros(k), jnp.array([t], jnp.int32)).block_until_ready()
    except Exception as e:  # noqa: BLE001 - any refusal means: use the XLA path
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    return None


def choose(platform: Platform | None, heads: int, kv_heads: int, head_dim: int, dtype) -> AttentionConfig:
    """The platform's attention for this model, decided once at start-up with one log line:
    cuDNN prefill falls back to the XLA path where cuDNN is unavailable or refuses the shape."""
    platform = resolve(platform)
    config = AttentionConfig.for_platform(platform)
    if config.prefill == "cudnn":
        reason = cudnn_refusal(platform, heads, kv_heads, head_dim, dtype)
        if reason is not None:
            config = dataclasses.replace(config, prefill="xla")
            log.warning("attention on %s: cuDNN flash attention unavailable for prefill (%s): using the XLA path; "
                        "decode: %s", platform.name, reason, config.decode)
            return config
    log.info("attention on %s: prefill %s, decode %s", platform.name, config.prefill, config.decode)
    return config


def _group(q: jax.Array, kv_heads: int) -> jax.Array:
    """`[B, T, H, D]` -> `[B, T, KV, G, D]`: query heads grouped onto their KV head (no repeat of k/v)."""
    b, t, h, d = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, d)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference GQA: q `[B, T, H, D]`, k/v `[B, KV, S, D]`, mask `[B, T, S]` -> `[B, T, H, D]`."""
    b, t, h, d = q.shape
    scores = jnp.einsum("btkgd,bksd->bkgts", _group(q, k.shape[1]), k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * d**-0.5, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    visible = jnp.any(mask, axis=1)  # [B, S]: keys some query sees; the rest may be stale
    v = jnp.where(visible[:, None, :, None], v, 0).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", probs.astype(v.dtype), v).reshape(b, t, h, d)


def causal_mask(lengths: jax.Array, t: int) -> jax.Array:
    """`[B, T, T]`: query i sees key j iff j <= i and j < the row's length (a fresh prompt)."""
    i = jnp.arange(t)
    return (i[None, None, :] <= i[None, :, None]) & (i[None, None, :] < lengths[:, None, None])


def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                      config: AttentionConfig) -> jax.Array:
    """Causal attention of fresh prompts: q `[B, T, H, D]`, k/v `[B, T, KV, D]`, true `lengths` `[B]`.
    cuDNN needs q, k and v sharded alike: with KV heads replicated over tp, the XLA path runs."""
    if config.prefill == "cudnn" and _heads_split(config, k.shape[2]):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                            key_value_seq_lengths=lengths, implementation="cudnn")
    t = q.shape[1]
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, KV, T, D]
    mask = causal_mask(lengths, t)
    block = PREFILL_QUERY_BLOCK
    # Query block s reads only the keys up to its end: half the work of one dense call, and a
    # score block small enough to stay in cache (3x faster attention at 1024 tokens on CPU).
    return jnp.concatenate(
        [masked_attention(q[:, s:s + block], k[:, :, :s + block], v[:, :, :s + block], mask[:, s:s + block, :s + block])
         for s in range(0, t, block)], axis=1)


def prompt_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     layer: jax.Array | int, rows: jax.Array, starts: jax.Array, lengths: jax.Array,
                     config: AttentionConfig, suffix: bool | None = None) -> jax.Array:
    """Queries `[B, T, H, D]` at positions `starts[b] + i` with their own keys `k`/`v` `[B, T, KV, D]`,
    already written into cache rows `rows` of layer `layer`; `lengths` `[B]` counts the prefix too.

    `suffix` (static): False when every start is 0 (the fresh path), True when some may not be (the
    cache-reading path, right for fresh rows too); None chooses on the device (a conditional)."""
    fresh = lambda: prefill_attention(q, k, v, lengths - starts, config)
    cached = lambda: suffix_attention(q, k_cache, v_cache, layer, rows, starts, lengths, config.loop_block,
                                      static_loops=config.static_loops)
    if suffix is None:
        return lax.cond(jnp.all(starts == 0), fresh, cached)
    return cached() if suffix else fresh()


def suffix_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array | int,
                     rows: jax.Array, starts: jax.Array, lengths: jax.Array, block: int,
                     static_loops: bool = False) -> jax.Array:
    """Causal attention of queries `[B, T, H, D]` at positions `starts[b] + i` over cache rows
    `rows` (keys `0..lengths[b]-1`): per query block, an online softmax over the key blocks up to
    its last position, each block gathered from the rows' keys (nothing else is read); with
    `static_loops`, over every key block of the row, masked (a trip count XLA knows)."""
    b, t, h, d = q.shape
    kv, max_len = k_cache.shape[2], k_cache.shape[3]
    g, block = h // kv, key_block(max_len, block)
    qg = (_group(q, kv).astype(jnp.float32) * d**-0.5).astype(q.dtype)  # [B, T, KV, G, D]

    def read(cache, start):  # [B, KV, block, D]: each row's keys from `start`
        return jax.vmap(lambda r: lax.dynamic_slice(cache, (layer, r, 0, start, 0), (1, 1, kv, block, d))[0, 0])(rows)

    out = []
    for s in range(0, t, PREFILL_QUERY_BLOCK):
        qb = qg[:, s:s + PREFILL_QUERY_BLOCK]
        tq = qb.shape[1]
        q_pos = starts[:, None] + s + jnp.arange(tq)  # [B, tq]
        last = jnp.minimum(jnp.max(q_pos[:, -1]), jnp.max(lengths) - 1)

        def body(j, carry, qb=qb, q_pos=q_pos):
            m, l, o = carry
            start = j * block
            k_pos = start + jnp.arange(block)
            kb, vb = from_bits(read(k_cache, start), q.dtype), from_bits(read(v_cache, start), q.dtype)
            valid = (k_pos[None, None] <= q_pos[:, :, None]) & (k_pos[None, None] < lengths[:, None, None])
            sc = jnp.einsum("btkgd,bksd->bkgts", qb, kb, preferred_element_type=jnp.float32)
            sc = jnp.where(valid[:, None, None], sc, _MASKED)
            m_new = jnp.maximum(m, sc.max(-1))
            p = jnp.exp(sc - m_new[..., None])
            corr = jnp.exp(m - m_new)
            vb = jnp.where((k_pos[None] < lengths[:, None])[:, None, :, None], vb, 0).astype(vb.dtype)
            pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
            return m_new, l * corr + p.sum(-1), o * corr[..., None] + pv

        init = (jnp.full((b, kv, g, tq), _MASKED, jnp.float32), jnp.zeros((b, kv, g, tq), jnp.float32),
                jnp.zeros((b, kv, g, tq, d), jnp.float32))
        # block 0 holds key 0, visible to every query: the running max is real after it
        trips = max_len // block if static_loops else last // block + 1
        _, l, o = lax.fori_loop(0, trips, body, init)
        o = o / jnp.maximum(l, 1e-30)[..., None]
        out.append(jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(b, tq, h, d))
    return jnp.concatenate(out, axis=1).astype(q.dtype)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
                     lengths: jax.Array, config: AttentionConfig) -> jax.Array:
    """One query per row: q `[B, H, D]` against layer `layer` of the stacked cache
    `[L, slots, KV, S, D]`, rows `0..B-1`, keys `0..lengths[b]-1` (the new token included)."""
    if config.decode == "pallas" and k_cache.shape[3] >= PALLAS_MIN_KEYS:
        kernel = functools.partial(_decode_pallas, config=config)
        tp = 1 if config.mesh is None else config.mesh.shape.get("tp", 1)
        if tp > 1:  # a custom kernel is not partitioned by XLA: run it per device on its own heads
            if not _heads_split(config, k_cache.shape[2]):  # KV heads replicated over tp: no per-device kernel
                return _decode_xla(q, k_cache, v_cache, layer, lengths, config.loop_block, config.static_loops)
            heads, cache = PartitionSpec(None, "tp", None), PartitionSpec(None, None, "tp", None, None)
            kernel = jax.shard_map(kernel, mesh=config.mesh, in_specs=(heads, cache, cache, PartitionSpec(), PartitionSpec()),
                                   out_specs=heads, check_vma=False)
        return kernel(q, k_cache, v_cache, layer, lengths)
    return _decode_xla(q, k_cache, v_cache, layer, lengths, config.loop_block, config.static_loops)


def _heads_split(config: AttentionConfig, kv_heads: int) -> bool:
    """Whether the KV heads are split over the tp mesh like the query heads (no mesh: trivially),
    as a custom kernel needs: per device (Pallas), or q, k and v sharded alike (cuDNN)."""
    tp = 1 if config.mesh is None else config.mesh.shape.get("tp", 1)
    return kv_heads % tp == 0


def key_block(max_len: int, block: int) -> int:
    """The largest power-of-two block <= `block` that divides `max_len` (or `max_len` itself)."""
    while block > 16 and max_len % block:
        block //= 2
    return block if max_len % block == 0 else max_len


def _decode_xla(q, k_cache, v_cache, layer, lengths, block: int, static_loops: bool = False) -> jax.Array:
    """Online softmax over key blocks; the trip count follows the longest row, so a step's cost
    follows the real context and one program serves every context length (`static_loops`: every
    block of the cache row, masked, so that XLA knows the trip count)."""
    b, h, d = q.shape
    kv, max_len = k_cache.shape[2], k_cache.shape[3]
    block = key_block(max_len, block)
    qg = (q.reshape(b, kv, h // kv, d).astype(jnp.float32) * d**-0.5).astype(q.dtype)

    def body(j, carry):
        m, l, o = carry
        start = j * block
        kb = from_bits(lax.dynamic_slice(k_cache, (layer, 0, 0, start, 0), (1, b, kv, block, d))[0], q.dtype)
        vb = from_bits(lax.dynamic_slice(v_cache, (layer, 0, 0, start, 0), (1, b, kv, block, d))[0], q.dtype)
        valid = (start + jnp.arange(block))[None, :] < lengths[:, None]  # [B, block]
        s = jnp.einsum("bkgd,bksd->bkgs", qg, kb, preferred_element_type=jnp.float32)
        s = jnp.where(valid[:, None, None], s, _MASKED)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        vb = jnp.where(valid[:, None, :, None], vb, 0).astype(vb.dtype)
        pv = jnp.einsum("bkgs,bksd->bkgd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return m_new, l * corr + p.sum(-1), o * corr[..., None] + pv

    g = h // kv
    init = (jnp.full((b, kv, g), _MASKED, jnp.float32), jnp.zeros((b, kv, g), jnp.float32),
            jnp.zeros((b, kv, g, d), jnp.float32))
    n_blocks = max_len // block if static_loops else (jnp.max(lengths) + block - 1) // block
    _, l, o = lax.fori_loop(0, n_blocks, body, init)
    return (o / l[..., None]).reshape(b, h, d).astype(q.dtype)


def _decode_kernel(layer_ref, lengths_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *,
                   block: int, split_len: int, slots: int, kv_heads: int, dtype):
    """One (row, KV head, key split): online softmax over this split's blocks below the row's length.

    k_ref/v_ref are the whole cache flattened to `[L * slots * KV, S, D]`: the row of keys is
    picked by index inside the kernel, so nothing is sliced or copied out of the cache. A block
    that would run past S (S not a multiple of `block`) is read from `S - block` instead, and the
    keys before its nominal start, already counted, are masked: every read stays inside the row.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = (layer_ref[0] * slots + b) * kv_heads + h
    length = lengths_ref[b]
    q = q_ref[...].astype(jnp.float32)  # [Gp, D], pre-scaled, zero rows past `groups`
    start = split * split_len
    n_blocks = pl.cdiv(jnp.clip(length - start, 0, split_len), block)
    max_len = k_ref.shape[1]

    def body(j, carry):
        m, l, o = carry
        pos = start + j * block
        read = jnp.minimum(pos, max_len - block)  # == pos but for a block past the end of the row
        k = from_bits(k_ref[row, pl.ds(read, block), :], dtype).astype(jnp.float32)  # [block, D]
        v = from_bits(v_ref[row, pl.ds(read, block), :], dtype)
        keys = read + jnp.arange(block)
        valid = (keys >= pos) & (keys < length)
        s = jnp.where(valid[None, :], plgpu.dot(q, k, trans_b=True), _MASKED)  # [Gp, block]
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        corr = jnp.exp(m - m_new)
        v = jnp.where(valid[:, None], v.astype(jnp.float32), 0.0)
        return m_new, l * corr + p.sum(axis=-1), o * corr[:, None] + plgpu.dot(p, v)

    gp, d = q.shape
    init = (jnp.full((gp,), _MASKED, jnp.float32), jnp.zeros((gp,), jnp.float32), jnp.zeros((gp, d), jnp.float32))
    m, l, o = lax.fori_loop(0, n_blocks, body, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


def _decode_pallas(q, k_cache, v_cache, layer, lengths, *, config: AttentionConfig) -> jax.Array:
    """Split-K flash decoding in Pallas over the stacked cache; partial results merged in XLA."""
    from jax.experimental import pallas as pl

    b, h, d = q.shape
    n_layers, slots, kv, max_len, _ = k_cache.shape
    g = h // kv
    gp = max(16, 1 << (g - 1).bit_length())  # tensor-core dots need >= 16 rows: pad the group
    splits, split_len, block = pallas_blocks(max_len, config.splits, config.block)
    qg = (q.reshape(b, kv, g, d).astype(jnp.float32) * d**-0.5)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0))).astype(q.dtype)
    flat = (n_layers * slots * kv, max_len, d)
    whole = pl.BlockSpec()  # the whole array: the kernel indexes the layer and row it reads
    kernel = functools.partial(_decode_kernel, block=block, split_len=split_len, slots=slots, kv_heads=kv, dtype=q.dtype)
    call = pl.pallas_call(
        kernel,
        grid=(b, kv, splits),
        in_specs=[whole, whole, pl.BlockSpec((None, None, gp, d), lambda i, j, s: (i, j, 0, 0)), whole, whole],
        out_specs=[pl.BlockSpec((None, None, None, gp, d), lambda i, j, s: (s, i, j, 0, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda i, j, s: (s, i, j, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda i, j, s: (s, i, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((splits, b, kv, gp, d), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, kv, gp), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, kv, gp), jnp.float32)],
        interpret=config.interpret,
        compiler_params=_triton_params(),
        name="decode_attention",
    )
    o, m, l = call(jnp.reshape(layer, (1,)).astype(jnp.int32), lengths.astype(jnp.int32), qg,
                   k_cache.reshape(flat), v_cache.reshape(flat))
    m_all = m.max(axis=0)
    corr = jnp.exp(m - m_all[None])  # splits past a row's length hold m = _MASKED and l = 0
    out = (o * corr[..., None]).sum(0) / ((l * corr).sum(0)[..., None])
    return out[:, :, :g].reshape(b, h, d).astype(q.dtype)


def pallas_blocks(max_len: int, splits: int, block: int) -> tuple[int, int, int]:
    """`(splits, split_len, block)` of the Pallas decode kernel for a cache row of `max_len` keys
    (>= `PALLAS_MIN_KEYS`). Triton lowers power-of-two blocks only, so the block is the largest
    power of two <= `block` and <= the even split, each split a whole number of blocks (the last
    may end past the row: the kernel reads it inside the row and masks what it repeats), and
    splits left with no key are dropped. Rows of a multiple of `splits * block` split evenly."""
    even = -(-max_len // splits)
    block = max(16, min(block, 1 << (even.bit_length() - 1)))
    split_len = -(-even // block) * block
    return -(-max_len // split_len), split_len, block


def _triton_params():
    """Pallas-Triton compiler parameters: without any, jax >= 0.10 hands a `pallas_call` to Mosaic
    GPU, which cannot lower this kernel (it would stage the whole cache in shared memory: "Mosaic
    GPU kernel exceeds available shared memory"). Triton compiles it to a cubin for sm_90 (jax
    0.10 and 0.11; 0.11 deprecates Pallas-Triton but still runs it)."""
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
                     rows: jax.Array, mask: jax.Array) -> jax.Array:
    """q `[B, T, H, D]` against cache rows `rows` `[B]` of layer `layer`, with an explicit mask `[B, T, S]`."""
    k = from_bits(jnp.take(k_cache[layer], rows, axis=0, mode="clip"), q.dtype)
    v = from_bits(jnp.take(v_cache[layer], rows, axis=0, mode="clip"), q.dtype)
    return masked_attention(q, k, v, mask)
