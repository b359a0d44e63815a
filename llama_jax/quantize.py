"""int8 weight quantization: the stored format, quantizing a float matrix, and the matmul and
embedding lookup that compute with the int8 weights directly.

Scheme (what `convert-weights --quantize int8` writes and `serve --quantize int8` applies at
load): every matrix, the embedding and the LM head included, is stored as int8 `q` with one
float32 scale per output channel (per row of the `[out, in]` matrix), symmetric, round to
nearest: `scale = max|w_row| / 127`, `q = round(w / scale)`, so `w ≈ q * scale`. Norm weights stay
in the model dtype. A stacked layer weight `[n_layers, out, in]` has scales `[n_layers, out]`:
the scale's axes are the weight's axes minus the last, so it shards with the output axis.

`Int8Weight` is a registered pytree, so stacking, scanning over layers, splitting per layer,
sharding and AOT shapes all follow from its two leaves. Its static `activations` field picks
how `linear` computes (see there); it is not stored on disk.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import QUANTIZATIONS
from llama_jax.platform import Platform, resolve

SCHEME = QUANTIZATIONS[0]  # the only scheme; recorded in config.json ("quantization") and the manifest
QMAX = 127
CPU_BLOCK_BYTES = 1 << 20  # weight-only on CPU: the float32 copy of one row block at a time
INV_QMAX = np.float32(1 / QMAX)  # scales are max * (1/127): XLA rewrites a division by a constant that way
ACTIVATIONS = ("float", "int8")
MANIFEST_ENTRY = {"scheme": SCHEME, "granularity": "per-output-channel", "symmetric": True,
                  "rounding": "nearest", "scale_dtype": "float32", "quantized": "every matrix, embedding and LM head "
                  "included; norms stay in the model dtype"}


@partial(jax.tree_util.register_dataclass, data_fields=["q", "scale"], meta_fields=["activations", "row_blocks"])
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """An int8 matrix `q` `[..., out, in]` and its float32 per-output-channel scales `[..., out]`.

    `activations` (static) is how `linear` multiplies by it: "float" (weight-only: the input stays
    in its float dtype, `dot(x, q) * scale`) or "int8" (the input is also quantized, per row,
    to int8 for an integer dot: what XLA's CPU backend runs fastest, see `linear`).
    `row_blocks` (static): weight-only matmuls go through row blocks (for XLA's CPU backend, see
    `linear`); None: as the host platform needs (`storage_params` sets it for the platform it targets).
    """

    q: Any
    scale: Any
    activations: str = "float"
    row_blocks: bool | None = None

    def __getitem__(self, index) -> Int8Weight:
        """Index the leading (layer) axes of both arrays, e.g. one layer of a stacked weight."""
        return dataclasses.replace(self, q=self.q[index], scale=self.scale[index])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.q.shape)) + 4 * int(np.prod(self.scale.shape))


def scale_axes(axes: tuple[str | None, ...]) -> tuple[str | None, ...]:
    """The logical axes of a weight's scales: the weight's minus the last (input) axis."""
    return tuple(axes[:-1])


def _scale_of(amax):
    """max|row| / 127, and 1 for an all-zero row (its q is all zeros either way)."""
    return np.where(amax > 0, amax * INV_QMAX, np.float32(1)).astype(np.float32)


def quantize_np(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8, scale float32) of a float matrix `[..., out, in]` on the host (conversion)."""
    w = np.asarray(w, np.float32)
    scale = _scale_of(np.max(np.abs(w), axis=-1))
    inv = (np.float32(1) / scale)[..., None]  # w * (1/scale): what XLA makes of w / broadcast(scale)
    q = np.clip(np.rint(w * inv), -QMAX, QMAX).astype(np.int8)
    return q, scale


def quantize(w: jax.Array) -> Int8Weight:
    """`quantize_np` on the device (jit it; load-time quantization): the same float32 arithmetic,
    so both give the same bits."""
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=-1)
    scale = jnp.where(amax > 0, amax * INV_QMAX, jnp.float32(1))
    q = jnp.clip(jnp.round(w * (1 / scale)[..., None]), -QMAX, QMAX).astype(jnp.int8)
    return Int8Weight(q, scale)


def dequantize(w: Int8Weight, dtype=jnp.float32) -> jax.Array:
    """The float matrix `q * scale` (tests and references only: the model never builds it)."""
    return (w.q.astype(jnp.float32) * w.scale[..., None].astype(jnp.float32)).astype(dtype)


