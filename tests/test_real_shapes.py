"""Real Llama 2 shapes without weights or a GPU: the serving programs compiled ahead of time from
abstract shapes (7B on one device, 70B at tp 8 on the 8 virtual CPU devices), and what the
compiler says they need: bounded temporaries in bf16, per-device weights and KV at 1/8, no
all-gather of the embedding or LM head, every cache buffer donated in place."""

import re

import jax

import numpy as np
import pytest

from llama_jax import plan, sharding
from llama_jax.config import preset
from llama_jax.device import decode_state_shardings, program_shapes
from llama_jax.engine import EngineConfig
from llama_jax.layers import split_layers

GiB = 1 << 30


def compile_one(cfg, config, mesh, kind, **shape):
    (compiled,) = plan.compile_programs(cfg, config, mesh, select=lambda k, s: k == kind and s == shape)
    return compiled


def cache_bytes_per_device(cfg, config, tp_kv: int) -> int:
    return 2 * cfg.n_layers * config.max_slots * (cfg.n_kv_heads // tp_kv) * cfg.max_seq_len * cfg.head_dim * 2


def test_default_gpu_serve_config_compiles_few_programs():
    """Warm-up grows with row buckets plus length buckets: 9 + 3 prefill shapes, 4 decode forwards
    and their 4 samplings, the prefix cache's slot copy and the slot swap that moves busy slots down."""
    shapes = program_shapes(EngineConfig(), preset("llama-2-7b").max_seq_len)
    assert len(shapes) == 22 and shapes[-2:] == [("copy", {}), ("swap", {})]
    assert [s for k, s in shapes if k == "decode"] == [s for k, s in shapes if k == "sample"] == [{"rows": r} for r in (1, 2, 4, 8)]


@pytest.fixture(scope="module")
def decode_7b():
    cfg = preset("llama-2-7b").replace(dtype="bfloat16")
    config = EngineConfig(max_slots=8)
    return cfg, config, compile_one(cfg, config, None, "decode", rows=8)


def test_7b_bf16_decode_temporaries_are_bounded(decode_7b):
    """bf16 on CPU upcasts one layer at a time, never the whole model or cache (was 60 GB)."""
    cfg, config, compiled = decode_7b
    memory = compiled.memory
    weights = 13_476_831_232  # 6.74B parameters x 2 bytes
    assert memory.argument_size_in_bytes >= weights + cache_bytes_per_device(cfg, config, 1)
    assert memory.temp_size_in_bytes <= 2 * GiB, f"{memory.temp_size_in_bytes / GiB:.2f} GiB of temporaries"


def test_7b_every_cache_buffer_is_donated_in_place(decode_7b):
    cfg, config, compiled = decode_7b
    cache = cache_bytes_per_device(cfg, config, 1)
    assert compiled.memory.alias_size_in_bytes >= cache
    header = compiled.compiled.as_text().splitlines()[0]
    aliased = {int(p) for p in re.findall(r"\{\d+\}: \((\d+), \{\}", header)}
    n_params = len(jax.tree.leaves(plan.abstract_params(cfg, None, split=split_layers(cfg))[1]))  # the plan's layout
    n_state = len(jax.tree.leaves(plan.abstract_state(cfg, config.max_slots, cfg.max_seq_len,
                                                      decode_state_shardings(cfg, None))))
    assert set(range(n_params, n_params + n_state)) <= aliased, "every decode-state buffer (k and v first) is donated"


@pytest.fixture(scope="module")
def tp8_70b():
    cfg = preset("llama-2-70b").replace(dtype="bfloat16")
    config = EngineConfig(max_slots=8)
    mesh = sharding.make_mesh(8)
    return cfg, config, mesh


def test_70b_tp8_per_device_weights_and_kv_are_an_eighth(tp8_70b):
    cfg, config, mesh = tp8_70b
    graphdef, params = plan.abstract_params(cfg, mesh)
    total = sum(int(np.prod(leaf.shape)) * 2 for leaf in jax.tree.leaves(params))
    per_device = plan.per_device_bytes(params)
    assert per_device <= total / 8 * 1.1 + GiB, (per_device / GiB, total / GiB)
    kv_total = cache_bytes_per_device(cfg, config, 1)
    assert cfg.n_kv_heads % 8 == 0
    compiled = compile_one(cfg, config, mesh, "decode", rows=8)
    memory = compiled.memory
    state = plan.abstract_state(cfg, config.max_slots, cfg.max_seq_len,
                                decode_state_shardings(cfg, mesh))
    kv = plan.per_device_bytes((state.cache.k, state.cache.v))
    assert kv == kv_total // 8
    # What the compiled SPMD program takes per device is the same eighth (plus small replicated state).
    assert memory.argument_size_in_bytes <= (total + kv_total) / 8 * 1.1 + GiB


@pytest.mark.parametrize("kind,shape", [("decode", {"rows": 8}), ("prefill", {"rows": 8, "bucket": 64})])
def test_70b_tp8_never_all_gathers_the_embedding_or_lm_head(tp8_70b, kind, shape):
    """The table is split along its columns (a local lookup), the head along the vocabulary (local
    logits): only activations and one [rows, vocab] logits gather cross devices."""
    cfg, config, mesh = tp8_70b
    text = compile_one(cfg, config, mesh, kind, **shape).compiled.as_text()
    gathers = re.findall(r"= (\w+)\[([\d,]*)\][^=]*? all-gather\(", text)
    assert gathers, "the tp program must gather something (activations, logits)"
    for dtype, dims in gathers:
        n = int(np.prod([int(d) for d in dims.split(",") if d]))
        assert n < cfg.vocab_size * cfg.dim // 8, f"an all-gather of {dtype}[{dims}]: a weight-sized gather"
