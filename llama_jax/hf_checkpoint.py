"""Hugging Face Llama checkpoints on disk: read them tensor by tensor, and write random tiny ones.

The layout is transformers': `config.json`, `*.safetensors` (sharded, with
`model.safetensors.index.json`) and `tokenizer.model`. Names and shapes come from
`model.weight_specs`, the single description of every weight; `model.tensors` lists them one HF
tensor (one layer of a stacked weight) at a time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from llama_jax.config import LlamaConfig, from_hf_config
from llama_jax.model import Llama, Tensor, abstract_model, tensors, weight_specs

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing something, or holds tensors that do not fit the config."""


def safetensors_files(hf_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, with a clear error for missing or PyTorch-only weights."""
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        return files
    if list(hf_dir.glob("*.bin")) or list(hf_dir.glob("*.pt")) or list(hf_dir.glob("*.pth")):
        raise CheckpointError(
            f"{hf_dir} holds only PyTorch weight files (*.bin/*.pt); download the safetensors version "
            "(e.g. `huggingface-cli download meta-llama/Llama-2-7b-chat-hf --include '*.safetensors'`) "
            "or convert them with transformers: `LlamaForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`"
        )
    raise CheckpointError(f"no *.safetensors weight files in {hf_dir}")


def tensor_index(hf_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the file that holds it (reads headers only)."""
    index: dict[str, Path] = {}
    for file in safetensors_files(hf_dir):
        try:
            with safe_open(file, framework="numpy") as f:
                names = list(f.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {file.name}: {e} (truncated or corrupt download?)") from e
        for name in names:
            index[name] = file
    return index


def check_names(expected: Iterable[str], present: Iterable[str], ignorable: Iterable[str] = (),
                what: str = "tensors") -> None:
    """CheckpointError naming (up to five of) the missing, then the unexpected, tensor names."""
    expected, present = set(expected), set(present)
    for problem, names in (("missing", expected - present), ("unexpected", present - expected - set(ignorable))):
        if names:
            names = sorted(names)
            raise CheckpointError(f"{problem} {what}: {', '.join(names[:5])}{' …' if len(names) > 5 else ''}")


def check_tensors(cfg: LlamaConfig, index: dict[str, Path]) -> None:
    """Fail, before any work, on missing, unexpected or misshapen tensors."""
    expected = {t.hf_name: t for t in tensors(cfg)}
    ignorable = {n for n in index if n.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:  # some tied checkpoints still store the head: a copy of the table
        ignorable.add("lm_head.weight")
    check_names(expected, index, ignorable)
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(index[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="numpy") as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                want = expected[name].shape
                if shape != want:
                    raise CheckpointError(f"tensor {name} has shape {shape}, expected {want} for this config")


def iter_weights(hf_dir: Path, cfg: LlamaConfig, dtype: str | None = None) -> Iterator[tuple[Tensor, np.ndarray]]:
    """Yield (tensor, array in our layout and `dtype`) one HF tensor at a time: bounded memory."""
    index = tensor_index(hf_dir)
    check_tensors(cfg, index)
    np_dtype = NUMPY_DTYPES[dtype or cfg.dtype]
    for tensor in tensors(cfg):
        with safe_open(index[tensor.hf_name], framework="numpy") as f:
            try:
                array = f.get_tensor(tensor.hf_name)
            except Exception as e:
                raise CheckpointError(f"cannot read tensor {tensor.hf_name}: {e} (truncated file?)") from e
        yield tensor, np.ascontiguousarray(array.astype(np_dtype))


def stack_weights(cfg: LlamaConfig, weights: Iterator[tuple[Tensor, np.ndarray]]) -> dict[tuple, np.ndarray]:
    """{state path: array} with each stacked weight assembled from its per-layer tensors (host memory)."""
    arrays: dict[tuple, np.ndarray] = {}
    for tensor, array in weights:
        if tensor.layer is None:
            arrays[tensor.path] = array
        else:
            stacked = arrays.setdefault(tensor.path, np.empty((cfg.n_layers, *array.shape), array.dtype))
            stacked[tensor.layer] = array
    return arrays


def load_hf_model(hf_dir: str | Path, dtype: str | None = None) -> Llama:
    """Load an HF Llama checkpoint into our NNX model on the default device (tests, notebooks)."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").exists():
        raise CheckpointError(f"no config.json in {hf_dir}")
    cfg = from_hf_config(hf_dir / "config.json", dtype=dtype)
    graphdef, _ = nnx.split(abstract_model(cfg))
    arrays = {path: jnp.asarray(a) for path, a in stack_weights(cfg, iter_weights(hf_dir, cfg)).items()}
    return nnx.merge(graphdef, state_from_arrays(cfg, arrays))


def _random_weight(tensor: Tensor, rng: np.random.Generator) -> np.ndarray:
    """Random weights in HF layout, scaled so activations stay O(1) and logits are far from uniform."""
    shape = tensor.shape
    if len(shape) == 1:  # norm weights near one
        return 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
    if tensor.hf_name == "model.embed_tokens.weight":
        return rng.standard_normal(shape, np.float32)
    fan_in = shape[1]
    scale = 4.0 if tensor.hf_name == "lm_head.weight" else 1.0  # logits with std ~4: peaked distributions
    return rng.standard_normal(shape, np.float32) * np.float32(scale / np.sqrt(fan_in))


def write_tiny_checkpoint(
    out_dir: str | Path,
    cfg: LlamaConfig,
    *,
    seed: int = 0,
    tokenizer_path: str | Path | None = None,
    shard_bytes: int = 2**30,
) -> Path:
    """Write a random-weight Llama in HF layout (no torch needed), deterministic from `seed`.

    Tensors are generated and written one shard at a time, so even the 7B shape needs only
    about one shard of memory. Returns the directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = NUMPY_DTYPES[cfg.dtype]
    specs = list(tensors(cfg))
    sizes = [int(np.prod(s.shape)) * np.dtype(np_dtype).itemsize for s in specs]
    shards: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if shards[-1] and total + size > shard_bytes:
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += size
    weight_map = {}
    for k, members in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        shard = {}
        for i in members:
            rng = np.random.default_rng([seed, i])  # per tensor: independent of the sharding
            shard[specs[i].hf_name] = _random_weight(specs[i], rng).astype(np_dtype)
            weight_map[specs[i].hf_name] = name
        save_file(shard, str(out / name), metadata={"format": "pt"})
        del shard
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "do_sample": False}, indent=2)
    )
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    return out


def param_count(cfg: LlamaConfig) -> int:
    """Number of parameters of a model with this config."""
    return sum(int(np.prod(s.shape)) for s in weight_specs(cfg).values())


def state_from_arrays(cfg: LlamaConfig, arrays: dict[tuple, jax.Array]) -> nnx.State:
    """Assemble an NNX parameter State from a {path: array} dict (e.g. from a checkpoint restore)."""
    _, state = nnx.split(abstract_model(cfg))
    flat = dict(nnx.to_flat_state(state))
    return nnx.from_flat_state({p: v.replace(arrays[p]) for p, v in flat.items()})
