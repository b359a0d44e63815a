"""GGUF files (llama.cpp's format) as a checkpoint source: the config from the metadata, the
weights dequantized one tensor at a time into Hugging Face layout.

The file is memory-mapped by `gguf.GGUFReader`, so reading holds one tensor in memory. llama.cpp's
converter permutes the rows of q and k from HF's split-halves rotary layout to interleaved pairs;
`_unpermute` undoes it, so a GGUF model computes what transformers computes from the same file.
Dequantization is the `gguf` package's (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_x and the K-quants).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llama_jax.config import LlamaConfig, RopeScaling, UnsupportedModelError
from llama_jax.hf_checkpoint import NUMPY_DTYPES, CheckpointError, check_names
from llama_jax.model import Tensor, tensors
from llama_jax.quantize import BLOCK, Int8Weight, block_size, from_q8_0

# HF tensor name (model.tensors' names, `{layer}` per layer) -> GGUF tensor name.
_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "blk.{layer}.attn_norm.weight",
    "self_attn.q_proj.weight": "blk.{layer}.attn_q.weight",
    "self_attn.k_proj.weight": "blk.{layer}.attn_k.weight",
    "self_attn.v_proj.weight": "blk.{layer}.attn_v.weight",
    "self_attn.o_proj.weight": "blk.{layer}.attn_output.weight",
    "post_attention_layernorm.weight": "blk.{layer}.ffn_norm.weight",
    "mlp.gate_proj.weight": "blk.{layer}.ffn_gate.weight",
    "mlp.up_proj.weight": "blk.{layer}.ffn_up.weight",
    "mlp.down_proj.weight": "blk.{layer}.ffn_down.weight",
}
_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def is_gguf(path: str | Path) -> bool:
    """Whether `path` is a GGUF file (by its magic bytes, not its name)."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def open_reader(path: str | Path):
    """A memory-mapped `gguf.GGUFReader`, with a CheckpointError for a file that is not one."""
    from gguf import GGUFReader

    try:
        return GGUFReader(Path(path), "r")
    except Exception as e:  # gguf raises ValueError/struct errors for truncated or foreign files
        raise CheckpointError(f"cannot read {path} as GGUF: {e}") from e


def metadata(reader, key: str, default=None):
    """One metadata value (a str, number, bool or list), or `default` when the key is absent."""
    field = reader.get_field(key)
    return default if field is None else field.contents()


def gguf_name(hf_name: str) -> str:
    """The GGUF name of an HF tensor name, e.g. model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight."""
    if hf_name in _NAMES:
        return _NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return _NAMES[rest].format(layer=layer)


