"""Perplexity of a real model, float32 against int8: what int8 costs in quality.

Converts a GGUF (default: the real SmolLM2-135M-Instruct in ../shared) to float32 and to int8
(`convert-weights --quantize int8`), and scores `--text` (default: the model's LICENSE, 2,224
tokens of English) in windows of `--window` tokens, BOS first, every other token scored: the
measure tests/test_int8_real_model.py asserts (int8 within +0.5 %).

    python tools/int8_perplexity.py                     # about 2 minutes on 2 CPU cores
    python tools/int8_perplexity.py --schemes           # the design study: other scales, int8 inputs

`--schemes` also scores the float32 model with its weights (and optionally the matmul inputs)
rounded through other int8 schemes in float ("fake quantization", the same arithmetic as
storing them): one scale per output channel or per block of 64 or 32 inputs, and inputs
quantized per row or per block of 32 as an int8 x int8 dot would. It is how the stored scheme
was chosen (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import llama_jax.model  # noqa: E402
from llama_jax import checkpoint, scoring  # noqa: E402
from llama_jax.convert import convert  # noqa: E402
from llama_jax.model import is_quantized, weight_specs  # noqa: E402
from llama_jax.tokenizer import load_tokenizer  # noqa: E402

DEFAULT_GGUF = ROOT.parent / "shared" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def windows(ids: list[int], bos: int, size: int) -> list[list[int]]:
    """Consecutive windows of `size - 1` text tokens, each with BOS first (the last, shorter one dropped)."""
    step = size - 1
    return [[bos, *ids[i:i + step]] for i in range(0, len(ids) - step + 1, step)]


def perplexity(model, chunks: list[list[int]]) -> float:
    scores = scoring.score_batch(model, chunks)
    return float(np.exp(-np.mean(np.concatenate([s.logprobs[1:] for s in scores]))))


def fake_quantize(x, block: int | None):
    """`x` rounded through symmetric int8 with one scale per `block` of its last axis (None: per row)."""
    b = x.shape[-1] if block is None else block
    r = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // b, b)
    s = jnp.max(jnp.abs(r), -1, keepdims=True) / 127
    s = jnp.where(s > 0, s, 1)
    return (jnp.clip(jnp.round(r / s), -127, 127) * s).reshape(x.shape).astype(x.dtype)


def schemes(f32, chunks: list[list[int]]) -> dict:
    """Perplexity with weights, and optionally matmul inputs, rounded through other schemes."""
    plain = llama_jax.model.linear
    cfg = f32.cfg.replace(quantization="int8")
    matrices = {p for p, spec in weight_specs(cfg).items() if is_quantized(cfg, spec)}
    out = {}
    for weights, inputs in [(None, None), (64, None), (32, None), (None, "row"), (32, "row"), (32, 32)]:
        flat = nnx.to_flat_state(f32.params)  # the matrices the int8 scheme stores; norms stay float
        params = nnx.from_flat_state({p: v.replace(fake_quantize(v.get_value(), weights)) if p in matrices else v
                                      for p, v in flat})
        block = None if inputs == "row" else inputs
        llama_jax.model.linear = plain if inputs is None else (  # the matmul inputs rounded too
            lambda x, w, out_dtype=None, b=block: plain(fake_quantize(x, b), w, out_dtype))
        jax.clear_caches()
        try:
            ppl = perplexity(nnx.merge(f32.graphdef, params), chunks)
        finally:
            llama_jax.model.linear = plain
        out[f"weights {'per channel' if weights is None else f'blocks of {weights}'}, "
            f"inputs {'float' if inputs is None else 'per row' if inputs == 'row' else f'blocks of {inputs}'}"] = round(ppl, 4)
    jax.clear_caches()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--text", type=Path, default=None, help="default: LICENSE beside the GGUF")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--schemes", action="store_true", help="also score other int8 schemes, in float (see above)")
    args = ap.parse_args()
    text = args.text or args.gguf.parent / "LICENSE"
    result: dict = {"gguf": str(args.gguf), "text": str(text)}
    with tempfile.TemporaryDirectory() as tmp:
        convert(args.gguf, Path(tmp) / "float32", dtype="float32", progress=False)
        convert(args.gguf, Path(tmp) / "int8", quantization="int8", progress=False)
        f32 = checkpoint.load(Path(tmp) / "float32")
        chunks = windows(load_tokenizer(f32.tokenizer_path).encode(text.read_text()), f32.cfg.bos_id, args.window)
        result["tokens_scored"] = sum(len(c) - 1 for c in chunks)
        result["ppl_float32"] = round(perplexity(f32.model, chunks), 4)
        result["ppl_int8"] = round(perplexity(checkpoint.load(Path(tmp) / "int8").model, chunks), 4)
        if args.schemes:
            result["schemes"] = {k: f"{v} ({v / result['ppl_float32'] - 1:+.2%})" for k, v in schemes(f32, chunks).items()}
    result["int8_vs_float32"] = f"{result['ppl_int8'] / result['ppl_float32'] - 1:+.3%}"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
