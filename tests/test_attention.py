"""Attention entry points against a dense reference: the XLA decode loop and the Pallas decode
kernel (interpret mode on CPU: the same kernel code the GPU compiles), in float32 and bfloat16,
per-row lengths, stale NaN past a row's length, and the kernel per device under tensor parallelism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import attention, sharding
from llama_jax.attention import AttentionConfig

LAYERS, SLOTS, MAX_LEN, D = 2, 4, 256, 32
PALLAS = AttentionConfig(decode="pallas", block=32, splits=4, interpret=True)
STATIC = AttentionConfig(block=64, static_loops=True, static_block=64)  # a GPU's XLA loops: every key block, masked


def case(kv: int, groups: int, dtype, seed: int = 0, stale_nan: bool = False):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(SLOTS, kv * groups, D)), dtype)
    k = rng.normal(size=(LAYERS, SLOTS, kv, MAX_LEN, D)).astype(np.float32)
    v = rng.normal(size=(LAYERS, SLOTS, kv, MAX_LEN, D)).astype(np.float32)
    lengths = np.array([1, 37, 200, 256], np.int32)
    if stale_nan:  # an earlier occupant's garbage past each row's length
        for row, n in enumerate(lengths):
            k[:, row, :, n:] = np.nan
            v[:, row, :, n:] = np.nan
    return q, jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(lengths)


def reference(q, k, v, layer, lengths):
    mask = (jnp.arange(MAX_LEN)[None, None, :] < lengths[:, None, None])  # [B, 1, S]
    return attention.masked_attention(q[:, None], k[layer], v[layer], mask)[:, 0]


@pytest.mark.parametrize("kv,groups", [(4, 1), (2, 4)])  # multi-head (7B) and grouped-query (70B-like)
@pytest.mark.parametrize("config", [AttentionConfig(block=64), STATIC, PALLAS], ids=["xla", "xla-static", "pallas"])
def test_decode_matches_dense_reference_float32(kv, groups, config):
    q, k, v, lengths = case(kv, groups, jnp.float32)
    for layer in range(LAYERS):
        got = jax.jit(lambda *a: attention.decode_attention(*a, config))(q, k, v, jnp.int32(layer), lengths)
        np.testing.assert_allclose(np.asarray(got), np.asarray(reference(q, k, v, layer, lengths)), atol=2e-6)


@pytest.mark.parametrize("config", [AttentionConfig(block=64), STATIC, PALLAS], ids=["xla", "xla-static", "pallas"])
def test_decode_bfloat16_and_stale_nan(config):
    """bf16 keys within bf16 rounding of the float32 result; NaN past a row's length never leaks."""
    q, k, v, lengths = case(2, 4, jnp.bfloat16, seed=1, stale_nan=True)
    got = np.asarray(jax.jit(lambda *a: attention.decode_attention(*a, config))(q, k, v, jnp.int32(1), lengths))
    assert np.isfinite(got).all()
    clean = lambda a: jnp.nan_to_num(a.astype(jnp.float32))
    want = np.asarray(reference(q.astype(jnp.float32), clean(k), clean(v), 1, lengths))
    np.testing.assert_allclose(got.astype(np.float32), want, atol=3e-2)


def test_pallas_kernel_runs_per_device_under_tensor_parallelism():
    """Under a tp mesh the kernel is wrapped in shard_map over KV heads: same result as one device."""
    q, k, v, lengths = case(4, 2, jnp.float32, seed=2)
    mesh = sharding.make_mesh(2)
    config = AttentionConfig(decode="pallas", block=32, splits=4, interpret=True, mesh=mesh)
    k_s = jax.device_put(k, NamedSharding(mesh, P(None, None, "tp", None, None)))
    v_s = jax.device_put(v, NamedSharding(mesh, P(None, None, "tp", None, None)))
    q_s = jax.device_put(q, NamedSharding(mesh, P(None, "tp", None)))
    got = jax.jit(lambda *a: attention.decode_attention(*a, config))(q_s, k_s, v_s, jnp.int32(0), lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(reference(q, k, v, 0, lengths)), atol=2e-6)


