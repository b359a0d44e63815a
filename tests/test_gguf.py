"""GGUF files as a checkpoint source: a GGUF written here from a random HF checkpoint (llama.cpp's
layout: its tensor names, q/k rows permuted, several quantization types) reads back to the same
model, and the real SmolLM2 GGUF computes what transformers computes from the same file."""

from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf.quants import quantize
from safetensors.numpy import load_file

from llama_jax.config import UnsupportedModelError, preset
from llama_jax.gguf_checkpoint import gguf_name, is_gguf, load_gguf_model, open_reader, read_config
from llama_jax.hf_checkpoint import load_hf_model, write_tiny_checkpoint
from llama_jax.kv_cache import init_cache

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO_ROOT.parent / "shared" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENS = [1, 518, 25580, 29962, 15043, 29991, 1724, 338, 263, 4086, 29973, 518, 29914, 25580, 29962]


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation: split-halves rotary rows to interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir: Path, out: Path, qtype: str = "F32", **overrides) -> Path:
    """A llama-architecture GGUF of an HF checkpoint, as llama.cpp's converter lays it out."""
    from llama_jax.config import from_hf_config

    cfg = from_hf_config(hf_dir / "config.json")
    tensors = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors |= load_file(f)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    for key, value in overrides.items():
        getattr(w, f"add_{key}")(value)
    q_type = getattr(gguf.GGMLQuantizationType, qtype)
    for name, array in tensors.items():
        if name.endswith("q_proj.weight"):
            array = permute(array, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            array = permute(array, cfg.n_kv_heads)
        if array.ndim == 2 and qtype != "F32":
            data = quantize(array, q_type)
            w.add_tensor(gguf_name(name), data, raw_shape=data.shape, raw_dtype=q_type)  # the byte shape
        else:
            w.add_tensor(gguf_name(name), array.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def logits(model, tokens=TOKENS) -> np.ndarray:
    out, _ = model(jnp.array([tokens]), jnp.arange(len(tokens))[None], init_cache(model.cfg, 1, len(tokens)))
    return np.asarray(out[0])


@pytest.mark.parametrize("shape", ["tiny-gqa", "tiny-mha"])
def test_float_gguf_is_the_same_model(tiny_checkpoint, tmp_path, shape):
    hf_dir = tiny_checkpoint(shape)
    path = write_gguf(hf_dir, tmp_path / "model.gguf")
    assert is_gguf(path) and not is_gguf(hf_dir / "config.json")
    model = load_gguf_model(path)
    assert model.cfg == preset(shape)
    np.testing.assert_allclose(logits(model), logits(load_hf_model(hf_dir)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("qtype, tolerance", [("F16", 0.01), ("BF16", 0.05), ("Q8_0", 0.05), ("Q4_1", 0.5)])
def test_quantized_gguf_dequantizes_close_to_the_source(tiny_checkpoint, tmp_path, qtype, tolerance):
    """Each type dequantizes with its own error: coarser types move the logits more, and all stay near."""
    hf_dir = tiny_checkpoint("tiny-gqa")
    ref = logits(load_hf_model(hf_dir))
    ours = logits(load_gguf_model(write_gguf(hf_dir, tmp_path / f"{qtype}.gguf", qtype)))
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert 0 < err <= tolerance


def test_q8_0_gguf_converts_to_int8_without_a_float_round_trip(tiny_checkpoint, tmp_path):
    """`convert-weights model.q8_0.gguf --quantize int8` takes each Q8_0 matrix's own int8 values
    and scales (q/k rows unpermuted like the floats), so the int8 model computes what the GGUF's
    dequantized float32 model computes."""
    from llama_jax import checkpoint
    from llama_jax.convert import main
    from llama_jax.gguf_checkpoint import dequantized, gguf_name

    vocab = preset("tiny-gqa").vocab_size  # a placeholder byte-level vocabulary: convert writes the tokenizer
    path = write_gguf(tiny_checkpoint("tiny-gqa"), tmp_path / "q8.gguf", "Q8_0", tokenizer_model="gpt2",
                      token_list=[f"t{i}" for i in range(vocab)], token_merges=[])
    assert main([str(path), str(tmp_path / "int8"), "--quantize", "int8", "--quiet"]) == 0
    loaded = checkpoint.load(tmp_path / "int8")
    reader = open_reader(path)
    have = {t.name: t for t in reader.tensors}
    up = loaded.params["layers"]["w_up"].get_value()[0]  # layer 0, not permuted
    raw = have[gguf_name("model.layers.0.mlp.up_proj.weight")]
    blocks = np.asarray(raw.data).reshape(up.q.shape[0], -1, 34)
    np.testing.assert_array_equal(np.asarray(up.q), blocks[..., 2:].copy().view(np.int8).reshape(up.q.shape))
    np.testing.assert_array_equal(np.asarray(up.scale), blocks[..., :2].copy().view(np.float16)[..., 0])
    np.testing.assert_array_equal(np.asarray(up.q) * np.repeat(np.asarray(up.scale), 32, axis=1), dequantized(raw))
    np.testing.assert_allclose(logits(loaded.model), logits(load_gguf_model(path)), rtol=0, atol=1e-4)


def test_tied_embeddings_when_the_gguf_has_no_output_tensor(tmp_path):
    cfg = preset("tiny-gqa").replace(tie_embeddings=True)
    hf_dir = write_tiny_checkpoint(tmp_path / "hf", cfg, seed=2)
    model = load_gguf_model(write_gguf(hf_dir, tmp_path / "tied.gguf"))
    assert model.cfg.tie_embeddings and not hasattr(model, "lm_head")
    np.testing.assert_allclose(logits(model), logits(load_hf_model(hf_dir)), rtol=0, atol=1e-5)


def test_unsupported_ggufs_are_refused_by_name(tiny_checkpoint, tmp_path):
    hf_dir = tiny_checkpoint("tiny-gqa")
    with pytest.raises(UnsupportedModelError, match="llama.expert_count"):
        read_config(open_reader(write_gguf(hf_dir, tmp_path / "moe.gguf", expert_count=8)))
    with pytest.raises(UnsupportedModelError, match="rope.scaling.type 'yarn'"):
        read_config(open_reader(write_gguf(hf_dir, tmp_path / "yarn.gguf", rope_scaling_type=gguf.RopeScalingType.YARN)))


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if not SMOLLM2.exists():
        pytest.skip(f"the real SmolLM2 GGUF is not at {SMOLLM2} (it lives in ../shared, never in the repo)")
    return SMOLLM2


def test_smollm2_config_from_gguf_metadata(smollm2):
    cfg = read_config(open_reader(smollm2))
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim) == (30, 576, 9, 3, 64, 1536)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.tie_embeddings, cfg.bos_id, cfg.eos_id) == (49152, 1e5, True, 1, 2)
    assert cfg.dtype == "float32"  # dequantized Q4_1


@pytest.mark.slow
def test_smollm2_logits_match_transformers_on_the_same_file(smollm2, smollm2_reference):
    """transformers dequantizes the same GGUF (float32): the two models agree to float error."""
    import torch

    ids = [504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4521, 314]  # "The capital of France is Paris. ..."
    ours = logits(load_gguf_model(smollm2), ids)
    hf, _ = smollm2_reference
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 2e-5
    assert ours[-1].argmax() == ref[-1].argmax() == 11452  # " Berlin"
