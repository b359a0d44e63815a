"""Benchmark the serving engine against Hugging Face transformers on the same random weights.

Reports batch-1 decode tok/s, TTFT at prompt 128 and 1024, aggregate tok/s at several
concurrency levels, and (same run, same weights) HF `generate` at batch 1 and 8.

    python tools/bench_engine.py                        # CPU shape from the issue, with HF
    python tools/bench_engine.py --preset llama-2-7b --dtype bfloat16 --no-hf --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_jax.config import preset  # noqa: E402
from llama_jax.engine import Engine, EngineConfig  # noqa: E402
from llama_jax.hf_checkpoint import load_hf_model, write_tiny_checkpoint  # noqa: E402
from llama_jax.model import init_model  # noqa: E402
from llama_jax.request import Request, SamplingOptions  # noqa: E402
from llama_jax.tokenizer import Tokenizer  # noqa: E402

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "llama2-tokenizer" / "tokenizer.model"


def prompt(rng: np.random.Generator, n: int) -> list[int]:
    return [1, *rng.integers(3, 32000, n - 1).tolist()]


def run_concurrent(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    """Submit all prompts at once (greedy, EOS ignored); returns (wall seconds, tokens generated)."""
    start = time.perf_counter()
    handles = [engine.submit(Request(prompt=p, max_tokens=max_tokens, stop_token_ids=[],
                                     sampling=SamplingOptions(temperature=0))) for p in prompts]
    tokens = sum(h.result().completion_tokens for h in handles)
    return time.perf_counter() - start, tokens


def ttft(engine: Engine, p: list[int]) -> float:
    start = time.perf_counter()
    handle = engine.submit(Request(prompt=p, max_tokens=1, stop_token_ids=[]))
    next(iter(handle))
    elapsed = time.perf_counter() - start
    handle.result()
    return elapsed


def bench_engine(model, args) -> dict:
    rng = np.random.default_rng(0)
    cfg = EngineConfig(max_slots=max(args.concurrency), max_seq_len=args.max_seq_len,
                       compilation_cache_dir=args.compilation_cache)
    engine = Engine(model, Tokenizer(args.tokenizer), cfg)
    t0 = time.perf_counter()
    engine.start(progress=lambda done, total, what: print(
        f"warm-up {done}/{total}: {what} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True))
    out = {"warmup_s": round(time.perf_counter() - t0, 1), "slots": cfg.max_slots}
    try:
        wall, n = run_concurrent(engine, [prompt(rng, 32)], args.decode_tokens)
        first = ttft(engine, prompt(rng, 32))
        out["batch1_decode_tok_s"] = round((n - 1) / (wall - first), 2)
        for length in (128, 1024):
            if length < args.max_seq_len:
                out[f"ttft_ms_{length}"] = round(1000 * statistics.median(ttft(engine, prompt(rng, length)) for _ in range(5)), 1)
        for c in args.concurrency:
            wall, n = run_concurrent(engine, [prompt(rng, args.context) for _ in range(c)], args.decode_tokens)
            out[f"aggregate_tok_s_{c}"] = round(n / wall, 2)
    finally:
        engine.stop()
    return out


def bench_window(model, slots: int = 8, context: int = 128, iters: int = 40) -> dict:
    """One generate step at a 128-token context, with max_seq_len 4096 vs 256: decode reads each
    row's keys up to its length, so the context (not the cache size) should set the cost. The two
    are timed alternately, so drift in the machine's speed hits both alike."""
    from llama_jax import kv_cache
    from llama_jax.engine import Programs, init_decode_state
    from llama_jax.model import storage_params

    graphdef, params = nnx.split(model)
    split = kv_cache.split_layers()
    params = storage_params(model.cfg, params, split)
    allowed = jnp.ones((slots, model.cfg.vocab_size), bool)
    states, programs, samples = {}, {}, {256: [], 4096: []}
    for max_len in samples:
        config = EngineConfig(max_slots=slots, max_seq_len=max_len)
        programs[max_len] = Programs.build(graphdef, model.cfg, config, None).generate
        state = init_decode_state(model.cfg, slots, max_len, split=split)
        states[max_len] = dataclasses.replace(state, cache=state.cache.replace(lengths=state.cache.lengths + context))
    for i in range(iters + 3):
        for max_len in samples:
            start = time.perf_counter()
            states[max_len], result = programs[max_len](params, states[max_len], allowed, rows=slots)
            result.tokens.block_until_ready()
            if i >= 3:  # the first calls compile and warm the caches
                samples[max_len].append(time.perf_counter() - start)
            states[max_len] = dataclasses.replace(  # stay at the same context
                states[max_len], cache=states[max_len].cache.replace(lengths=states[max_len].cache.lengths - 1))
    times = {max_len: statistics.median(s) for max_len, s in samples.items()}
    return {"step_ms_ctx128_max256": round(1000 * times[256], 2), "step_ms_ctx128_max4096": round(1000 * times[4096], 2),
            "window_cost_ratio": round(times[4096] / times[256], 3)}


def bench_hf(path: Path, args) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    out = {}
    for batch in (1, 8):
        ids = torch.tensor([prompt(rng, args.context) for _ in range(batch)])
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)  # warm
            start = time.perf_counter()
            gen = model.generate(ids, max_new_tokens=args.decode_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        wall = time.perf_counter() - start
        out[f"hf_tok_s_batch{batch}"] = round((gen.shape[1] - ids.shape[1]) * batch / wall, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-bench")
    ap.add_argument("--dtype", default=None, help="override the preset's dtype")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=32, help="prompt tokens of each concurrent request")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers reference (e.g. on a GPU box)")
    ap.add_argument("--compilation-cache", default=None,
                    help="JAX persistent compilation cache dir: a second run with the same shapes skips compiling")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="a Llama 2 tokenizer.model (32000 pieces)")
    args = ap.parse_args()

    cfg = preset(args.preset)
    cfg = cfg.replace(dtype=args.dtype) if args.dtype else cfg
    result = {"preset": args.preset, "dtype": cfg.dtype, "device": str(jax.devices()[0]), "jax": jax.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        if args.no_hf:  # random weights straight on the device: no disk, no torch
            model = init_model(cfg)
        else:
            path = write_tiny_checkpoint(Path(tmp) / "hf", cfg, seed=0)
            model = load_hf_model(path)
        result.update(bench_engine(model, args))
        print(json.dumps(result), file=sys.stderr, flush=True)  # partial results, in case a later stage fails
        result.update(bench_window(model))
        del model
        if not args.no_hf:
            result.update(bench_hf(path, args))
    if not args.no_hf:
        result["ratio_batch1"] = round(result["batch1_decode_tok_s"] / result["hf_tok_s_batch1"], 2)
        if "aggregate_tok_s_8" in result:
            result["ratio_8_concurrent"] = round(result["aggregate_tok_s_8"] / result["hf_tok_s_batch8"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
