"""int8 weight quantization: the stored format, quantizing a float matrix, and the matmul and
embedding lookup that compute from the int8 weights directly.

Scheme (what `convert-weights --quantize int8` writes and `serve --quantize int8` applies at
load): every matrix, the embedding and the LM head included, is stored as int8 `q` with one
float32 scale per block of `BLOCK` (32) consecutive weights along the input axis, symmetric,
round to nearest: `scale = max|w_block| / 127`, `q = round(w / scale)`, so `w ≈ q * scale`.
That is llama.cpp's Q8_0 layout (there the scale is float16), so a Q8_0 GGUF tensor maps onto it
bit for bit. A matrix whose input size is not a multiple of 32 uses the largest of 16 or 8 that
divides it, else one scale per row. Norm weights stay in the model dtype. A stacked layer weight
`[n_layers, out, in]` has scales `[n_layers, out, in / block]`: the scale's axes are the
weight's axes, so scales shard with the weight's blocks.

Why blocks (the real SmolLM2-135M-Instruct, 2,044 tokens of English, `tools/int8_perplexity.py
--schemes`): one scale per output channel cost +1.08 % perplexity, blocks of 64 +0.30 %, blocks
of 32 -0.16 %. Quantizing the matmul inputs too costs +3.7 to +5.2 % per row; per block of 32
(Q8_0 x Q8_0, what llama.cpp computes on a CPU) it costs nothing measurable, but XLA has no int8
dot with per-block scales: batched over blocks it runs 3-8x slower than weight-only on the CPU
(`tools/bench_int8_matmul.py`). So int8 weights always multiply float inputs.

`Int8Weight` is a registered pytree, so stacking, scanning over layers, splitting per layer,
sharding and AOT shapes all follow from its two leaves; its static `path` says how `linear`
computes on the platform the program is built for (`for_platform`).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import int8_matmul
from llama_jax.config import QUANTIZATIONS
from llama_jax.int8_matmul import BLOCK
from llama_jax.platform import Platform, resolve

SCHEME = QUANTIZATIONS[0]  # the only scheme; recorded in config.json ("quantization") and the manifest
QMAX = 127
CPU_BLOCK_BYTES = 1 << 18  # on CPU: the float32 copy of one row block at a time (256 KiB: fastest, measured)
PATHS = ("xla", "rows", "kernel")  # dequantize + dot; the same in row blocks (CPU); the Pallas GPU kernel
INV_QMAX = np.float32(1 / QMAX)  # scales are max * (1/127): XLA rewrites a division by a constant that way
MANIFEST_ENTRY = {"scheme": SCHEME, "granularity": "blocks along the input axis", "block": BLOCK,
                  "symmetric": True, "rounding": "nearest", "scale_dtype": "float32",
                  "quantized": "every matrix, embedding and LM head included; norms stay in the model dtype"}


@partial(jax.tree_util.register_dataclass, data_fields=["q", "scale"], meta_fields=["path"])
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """An int8 matrix `q` `[..., out, in]` and its float32 block scales `[..., out, in / block]`.

    `path` (static): how `linear` computes with it, one of `PATHS` (see `for_platform`); None:
    as the host platform runs it fastest.
    """

    q: Any
    scale: Any
    path: str | None = None

    def __getitem__(self, index) -> Int8Weight:
        """Index the leading (layer) axes of both arrays, e.g. one layer of a stacked weight."""
        return dataclasses.replace(self, q=self.q[index], scale=self.scale[index])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.q.shape)) + 4 * int(np.prod(self.scale.shape))


def block_size(cols: int) -> int:
    """Weights per scale for a matrix with `cols` inputs: 32, else 16 or 8, else the whole row."""
    return next((b for b in (BLOCK, 16, 8) if cols % b == 0), cols)


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a weight's scales: one per block of its last (input) axis."""
    return (*shape[:-1], shape[-1] // block_size(shape[-1]))


def _blocks(w, block: int):
    """`[..., out, in]` -> `[..., out, in / block, block]` (numpy or jax)."""
    return w.reshape(*w.shape[:-1], w.shape[-1] // block, block)


def _scale_of(amax):
    """max|block| / 127, and 1 for an all-zero block (its q is all zeros either way)."""
    return np.where(amax > 0, amax * INV_QMAX, np.float32(1)).astype(np.float32)


def quantize_np(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8, scale float32) of a float matrix `[..., out, in]` on the host (conversion)."""
    w = np.asarray(w, np.float32)
    blocks = _blocks(w, block_size(w.shape[-1]))
    scale = _scale_of(np.max(np.abs(blocks), axis=-1))
    inv = (np.float32(1) / scale)[..., None]  # w * (1/scale): what XLA makes of w / broadcast(scale)
    q = np.clip(np.rint(blocks * inv), -QMAX, QMAX).astype(np.int8)
    return q.reshape(w.shape), scale


def quantize(w: jax.Array) -> Int8Weight:
    """`quantize_np` on the device (jit it; load-time quantization): the same float32 arithmetic,
    so both give the same bits."""
    w = w.astype(jnp.float32)
    blocks = _blocks(w, block_size(w.shape[-1]))
    amax = jnp.max(jnp.abs(blocks), axis=-1)
    scale = jnp.where(amax > 0, amax * INV_QMAX, jnp.float32(1))
    q = jnp.clip(jnp.round(blocks * (1 / scale)[..., None]), -QMAX, QMAX).astype(jnp.int8)
    return Int8Weight(q.reshape(w.shape), scale)


def from_q8_0(data: np.ndarray, shape: tuple[int, int]) -> Int8Weight:
    """A GGUF Q8_0 tensor's raw blocks (per block: float16 scale, 32 int8) as an `Int8Weight` of
    `shape` `[out, in]`: the same values, with no float round trip."""
    blocks = np.asarray(data, np.uint8).reshape(shape[0], shape[1] // BLOCK, 2 + BLOCK)
    scale = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).reshape(shape)
    return Int8Weight(q, scale)


def dequantize(w: Int8Weight, dtype=jnp.float32) -> jax.Array:
    """The float matrix `q * scale`, computed in float32 and rounded once to `dtype`."""
    block = w.q.shape[-1] // w.scale.shape[-1]
    blocks = _blocks(w.q, block).astype(jnp.float32) * w.scale[..., None].astype(jnp.float32)
    return blocks.reshape(w.q.shape).astype(dtype)


def is_int8(x: Any) -> bool:
    return isinstance(x, Int8Weight)


def for_platform(w: Int8Weight, platform: Platform | None = None, sharded: bool = False) -> Int8Weight:
    """`w` computing as `platform` (default: the host's) runs it fastest (see `linear`): in row
    blocks on a CPU, through the Pallas kernel on a GPU with Triton (not yet when the weights are
    sharded: XLA would gather each matrix whole in front of it), else dequantized by XLA."""
    platform = resolve(platform)
    path = "rows" if platform.cpu else "kernel" if platform.has("triton") and not sharded else "xla"
    return dataclasses.replace(w, path=path)


def _contract(x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=out_dtype)


def _row_blocks(rows: int, cols: int, block_bytes: int) -> int:
    """The fewest row blocks, dividing `rows` evenly, whose float32 copy fits `block_bytes`."""
    want = -(-rows * cols * 4 // block_bytes)
    return next(n for n in range(max(want, 1), rows + 1) if rows % n == 0)


def _linear_blocked(x: jax.Array, w: Int8Weight, out_dtype) -> jax.Array:
    """`linear` over row blocks of `w`, one dequantized at a time (XLA's CPU backend)."""
    rows, cols = w.q.shape
    n = _row_blocks(rows, cols, CPU_BLOCK_BYTES)
    blocks = Int8Weight(w.q.reshape(n, rows // n, cols), w.scale.reshape(n, rows // n, w.scale.shape[-1]))
    y = jax.lax.map(lambda b: _contract(x, dequantize(b, x.dtype), out_dtype), blocks)  # [n, ..., rows / n]
    return jnp.moveaxis(y, 0, -2).reshape(*x.shape[:-1], rows)


def linear(x: jax.Array, w: Int8Weight, out_dtype=None) -> jax.Array:
    """`x @ dequantize(w).T` (weight-only int8: the input stays in its float dtype), by `w.path`.

    "kernel" (GPU): decode-sized inputs (at most `MatmulConfig.decode_rows` rows) of a 2-D weight
    in blocks of 32 go through the Pallas kernel `int8_matmul.block_matmul`, which never stores
    the float matrix: XLA's GPU compiler does not fuse the block dequantization into its dot and
    writes a float copy of the matrix per matmul (prefill, compute-bound, keeps that path).
    "rows" (CPU): XLA's CPU backend would also dequantize each whole matrix first (and schedules
    those copies together, 418 MiB of temporaries for the cpu-bench step), so the rows go through
    in blocks of at most `CPU_BLOCK_BYTES` as float32, one at a time.
    """
    path = w.path or for_platform(w).path
    if path == "kernel" and w.q.ndim == 2 and w.scale.shape[-1] * BLOCK == w.q.shape[-1]:
        rows = int(np.prod(x.shape[:-1]))
        if rows <= int8_matmul.DEFAULT.decode_rows and int8_matmul.supported(rows, *w.q.shape):
            return int8_matmul.block_matmul(x, w.q, w.scale, out_dtype=out_dtype)
    if path == "rows" and w.q.size * 4 > CPU_BLOCK_BYTES:
        return _linear_blocked(x, w, out_dtype)
    return _contract(x, dequantize(w, x.dtype), out_dtype)


def embed(w: Int8Weight, tokens: jax.Array, dtype) -> jax.Array:
    """Embedding lookup: gather the int8 rows of `tokens` and their scales, then dequantize."""
    return dequantize(Int8Weight(jnp.take(w.q, tokens, axis=0), jnp.take(w.scale, tokens, axis=0)), dtype)
