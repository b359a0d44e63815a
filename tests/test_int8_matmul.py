"""The Pallas block-scaled int8 matmul: its arithmetic in Pallas's interpret mode on the CPU, and,
compiled by XLA's real GPU compiler for an H200 without one, that it runs as one Triton kernel
with no dequantized copy of the matrix (which XLA's own dequantize + dot path writes)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import int8_matmul, quantize


def _weight(n: int, k: int, seed: int = 0) -> quantize.Int8Weight:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 2, (n, 1)).astype(np.float32)
    return quantize.Int8Weight(*(jnp.asarray(a) for a in quantize.quantize_np(w)))


@pytest.mark.parametrize(("m", "n", "k", "dtype"), [
    (1, 96, 256, jnp.bfloat16),  # decode; n a multiple of the column tile
    (8, 37, 576, jnp.float32),  # odd n: the last column tile is masked; SmolLM2's k = 2 x 256 + 64
    (40, 100, 96, jnp.bfloat16),  # m past two row tiles, masked; k = 64 + a masked 32-block tail
    (17, 20, 1376, jnp.float32),  # 7B's w_down at tp 8: k = 5 x 256 + 96 (one masked step)
    (3, 5, 32, jnp.float32),  # n below one tile, one k step
])
def test_interpret_equals_dequantize_then_dot(m, n, k, dtype):
    w = _weight(n, k)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((m, k)), dtype)
    want = jnp.dot(x.astype(jnp.float32), quantize.dequantize(w, dtype).astype(jnp.float32).T,
                   precision=jax.lax.Precision.HIGHEST)
    got = int8_matmul.block_matmul(x, w.q, w.scale, out_dtype=jnp.float32, interpret=True)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_interpret_leading_axes_and_out_dtype():
    w = _weight(48, 128)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 128)), jnp.bfloat16)
    got = int8_matmul.block_matmul(x, w.q, w.scale, interpret=True)  # out dtype: x's
    want = quantize._contract(x, quantize.dequantize(w, x.dtype), jnp.float32)
    assert got.shape == (2, 3, 48) and got.dtype == jnp.bfloat16
    want = np.asarray(want.astype(jnp.bfloat16), np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2)  # at most one bf16 rounding step apart


def test_shapes_refused():
    assert int8_matmul.supported(1, 11008, 4096) and int8_matmul.supported(1024, 37, 32)
    assert int8_matmul.supported(1, 4096, 1376)
    assert not int8_matmul.supported(1, 64, 48) and not int8_matmul.supported(1, 64, 16)
    w = _weight(64, 128)
    with pytest.raises(ValueError, match="do not fit"):
        int8_matmul.block_matmul(jnp.zeros((1, 128)), w.q, w.scale[:, :2], interpret=True)
    with pytest.raises(ValueError, match="unsupported shape"):
        int8_matmul.block_matmul(jnp.zeros((1, 48)), w.q[:, :48], w.q[:, :1].astype(jnp.float32), interpret=True)


@pytest.mark.parametrize("split", ["out", "in"])
def test_interpret_sharded_over_two_devices(split):
    """Column-parallel ("out") and row-parallel ("in", psum of partial products) per-device kernels
    over two CPU devices equal the whole matmul."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tp",))
    w = _weight(96, 256)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 1, 256)), jnp.float32)
    got = int8_matmul.sharded_block_matmul(x, w.q, w.scale, mesh=mesh, split=split, interpret=True)
    want = int8_matmul.block_matmul(x, w.q, w.scale, interpret=True)
    assert got.shape == (2, 1, 96)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def _h200(tp: int):
    platform = pytest.importorskip("llama_jax.platform",
                                   reason="needs llama_jax.platform (the shipped H200 target config)")
    try:
        return jax.sharding.Mesh(np.array(platform.target("h200", tp=tp)[1]), ("tp",))
    except RuntimeError as e:  # no CUDA plugin or ptxas
        pytest.skip(str(e))
    except FileNotFoundError as e:  # llama_jax/targets/h200.txtpb (ships with llama_jax.platform)
        pytest.skip(f"the H200 target config is missing: {e}")


@pytest.fixture(scope="module")
def h200():
    """A replicated sharding over one abstract H200: programs lowered on it compile with XLA's GPU
    compiler (Triton included) on this CPU-only machine."""
    return jax.sharding.NamedSharding(_h200(1), jax.sharding.PartitionSpec())


