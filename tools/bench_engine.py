"""Benchmark the serving engine against Hugging Face transformers on the same random weights, or
against llama.cpp on the same real model (a GGUF).

Reports batch-1 decode tok/s, TTFT at prompt 128 and 1024, aggregate tok/s at several
concurrency levels, and (same run, same weights) HF `generate` at batch 1 and 8.

    python tools/bench_engine.py                        # CPU shape from the issue, with HF
    python tools/bench_engine.py --preset llama-2-7b --dtype bfloat16 --no-hf --concurrency 1 8 32
    python tools/bench_engine.py --quantize int8 --concurrency 1 8 --llama-cpp BUILD_DIR
    python tools/bench_engine.py --gguf ../shared/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --llama-cpp BUILD_DIR
    python tools/bench_engine.py --speculative          # prompt-lookup drafts on and off (bench_speculative.py)
    python tools/bench_engine.py --host                 # the scheduler's host time per step (bench_host.py)

`--gguf FILE` runs the real model instead: the GGUF converted to float32 and to int8 for
llama-jax, and (with `--llama-cpp`) the same GGUF requantized to F32 and Q8_0 by llama.cpp's own
`llama-quantize` for llama.cpp (tools/llama_cpp_peer.py). One table, side by side: batch-1 decode
tok/s, 8-concurrent aggregate tok/s (llama-server with 8 slots), TTFT at 128 and 1024 tokens
(llama.cpp: prompt time from llama-bench), and perplexity of `--text` computed as
llama-perplexity does (chunks of `--ppl-ctx` tokens, BOS first, the second half scored).

`--quantize int8` adds the int8 engine on the same weights (converted with `convert-weights
--quantize int8`, loaded with `checkpoint.load`), keys prefixed `int8_`, with its ratios to our
float32 and to HF. `--llama-cpp BUILD_DIR` adds llama.cpp on the same weights as the CPU peer: the
HF checkpoint is converted to a Q8_0 GGUF with llama.cpp's own `convert_hf_to_gguf.py` (from
`--llama-cpp-src`, default BUILD_DIR/..) and `llama-batched-bench` decodes 1 and 8 parallel
sequences of `--decode-tokens` after `--context`-token prompts.
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
from pathlib import Path

import jax
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


def decode_rate(engine: Engine, p: list[int], max_tokens: int) -> float:
    """One request's decode tok/s: its tokens after the first over the time from first to last."""
    handle = engine.submit(Request(prompt=p, max_tokens=max_tokens, stop_token_ids=[],
                                   sampling=SamplingOptions(temperature=0)))
    times = [time.perf_counter() for _ in handle]  # one event per token
    return (len(times) - 1) / (times[-1] - times[0])


def ttft(engine: Engine, p: list[int]) -> float:
    start = time.perf_counter()
    handle = engine.submit(Request(prompt=p, max_tokens=1, stop_token_ids=[]))
    next(iter(handle))
    elapsed = time.perf_counter() - start
    handle.result()
    return elapsed


def bench_engine(model, args, tokenizer=None) -> dict:
    rng = np.random.default_rng(0)
    cfg = EngineConfig(max_slots=max(args.concurrency), max_seq_len=args.max_seq_len,
                       compilation_cache_dir=args.compilation_cache)
    engine = Engine(model, tokenizer or Tokenizer(args.tokenizer), cfg)
    t0 = time.perf_counter()
    engine.start(progress=lambda done, total, what, seconds: print(
        f"warm-up {done}/{total}: {what} ({seconds:.0f} s; {time.perf_counter() - t0:.0f} s in all)", file=sys.stderr, flush=True))
    out = {"warmup_s": round(time.perf_counter() - t0, 1), "slots": cfg.max_slots}
    try:
        out["batch1_decode_tok_s"] = round(statistics.median(
            decode_rate(engine, prompt(rng, 32), args.decode_tokens) for _ in range(3)), 2)
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
    """One decode step (its forward) at a 128-token context, with max_seq_len 4096 vs 256: decode reads each
    row's keys up to its length, so the context (not the cache size) should set the cost. The two
    are timed alternately, so drift in the machine's speed hits both alike."""
    from llama_jax.device import Programs, init_decode_state
    from llama_jax.layers import split_layers
    from llama_jax.model import storage_params

    graphdef, params = nnx.split(model)
    split = split_layers(model.cfg)
    params = storage_params(model.cfg, params, split)
    states, programs, samples = {}, {}, {256: [], 4096: []}
    for max_len in samples:
        config = EngineConfig(max_slots=slots, max_seq_len=max_len)
        programs[max_len] = Programs.build(graphdef, model.cfg, config, None).decode
        state = init_decode_state(model.cfg, slots, max_len)
        states[max_len] = dataclasses.replace(state, cache=state.cache.replace(lengths=state.cache.lengths + context))
    for i in range(iters + 3):
        for max_len in samples:
            start = time.perf_counter()
            states[max_len], result = programs[max_len](params, states[max_len], rows=slots)
            result.block_until_ready()
            if i >= 3:  # the first calls compile and warm the caches
                samples[max_len].append(time.perf_counter() - start)
            states[max_len] = dataclasses.replace(  # stay at the same context
                states[max_len], cache=states[max_len].cache.replace(lengths=states[max_len].cache.lengths - 1))
    times = {max_len: statistics.median(s) for max_len, s in samples.items()}
    return {"step_ms_ctx128_max256": round(1000 * times[256], 2), "step_ms_ctx128_max4096": round(1000 * times[4096], 2),
            "window_cost_ratio": round(times[4096] / times[256], 3)}