def read_config(reader, dtype: str | None = None) -> LlamaConfig:
    """The LlamaConfig a GGUF's `llama.*` metadata describes; refuses, naming the key or tensor,
    what this implementation does not compute (other architectures, experts, YaRN, rope_freqs)."""
    arch = metadata(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"general.architecture {arch!r}: only 'llama' GGUF files are implemented")
    key = "llama.{}".format
    if metadata(reader, key("expert_count"), 0):
        raise UnsupportedModelError("llama.expert_count: mixture-of-experts models are not implemented")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError("tensor rope_freqs.weight (per-frequency RoPE factors, Llama 3.1+ in GGUF) is "
                                    "not implemented; convert the Hugging Face checkpoint instead")
    scaling = None
    kind = metadata(reader, key("rope.scaling.type"), "none")
    if kind == "linear":
        scaling = RopeScaling("linear", float(metadata(reader, key("rope.scaling.factor"))))
    elif kind not in ("none", None):
        raise UnsupportedModelError(f"llama.rope.scaling.type {kind!r} is not implemented")
    n_heads = int(metadata(reader, key("attention.head_count")))
    dim = int(metadata(reader, key("embedding_length")))
    head_dim = int(metadata(reader, key("attention.key_length"), 0) or metadata(reader, key("rope.dimension_count"), 0)
                   or dim // n_heads)
    vocab = metadata(reader, key("vocab_size")) or len(metadata(reader, "tokenizer.ggml.tokens", []))
    if dtype is None:
        matrices = {reader_type(t) for t in reader.tensors if len(t.shape) == 2}
        dtype = _FLOAT_TYPES.get(matrices.pop(), "float32") if len(matrices) == 1 else "float32"
    return LlamaConfig(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(metadata(reader, key("block_count"))),
        n_heads=n_heads,
        n_kv_heads=int(metadata(reader, key("attention.head_count_kv"), n_heads)),
        ffn_dim=int(metadata(reader, key("feed_forward_length"))),
        norm_eps=_float32(metadata(reader, key("attention.layer_norm_rms_epsilon"), 1e-5)),
        rope_theta=_float32(metadata(reader, key("rope.freq_base"), 10000.0)),
        max_seq_len=int(metadata(reader, key("context_length"), 4096)),
        dtype=dtype,
        bos_id=int(metadata(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(metadata(reader, "tokenizer.ggml.eos_token_id", 2)),
        head_dim=head_dim if head_dim != dim // n_heads else 0,
        tie_embeddings="output.weight" not in names,
        rope_scaling=scaling,
    )


def _float32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(f"{float(value):.7g}")


def reader_type(tensor) -> str:
    """The GGML type name of a tensor, e.g. "Q4_1"."""
    return tensor.tensor_type.name


def check_tensors(reader, cfg: LlamaConfig) -> None:
    """Fail, before any work, on missing, unexpected, misshapen or undecodable tensors."""
    from gguf.quants import _type_traits  # the types the package can dequantize

    have = {t.name: t for t in reader.tensors}
    expected = {gguf_name(t.hf_name): t for t in tensors(cfg)}
    ignorable = {"output.weight"} if cfg.tie_embeddings else set()
    check_names(expected, have, ignorable, "GGUF tensors")
    for name, tensor in expected.items():
        t = have[name]
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        if shape != tensor.shape:
            raise CheckpointError(f"GGUF tensor {name} has shape {shape}, expected {tensor.shape} for this config")
        if reader_type(t) not in ("F32", "F16", "BF16") and t.tensor_type not in _type_traits:
            raise CheckpointError(f"GGUF tensor {name}: type {reader_type(t)} cannot be dequantized by the gguf package")


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: interleaved rotary pairs back to split halves (HF)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized(tensor) -> np.ndarray:
    """One GGUF tensor as float32, in HF's `[out, in]` layout."""
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))
    return dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False).reshape(shape)


def iter_weights(reader, cfg: LlamaConfig, dtype: str | None = None,
                 keep_int8: bool = False) -> Iterator[tuple[Tensor, np.ndarray | Int8Weight]]:
    """Yield (tensor, array in HF layout and `dtype`) in `model.tensors` order, one at a time; with
    `keep_int8`, Q8_0 matrices come as the `Int8Weight` of their own blocks, not dequantized."""
    check_tensors(reader, cfg)
    have = {t.name: t for t in reader.tensors}
    np_dtype = NUMPY_DTYPES[dtype or cfg.dtype]
    heads = {"self_attn.q_proj.weight": cfg.n_heads, "self_attn.k_proj.weight": cfg.n_kv_heads}
    for tensor in tensors(cfg):
        source = have[gguf_name(tensor.hf_name)]
        n = next((h for suffix, h in heads.items() if tensor.hf_name.endswith(suffix)), None)
        unpermute = (lambda a: _unpermute(a, n)) if n is not None else (lambda a: a)
        if keep_int8 and reader_type(source) == "Q8_0" and block_size(tensor.shape[-1]) == BLOCK:
            w = from_q8_0(source.data, tensor.shape)
            yield tensor, Int8Weight(np.ascontiguousarray(unpermute(w.q)), np.ascontiguousarray(unpermute(w.scale)))
        else:
            yield tensor, np.ascontiguousarray(unpermute(dequantized(source)).astype(np_dtype))


def load_gguf_model(path: str | Path, dtype: str | None = None):
    """Load a GGUF file's weights into our NNX model on the default device (tests, notebooks);
    serving goes through `convert-weights`, which writes a loadable, shardable checkpoint."""
    import jax.numpy as jnp
    from flax import nnx

    from llama_jax.hf_checkpoint import stack_weights, state_from_arrays
    from llama_jax.model import abstract_model

    reader = open_reader(path)
    cfg = read_config(reader, dtype)
    graphdef, _ = nnx.split(abstract_model(cfg))
    arrays = {p: jnp.asarray(a) for p, a in stack_weights(cfg, iter_weights(reader, cfg)).items()}
    return nnx.merge(graphdef, state_from_arrays(cfg, arrays))
