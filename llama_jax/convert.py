"""`convert-weights`: a Hugging Face Llama checkpoint or a GGUF file → a converted orbax checkpoint
(see checkpoint.py), self-contained: the tokenizer and chat template are written beside the weights.

    convert-weights HF_DIR|MODEL.gguf OUT_DIR [--dtype bfloat16|float16|float32] [--quantize int8] [--force] [--quiet]

`--quantize int8` stores every matrix as int8 with one float32 scale per block of 32 inputs (see
quantize.py), computed from the source's values in float32 (a GGUF's Q8_0 tensors are taken as
they are): about 28 % of float32's bytes.

Reads tensor by tensor (memory: about one decoder layer), writes under a temporary name renamed
at the end. Errors are one line on stderr, `convert-weights: error: …`, exit code 1 for bad input
and 2 for bad usage; nothing is left behind on failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from llama_jax import checkpoint, quantize
from llama_jax.config import DTYPES, QUANTIZATIONS, LlamaConfig, UnsupportedModelError, from_hf_config
from llama_jax.hf_checkpoint import (
    INDEX_FILE,
    NUMPY_DTYPES,
    CheckpointError,
    check_tensors,
    iter_weights,
    tensor_index,
)
from llama_jax.model import Tensor, is_quantized, weight_specs

PROG = "convert-weights"


class ConvertError(CheckpointError):
    """Bad input for the converter (reported as one line, exit code 1)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert a Hugging Face Llama checkpoint (config.json, *.safetensors, tokenizer) or a GGUF "
        "file (llama.cpp's format, dequantized) into a llama-jax checkpoint: sharded orbax parameters that load "
        "straight onto a device mesh, with the tokenizer and chat template beside them.",
        epilog="Example: convert-weights ~/models/Llama-2-7b-chat-hf ~/models/llama-2-7b-chat-jax. "
        "Memory use stays near one decoder layer; OUT_DIR appears only when the conversion is complete.",
    )
    p.add_argument("source", metavar="HF_DIR|MODEL.gguf", help="Hugging Face checkpoint directory (safetensors) "
                   "or a GGUF file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to create")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="parameter dtype to store (default: the checkpoint's own, e.g. float16 for Llama-2-7b-chat-hf; "
        "float32 for a quantized GGUF)",
    )
    p.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default=None,
        help="store every matrix (embedding and LM head included) as int8 with one float32 scale per block of "
        "32 inputs (llama.cpp's Q8_0 layout; symmetric, round to nearest); norms stay in --dtype. About 28%% of "
        "float32's size; `serve` and `checkpoint.load` read it with no flag",
    )
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary line (errors still print)")
    return p