def with_activations(w: Int8Weight, activations: str, row_blocks: bool | None = None) -> Int8Weight:
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    return dataclasses.replace(w, activations=activations, row_blocks=w.row_blocks if row_blocks is None else row_blocks)


def default_activations(platform: Platform | None = None) -> str:
    """How int8 weights compute by default on a platform (default: the host's): "int8" on CPU
    (the fast integer dot, as llama.cpp's Q8_0 does), "float" (weight-only) on accelerators."""
    return "int8" if resolve(platform).cpu else "float"


def is_int8(x: Any) -> bool:
    return isinstance(x, Int8Weight)


def _contract(x: jax.Array, q: jax.Array, out_dtype) -> jax.Array:
    return jax.lax.dot_general(x, q, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=out_dtype)


def _row_blocks(rows: int, cols: int, block_bytes: int) -> int:
    """The fewest row blocks, dividing `rows` evenly, whose float32 copy fits `block_bytes`."""
    want = -(-rows * cols * 4 // block_bytes)
    return next(n for n in range(max(want, 1), rows + 1) if rows % n == 0)


def _weight_only(x: jax.Array, w: Int8Weight, out_dtype) -> jax.Array:
    y = _contract(x, w.q.astype(x.dtype), out_dtype)
    return y * w.scale.astype(y.dtype)


def _weight_only_blocked(x: jax.Array, w: Int8Weight, out_dtype) -> jax.Array:
    """`_weight_only` over row blocks of `w`, one converted at a time (XLA's CPU backend)."""
    rows, cols = w.q.shape
    n = _row_blocks(rows, cols, CPU_BLOCK_BYTES)
    blocks = Int8Weight(w.q.reshape(n, rows // n, cols), w.scale.reshape(n, rows // n))
    y = jax.lax.map(lambda b: _weight_only(x, b, out_dtype), blocks)  # [n, ..., rows / n]
    return jnp.moveaxis(y, 0, -2).reshape(*x.shape[:-1], rows)


def linear(x: jax.Array, w: Int8Weight, out_dtype=None) -> jax.Array:
    """`x @ dequantize(w).T`, computed from the int8 weight without building the float matrix.

    "float" activations (weight-only): `dot(x, convert(q)) * scale`. On GPU XLA fuses the convert
    into the dot's operand load. XLA's CPU backend cannot: it would convert each whole matrix
    first (and schedules those copies together, 418 MiB of temporaries for the cpu-bench step),
    so there the rows go through in blocks of at most `CPU_BLOCK_BYTES` as float32, one at a time.

    "int8" activations: each row of `x` is quantized too (symmetric, per row, round to nearest)
    and the dot runs on int8 x int8 with int32 accumulation, then both scales are applied. XLA's
    CPU backend hands that dot to YNNPACK's int8 kernel (no float copy of the weight at all),
    the fastest form there, and the one llama.cpp's Q8_0 uses. A one-row input is padded to two:
    XLA rewrites a one-row dot into a matrix-vector product that YNNPACK does not take (and then
    converts both operands to float).
    """
    if w.activations == "float":
        blocks = resolve(None).cpu if w.row_blocks is None else w.row_blocks
        if blocks and w.q.size * 4 > CPU_BLOCK_BYTES:
            return _weight_only_blocked(x, w, out_dtype)
        return _weight_only(x, w, out_dtype)
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    n = rows.shape[0]
    if n == 1:
        rows = jnp.concatenate([rows, jnp.zeros_like(rows)])
    amax = jnp.max(jnp.abs(rows), axis=-1, keepdims=True)
    x_scale = jnp.where(amax > 0, amax * INV_QMAX, jnp.float32(1))
    xq = jnp.clip(jnp.round(rows * (1 / x_scale)), -QMAX, QMAX).astype(jnp.int8)
    y = _contract(xq, w.q, jnp.int32)[:n]
    y = y.astype(jnp.float32) * x_scale[:n] * w.scale.astype(jnp.float32)
    return y.reshape(*lead, -1).astype(out_dtype or x.dtype)


def embed(w: Int8Weight, tokens: jax.Array, dtype) -> jax.Array:
    """Embedding lookup: gather the int8 rows of `tokens`, then scale them (`[..., dim]` in `dtype`)."""
    rows = jnp.take(w.q, tokens, axis=0).astype(jnp.float32)
    return (rows * jnp.take(w.scale, tokens, axis=0)[..., None]).astype(dtype)
