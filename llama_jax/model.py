"""Llama 2 as a Flax NNX module: embedding, RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU MLP, and an explicit static-shape KV cache passed in and returned.

NNX (the Flax team's recommendation for new code) keeps the module readable as plain Python
objects; the serving path uses it functionally: `nnx.split` once, then jitted steps that `merge`
at trace time, so the hot path is a pure function of (params, cache, tokens).

Every weight is described once in `weight_specs`: its shape, logical axes (for sharding) and its
Hugging Face name (for loading). Matrices are stored `[out, in]` as in HF checkpoints: no
transposes at load, and XLA's CPU dots run up to 40% faster at batch 8-32 with the contraction
on both operands' last axis.
Rotary embeddings use the split-halves layout that HF checkpoints already have, so q/k weights
load without permutation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.config import LlamaConfig
from llama_jax.kv_cache import KVCache, attention_mask, write

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One weight: its shape (`[out, in]` for matrices, as HF), logical axes (mapped to mesh axes by
    the sharding rules) and its HF tensor name."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    hf_name: str


def layer_weight_specs(cfg: LlamaConfig, i: int) -> dict[str, WeightSpec]:
    """The nine weights of decoder layer i."""
    d, f, q, kv = cfg.dim, cfg.ffn_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    hf = f"model.layers.{i}."
    return {
        "attn_norm": WeightSpec((d,), (None,), hf + "input_layernorm.weight"),
        "wq": WeightSpec((q, d), ("heads", "embed"), hf + "self_attn.q_proj.weight"),
        "wk": WeightSpec((kv, d), ("kv_heads", "embed"), hf + "self_attn.k_proj.weight"),
        "wv": WeightSpec((kv, d), ("kv_heads", "embed"), hf + "self_attn.v_proj.weight"),
        "wo": WeightSpec((d, q), ("embed", "heads"), hf + "self_attn.o_proj.weight"),
        "mlp_norm": WeightSpec((d,), (None,), hf + "post_attention_layernorm.weight"),
        "w_gate": WeightSpec((f, d), ("ffn", "embed"), hf + "mlp.gate_proj.weight"),
        "w_up": WeightSpec((f, d), ("ffn", "embed"), hf + "mlp.up_proj.weight"),
        "w_down": WeightSpec((d, f), ("embed", "ffn"), hf + "mlp.down_proj.weight"),
    }


def weight_specs(cfg: LlamaConfig) -> dict[Path, WeightSpec]:
    """Every weight of the model keyed by its path in the NNX state, e.g. ('layers', 3, 'wq')."""
    specs: dict[Path, WeightSpec] = {
        ("embed",): WeightSpec((cfg.vocab_size, cfg.dim), ("vocab", "embed"), "model.embed_tokens.weight")
    }
    for i in range(cfg.n_layers):
        specs.update({("layers", i, name): s for name, s in layer_weight_specs(cfg, i).items()})
    specs[("norm",)] = WeightSpec((cfg.dim,), (None,), "model.norm.weight")
    specs[("lm_head",)] = WeightSpec((cfg.vocab_size, cfg.dim), ("vocab", "embed"), "lm_head.weight")
    return specs


def _init_param(spec: WeightSpec, rngs: nnx.Rngs, dtype: str) -> nnx.Param:
    """Norm weights start at one, matrices at N(0, 0.02) as in Llama's initializer_range."""
    if len(spec.shape) == 1:
        return nnx.Param(jnp.ones(spec.shape, dtype))
    return nnx.Param((0.02 * jax.random.normal(rngs.params(), spec.shape, jnp.float32)).astype(dtype))


def linear(x: jax.Array, w: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """`x @ w.T` for a weight stored `[out, in]`."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=out_dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 and cast back before the scale, exactly as HF does."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin, `[B, T, head_dim // 2]` in float32, for integer positions `[B, T]`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `[B, T, H, D]` in the split-halves layout: pairs (x[i], x[i + D/2])."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention: q `[B, T, H, D]`, k/v `[B, KV, S, D]`, mask `[B, T, S]`.

    Query heads are grouped onto their KV head with a reshape (no repeat of k/v in memory);
    scores and softmax are float32.
    """
    b, t, h, d = q.shape
    kv = k.shape[1]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(b, t, h, d)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, block: int) -> jax.Array:
    """`attention` for a prompt whose query i sits at position i (a fresh prefill), in query
    blocks of `block` rows that each read only the keys up to the block's end.

    Same result as one `attention` call, with about half the work and a score block small
    enough to stay in cache: 3x faster attention (1.8x faster prefill) at 1024 tokens on CPU.
    """
    t = q.shape[1]
    return jnp.concatenate(
        [attention(q[:, s:s + block], k[:, :, :s + block], v[:, :, :s + block], mask[:, s:s + block, :s + block])
         for s in range(0, t, block)], axis=1)