def test_prefill_attention_is_causal_within_each_length():
    rng = np.random.default_rng(3)
    b, t, kv, g = 2, 300, 2, 2  # spans several causal query blocks
    q = jnp.asarray(rng.normal(size=(b, t, kv * g, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kv, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kv, D)), jnp.float32)
    lengths = jnp.array([300, 131], jnp.int32)
    got = attention.prefill_attention(q, k, v, lengths, AttentionConfig())
    want = attention.masked_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), attention.causal_mask(lengths, t))
    valid = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-6)


@pytest.mark.parametrize("static_loops", [False, True], ids=["to-last-position", "static"])
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 3e-2)])
def test_suffix_attention_reads_the_prefix_from_the_cache(dtype, atol, static_loops):
    """Queries at offsets (a suffix after a cached prefix) against cache rows picked by index:
    equal to the dense masked reference, stale NaN past each row's length never leaking."""
    kv, groups, t = 2, 4, 150  # two query blocks
    rng = np.random.default_rng(4)
    _, k, v, _ = case(kv, groups, jnp.float32, seed=5, stale_nan=False)
    rows, starts = jnp.array([3, 0, 2]), jnp.array([0, 60, 100], jnp.int32)
    lengths = starts + jnp.array([150, 90, 20], jnp.int32)
    k, v = np.array(k), np.array(v)
    for row, n in zip(np.asarray(rows), np.asarray(lengths)):
        k[:, row, :, n:] = np.nan
        v[:, row, :, n:] = np.nan
    q = jnp.asarray(rng.normal(size=(3, t, kv * groups, D)), dtype)
    k, v = jnp.asarray(k, dtype), jnp.asarray(v, dtype)
    got = jax.jit(lambda *a: attention.suffix_attention(*a, block=64, static_loops=static_loops))(
        q, k, v, jnp.int32(1), rows, starts, lengths)
    pos = starts[:, None] + jnp.arange(t)
    mask = (jnp.arange(MAX_LEN)[None, None] <= pos[:, :, None]) & (jnp.arange(MAX_LEN)[None, None] < lengths[:, None, None])
    clean = lambda a: jnp.nan_to_num(a[1][rows].astype(jnp.float32))
    want = attention.masked_attention(q.astype(jnp.float32), clean(k), clean(v), mask)
    valid = np.asarray(pos < lengths[:, None])
    assert np.isfinite(np.asarray(got.astype(jnp.float32))[valid]).all()
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32))[valid], np.asarray(want)[valid], atol=atol)


def test_prompt_attention_takes_the_fresh_path_only_when_every_start_is_zero():
    """A fresh batch equals `prefill_attention` on its own keys; one suffix in the batch switches
    the whole batch to the cache-reading path, which agrees on the fresh rows."""
    rng = np.random.default_rng(6)
    kv, g, t = 2, 2, 40
    q = jnp.asarray(rng.normal(size=(2, t, kv * g, D)), jnp.float32)
    new_k = jnp.asarray(rng.normal(size=(2, t, kv, D)), jnp.float32)
    new_v = jnp.asarray(rng.normal(size=(2, t, kv, D)), jnp.float32)
    cache_k, cache_v = (jnp.zeros((1, 2, kv, MAX_LEN, D)).at[0, :, :, :t].set(jnp.swapaxes(a, 1, 2)) for a in (new_k, new_v))
    rows, lengths = jnp.arange(2), jnp.array([40, 25], jnp.int32)
    run = jax.jit(lambda starts: attention.prompt_attention(q, new_k, new_v, cache_k, cache_v, 0, rows, starts,
                                                            lengths, AttentionConfig(block=32)))
    fresh = run(jnp.zeros(2, jnp.int32))
    want = attention.prefill_attention(q, new_k, new_v, lengths, AttentionConfig())
    valid = np.arange(t)[None] < np.asarray(lengths)[:, None]
    np.testing.assert_allclose(np.asarray(fresh)[valid], np.asarray(want)[valid], atol=2e-6)
    mixed = run(jnp.array([0, 5], jnp.int32))  # row 1 now has 5 cached keys before it: a different result
    np.testing.assert_allclose(np.asarray(mixed)[0], np.asarray(want)[0], atol=2e-6)
    assert not np.allclose(np.asarray(mixed)[1, :20], np.asarray(want)[1, :20])
    # the path chosen on the host (a GPU's programs, `suffix` static) computes the same
    for suffix, starts, want_ in ((False, jnp.zeros(2, jnp.int32), fresh), (True, jnp.array([0, 5], jnp.int32), mixed)):
        for config in (AttentionConfig(block=32), AttentionConfig(block=32, static_loops=True, static_block=32)):
            got = jax.jit(lambda s: attention.prompt_attention(q, new_k, new_v, cache_k, cache_v, 0, rows, s, lengths,
                                                               config, suffix=suffix))(starts)
            np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want_)[valid], atol=1e-6)


