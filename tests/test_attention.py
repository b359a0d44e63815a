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
@pytest.mark.parametrize("config", [AttentionConfig(block=64), PALLAS], ids=["xla", "pallas"])
def test_decode_matches_dense_reference_float32(kv, groups, config):
    q, k, v, lengths = case(kv, groups, jnp.float32)
    for layer in range(LAYERS):
        got = jax.jit(lambda *a: attention.decode_attention(*a, config))(q, k, v, jnp.int32(layer), lengths)
        np.testing.assert_allclose(np.asarray(got), np.asarray(reference(q, k, v, layer, lengths)), atol=2e-6)


@pytest.mark.parametrize("config", [AttentionConfig(block=64), PALLAS], ids=["xla", "pallas"])
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


def test_platform_choices():
    assert AttentionConfig.for_platform("gpu") == AttentionConfig(prefill="cudnn", decode="pallas", block=64, splits=8)
    assert AttentionConfig.for_platform("cpu") == AttentionConfig()
    assert attention.key_block(4096, 256) == 256 and attention.key_block(100, 256) == 100
