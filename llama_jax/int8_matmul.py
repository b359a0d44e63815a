"""A Pallas GPU kernel for the block-scaled int8 matmul `x @ dequantize(q, scale).T` that never
stores the dequantized matrix.

Why: XLA's GPU compiler fuses a per-channel int8 weight's convert into its dot, but not the
per-block (Q8_0, `BLOCK` = 32) dequantization `convert(q) * broadcast(scale)`: it writes a
whole float copy of every matrix per matmul (86 MiB for 11008 x 4096 in bf16) and reads it back,
which at decode (memory-bound: each weight byte is read once per step) is 5x the int8 bytes. This
kernel loads int8 tiles and their scales, dequantizes them in registers and feeds the tensor-core
dot (mma.sync on sm_90, operands staged in shared memory by cp.async).

Where it is used: decode-sized inputs (`MatmulConfig.decode_rows` rows or fewer after flattening),
where the step is bound by reading the weights. Prefill keeps the XLA dequantize + dot path: there
the dot is compute-bound, so the float copy (one extra pass over the weights per hundreds of rows)
costs little, while this kernel's 16-row tiles would re-read every weight tile once per 16 rows
(from L2 at best) and its fixed tiling cannot match XLA's autotuned GEMM. The 64-row limit is
reasoned, not measured: no GPU has run this kernel yet.

Backend: Pallas-Triton, chosen by passing `triton.CompilerParams` (without them jax >= 0.10 hands
a `pallas_call` to Mosaic GPU). jax 0.11 keeps Pallas-Triton with the same API but deprecates it
(a DeprecationWarning at each lowering, id "jax-pallas-triton"), and, with no GPU attached (a
deviceless compile), reads the GPU kind from the current mesh: lower under `jax.set_mesh` of the
target's devices (0.10 assumed sm_90). Mosaic GPU is the backend to move to when Pallas-Triton
goes (jax's `pallas/ops/gpu/hopper_mixed_type_matmul_mgpu.py`, an int8 x bf16 wgmma kernel, is
the pattern, with the weight as the 64-row wgmma operand and the block scales applied in registers).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

BLOCK = 32  # weights per scale along the input axis (llama.cpp's Q8_0 block; quantize's scheme)


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """Tiling of the kernel (untuned on hardware: chosen from the H200's shape, 132 SMs).

    `row_tile`: rows of x per program, the smallest tensor-core dot (Triton needs 16); rows past
    m are masked, never read. `col_tiles`: output columns per program, the widest that still
    gives `min_programs` programs (small n, e.g. 4096 at decode, needs narrow tiles to occupy
    every SM). `k_tiles`: inputs per loop step, the widest not above k; a remainder (e.g. 7B's
    w_down at tp 8: k = 1376 = 5 x 256 + 96) is one more, masked step. `decode_rows`: the most rows
    `quantize.linear` sends here.
    """

    row_tile: int = 16
    col_tiles: tuple[int, ...] = (64, 32, 16)
    k_tiles: tuple[int, ...] = (256, 128, 64, 32)
    min_programs: int = 264  # two per H200 SM
    decode_rows: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def col_tile(self, m: int, n: int) -> int:
        row_tiles = -(-m // self.row_tile)
        return next((t for t in self.col_tiles if row_tiles * -(-n // t) >= self.min_programs), self.col_tiles[-1])

    def k_tile(self, k: int) -> int | None:
        return next((t for t in self.k_tiles if t <= k), None)


DEFAULT = MatmulConfig()


def supported(m: int, n: int, k: int, config: MatmulConfig = DEFAULT) -> bool:
    """Whether `block_matmul` takes these shapes: k in whole 32-blocks; any m and n (partial row
    and column tiles are masked), though it is meant for decode."""
    return m >= 1 and n >= 1 and k % BLOCK == 0 and config.k_tile(k) is not None


def _both(a, b):
    """The conjunction of two optional masks (None: all true)."""
    return b if a is None else a if b is None else a & b


def _kernel(x_ref, q_ref, s_ref, o_ref, *, m: int, n: int, k: int, k_tile: int):
    """One (row tile, column tile) of the output: loop over k, dequantize each int8 tile in
    registers (float32 product, rounded once to x's dtype as `quantize.dequantize` does), dot.
    Rows of x past m, rows of q past n (the last tiles' overhang) and inputs past k (the last,
    partial k step) are masked: not read (0), not written."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    rows, cols = x_ref.shape[0], q_ref.shape[0]
    blocks = k_tile // BLOCK
    row_ok = col_ok = None
    if m % rows:
        row_ok = pl.program_id(0) * rows + lax.broadcasted_iota(jnp.int32, (rows, 1), 0) < m
    if n % cols:
        col_ok = pl.program_id(1) * cols + lax.broadcasted_iota(jnp.int32, (cols, 1), 0) < n

    def load(ref, index, ok):
        return ref[index] if ok is None else plgpu.load(ref.at[index], mask=ok, other=0)

    def step(i, acc, k_ok=None, s_ok=None):
        at = (lambda size: i * size) if isinstance(i, int) else (lambda size: pl.multiple_of(i * size, size))
        ks = pl.ds(at(k_tile), k_tile)
        x = load(x_ref, (slice(None), ks), _both(row_ok, k_ok))
        q = load(q_ref, (slice(None), ks), _both(col_ok, k_ok)).astype(jnp.float32)
        s = load(s_ref, (slice(None), pl.ds(at(blocks), blocks)), _both(col_ok, s_ok))
        w = (q.reshape(cols, blocks, BLOCK) * s[:, :, None]).reshape(cols, k_tile).astype(x.dtype)
        return acc + lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    steps = k // k_tile
    acc = lax.fori_loop(0, steps, step, jnp.zeros((rows, cols), jnp.float32))
    if k % k_tile:
        k_ok = steps * k_tile + lax.broadcasted_iota(jnp.int32, (1, k_tile), 1) < k
        s_ok = steps * blocks + lax.broadcasted_iota(jnp.int32, (1, blocks), 1) < k // BLOCK
        acc = step(steps, acc, k_ok, s_ok)
    out = acc.astype(o_ref.dtype)
    if row_ok is None and col_ok is None:
        o_ref[...] = out
    else:
        ok = _both(row_ok, None if col_ok is None else col_ok.reshape(1, cols))
        plgpu.store(o_ref.at[:, :], out, mask=jnp.broadcast_to(ok, (rows, cols)))


def block_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, *, out_dtype=None, interpret: bool = False,
                 config: MatmulConfig = DEFAULT) -> jax.Array:
    """`x [..., k] @ dequantize(q [n, k] int8, scale [n, k / 32] float32).T -> [..., n]`, float32
    accumulation, in `out_dtype` (default: x's). Leading axes of x are flattened. The dot runs at
    the default precision (float32 x: tf32 tensor cores on the GPU, as XLA's own dots). `interpret`:
    Pallas's interpreter (CPU tests); otherwise it compiles for an NVIDIA GPU only."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    *lead, k = x.shape
    n = q.shape[0]
    m = 1
    for d in lead:
        m *= d
    if q.shape != (n, k) or scale.shape != (n, k // BLOCK):
        raise ValueError(f"block_matmul: q {q.shape} and scale {scale.shape} do not fit x {x.shape} "
                         f"(want q [n, {k}], scale [n, {k // BLOCK}])")
    if not supported(m, n, k, config):
        raise ValueError(f"block_matmul: unsupported shape m={m} n={n} k={k} (see supported)")
    k_tile, col_tile, row_tile = config.k_tile(k), config.col_tile(m, n), config.row_tile
    k_pad = -(-k // k_tile) * k_tile  # blocks span whole k steps; the last one's overhang is masked
    kernel = functools.partial(_kernel, m=m, n=n, k=k, k_tile=k_tile)
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, row_tile), pl.cdiv(n, col_tile)),
        in_specs=[pl.BlockSpec((row_tile, k_pad), lambda i, j: (i, 0)),
                  pl.BlockSpec((col_tile, k_pad), lambda i, j: (j, 0)),
                  pl.BlockSpec((col_tile, k_pad // BLOCK), lambda i, j: (j, 0))],
        out_specs=pl.BlockSpec((row_tile, col_tile), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), jnp.dtype(out_dtype or x.dtype)),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        name="int8_block_matmul",
    )(x.reshape(m, k), q, scale.astype(jnp.float32))
    return out.reshape(*lead, n)


def sharded_block_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, *, mesh: Mesh, split: str, axis: str = "tp",
                         out_dtype=None, interpret: bool = False, config: MatmulConfig = DEFAULT) -> jax.Array:
    """`block_matmul` under tensor parallelism: XLA does not partition a custom kernel (it would
    all-gather the whole int8 matrix to every device first), so it runs per device in a
    `shard_map` on the device's own part of `q` along mesh axis `axis`. `split`: "out"
    (column-parallel: q and scale split along n, the output too) or "in" (row-parallel: q, scale
    and x split along k; the partial products are summed in float32 with a psum)."""
    lead = (None,) * (x.ndim - 1)
    if split == "out":
        specs = (PartitionSpec(*lead, None), PartitionSpec(axis, None), PartitionSpec(axis, None))
        fn = functools.partial(block_matmul, out_dtype=out_dtype, interpret=interpret, config=config)
        out_spec = PartitionSpec(*lead, axis)
    elif split == "in":
        specs = (PartitionSpec(*lead, axis), PartitionSpec(None, axis), PartitionSpec(None, axis))
        dtype = jnp.dtype(out_dtype or x.dtype)

        def fn(x, q, scale):
            part = block_matmul(x, q, scale, out_dtype=jnp.float32, interpret=interpret, config=config)
            return lax.psum(part, axis).astype(dtype)

        out_spec = PartitionSpec(*lead, None)
    else:
        raise ValueError(f"split must be 'out' or 'in', got {split!r}")
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=False)(x, q, scale)