class DecoderLayer(nnx.Module):
    """Pre-norm attention block and pre-norm SwiGLU block, each with a residual connection."""

    def __init__(self, cfg: LlamaConfig, i: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        for name, spec in layer_weight_specs(cfg, i).items():
            setattr(self, name, _init_param(spec, rngs, cfg.dtype))

    def __call__(self, x, cos, sin, positions, mask, k_buf, v_buf, kv_len: int, causal_block: int | None):
        cfg = self.cfg
        b, t, _ = x.shape
        h = rms_norm(x, self.attn_norm[...], cfg.norm_eps)
        q = linear(h, self.wq[...]).reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = linear(h, self.wk[...]).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = linear(h, self.wv[...]).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_buf = write(k_buf, k, positions[:, 0])
        v_buf = write(v_buf, v, positions[:, 0])
        k_win, v_win = k_buf[:b, :, :kv_len], v_buf[:b, :, :kv_len]
        if causal_block:
            o = causal_attention(q, k_win, v_win, mask, causal_block)
        else:
            o = attention(q, k_win, v_win, mask)
        x = x + linear(o.reshape(b, t, -1), self.wo[...])
        h = rms_norm(x, self.mlp_norm[...], cfg.norm_eps)
        x = x + linear(jax.nn.silu(linear(h, self.w_gate[...])) * linear(h, self.w_up[...]), self.w_down[...])
        return x, k_buf, v_buf


class Llama(nnx.Module):
    """Llama 2 decoder-only transformer."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        specs = weight_specs(cfg)
        self.embed = _init_param(specs[("embed",)], rngs, cfg.dtype)
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.norm = _init_param(specs[("norm",)], rngs, cfg.dtype)
        self.lm_head = _init_param(specs[("lm_head",)], rngs, cfg.dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        lengths: jax.Array | None = None,
        *,
        kv_len: int | None = None,
        logits_at: jax.Array | None = None,
        causal_block: int | None = None,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, KVCache] | tuple[jax.Array, KVCache, jax.Array]:
        """Run `tokens` `[B, T]` at `positions` `[B, T]` (contiguous per row) against the first B
        rows of `cache` (it may hold more: idle decode slots cost nothing).

        New keys/values are written at each row's positions; `lengths` `[B]` is each row's valid
        length after this step (default: last position + 1; a padded prefill passes the true
        lengths). Attention reads only the first `kv_len` cache entries (static; default all),
        so a step's cost follows the context it needs. Returns float32 logits `[B, T, V]`, or
        `[B, V]` at per-row indices `logits_at`, and the updated cache.

        `causal_block` (static) declares a fresh prefill: positions are `0..T-1` in every row and
        `kv_len` is T, so attention can run in causal query blocks of that size.

        `return_hidden` (static) also returns the residual stream `[n_layers + 1, B, T, dim]`:
        after the embedding and after each decoder layer, before the final norm (a logit lens).
        """
        cfg = self.cfg
        kv_len = kv_len or cache.max_len
        lengths = positions[:, -1] + 1 if lengths is None else lengths
        x = jnp.take(self.embed[...], tokens, axis=0)
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
        mask = attention_mask(positions, lengths, kv_len)
        ks, vs, hidden = [], [], [x]
        for layer, k_buf, v_buf in zip(self.layers, cache.k, cache.v):
            x, k_buf, v_buf = layer(x, cos, sin, positions, mask, k_buf, v_buf, kv_len, causal_block)
            ks.append(k_buf)
            vs.append(v_buf)
            hidden.append(x)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]
        x = rms_norm(x, self.norm[...], cfg.norm_eps)
        logits = linear(x, self.lm_head[...], jnp.float32)
        new_cache = KVCache(k=tuple(ks), v=tuple(vs), lengths=cache.lengths.at[: tokens.shape[0]].set(lengths))
        return (logits, new_cache, jnp.stack(hidden)) if return_hidden else (logits, new_cache)


def init_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
    """A randomly initialised model (N(0, 0.02) weights), e.g. for benchmarks at a real shape."""
    return Llama(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: LlamaConfig) -> Llama:
    """The model with ShapeDtypeStruct leaves: the target tree for loading, no memory used."""
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