def bench_llama_cpp(hf_dir: Path, tmp: Path, args) -> dict:
    """llama.cpp Q8_0 on the same weights: convert with its converter, decode with batched-bench."""
    import re
    import subprocess

    build = Path(args.llama_cpp)
    src = Path(args.llama_cpp_src) if args.llama_cpp_src else build.parent
    gguf = tmp / "model-q8_0.gguf"
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "q8_0",
                    "--outfile", str(gguf)], check=True, capture_output=True, text=True)
    binary = next(p for p in (build / "bin" / "llama-batched-bench", build / "llama-batched-bench") if p.exists())
    out: dict = {}
    for threads in sorted({1, os.cpu_count() or 1}):  # its thread pool spin-waits: on a busy box 1 thread can win
        cmd = [str(binary), "-m", str(gguf), "-c", str(8 * (args.context + args.decode_tokens) + 64), "-b", "512",
               "-ub", "512", "-npp", str(args.context), "-ntg", str(args.decode_tokens), "-npl", "1,8",
               "-t", str(threads), "--no-repack"]  # --no-repack: the CPU repack path crashes on this machine
        run = subprocess.run(cmd, capture_output=True, text=True)
        run.check_returncode()
        out["llama_cpp_command"] = " ".join(cmd[:1] + ["-m", "model-q8_0.gguf"] + cmd[3:-3] + ["-t", "T", "--no-repack"])
        for line in run.stdout.splitlines():  # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 8 and re.fullmatch(r"\d+", cells[2] or "x"):
                b = int(cells[2])
                out[f"llama_cpp_tok_s_batch{b}_t{threads}"] = float(cells[7])  # decode (TG) tok/s
                out[f"llama_cpp_tok_s_batch{b}"] = max(out.get(f"llama_cpp_tok_s_batch{b}", 0.0), float(cells[7]))
    return out


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
    ap.add_argument("--quantize", choices=["int8"], default=None,
                    help="also run the int8 engine (a --quantize int8 checkpoint of the same weights)")
    ap.add_argument("--gguf", type=Path, default=None, help="a real model: this GGUF for both llama-jax and llama.cpp")
    ap.add_argument("--text", type=Path, default=None, help="--gguf: perplexity text (default: LICENSE beside the GGUF)")
    ap.add_argument("--ppl-ctx", type=int, default=512, help="--gguf: perplexity chunk length (llama-perplexity's -c)")
    ap.add_argument("--no-float", action="store_true", help="with --quantize: skip the float32 engine")
    ap.add_argument("--llama-cpp", metavar="BUILD_DIR", default=None,
                    help="a llama.cpp CMake build directory (llama-batched-bench): add llama.cpp Q8_0 as the peer")
    ap.add_argument("--llama-cpp-src", metavar="SRC_DIR", default=None,
                    help="the llama.cpp source holding convert_hf_to_gguf.py (default: BUILD_DIR/..)")
    ap.add_argument("--speculative", action="store_true",
                    help="prompt-lookup speculation on and off on the real model (--gguf, default ../shared's "
                         "SmolLM2): tools/bench_speculative.py")
    ap.add_argument("--speculative-tokens", type=int, default=4, help="--speculative: tokens drafted per step")
    ap.add_argument("--speculative-min-n", type=int, default=2, help="--speculative: shortest n-gram matched")
    ap.add_argument("--speculative-verify-cost", type=float, default=None,
                    help="--speculative: a verify step's time in plain steps, fixed (default: the engine measures it "
                         "per batch size at warm-up)")
    ap.add_argument("--spec-max-tokens", type=int, default=256, help="--speculative: max_tokens of each reply")
    ap.add_argument("--batch1-prompts", type=int, default=2, help="--speculative: prompts run one by one per round")
    ap.add_argument("--rounds", type=int, default=2, help="--speculative: timed rounds, plain and speculative alternating")
    ap.add_argument("--spec-workloads", nargs="+", default=None,
                    choices=["grounded_1", "grounded_8", "open_1", "open_8"],
                    help="--speculative: run only these workloads, by name and concurrency (default: all four)")
    ap.add_argument("--host", action="store_true",
                    help="the scheduler's host time per step at 1, 8 and 64 busy slots, with and without a "
                         "grammar-constrained slot (tools/bench_host.py)")
    ap.add_argument("--host-slots", type=int, nargs="+", default=[1, 8, 64], help="--host: busy slots")
    ap.add_argument("--host-tokens", type=int, default=200, help="--host: tokens per request")
    ap.add_argument("--host-async", action="store_true",
                    help="--host: consume the requests on an asyncio loop as the server does "
                         "(default: the caller's thread reads each request's queue in turn)")
    args = ap.parse_args()
    if args.host:
        from bench_host import bench_host

        print(json.dumps(bench_host(args), indent=2))
        return
    if args.speculative:
        from bench_speculative import bench_speculative

        print(json.dumps(bench_speculative(args), indent=2))
        return
    if args.gguf:
        from bench_real import bench_gguf

        print(json.dumps(bench_gguf(args, bench_engine), indent=2))
        return

    cfg = preset(args.preset)
    cfg = cfg.replace(dtype=args.dtype) if args.dtype else cfg
    result = {"preset": args.preset, "dtype": cfg.dtype, "device": str(jax.devices()[0]), "jax": jax.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        path = None
        if args.no_hf and not (args.quantize or args.llama_cpp):  # random weights straight on the device
            model = init_model(cfg)
        else:  # an HF checkpoint on disk: HF, the int8 conversion and llama.cpp read the same weights
            tokenizer = args.tokenizer if args.llama_cpp else None  # llama.cpp's converter wants one beside
            path = write_tiny_checkpoint(Path(tmp) / "hf", cfg, seed=0, tokenizer_path=tokenizer)
            model = load_hf_model(path)
        if not args.no_float:
            result.update(bench_engine(model, args))
            print(json.dumps(result), file=sys.stderr, flush=True)  # partial results, in case a later stage fails
            result.update(bench_window(model))
        del model
        if args.quantize:
            from llama_jax import checkpoint
            from llama_jax.convert import convert

            convert(path, Path(tmp) / "int8", quantization=args.quantize, progress=False)
            int8 = checkpoint.load(Path(tmp) / "int8").model
            result.update({f"int8_{k}": v for k, v in bench_engine(int8, args).items()})
            print(json.dumps(result), file=sys.stderr, flush=True)
            del int8
        if args.llama_cpp:
            result.update(bench_llama_cpp(path, Path(tmp), args))
            print(json.dumps(result), file=sys.stderr, flush=True)
        if not args.no_hf:
            result.update(bench_hf(path, args))
    for prefix in ("", "int8_") if args.quantize else ("",):
        if f"{prefix}batch1_decode_tok_s" not in result:
            continue
        peers = {"hf": ("hf_tok_s_batch1", "hf_tok_s_batch8"), "llama_cpp": ("llama_cpp_tok_s_batch1", "llama_cpp_tok_s_batch8")}
        if prefix:
            peers["float32"] = ("batch1_decode_tok_s", "aggregate_tok_s_8")
        for peer, (one, eight) in peers.items():
            tag = "" if peer == "hf" and not prefix else f"_vs_{peer}"
            if one in result:
                result[f"{prefix}ratio_batch1{tag}"] = round(result[f"{prefix}batch1_decode_tok_s"] / result[one], 2)
            if eight in result and f"{prefix}aggregate_tok_s_8" in result:
                result[f"{prefix}ratio_8_concurrent{tag}"] = round(result[f"{prefix}aggregate_tok_s_8"] / result[eight], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
