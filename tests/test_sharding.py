"""Tensor parallelism on 8 virtual CPU devices: the mesh, the partition rules, restored arrays
really sharded as the rules say, and sharded prefill + decode equal to one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from llama_jax import checkpoint, sharding, steps
from llama_jax.config import preset
from llama_jax.convert import main
from llama_jax.kv_cache import init_cache
from llama_jax.model import weight_specs

PROMPTS = [[1, 518, 25580, 29962, 15043, 29991, 1724, 338, 263], [1, 4086, 29973, 518, 29914]]


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    made = {}

    def get(name: str):
        if name not in made:
            out = tmp_path_factory.mktemp("tp") / name
            assert main([str(tiny_checkpoint(name)), str(out), "--quiet"]) == 0
            made[name] = out
        return made[name]

    return get


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_make_mesh_is_auto_and_usable_by_plain_code(tp):
    mesh = sharding.make_mesh(tp)
    assert dict(mesh.shape) == {"tp": tp}
    assert list(mesh.devices.flat) == jax.devices()[:tp]
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    x = jax.device_put(jnp.arange(8.0 * tp).reshape(tp, 8), jax.sharding.NamedSharding(mesh, P("tp")))
    assert float(jnp.sum(x @ jnp.ones((8, 3)))) == 3 * sum(range(8 * tp))  # ordinary jnp on a sharded array


def test_partition_rules_are_megatron():
    cfg = preset("tiny-mha")
    specs = {path: s.spec for path, s in sharding.param_shardings(cfg, sharding.make_mesh(4)).items()}
    assert specs[("embed",)] == P(None, "tp")  # the table's columns: a local lookup
    assert specs[("lm_head",)] == P("tp", None)  # vocab-parallel LM head
    assert specs[("norm",)] == P(None)
    layer = {name: specs[("layers", name)] for name in ("attn_norm", "mlp_norm", "wq", "wk", "wv", "wo",
                                                        "w_gate", "w_up", "w_down")}
    assert layer == {  # stacked [layers, out, in]: the layer axis is never split
        "attn_norm": P(None, None), "mlp_norm": P(None, None),  # replicated norms
        "wq": P(None, "tp", None), "wk": P(None, "tp", None), "wv": P(None, "tp", None),  # column-parallel
        "w_gate": P(None, "tp", None), "w_up": P(None, "tp", None),
        "wo": P(None, None, "tp"), "w_down": P(None, None, "tp"),  # row-parallel
    }


def test_kv_heads_are_replicated_when_tp_exceeds_them():
    cfg = preset("tiny-gqa")  # 8 query heads, 2 KV heads
    assert not sharding.kv_heads_replicated(cfg, 2) and sharding.kv_heads_replicated(cfg, 4)
    at2 = sharding.param_shardings(cfg, sharding.make_mesh(2))
    at4 = sharding.param_shardings(cfg, sharding.make_mesh(4))
    assert at2[("layers", "wk")].spec == P(None, "tp", None) and at4[("layers", "wk")].spec == P(None, None, None)
    assert at4[("layers", "wq")].spec == P(None, "tp", None)  # query heads stay split
    assert sharding.cache_sharding(cfg, sharding.make_mesh(2)).k.spec == P(None, None, "tp", None, None)
    assert sharding.cache_sharding(cfg, sharding.make_mesh(8)).v.spec == P(None, None, None, None, None)


def test_tp_that_does_not_divide_query_heads_is_refused(converted):
    cfg = preset("tiny-mha")  # 4 heads
    with pytest.raises(sharding.ShardingError, match=r"--tp 8 does not divide the model's 4 attention heads; use one of \[1, 2, 4\]"):
        sharding.param_shardings(cfg, sharding.make_mesh(8))
    with pytest.raises(sharding.ShardingError, match="does not divide"):
        checkpoint.load(converted("tiny-mha"), mesh=sharding.make_mesh(8))
    with pytest.raises(sharding.ShardingError, match="needs 16 devices but only 8"):
        sharding.make_mesh(16)


@pytest.mark.parametrize("shape,tp", [("tiny-mha", 4), ("tiny-gqa", 2), ("tiny-gqa", 8)])
def test_restored_arrays_are_sharded_as_the_rules_say(converted, shape, tp):
    cfg = preset(shape)
    mesh = sharding.make_mesh(tp)
    sharded = checkpoint.load(converted(shape), mesh=mesh)
    single = checkpoint.load(converted(shape))
    flat, ref = dict(nnx.to_flat_state(sharded.params)), dict(nnx.to_flat_state(single.params))
    assert set(flat) == set(weight_specs(cfg))
    rules = sharding.param_shardings(cfg, mesh)
    for path, spec in weight_specs(cfg).items():
        array = flat[path][...]
        assert array.sharding.is_equivalent_to(rules[path], array.ndim), path
        assert len(array.addressable_shards) == tp
        # Each device holds exactly its slice: the dims the rules shard are divided by tp.
        want = tuple(n // tp if rules[path].spec[i] == "tp" else n for i, n in enumerate(spec.shape))
        assert {s.data.shape for s in array.addressable_shards} == {want}, path
        np.testing.assert_array_equal(np.asarray(array), np.asarray(ref[path][...]))
    d, v, f = cfg.dim, cfg.vocab_size, cfg.ffn_dim
    shard = lambda *p: flat[p][...].addressable_shards[0].data.shape
    n = cfg.n_layers
    assert shard("embed") == (v, d // tp) and shard("lm_head") == (v // tp, d) and shard("norm") == (d,)
    assert shard("layers", "wq") == (n, d // tp, d) and shard("layers", "wo") == (n, d, d // tp)  # [out, in]
    assert shard("layers", "w_up") == (n, f // tp, d) and shard("layers", "w_down") == (n, d, f // tp)
    kv = cfg.n_kv_heads * cfg.head_dim
    assert shard("layers", "wk") == ((n, kv // tp, d) if cfg.n_kv_heads % tp == 0 else (n, kv, d))


def test_shard_params_agrees_with_load(converted):
    cfg = preset("tiny-gqa")
    mesh = sharding.make_mesh(2)
    placed = dict(nnx.to_flat_state(sharding.shard_params(cfg, checkpoint.load(converted("tiny-gqa")).params, mesh)))
    rules = sharding.param_shardings(cfg, mesh)
    for path in weight_specs(cfg):
        array = placed[path][...]
        assert array.sharding.is_equivalent_to(rules[path], array.ndim)


def run_greedy(loaded, mesh, new_tokens: int = 8):
    """Prefill two prompts into a (sharded) decode cache, decode greedily. Returns every step's
    logits `[steps, rows, V]`, the tokens `[new_tokens, rows]` and the cache."""
    gd, params, cfg = loaded.graphdef, loaded.params, loaded.cfg
    tokens, lengths = steps.pad_prompts(PROMPTS, 16)
    cache = sharding.shard_cache(init_cache(cfg, len(PROMPTS), 64), cfg, mesh)
    logits, cache = steps.prefill_into(gd, params, cache, tokens, lengths, np.arange(len(PROMPTS), dtype=np.int32))
    all_logits, out = [np.asarray(logits)], []
    for _ in range(new_tokens):
        nxt = np.asarray(jnp.argmax(logits, axis=-1)).astype(np.int32)
        out.append(nxt)
        logits, cache = steps.decode_step(gd, params, cache, nxt)
        all_logits.append(np.asarray(logits))
    return np.stack(all_logits), np.stack(out), cache


_reference: dict = {}


@pytest.mark.parametrize("shape,tp", [("tiny-mha", 1), ("tiny-mha", 2), ("tiny-mha", 4),
                                      ("tiny-gqa", 2), ("tiny-gqa", 4), ("tiny-gqa", 8), ("tiny-llama3", 4)])
def test_sharded_prefill_and_decode_equal_one_device(converted, shape, tp):
    if shape not in _reference:
        _reference[shape] = run_greedy(checkpoint.load(converted(shape)), None)[:2]
    ref_logits, ref_tokens = _reference[shape]
    mesh = sharding.make_mesh(tp)
    loaded = checkpoint.load(converted(shape), mesh=mesh)
    logits, tokens, cache = run_greedy(loaded, mesh)
    scale = np.abs(ref_logits).max()
    assert np.max(np.abs(logits - ref_logits)) <= 1e-5 * scale
    np.testing.assert_array_equal(tokens, ref_tokens)
    # The cache stays on the mesh, KV heads split where tp divides them (replicated otherwise).
    want = sharding.cache_sharding(loaded.cfg, mesh)
    for got, exp in [(cache.k, want.k), (cache.v, want.v)]:
        assert got.sharding.is_equivalent_to(exp, 5)
        assert set(got.sharding.device_set) == set(mesh.devices.flat)
