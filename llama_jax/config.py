"""Configuration, one frozen dataclass per concern: the model's (`LlamaConfig`, presets for Llama 2
and tiny test shapes, the reader for Hugging Face `config.json` files, transformers v4 and v5
spellings) and the serving engine's (`EngineConfig`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_jax.speculative import SpeculativeConfig

if TYPE_CHECKING:
    from llama_jax.attention import AttentionConfig
    from llama_jax.platform import Platform

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("int8",)  # weight formats besides the model dtype (llama_jax/quantize.py)


class UnsupportedModelError(ValueError):
    """A checkpoint uses a feature this implementation does not have (it would give wrong logits)."""


ROPE_SCALINGS = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-frequency scaling as transformers implements it: `linear` divides every frequency by
    `factor`; `llama3` (Llama 3.1+) divides only the low frequencies, blending in between."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALINGS:
            raise UnsupportedModelError(f"rope_scaling type {self.kind!r} is not implemented (only {ROPE_SCALINGS})")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-architecture model (`LlamaForCausalLM`). `dtype` is the dtype of
    the weights and activations; `head_dim` 0 means `dim // n_heads`; with `tie_embeddings` the
    embedding table is also the LM head (one matrix, stored and sharded once)."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    dtype: str = "bfloat16"
    bos_id: int = 1
    eos_id: int = 2
    quantization: str | None = None  # "int8": matrices stored as int8 with per-channel scales (quantize.py)
    head_dim: int = 0  # 0: dim // n_heads (Llama 2); set when a checkpoint says otherwise
    tie_embeddings: bool = False
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        if not self.head_dim:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if isinstance(self.rope_scaling, dict):  # from JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {self.quantization!r}")

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with `changes`; a derived head_dim follows a new dim or head count."""
        if "head_dim" not in changes and self.head_dim * self.n_heads == self.dim:
            changes["head_dim"] = 0
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        """The fields as JSON; the newer ones only when they differ from Llama 2's, so Llama 2
        configs read as before (also by older readers)."""
        fields = dataclasses.asdict(self)
        defaults = {"quantization": None, "tie_embeddings": False, "rope_scaling": None}
        for name, default in defaults.items():
            if fields[name] == default:
                del fields[name]
        if fields["head_dim"] == self.dim // self.n_heads:
            del fields["head_dim"]
        return json.dumps(fields, indent=2)

    @classmethod
    def from_json(cls, text: str) -> LlamaConfig:
        return cls(**json.loads(text))

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` transformers writes for this model (v4 keys, which v5 also reads)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "hidden_act": "silu",
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": _hf_rope_scaling(self.rope_scaling),
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": self.dtype,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "pad_token_id": None,
        }


def _hf_rope_scaling(scaling: RopeScaling | None) -> dict[str, Any] | None:
    """`rope_scaling` as transformers' config.json spells it."""
    if scaling is None:
        return None
    if scaling.kind == "linear":
        return {"rope_type": "linear", "factor": scaling.factor}
    return {"rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_len}


def _rope_scaling(spec: dict[str, Any] | None) -> RopeScaling | None:
    """A transformers `rope_scaling` (v4) or `rope_parameters` (v5) dict as a RopeScaling (None: plain RoPE)."""
    kind = (spec or {}).get("rope_type") or (spec or {}).get("type") or "default"
    if kind == "default":
        return None
    if kind not in ROPE_SCALINGS:
        raise UnsupportedModelError(f"rope_scaling: type {kind!r} is not implemented (only {ROPE_SCALINGS} and plain RoPE)")
    if kind == "linear":
        return RopeScaling("linear", float(spec["factor"]))
    return RopeScaling("llama3", float(spec["factor"]), float(spec.get("low_freq_factor", 1.0)),
                       float(spec.get("high_freq_factor", 4.0)), int(spec.get("original_max_position_embeddings", 8192)))


# Fields of config.json that change the math and that this implementation does not have.
_UNSUPPORTED_FLAGS = {
    "attention_bias": "attention_bias=true (biases on q/k/v/o)",
    "mlp_bias": "mlp_bias=true (biases on the MLP)",
    "sliding_window": "sliding_window (sliding-window attention)",
    "use_sliding_window": "use_sliding_window (sliding-window attention)",
    "num_local_experts": "num_local_experts (mixture of experts)",
    "num_experts": "num_experts (mixture of experts)",
}


PRESETS: dict[str, LlamaConfig] = {
    "llama-2-7b": LlamaConfig(),
    "llama-2-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824),
    "llama-2-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    # Tiny random-weight shapes for tests: real Llama 2 vocabulary, multi-head and grouped-query.
    "tiny-mha": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=160, max_seq_len=256, dtype="float32"),
    "tiny-gqa": LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=160, max_seq_len=256, dtype="float32"),
    # Llama 3.x's additions at the tiny shape: tied embeddings, head_dim != dim / heads, llama3 RoPE.
    "tiny-llama3": LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=160, max_seq_len=256,
                               dtype="float32", head_dim=16, tie_embeddings=True, rope_theta=5e5,
                               rope_scaling=RopeScaling("llama3", 4.0, 1.0, 4.0, original_max_len=64)),
    # The built-in demo model and the CPU benchmark shape (issue: ~21 tok/s for HF at batch 1 here).
    "demo": LlamaConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=688, max_seq_len=4096, dtype="float32"),
    "cpu-bench": LlamaConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048, dtype="float32"),
}


def preset(name: str) -> LlamaConfig:
    """Look up a preset by name, with a helpful error listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def from_hf_config(config: dict[str, Any] | str | Path, dtype: str | None = None) -> LlamaConfig:
    """Build a LlamaConfig from a transformers `config.json` (a dict or a path).

    Accepts v4 (`rope_theta`, `torch_dtype`) and v5 (`rope_parameters`, `dtype`) spellings and
    refuses, with UnsupportedModelError, anything that would change the math we implement.
    """
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    c = config
    arch = c.get("architectures") or []
    if c.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
        raise UnsupportedModelError(
            f"unsupported architecture {arch or c.get('model_type')!r}: only LlamaForCausalLM (model_type 'llama') is implemented"
        )
    if arch and arch != ["LlamaForCausalLM"]:
        raise UnsupportedModelError(f"unsupported architecture {arch!r}: only LlamaForCausalLM is implemented")

    rope_theta = c.get("rope_theta", 10000.0)
    rope_params = c.get("rope_parameters")
    rope_scaling = c.get("rope_scaling")
    if isinstance(rope_params, dict):  # transformers v5
        rope_theta = rope_params.get("rope_theta", rope_theta)
        rope_scaling = rope_params
    for flag, what in _UNSUPPORTED_FLAGS.items():
        if c.get(flag):
            raise UnsupportedModelError(f"config.json: {what} is not implemented")
    if c.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"config.json: hidden_act {c['hidden_act']!r} is not implemented (Llama uses silu)")
    if c.get("pretraining_tp", 1) not in (1, None):
        raise UnsupportedModelError("config.json: pretraining_tp > 1 is not implemented")
    n_heads = c["num_attention_heads"]
    src_dtype = c.get("dtype") or c.get("torch_dtype") or "float32"
    eos = c.get("eos_token_id", 2)
    return LlamaConfig(
        vocab_size=c["vocab_size"],
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads,
        ffn_dim=c["intermediate_size"],
        norm_eps=c.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope_theta),
        max_seq_len=c.get("max_position_embeddings", 4096),
        dtype=dtype or str(src_dtype).removeprefix("torch."),
        bos_id=c.get("bos_token_id", 1) if c.get("bos_token_id") is not None else 1,
        eos_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
        head_dim=c.get("head_dim") or 0,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        rope_scaling=_rope_scaling(rope_scaling),
    )


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Serving shape: slots, context, buckets and queue. Everything here fixes a compiled shape."""

    max_slots: int = 8
    max_seq_len: int | None = None  # default: the model's context (4096 for Llama 2)
    min_prefill_bucket: int = 16
    max_prefill_tokens: int = 512  # queued prompts are prefilled together up to rows x bucket tokens
    max_queue: int = 64
    compilation_cache_dir: str | None = None  # JAX's persistent cache: restarts skip compiling
    compile_threads: int | None = None  # programs compiled at once at warm-up (default: the CPU count)
    attention: AttentionConfig | None = None  # default: the fast choice for the platform
    branch_free_sampler: bool | None = None  # default: on for accelerators, off on CPU
    split_layers: bool | None = None  # weights one buffer per layer or stacked; default `layers.split_layers`
    prefix_cache: bool = True  # reuse the keys of prompt prefixes the slots still hold (see prefix_cache.py)
    platform: Platform | None = None  # what the programs are built for (default: the host's devices; plan: a target)
    speculative: SpeculativeConfig = SpeculativeConfig()  # prompt-lookup drafts (off: tokens 0, no programs)
    mask_upload: str | None = None  # grammar masks: "batch" or "rows" (default: batch on a CPU): step_masks.py
