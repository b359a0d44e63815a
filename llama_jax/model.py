"""Llama 2 as a Flax NNX module: embedding, RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU MLP, and an explicit static-shape KV cache passed in and returned.

The decoder layers run as one `jax.lax.scan`: one traced layer, so compile time and program size
do not grow with depth (80 layers compile like one), and the stacked KV cache is carried through
the loop and updated in place. The layer weights are stacked along a leading layer axis, or on
CPU split into one buffer per layer (`storage_params(split=True)`; `layers` explains both).

NNX keeps the module readable as plain Python objects; the serving path uses it functionally:
`nnx.split` once, then jitted steps that `merge` at trace time, so the hot path is a pure function
of (params, cache, tokens).

Every weight is described once in `weight_specs`: its shape, logical axes (for sharding) and its
Hugging Face name (for loading). Matrices are stored `[out, in]` as in HF checkpoints: no
transposes at load, and XLA's CPU dots run up to 40% faster at batch 8-32 with the contraction
on both operands' last axis. Rotary embeddings use the split-halves layout that HF checkpoints
already have, so q/k weights load without permutation.

With `cfg.quantization = "int8"` every matrix (embedding and LM head included) is a
`quantize.Int8Weight` (int8 values, one scale per block of 32 inputs): `linear` and the embedding
lookup compute from it directly, and the layer scan, the per-layer split and the shardings
follow its two arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import attention, quantize
from llama_jax.attention import AttentionConfig
from llama_jax.config import LlamaConfig
from llama_jax.bits import from_bits, to_bits
from llama_jax.kv_cache import KVCache, attention_mask, write
from llama_jax.layers import LayerWeights, layout, split_weight, unbits
from llama_jax.platform import Platform, resolve

Path = tuple[str, ...]
LAYER_HF = "model.layers.{layer}."
LM_HEAD_CHUNKS = 8


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One weight: its shape (`[out, in]` for matrices, as HF; stacked layer weights lead with
    `n_layers`), logical axes (mapped to mesh axes by the sharding rules) and its HF tensor name
    (with `{layer}` for a stacked weight: one HF tensor per layer)."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    hf_name: str

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.hf_name

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        """The shape of one HF tensor (one layer's slice of a stacked weight)."""
        return self.shape[1:] if self.stacked else self.shape


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor of a checkpoint on disk: the model weight it belongs to and, if stacked, its layer."""

    path: Path
    layer: int | None
    hf_name: str
    shape: tuple[int, ...]


def weight_specs(cfg: LlamaConfig) -> dict[Path, WeightSpec]:
    """Every weight of the model keyed by its path in the NNX state, e.g. ('layers', 'wq'); a model
    with tied embeddings has no ('lm_head',): its table is the head."""
    d, f, q, kv, n = cfg.dim, cfg.ffn_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_layers
    layer = {
        "attn_norm": ((n, d), ("layers", None), "input_layernorm.weight"),
        "wq": ((n, q, d), ("layers", "heads", "embed"), "self_attn.q_proj.weight"),
        "wk": ((n, kv, d), ("layers", "kv_heads", "embed"), "self_attn.k_proj.weight"),
        "wv": ((n, kv, d), ("layers", "kv_heads", "embed"), "self_attn.v_proj.weight"),
        "wo": ((n, d, q), ("layers", "embed", "heads"), "self_attn.o_proj.weight"),
        "mlp_norm": ((n, d), ("layers", None), "post_attention_layernorm.weight"),
        "w_gate": ((n, f, d), ("layers", "ffn", "embed"), "mlp.gate_proj.weight"),
        "w_up": ((n, f, d), ("layers", "ffn", "embed"), "mlp.up_proj.weight"),
        "w_down": ((n, d, f), ("layers", "embed", "ffn"), "mlp.down_proj.weight"),
    }
    specs = {
        # The table is split along its columns ("table_embed"), so a token lookup is local on
        # every device (a vocab split would all-gather the table or mask-and-sum the lookup).
        ("embed",): WeightSpec((cfg.vocab_size, d), (None, "table_embed"), "model.embed_tokens.weight"),
        **{("layers", name): WeightSpec(shape, axes, LAYER_HF + hf) for name, (shape, axes, hf) in layer.items()},
        ("norm",): WeightSpec((d,), (None,), "model.norm.weight"),
        ("lm_head",): WeightSpec((cfg.vocab_size, d), ("vocab", "embed"), "lm_head.weight"),
    }
    if cfg.tie_embeddings:
        del specs[("lm_head",)]
    return specs


def tensors(cfg: LlamaConfig) -> Iterator[Tensor]:
    """Every HF tensor in checkpoint order: embedding, layer 0's nine, layer 1's, ..., norm, LM head."""
    specs = weight_specs(cfg)
    stacked = [(p, s) for p, s in specs.items() if s.stacked]
    yield from (Tensor(p, None, s.hf_name, s.shape) for p, s in specs.items() if p == ("embed",))
    for i in range(cfg.n_layers):
        yield from (Tensor(p, i, s.hf_name.format(layer=i), s.tensor_shape) for p, s in stacked)
    yield from (Tensor(p, None, s.hf_name, s.shape) for p, s in specs.items() if not s.stacked and p != ("embed",))


def is_quantized(cfg: LlamaConfig, spec: WeightSpec) -> bool:
    """True for the weights `cfg.quantization` stores as `quantize.Int8Weight`: every matrix
    (embedding and LM head included); norms stay in the model dtype."""
    return cfg.quantization is not None and len(spec.tensor_shape) == 2


def _init_param(spec: WeightSpec, rngs: nnx.Rngs, cfg: LlamaConfig) -> nnx.Param:
    """Norm weights start at one, matrices at N(0, 0.02) as in Llama's initializer_range
    (quantized from float32 when `cfg.quantization` says so)."""
    if len(spec.tensor_shape) == 1:
        return nnx.Param(jnp.ones(spec.shape, cfg.dtype))
    w = 0.02 * jax.random.normal(rngs.params(), spec.shape, jnp.float32)
    return nnx.Param(quantize.quantize(w) if is_quantized(cfg, spec) else w.astype(cfg.dtype))


Weight = jax.Array | quantize.Int8Weight


def linear(x: jax.Array, w: Weight, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """`x @ w.T` for a weight stored `[out, in]` (float, or int8: `quantize.linear`)."""
    if quantize.is_int8(w):
        return quantize.linear(x, w, out_dtype)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=out_dtype)


def constrain(x: jax.Array, mesh, last: str | None = None) -> jax.Array:
    """Pin `x`'s layout on the mesh: replicated, or with its last axis split over mesh axis `last`."""
    spec = jax.sharding.PartitionSpec(*([None] * (x.ndim - 1)), last)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def chunked_linear(x: jax.Array, w_bits: jax.Array, dtype, chunks: int) -> jax.Array:
    """`linear(x, w)` in float32 over `chunks` row blocks of `w` (given as `to_bits` patterns, rows
    divisible by `chunks`), so a 16-bit matrix is upcast one block at a time on CPU."""
    rows = w_bits.shape[0]
    if rows % chunks:
        return linear(x, from_bits(w_bits, dtype), jnp.float32)
    blocks = w_bits.reshape(chunks, rows // chunks, -1)
    out = jax.lax.map(lambda blk: linear(x, from_bits(blk, dtype), jnp.float32), blocks)  # [chunks, ..., rows/chunks]
    return jnp.moveaxis(out, 0, -2).reshape(*x.shape[:-1], rows)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 and cast back before the scale, exactly as HF does."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """The `head_dim // 2` rotary frequencies, float32 as transformers computes them, with the
    config's `rope_scaling` (linear, or Llama 3's low-frequency scaling) applied."""
    d = cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2).astype(np.float32) / np.float32(d))))
    inv_freq = inv_freq.astype(np.float32)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    low_wavelen = scaling.original_max_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_len / scaling.high_freq_factor
    wavelen = np.float32(2 * np.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(scaling.factor), inv_freq).astype(np.float32)
    smooth = ((scaling.original_max_len / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / np.float32(scaling.factor) + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin, `[B, T, head_dim // 2]` in float32, for integer positions `[B, T]`."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `[B, T, H, D]` in the split-halves layout: pairs (x[i], x[i + D/2])."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@dataclasses.dataclass(frozen=True)
class _Step:
    """What every layer of one forward shares: static mode and config, traced positions and masks."""

    cfg: LlamaConfig
    mode: str
    attn: AttentionConfig
    rows: jax.Array  # [B] cache row of each input row
    positions: jax.Array  # [B, T]
    lengths: jax.Array  # [B] valid length of each row after this step
    cos: jax.Array
    sin: jax.Array
    mask: jax.Array | None  # [B, T, max_len] for mode "cached"
    suffix: bool | None = None  # mode "prefill": the attention path, if known (`attention.prompt_attention`)


def decoder_layer(step: _Step, w: LayerWeights, layer: jax.Array, x: jax.Array,
                  k_cache: jax.Array, v_cache: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pre-norm attention block and pre-norm SwiGLU block, each with a residual connection;
    writes this layer's new keys/values into the stacked cache."""
    cfg = step.cfg
    b, t, _ = x.shape
    h = rms_norm(x, w.norm("attn_norm"), cfg.norm_eps)
    q, k, v = w.linear(("wq", "wk", "wv"), h)
    q = q.reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    q, k = apply_rope(q, step.cos, step.sin), apply_rope(k, step.cos, step.sin)
    k_cache = write(k_cache, layer, k, step.rows, step.positions)
    v_cache = write(v_cache, layer, v, step.rows, step.positions)
    if step.mode == "prefill":
        o = attention.prompt_attention(q, k, v, k_cache, v_cache, layer, step.rows, step.positions[:, 0],
                                       step.lengths, step.attn, suffix=step.suffix)
    elif step.mode == "decode":
        o = attention.decode_attention(q[:, 0], k_cache, v_cache, layer, step.lengths, step.attn)[:, None]
    else:
        o = attention.cached_attention(q, k_cache, v_cache, layer, step.rows, step.mask)
    x = x + w.linear(("wo",), o.reshape(b, t, -1))[0]
    h = rms_norm(x, w.norm("mlp_norm"), cfg.norm_eps)
    gate, up = w.linear(("w_gate", "w_up"), h)
    x = x + w.linear(("w_down",), jax.nn.silu(gate) * up)[0]
    return x, k_cache, v_cache


def _run_layers(step: _Step, weights: dict, k: jax.Array, v: jax.Array, x: jax.Array, return_hidden: bool):
    """Every decoder layer over `x`, scanned in the weights' layout (`layers.layout`).
    Returns (x, k, v, residual stream after each layer or None)."""
    def body(carry, w: LayerWeights, layer: jax.Array):
        x, k, v = decoder_layer(step, w, layer, *carry)
        return (x, k, v), (x if return_hidden else None)

    # `linear` looked up here, at trace time: tools/int8_perplexity.py swaps it
    (x, k, v), hidden = layout(weights).scan(body, (x, k, v), step.cfg.n_layers, step.cfg.dtype, linear)
    return x, k, v, hidden


class Layers(nnx.Module):
    """The decoder layers' weights, each stacked along a leading `n_layers` axis (or, after
    `storage_params(split=True)`, a `layers.SplitWeight`: one buffer per layer)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        for path, spec in weight_specs(cfg).items():
            if spec.stacked:
                setattr(self, path[-1], _init_param(spec, rngs, cfg))

    def weights(self) -> dict:
        return {name: value.get_value() for name, value in vars(self).items() if isinstance(value, nnx.Param)}


class Llama(nnx.Module):
    """Llama decoder-only transformer (Llama 2's layout; any `LlamaForCausalLM`)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        specs = weight_specs(cfg)
        self.embed = _init_param(specs[("embed",)], rngs, cfg)
        self.layers = Layers(cfg, rngs=rngs)
        self.norm = _init_param(specs[("norm",)], rngs, cfg)
        if not cfg.tie_embeddings:
            self.lm_head = _init_param(specs[("lm_head",)], rngs, cfg)

    @property
    def head(self) -> Weight:
        """The LM head's weight: the embedding table itself when embeddings are tied."""
        return self.embed[...] if self.cfg.tie_embeddings else self.lm_head[...]

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, lengths: jax.Array | None = None, *,
                 rows: jax.Array | None = None, logits_at: jax.Array | None = None,
                 attn: AttentionConfig = AttentionConfig(), return_hidden: bool = False):
        """Run `tokens` `[B, T]` at any `positions` `[B, T]` against cache rows `rows` `[B]`
        (default the first B), attending through an explicit mask over the whole cache: the
        general forward (scoring, notebooks, references). Returns (logits, cache), and with
        `return_hidden` also the residual stream `[n_layers + 1, B, T, dim]` after the embedding
        and after each layer. Arguments and results otherwise as `_forward`."""
        return self._forward(tokens, positions, cache, lengths, rows, logits_at, "cached", attn, None, return_hidden)

    def prefill(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, lengths: jax.Array | None = None, *,
                rows: jax.Array | None = None, logits_at: jax.Array | None = None,
                attn: AttentionConfig = AttentionConfig(), suffix: bool | None = None) -> tuple[jax.Array, KVCache]:
        """Prompts (padded: pass the true `lengths`), or suffixes after a prefix already in cache rows `rows`,
        with causal attention (`attention.prompt_attention`). `suffix`: False when every row starts
        at 0, True when some may start after a prefix, None to choose on the device."""
        return self._forward(tokens, positions, cache, lengths, rows, logits_at, "prefill", attn, suffix)

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, *,
               attn: AttentionConfig = AttentionConfig()) -> tuple[jax.Array, KVCache]:
        """One token per row (`[B, 1]`) for the first B cache rows, each read in place up to its
        length: the decode step."""
        return self._forward(tokens, positions, cache, None, None, None, "decode", attn, None)

    def _forward(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, lengths: jax.Array | None,
                 rows: jax.Array | None, logits_at: jax.Array | None, mode: str, attn: AttentionConfig,
                 suffix: bool | None, return_hidden: bool = False):
        """The forward behind the entry points, `mode` (static) picking the attention.

        New keys/values are written at each row's positions (contiguous per row; a row out of
        range writes nothing); `lengths` `[B]` is each row's valid length after this step (default:
        last position + 1). Returns float32 logits `[B, T, V]`, or `[B, V]` at per-row indices
        `logits_at`, and the updated cache (and the residual stream with `return_hidden`)."""
        cfg = self.cfg
        b = tokens.shape[0]
        if rows is None:
            rows = jnp.arange(b, dtype=jnp.int32)
        lengths = positions[:, -1] + 1 if lengths is None else lengths
        cos, sin = rope_angles(positions, rope_frequencies(cfg))
        mask = attention_mask(positions, lengths, cache.max_len) if mode == "cached" else None
        step = _Step(cfg, mode, attn, rows, positions, lengths, cos, sin, mask, suffix)

        # On CPU, 16-bit weights and caches are stored as bit patterns (bits.to_bits, chosen
        # by `storage_params` and `init_cache`); each is converted back where it is read.
        table = self.embed[...]
        if quantize.is_int8(table):
            x0 = quantize.embed(table, tokens, cfg.dtype)
        else:
            x0 = from_bits(jnp.take(table, tokens, axis=0), cfg.dtype)
        x, k, v, hidden = _run_layers(step, self.layers.weights(), cache.k, cache.v, x0, return_hidden)
        if return_hidden:
            hidden = jnp.concatenate([x0[None], hidden], axis=0)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]
        x = rms_norm(x, from_bits(self.norm[...], cfg.dtype), cfg.norm_eps)
        head = self.head
        if attn.mesh is not None:  # vocab-parallel head, on purpose: replicated x, logits split by vocab
            x = constrain(x, attn.mesh)
            logits = constrain(linear(x, unbits(head, cfg.dtype), jnp.float32), attn.mesh, "tp")
        elif cache.bits and not quantize.is_int8(head):  # in vocab chunks: one chunk of the head upcast at a time
            logits = chunked_linear(x, to_bits(head), cfg.dtype, LM_HEAD_CHUNKS)
        else:
            logits = linear(x, unbits(head, cfg.dtype), jnp.float32)
        cache = KVCache(k=k, v=v, lengths=cache.lengths.at[rows].set(lengths, mode="drop"))
        return (logits, cache, hidden) if return_hidden else (logits, cache)


