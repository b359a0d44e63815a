"""Perplexity of a real model, float32 against int8: what int8 costs in quality.

Converts a GGUF (default: the real SmolLM2-135M-Instruct in ../shared) to float32 and to int8
(`convert-weights --quantize int8`), and scores `--text` (default: the model's LICENSE, 2,224
tokens of English) in windows of `--window` tokens, BOS first, every other token scored: the
measure tests/test_int8_real_model.py asserts (int8 within +0.5 %).

    python tools/int8_perplexity.py                     # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama_jax import checkpoint, scoring  # noqa: E402
from llama_jax.convert import convert  # noqa: E402
from llama_jax.tokenizer import load_tokenizer  # noqa: E402

DEFAULT_GGUF = ROOT.parent / "shared" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def windows(ids: list[int], bos: int, size: int) -> list[list[int]]:
    """Consecutive windows of `size - 1` text tokens, each with BOS first (the last, shorter one dropped)."""
    step = size - 1
    return [[bos, *ids[i:i + step]] for i in range(0, len(ids) - step + 1, step)]


def perplexity(model, chunks: list[list[int]]) -> float:
    scores = scoring.score_batch(model, chunks)
    return float(np.exp(-np.mean(np.concatenate([s.logprobs[1:] for s in scores]))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--text", type=Path, default=None, help="default: LICENSE beside the GGUF")
    ap.add_argument("--window", type=int, default=512)
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
    result["int8_vs_float32"] = f"{result['ppl_int8'] / result['ppl_float32'] - 1:+.3%}"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
