"""`tools/bench_engine.py --gguf FILE`: llama-jax (float32, int8) and llama.cpp (F32, Q8_0) on the
same real model, side by side in one run (see bench_engine's docstring)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_cpp_peer  # noqa: E402

from llama_jax import checkpoint, scoring  # noqa: E402
from llama_jax.convert import convert  # noqa: E402
from llama_jax.tokenizer import load_tokenizer  # noqa: E402

ROWS = ("decode tok/s, batch 1", "aggregate tok/s, 8 concurrent", "TTFT ms, 128 tokens", "TTFT ms, 1024 tokens",
        "perplexity")


def chunk_perplexity(model, ids: list[int], ctx: int, bos: int) -> float:
    """Perplexity as llama-perplexity computes it: chunks of `ctx` tokens with BOS in the first
    place, each chunk's second half scored."""
    chunks = [[bos, *ids[i + 1:i + ctx]] for i in range(0, len(ids) - ctx + 1, ctx)]
    first = ctx // 2
    scores = scoring.score_batch(model, chunks)
    return float(np.exp(-np.mean(np.concatenate([s.logprobs[first + 1:] for s in scores]))))


def ours(path: Path, args, bench_engine: Callable, ids: list[int]) -> dict:
    loaded = checkpoint.load(path)
    result = bench_engine(loaded.model, args, load_tokenizer(loaded.tokenizer_path))
    print(json.dumps(result), file=sys.stderr, flush=True)
    return {ROWS[0]: result["batch1_decode_tok_s"], ROWS[1]: result["aggregate_tok_s_8"],
            ROWS[2]: result["ttft_ms_128"], ROWS[3]: result["ttft_ms_1024"],
            ROWS[4]: chunk_perplexity(loaded.model, ids, args.ppl_ctx, loaded.cfg.bos_id), "warmup_s": result["warmup_s"]}


def peer(gguf: Path, args, ids_for: Callable[[int], list[list[int]]], text: Path) -> dict:
    """llama.cpp on `gguf`, each measure at its best of 1 and all threads."""
    build = Path(args.llama_cpp)
    out: dict = {}
    for threads in sorted({1, os.cpu_count() or 1}):  # its thread pool spin-waits: on a busy box 1 thread can win
        speed = llama_cpp_peer.bench(build, gguf, threads, args.decode_tokens, (128, 1024))
        aggregate = llama_cpp_peer.server_aggregate(build, gguf, threads, ids_for(8), args.decode_tokens)
        print(f"llama.cpp {gguf.name} t={threads}: {speed}, aggregate {aggregate:.1f}", file=sys.stderr, flush=True)
        candidates = {ROWS[0]: speed["decode_tok_s"], ROWS[1]: aggregate,
                      ROWS[2]: -1000 * 128 / speed["prompt_tok_s_128"], ROWS[3]: -1000 * 1024 / speed["prompt_tok_s_1024"]}
        for key, value in candidates.items():  # TTFT negated: the best is the largest everywhere
            out[key] = max(out.get(key, -np.inf), value)
    for key in ROWS[2:4]:
        out[key] = -out[key]
    out[ROWS[4]] = llama_cpp_peer.perplexity(build, gguf, text, os.cpu_count() or 1, args.ppl_ctx)
    return out


def table(columns: dict[str, dict]) -> str:
    names = list(columns)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in ROWS:
        cells = [columns[n].get(row) for n in names]
        lines.append(f"| {row} | " + " | ".join("" if c is None else f"{c:.4g}" if row == ROWS[4] else f"{c:.1f}"
                                               for c in cells) + " |")
    return "\n".join(lines)


def bench_gguf(args, bench_engine: Callable) -> dict:
    text = args.text or args.gguf.parent / "LICENSE"
    rng = np.random.default_rng(0)
    columns: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        convert(args.gguf, tmp / "float32", dtype="float32", progress=False)
        convert(args.gguf, tmp / "int8", quantization="int8", progress=False)
        tokenizer = load_tokenizer(checkpoint.load(tmp / "float32").tokenizer_path)
        ids = tokenizer.encode(text.read_text())
        columns["llama-jax float32"] = ours(tmp / "float32", args, bench_engine, ids)
        columns["llama-jax int8"] = ours(tmp / "int8", args, bench_engine, ids)
        if args.llama_cpp:
            vocab = tokenizer.vocab_size
            ids_for = lambda n: [[int(t) for t in rng.integers(3, vocab, args.context)] for _ in range(n)]
            for kind in ("F32", "Q8_0"):
                gguf = llama_cpp_peer.requantize(Path(args.llama_cpp), args.gguf, tmp / f"model-{kind}.gguf", kind)
                columns[f"llama.cpp {kind}"] = peer(gguf, args, ids_for, text)
    print(table(columns), file=sys.stderr)
    pairs = [("llama-jax float32", "llama.cpp F32"), ("llama-jax int8", "llama.cpp Q8_0")]
    ratios = {f"{a} / {b}: {row}": round(columns[a][row] / columns[b][row], 3)
              for a, b in pairs if b in columns for row in ROWS}
    return {"gguf": str(args.gguf), "text": str(text), "columns": columns, "ratios": ratios, "table": table(columns)}