def cpu16(cfg: LlamaConfig, platform: Platform | None = None) -> bool:
    """True where 16-bit weights and caches are kept as bit patterns (see `bits.to_bits`):
    16-bit models on a CPU platform (default: the host's)."""
    return resolve(platform).cpu and jnp.dtype(cfg.dtype).itemsize == 2


def storage_params(cfg: LlamaConfig, params: nnx.State, split: bool = False,
                   platform: Platform | None = None, sharded: bool = False) -> nnx.State:
    """Parameters in the form the jitted steps run fastest on, on `platform` (default: the
    host's): on CPU, 16-bit floats as their bit patterns, so a step never converts the whole
    model; with `split`, each stacked layer weight as one buffer per layer (`layers.SplitWeight`,
    see `layers.split_layers`; run unrolled off CPU). Either is a one-time copy. int8 weights learn how to compute there
    (`quantize.for_platform`; `sharded`: over a mesh of more than one device)."""
    platform = resolve(platform)
    params = jax.tree.map(to_bits, params) if cpu16(cfg, platform) else params
    if cfg.quantization is not None:
        params = jax.tree.map(lambda w: quantize.for_platform(w, platform, sharded) if quantize.is_int8(w) else w, params,
                              is_leaf=quantize.is_int8)
    if not split:
        return params
    flat = nnx.to_flat_state(params)
    unrolled = not platform.cpu  # a switch would wait on the host there
    return nnx.from_flat_state({p: v.replace(split_weight(v.get_value(), unrolled)) if p[0] == "layers" else v
                                for p, v in flat})


def init_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
    """A randomly initialised model (N(0, 0.02) weights), e.g. for benchmarks at a real shape."""
    return Llama(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: LlamaConfig) -> Llama:
    """The model with ShapeDtypeStruct leaves: the target tree for loading, no memory used."""
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