def _compile(fn, sharding, *args):
    """Compile for the mesh's abstract GPUs: lowered under that mesh, since jax 0.11's Pallas-Triton
    reads the GPU kind from the current mesh when the process has no GPU (0.10 assumed sm_90)."""
    args = [a if isinstance(a, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(*a, sharding=sharding) for a in args]
    with jax.set_mesh(sharding.mesh):
        return jax.jit(fn).lower(*args).compile()


def _triton_calls(compiled) -> int:
    return len(re.findall(r'custom_call_target="__gpu\$xla\.gpu\.triton".*int8_block_matmul', compiled.as_text()))


@pytest.mark.parametrize(("m", "n", "k"), [(1, 11008, 4096), (8, 11008, 4096), (8, 4096, 1376)])
def test_h200_kernel_stores_no_dequantized_matrix(h200, m, n, k):
    """7B's MLP up projection at decode (and w_down's part at tp 8, a masked k tail): XLA's path
    writes the bf16 matrix (86 MiB); the kernel is the program's one custom call and writes only
    the output."""
    shapes = [((m, k), jnp.bfloat16), ((n, k), jnp.int8), ((n, k // quantize.BLOCK), jnp.float32)]
    kernel = _compile(lambda x, q, s: int8_matmul.block_matmul(x, q, s, out_dtype=jnp.float32), h200, *shapes)
    dequantize_dot = lambda x, q, s: quantize._contract(x, quantize.dequantize(quantize.Int8Weight(q, s), x.dtype),
                                                        jnp.float32)  # linear's GPU path
    xla = _compile(dequantize_dot, h200, *shapes)
    matrix = n * k * 2
    assert _triton_calls(kernel) == 1
    assert kernel.memory_analysis().temp_size_in_bytes < 2**20  # measured: 0 (one custom call, no pad or slice)
    # Why the kernel exists (XLA's GPU compiler, jaxlib 0.10). Not at every shape: at 1 row XLA
    # makes some small matrices (4096 x 1376, 1536 x 576) a fused reduction with no copy.
    assert xla.memory_analysis().temp_size_in_bytes >= matrix


def test_h200_linear_takes_the_kernel_for_decode_only(h200):
    """`linear` on a weight whose path is "kernel": [batch, 1, k] decode rows go through the kernel, a 128-token prefill
    does not (it keeps linear's XLA path)."""
    n, k = 4096, 4096
    w = [((n, k), jnp.int8), ((n, k // quantize.BLOCK), jnp.float32)]
    fn = lambda x, q, s: quantize.linear(x, quantize.Int8Weight(q, s, path="kernel"))
    decode = _compile(fn, h200, ((4, 1, k), jnp.bfloat16), *w)
    prefill = _compile(fn, h200, ((1, 128, k), jnp.bfloat16), *w)
    assert _triton_calls(decode) == 1 and _triton_calls(prefill) == 0
    assert decode.out_info.shape == (4, 1, n) and decode.out_info.dtype == jnp.bfloat16


@pytest.mark.parametrize(("split", "spec"), [("out", ("tp", None)), ("in", (None, "tp"))])
def test_h200_tp2_runs_per_device_without_gathering_the_weight(split, spec):
    """Called on tp-sharded weights, the bare kernel makes XLA all-gather the int8 matrix; the
    per-device form does not (row-parallel: one all-reduce of the [1, n] float32 output)."""
    mesh = _h200(2)
    n, k = 11008, 4096
    at = lambda *axes: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))
    args = [jax.ShapeDtypeStruct((1, k), jnp.bfloat16, sharding=at()),
            jax.ShapeDtypeStruct((n, k), jnp.int8, sharding=at(*spec)),
            jax.ShapeDtypeStruct((n, k // quantize.BLOCK), jnp.float32, sharding=at(*spec))]
    gathers = lambda c: re.findall(r"all-gather(?:-start)?\(", c.as_text())
    bare = _compile(lambda x, q, s: int8_matmul.block_matmul(x, q, s), at(), *args)
    per_device = _compile(lambda x, q, s: int8_matmul.sharded_block_matmul(x, q, s, mesh=mesh, split=split),
                          at(), *args)
    assert gathers(bare) and not gathers(per_device) and _triton_calls(per_device) == 1
    assert per_device.memory_analysis().temp_size_in_bytes < 2**20
    reduces = re.findall(r"= (\S+) all-reduce(?:-start)?\(", per_device.as_text())
    assert reduces == ([] if split == "out" else ["f32[1,11008]{1,0}"])
