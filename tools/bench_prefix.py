"""Benchmark prefix caching: time to first token of a growing conversation and of users sharing a
system prompt, with the cache and without it (same engine, same programs, same run), and HF
`generate` on the full prompt as the reference.

    python tools/bench_prefix.py                 # CPU-bench shape, 10 turns of ~150 tokens, 8 users

1. A 10-turn chat in the seed page's style: each turn appends a ~130-token user message to the
   history and the model's ~20-token reply (its text, re-templated: as a client sends it).
2. Eight users with the same ~1000-token system prompt: the first one alone, then seven at once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_jax.config import preset  # noqa: E402
from llama_jax.engine import Engine, EngineConfig  # noqa: E402
from llama_jax.hf_checkpoint import load_hf_model, write_tiny_checkpoint  # noqa: E402
from llama_jax.request import Request, SamplingOptions  # noqa: E402
from llama_jax.tokenizer import Tokenizer, apply_chat_template  # noqa: E402

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "llama2-tokenizer" / "tokenizer.model"
GREEDY = SamplingOptions(temperature=0)


def words(rng: np.random.Generator, tokenizer: Tokenizer, tokens: int) -> str:
    """Text of about `tokens` tokens, made of real vocabulary words."""
    pieces = [tokenizer.decode([int(t)]).strip() for t in rng.integers(300, 20000, tokens)]
    return " ".join(p for p in pieces if p.isalpha()) or "hello"


def first_token(engine: Engine, prompt: list[int], max_tokens: int = 1) -> tuple[float, str, int]:
    """Submit and time the first token; returns (TTFT s, reply text, cached tokens)."""
    start = time.perf_counter()
    handle = engine.submit(Request(prompt=prompt, max_tokens=max_tokens, sampling=GREEDY))
    events = iter(handle)
    first = next(events)
    elapsed = time.perf_counter() - start
    text = first.text + "".join(e.text for e in events)
    return elapsed, text, handle.cached_tokens


def conversation(engine: Engine, tokenizer: Tokenizer, turns: int, user_tokens: int, reply_tokens: int) -> dict:
    rng = np.random.default_rng(0)
    messages = [{"role": "system", "content": "You are a helpful, respectful and honest assistant."}]
    prompts, cached_ms, reused = [], [], []
    engine.prefix.enabled = True
    for _ in range(turns):
        messages.append({"role": "user", "content": words(rng, tokenizer, user_tokens)})
        prompt = apply_chat_template(tokenizer, messages)
        elapsed, reply, cached = first_token(engine, prompt, reply_tokens)
        prompts.append(prompt)
        cached_ms.append(round(1000 * elapsed, 1))
        reused.append(cached)
        messages.append({"role": "assistant", "content": reply})
    engine.prefix.enabled = False
    plain_ms = [round(1000 * first_token(engine, p)[0], 1) for p in prompts]
    engine.prefix.enabled = True
    return {"prompt_tokens": [len(p) for p in prompts], "cached_tokens": reused, "ttft_ms_cache": cached_ms,
            "ttft_ms_no_cache": plain_ms, "last_turn_speedup": round(plain_ms[-1] / cached_ms[-1], 2),
            "prompts": prompts}


def shared_system_prompt(engine: Engine, tokenizer: Tokenizer, users: int, system_tokens: int) -> dict:
    rng = np.random.default_rng(1)
    system = words(rng, tokenizer, system_tokens)
    prompts = [apply_chat_template(tokenizer, [{"role": "system", "content": system},
                                               {"role": "user", "content": words(rng, tokenizer, 30)}])
               for _ in range(users)]
    out = {"system_prompt_tokens": len(apply_chat_template(tokenizer, [{"role": "system", "content": system},
                                                                        {"role": "user", "content": "x"}]))}
    for enabled in (True, False):
        engine.prefix.enabled = enabled
        engine.prefix.forget()
        first, _, _ = first_token(engine, prompts[0])
        start = time.perf_counter()
        handles = [engine.submit(Request(prompt=p, max_tokens=1, sampling=GREEDY)) for p in prompts[1:]]
        ttfts = []
        for h in handles:
            next(iter(h))
            ttfts.append(time.perf_counter() - start)
            h.result()
        key = "cache" if enabled else "no_cache"
        out[f"first_user_ttft_ms_{key}"] = round(1000 * first, 1)
        out[f"others_mean_ttft_ms_{key}"] = round(1000 * statistics.mean(ttfts), 1)
        out[f"others_all_served_ms_{key}"] = round(1000 * max(ttfts), 1)
    engine.prefix.enabled = True
    out["others_speedup"] = round(out["others_mean_ttft_ms_no_cache"] / out["others_mean_ttft_ms_cache"], 2)
    return out


def hf_ttft(path: Path, prompts: list[list[int]]) -> list[float]:
    """HF `generate` of one token on each full prompt: its time to first token."""
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=1, do_sample=False, pad_token_id=0)  # warm
        for p in prompts:
            start = time.perf_counter()
            model.generate(torch.tensor([p]), max_new_tokens=1, do_sample=False, pad_token_id=0)
            out.append(round(1000 * (time.perf_counter() - start), 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-bench")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--user-tokens", type=int, default=130)
    ap.add_argument("--reply-tokens", type=int, default=20)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    args = ap.parse_args()

    tokenizer = Tokenizer(args.tokenizer)
    result: dict = {"preset": args.preset}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(Path(tmp) / "hf", preset(args.preset), seed=0)
        engine = Engine(load_hf_model(path), tokenizer, EngineConfig(max_slots=args.users, max_seq_len=args.max_seq_len))
        t0 = time.perf_counter()
        engine.start()
        result["warmup_s"] = round(time.perf_counter() - t0, 1)
        try:
            chat = conversation(engine, tokenizer, args.turns, args.user_tokens, args.reply_tokens)
            result["shared_system_prompt"] = shared_system_prompt(engine, tokenizer, args.users, args.system_tokens)
        finally:
            engine.stop()
        prompts = chat.pop("prompts")
        result["conversation"] = chat
        if not args.no_hf:
            chat["ttft_ms_hf"] = hf_ttft(path, prompts)
            chat["last_turn_vs_hf"] = round(chat["ttft_ms_hf"][-1] / chat["ttft_ms_cache"][-1], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