def test_key_block_never_exceeds_the_cache():
    assert attention.key_block(4096, 256) == 256 and attention.key_block(100, 256) == 100


def test_pallas_blocks_are_powers_of_two_covering_any_row():
    """Triton lowers power-of-two blocks only: any cache length gets whole blocks of >= 16 keys
    whose splits cover the row (the last block may end past it), and lengths that are a multiple
    of splits x block split as evenly as before."""
    assert attention.pallas_blocks(4096, 8, 64) == (8, 512, 64) and attention.pallas_blocks(256, 8, 64) == (8, 32, 32)
    for max_len in (16, 100, 1000, 2050, 3000, 4000, 4097):
        splits, split_len, block = attention.pallas_blocks(max_len, 8, 64)
        assert block >= 16 and block & (block - 1) == 0 and block <= max_len and split_len % block == 0, max_len
        assert (splits - 1) * split_len < max_len <= splits * split_len, max_len
    # a row shorter than one Triton block takes the XLA loop
    q, k, v = jnp.ones((1, 2, D)), jnp.ones((1, 1, 1, 8, D)), jnp.arange(8.0)[None, None, None, :, None] * jnp.ones(D)
    got = attention.decode_attention(q, k, v, jnp.int32(0), jnp.array([4]), AttentionConfig(decode="pallas", interpret=True))
    np.testing.assert_allclose(np.asarray(got), 1.5, atol=1e-6)  # the mean of values 0..3


@pytest.mark.parametrize("max_len, config", [
    (1000, AttentionConfig(decode="pallas", interpret=True)),  # the GPU's defaults: 8 splits of 128, blocks of 64
    (200, AttentionConfig(decode="pallas", block=32, splits=4, interpret=True)),  # 4 x 64, the last block past the row
], ids=["1000", "200"])
def test_pallas_decode_on_a_cache_length_no_block_divides(max_len, config):
    """A cache row whose length is no multiple of the kernel's block: the last block is read from
    inside the row and its repeated keys masked, so the kernel equals the XLA loop and the dense
    reference, rows reaching the very last key included, with stale NaN past each row's length."""
    rng = np.random.default_rng(7)
    kv, groups, slots = 2, 4, 4
    q = jnp.asarray(rng.normal(size=(slots, kv * groups, D)), jnp.float32)
    k, v = (rng.normal(size=(LAYERS, slots, kv, max_len, D)).astype(np.float32) for _ in range(2))
    lengths = np.array([1, max_len // 2 + 3, max_len - 1, max_len], np.int32)
    for row, n in enumerate(lengths):
        k[:, row, :, n:] = np.nan
        v[:, row, :, n:] = np.nan
    k, v, lengths = jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths)
    mask = jnp.arange(max_len)[None, None, :] < lengths[:, None, None]
    for layer in range(LAYERS):
        run = lambda c: np.asarray(jax.jit(lambda *a: attention.decode_attention(*a, c))(q, k, v, jnp.int32(layer), lengths))
        got = run(config)
        assert np.isfinite(got).all()
        want = attention.masked_attention(q[:, None], jnp.nan_to_num(k[layer]), jnp.nan_to_num(v[layer]), mask)[:, 0]
        np.testing.assert_allclose(got, np.asarray(want), atol=2e-6)
        np.testing.assert_allclose(got, run(AttentionConfig(block=64, static_loops=True, static_block=64)), atol=2e-6)
