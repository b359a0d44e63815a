"""A Pallas GPU kernel for the block-scaled int8 matmul `x @ dequantize(q, scale).T` that never
stores the dequantized matrix.

Why: XLA's GPU compiler fuses a per-channel int8 weight's convert into its dot, but not the
per-block (Q8_0, `quantize.BLOCK` = 32) dequantization `convert(q) * broadcast(scale)`: it writes a
whole float copy of every matrix per matmul (86 MiB for 11008 x 4096 in bf16), which at decode
(memory-bound: each weight byte is read once per step) triples the bytes moved. This kernel loads
int8 tiles and their scales, dequantizes them in registers and feeds the tensor-core dot.

Where it is used: decode-sized inputs (`DECODE_ROWS` rows or fewer after flattening), where the
step is bound by reading the weights. Prefill keeps the XLA dequantize + dot path: at hundreds of
rows the matmul is compute-bound, the float copy costs one extra pass over the weights per
thousands of rows, and XLA's autotuned GEMM beats this kernel's fixed small row tile there.

Backend: Pallas-Triton (explicit `triton.CompilerParams`: without them jax >= 0.10 sends a
`pallas_call` to Mosaic GPU). It runs on jax 0.10 (what CI and the deviceless H200 compile use)
and 0.11, where Pallas-Triton is deprecated but still lowers; see `TRITON_NOTE`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from llama_jax.quantize import BLOCK

ROW_TILE = 16  # rows of x per program: the smallest tensor-core dot; decode's m is padded to it
DECODE_ROWS = 64  # `quantize.linear` takes the kernel up to this many rows (see the module docstring)
COL_TILES = (64, 32, 16)  # output columns per program: the widest that still gives MIN_PROGRAMS
MIN_PROGRAMS = 264  # two per H200 SM (132): enough loads in flight to keep reading at full bandwidth
K_TILES = (256, 128, 64, 32)  # inputs per loop step, the first that divides k
TRITON_NOTE = ("jax 0.11 deprecates Pallas-Triton (a DeprecationWarning at pallas_call) but keeps its "
               "lowering; the kernel needs triton.CompilerParams there as on 0.10")


def _tile(size: int, choices: tuple[int, ...]) -> int | None:
    return next((t for t in choices if size % t == 0), None)


def supported(m: int, n: int, k: int) -> bool:
    """Whether `block_matmul` takes these shapes: k in whole 32-blocks; any n (a last, partial
    column tile is masked) and any m (padded to the row tile), though it is meant for decode."""
    return m >= 1 and n >= 1 and k >= BLOCK and k % BLOCK == 0


def _col_tile(row_tiles: int, n: int) -> int:
    """The widest column tile that still gives `MIN_PROGRAMS` programs (wide tiles: fewer, longer
    dots; small n, e.g. 4096 at decode, needs narrow ones to occupy every SM)."""
    return next((t for t in COL_TILES if row_tiles * -(-n // t) >= MIN_PROGRAMS), COL_TILES[-1])


def _kernel(x_ref, q_ref, s_ref, o_ref, *, k_tile: int, steps: int, n: int, precision):
    """One (row tile, column tile) of the output: loop over k, dequantize each int8 tile in
    registers (float32 product, rounded once to x's dtype as `quantize.dequantize` does), dot.
    Where n is not a multiple of the column tile, the last tile's loads are masked (rows past n
    read as 0; their output columns are cut off by the caller)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    rows, cols = x_ref.shape[0], q_ref.shape[0]
    blocks = k_tile // BLOCK
    valid = None
    if n % cols:
        valid = (pl.program_id(1) * cols + lax.broadcasted_iota(jnp.int32, (cols, 1), 0)) < n

    def load(ref, index):
        return ref[index] if valid is None else plgpu.load(ref.at[index], mask=valid, other=0)

    def step(i, acc):
        x = x_ref[:, pl.ds(pl.multiple_of(i * k_tile, k_tile), k_tile)]
        q = load(q_ref, (slice(None), pl.ds(pl.multiple_of(i * k_tile, k_tile), k_tile))).astype(jnp.float32)
        s = load(s_ref, (slice(None), pl.ds(pl.multiple_of(i * blocks, blocks), blocks)))
        w = (q.reshape(cols, blocks, BLOCK) * s[:, :, None]).reshape(cols, k_tile).astype(x.dtype)
        return acc + lax.dot_general(x, w, (((1,), (1,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, steps, step, jnp.zeros((rows, cols), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _triton_params():
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4, num_stages=3)


def block_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, *, out_dtype=None,
                 interpret: bool = False) -> jax.Array:
    """`x [..., k] @ dequantize(q [n, k] int8, scale [n, k / 32] float32).T -> [..., n]`, float32
    accumulation, in `out_dtype` (default: x's). Leading axes of x are flattened; rows padded to
    the row tile. Shapes must pass `supported`."""
    from jax.experimental import pallas as pl

    *lead, k = x.shape
    n = q.shape[0]
    m = 1
    for d in lead:
        m *= d
    if q.shape != (n, k) or scale.shape != (n, k // BLOCK):
        raise ValueError(f"block_matmul: q {q.shape} and scale {scale.shape} do not fit x {x.shape} "
                         f"(want q [n, {k}], scale [n, {k // BLOCK}])")
    if not supported(m, n, k):
        raise ValueError(f"block_matmul: unsupported shape m={m} n={n} k={k} (see supported)")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    rows = -(-m // ROW_TILE) * ROW_TILE
    k_tile, col_tile = _tile(k, K_TILES), _col_tile(rows // ROW_TILE, n)
    col_tiles = -(-n // col_tile)
    x2 = x.reshape(m, k)
    if rows != m:
        x2 = jnp.pad(x2, ((0, rows - m), (0, 0)))
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, k_tile=k_tile, steps=k // k_tile, n=n, precision=precision)
    out = pl.pallas_call(
        kernel,
        grid=(rows // ROW_TILE, col_tiles),
        in_specs=[pl.BlockSpec((ROW_TILE, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((col_tile, k), lambda i, j: (j, 0)),
                  pl.BlockSpec((col_tile, k // BLOCK), lambda i, j: (j, 0))],
        out_specs=pl.BlockSpec((ROW_TILE, col_tile), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((rows, col_tiles * col_tile), out_dtype),
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(),
        name="int8_block_matmul",
    )(x2, q, scale.astype(jnp.float32))
    return out[:m, :n].reshape(*lead, n)
