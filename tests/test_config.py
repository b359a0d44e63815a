"""LlamaConfig presets, the transformers config.json reader (v4 and v5 spellings, refusals),
and the make-tiny-checkpoint command."""

import json

import pytest

from llama_jax.cli import main as cli_main
from llama_jax.config import PRESETS, LlamaConfig, RopeScaling, UnsupportedModelError, from_hf_config, preset
from llama_jax.hf_checkpoint import load_hf_model, param_count
from llama_jax.model import weight_specs

V4_7B_CHAT = {  # meta-llama/Llama-2-7b-chat-hf's config.json as transformers v4 writes it
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def test_llama2_7b_chat_config_is_the_7b_preset():
    cfg = from_hf_config(V4_7B_CHAT)
    assert cfg == preset("llama-2-7b").replace(dtype="float16")
    assert param_count(cfg) == 6_738_415_616  # Llama-2-7b's published parameter count


def test_transformers_v5_spelling():
    v5 = {k: v for k, v in V4_7B_CHAT.items() if k not in ("torch_dtype", "rope_scaling")}
    v5 |= {"dtype": "bfloat16", "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    cfg = from_hf_config(v5)
    assert cfg.dtype == "bfloat16" and cfg.rope_theta == 500000.0


def test_70b_preset_is_grouped_query():
    cfg = PRESETS["llama-2-70b"]
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.head_dim) == (64, 8, 28672, 128)


@pytest.mark.parametrize("change, words", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "architecture"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling: type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "rope_scaling: type 'yarn'"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unimplemented_features_are_refused(change, words):
    with pytest.raises(UnsupportedModelError, match=words):
        from_hf_config(V4_7B_CHAT | change)


LLAMA_32_1B = {  # meta-llama/Llama-3.2-1B-Instruct's config.json (transformers v4 spelling)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256,
}


def test_llama_3_config_reads_tied_embeddings_head_dim_and_llama3_rope():
    cfg = from_hf_config(LLAMA_32_1B)
    assert cfg.tie_embeddings and cfg.head_dim == 64 and cfg.eos_id == 128001
    assert cfg.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    assert ("lm_head",) not in weight_specs(cfg)  # one matrix, stored once
    assert abs(param_count(cfg) - 1_235_814_400) == 0  # Llama-3.2-1B's parameter count
    assert LlamaConfig.from_json(cfg.to_json()) == cfg and from_hf_config(cfg.to_hf_config()) == cfg


def test_explicit_head_dim_need_not_divide_dim():
    cfg = LlamaConfig(dim=96, n_heads=4, n_kv_heads=2, head_dim=32)  # 4 x 32 = 128 != 96
    assert weight_specs(cfg)[("layers", "wq")].shape == (32, 128, 96)
    assert from_hf_config(cfg.to_hf_config() | {"num_hidden_layers": 32}).head_dim == 32


def test_inconsistent_shapes_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        LlamaConfig(dim=100, n_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("llama-3-8b")


def test_config_json_round_trip():
    cfg = PRESETS["tiny-gqa"]
    assert LlamaConfig.from_json(cfg.to_json()) == cfg
    assert from_hf_config(cfg.to_hf_config()) == cfg


def test_make_tiny_checkpoint_command(tmp_path, tokenizer_path, capsys):
    out = tmp_path / "tiny"
    assert cli_main(["make-tiny-checkpoint", str(out), "--layers", "3", "--dim", "96", "--heads", "6",
                     "--kv-heads", "2", "--vocab-from", str(tokenizer_path), "--seed", "7"]) == 0
    assert "wrote a random" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (3, 96, 2)
    assert (out / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == 3 * 9 + 3
    model = load_hf_model(out)
    assert model.layers.wk[...].shape == (3, 32, 96)  # [layers, out, in]
    again = tmp_path / "again"
    cli_main(["make-tiny-checkpoint", str(again), "--layers", "3", "--dim", "96", "--heads", "6",
              "--kv-heads", "2", "--vocab-from", str(tokenizer_path), "--seed", "7"])
    assert all((again / f.name).read_bytes() == f.read_bytes() for f in out.glob("*.safetensors"))  # deterministic