def _read_hf_config(hf_dir: Path) -> dict:
    file = hf_dir / "config.json"
    if not file.is_file():
        raise ConvertError(f"no config.json in {hf_dir} (is this a Hugging Face model directory?)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ConvertError(f"{file} does not hold a JSON object")
    return config


def _check_index(hf_dir: Path) -> None:
    """If the sharded-checkpoint index exists, every file it names must be present."""
    file = hf_dir / INDEX_FILE
    if not file.exists():
        return
    try:
        weight_map = json.loads(file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConvertError(f"{file} is not a valid safetensors index: {e}") from e
    missing = sorted({f for f in weight_map.values() if not (hf_dir / f).is_file()})
    if missing:
        raise ConvertError(f"{INDEX_FILE} lists {', '.join(missing)}, not found in {hf_dir} (incomplete download?)")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def stored_bytes(cfg: LlamaConfig) -> int:
    """About how many bytes the converted parameters take (int8 matrices: one byte a weight plus scales)."""
    itemsize = np.dtype(NUMPY_DTYPES[cfg.dtype]).itemsize
    total = 0
    for spec in weight_specs(cfg).values():
        n = int(np.prod(spec.shape))
        total += n + 4 * int(np.prod(quantize.scale_shape(spec.shape))) if is_quantized(cfg, spec) else n * itemsize
    return total


def quantized_weights(cfg: LlamaConfig, weights):
    """(tensor, array) pairs with every matrix quantized on the host (`quantize.quantize_np`; one
    the source already gives as int8, e.g. a GGUF Q8_0 tensor, as it is) and norms cast to the
    model dtype: one tensor in memory at a time."""
    specs = weight_specs(cfg)
    for tensor, array in weights:
        if quantize.is_int8(array):
            yield tensor, array
        elif is_quantized(cfg, specs[tensor.path]):
            yield tensor, quantize.Int8Weight(*quantize.quantize_np(array))
        else:
            yield tensor, np.ascontiguousarray(array.astype(NUMPY_DTYPES[cfg.dtype]))


HF_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja", "chat_template.json")


@dataclasses.dataclass(frozen=True)
class Source:
    """A checkpoint to convert: its config, its weights (one tensor at a time), the tokenizer and
    chat-template files to write beside them, and its generation config."""

    cfg: LlamaConfig
    # (dtype, keep_int8) -> (tensor, array) pairs; keep_int8: int8 tensors (GGUF Q8_0) as Int8Weight
    weights: Callable[[str | None, bool], Iterator[tuple[Tensor, np.ndarray | quantize.Int8Weight]]]
    write_tokenizer: Callable[[Path], list[str]]  # (dir) -> names of the files written there
    generation_config: dict | None
    path: Path


def hf_source(hf_dir: Path, dtype: str | None) -> Source:
    """A Hugging Face checkpoint directory, every tensor and its shape checked before any write."""
    hf_config = _read_hf_config(hf_dir)
    try:
        cfg = from_hf_config(hf_config, dtype=dtype)
    except KeyError as e:
        raise ConvertError(f"config.json lacks required field {e}") from e
    except TypeError as e:
        raise ConvertError(f"config.json has a field of the wrong type: {e}") from e
    except ValueError as e:  # UnsupportedModelError, or an inconsistent/unknown dtype or shape
        if isinstance(e, UnsupportedModelError):
            raise
        raise ConvertError(f"config.json: {e}") from e
    _check_index(hf_dir)
    check_tensors(cfg, tensor_index(hf_dir))  # missing, extra, misshapen, unreadable: before any write
    files = [hf_dir / name for name in HF_TOKENIZER_FILES if (hf_dir / name).is_file()]
    if not any(f.name in checkpoint.TOKENIZER_FILES for f in files):
        print(f"{PROG}: warning: no tokenizer.model or tokenizer.json in {hf_dir}; the converted model will need "
              "one given separately", file=sys.stderr)

    def write_tokenizer(out: Path) -> list[str]:
        for f in files:
            shutil.copyfile(f, out / f.name)
        return [f.name for f in files]

    gen_file = hf_dir / "generation_config.json"
    generation_config = None
    if gen_file.is_file():
        try:
            generation_config = json.loads(gen_file.read_text())
        except json.JSONDecodeError as e:
            raise ConvertError(f"{gen_file} is not valid JSON: {e}") from e
    return Source(cfg, lambda dt, _keep_int8: iter_weights(hf_dir, cfg, dtype=dt), write_tokenizer, generation_config, hf_dir)


def gguf_source(file: Path, dtype: str | None) -> Source:
    """A GGUF file: config and tokenizer from its metadata, weights dequantized tensor by tensor."""
    from llama_jax import gguf_checkpoint, gguf_vocab

    reader = gguf_checkpoint.open_reader(file)
    try:
        cfg = gguf_checkpoint.read_config(reader, dtype)
    except (TypeError, ValueError) as e:
        if isinstance(e, UnsupportedModelError):
            raise
        raise ConvertError(f"{file}: bad metadata: {e}") from e
    gguf_checkpoint.check_tensors(reader, cfg)
    eos = gguf_checkpoint.metadata(reader, "tokenizer.ggml.eos_token_id")
    generation_config = {"bos_token_id": cfg.bos_id, "eos_token_id": eos if eos is not None else cfg.eos_id}
    return Source(cfg, lambda dt, keep_int8: gguf_checkpoint.iter_weights(reader, cfg, dt, keep_int8),
                  lambda out: gguf_vocab.write_tokenizer_files(reader, out), generation_config, file)


def model_name(src: Path) -> str:
    """A model's own name from its file or directory: a GGUF's quantization suffix dropped
    (SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct)."""
    return re.sub(r"[.-](q\d\w*|iq\d\w*|f16|f32|bf16)$", "", src.name.removesuffix(".gguf"), flags=re.IGNORECASE)


def open_source(src: str | Path, dtype: str | None = None) -> Source:
    """A GGUF file or a Hugging Face checkpoint directory, validated up front."""
    from llama_jax.gguf_checkpoint import is_gguf

    src = Path(src)
    if is_gguf(src):
        return gguf_source(src, dtype)
    if src.is_file():
        raise ConvertError(f"{src} is neither a GGUF file nor a directory")
    if not src.is_dir():
        raise ConvertError(f"{src} is not a directory")
    return hf_source(src, dtype)


def convert(src: str | Path, out_dir: str | Path, *, dtype: str | None = None, quantization: str | None = None,
            force: bool = False, progress: bool = True) -> dict:
    """Validate everything that can be checked up front, then stream the weights into `out_dir`.
    `src` is a Hugging Face checkpoint directory or a GGUF file."""
    src, out = Path(src), Path(out_dir)
    if not src.exists():
        raise ConvertError(f"{src} does not exist")
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists (pass --force to replace it)")
    if out.exists() and (out.resolve() == src.resolve() or out.resolve() in src.resolve().parents):
        raise ConvertError(f"refusing to replace {out}: it holds the input checkpoint {src}")
    source = open_source(src, dtype)
    cfg = source.cfg if quantization is None else source.cfg.replace(quantization=quantization)

    total = stored_bytes(cfg)
    parent = out.absolute().parent
    probe = parent if parent.exists() else next(p for p in parent.parents if p.exists())
    free = shutil.disk_usage(probe).free
    if free < total * 1.02:
        raise ConvertError(f"not enough disk space under {probe}: need about {_human(total)}, {_human(free)} free")

    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
                   file=sys.stderr, dynamic_ncols=True)

    def on_tensor(tensor, array: np.ndarray) -> None:
        if bar is not None:
            bar.set_postfix_str(tensor.hf_name, refresh=False)
            bar.update(array.nbytes)

    if cfg.quantization is None:
        weights = source.weights(None, False)
    else:  # scales from the source's values, read as float32; int8 ones (GGUF Q8_0) as they are
        weights = quantized_weights(cfg, source.weights("float32", True))
    try:
        manifest = checkpoint.save(
            out,
            cfg,
            weights,
            write_tokenizer=source.write_tokenizer,
            generation_config=source.generation_config,
            source=str(source.path.resolve()),
            name=model_name(source.path),
            force=force,
            on_tensor=on_tensor,
        )
    finally:
        if bar is not None:
            bar.close()
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, message already printed)
        return int(e.code or 0)
    start = time.time()
    try:
        manifest = convert(args.source, args.out_dir, dtype=args.dtype, quantization=args.quantize, force=args.force,
                           progress=not args.quiet)
    except (CheckpointError, UnsupportedModelError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions, …: the temporary directory is already gone
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written to {args.out_dir}", file=sys.stderr)
        return 130
    if not args.quiet:
        print(
            f"{PROG}: {args.source} -> {args.out_dir}: {_count(manifest['param_count'])} parameters, "
            f"{manifest['dtype']}{' with int8 matrices' if manifest.get('quantization') else ''}, "
            f"{_human(manifest['bytes'])}, {time.time() - start:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
