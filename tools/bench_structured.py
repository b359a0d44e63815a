"""Benchmark grammar-constrained decoding (llama_jax.structured, llguidance) on the real Llama 2 vocabulary.

1. Host cost per token of one constraint, without a model: `allowed()` (llguidance's mask + the
   closing-plan check; its first mask computation in a state is timed separately as
   `llguidance_mask`, and included in `allowed`), `advance()`, for JSON mode, a JSON schema and a
   tool envelope (a uniformly random "model" among the allowed tokens).
2. Engine per-token overhead: the same requests unconstrained vs constrained (a JSON schema with
   one string, a forced tool call) at 1 and 8 concurrent requests, as ms per decode step (wall /
   the longest request's tokens: the inter-token latency) and aggregate tok/s. Unconstrained
   requests ignore EOS so that they run the full length; constrained ones end when their JSON does.

    python tools/bench_structured.py                       # tiny-gqa, as in docs/benchmarks.md
    python tools/bench_structured.py --preset cpu-bench    # a bigger step, smaller relative cost
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_jax import structured, tools, vocabulary  # noqa: E402
from llama_jax.config import preset  # noqa: E402
from llama_jax.engine import Engine, EngineConfig  # noqa: E402
from llama_jax.model import init_model  # noqa: E402
from llama_jax.request import Request, SamplingOptions  # noqa: E402
from llama_jax.tokenizer import Tokenizer, apply_chat_template  # noqa: E402

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "llama2-tokenizer" / "tokenizer.model"
PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                    "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"]}}, "required": ["name", "age", "address"]}
WEATHER = tools.ToolSpec("get_weather", "Weather in a city", {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"]})


TEXT = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def grammars(tokenizer: Tokenizer) -> dict[str, structured.Grammar]:
    return {"json_object": structured.json_grammar(tokenizer, None),
            "json_schema": structured.json_grammar(tokenizer, PERSON),
            "tools_required": structured.tools_grammar(tokenizer, [WEATHER, tools.ToolSpec("get_time")],
                                                       "required")}


def engine_grammars(tokenizer: Tokenizer) -> dict[str, structured.Grammar]:
    """Grammars a random model fills to the budget (a string it never closes), so that constrained
    and unconstrained requests generate the same number of tokens (json_object's "{}" would not)."""
    return {"json_schema_string": structured.json_grammar(tokenizer, TEXT),
            "tool_call_named": structured.tools_grammar(tokenizer, [WEATHER], "required", parallel=False)}


def _us(samples: list[float]) -> dict:
    a = np.array(samples) * 1e6
    return {"median_us": round(float(np.median(a)), 1), "p99_us": round(float(np.percentile(a, 99)), 1),
            "mean_us": round(float(a.mean()), 1)}


def bench_host(tokenizer: Tokenizer, walks: int, budget: int) -> dict:
    """Per-token host cost of one constraint, random walks of `budget` tokens."""
    import llguidance
    import llguidance.numpy

    out = {}
    rng = np.random.default_rng(0)
    for name, grammar in grammars(tokenizer).items():
        allowed_t, advance_t, raw_t, lengths = [], [], [], []
        bits = llguidance.numpy.allocate_token_bitmask(1, grammar.vocab.size)
        for _ in range(walks):
            c = grammar.constraint(budget)
            for _ in range(budget):
                t0 = time.perf_counter()
                llguidance.numpy.fill_next_token_bitmask(c.matcher, bits)  # llguidance's mask alone
                t1 = time.perf_counter()
                mask = c.allowed()  # the same mask again (llguidance caches it) + the closing plan
                t2 = time.perf_counter()
                allowed_t.append(t2 - t0)
                ids = np.flatnonzero(mask)
                token = int(rng.choice(ids))
                t3 = time.perf_counter()
                c.advance(token)
                t4 = time.perf_counter()
                raw_t.append(t1 - t0)
                advance_t.append(t4 - t3)
                if token == grammar.vocab.eos_id or c.done():
                    break
            lengths.append(c.generated)
        out[name] = {"allowed": _us(allowed_t), "llguidance_mask": _us(raw_t), "advance": _us(advance_t),
                     "tokens_per_walk": round(statistics.mean(lengths), 1)}
    return out


def _run(engine: Engine, prompts: list[list[int]], max_tokens: int, factory=None) -> tuple[float, list[int]]:
    start = time.perf_counter()
    handles = [engine.submit(Request(prompt=p, max_tokens=max_tokens, sampling=SamplingOptions(seed=i),
                                     stop_token_ids=[] if factory is None else None, constraint=factory))
               for i, p in enumerate(prompts)]
    lengths = [h.result().completion_tokens for h in handles]
    return time.perf_counter() - start, lengths


def bench_engine(model, tokenizer: Tokenizer, concurrency: list[int], max_tokens: int, repeats: int) -> dict:
    config = EngineConfig(max_slots=max(concurrency), max_seq_len=model.cfg.max_seq_len, min_prefill_bucket=32)
    engine = Engine(model, tokenizer, config).start()
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "Describe a person as JSON."}])
    vocab = model.cfg.vocab_size
    kinds = {"unconstrained": None}
    for name, grammar in engine_grammars(tokenizer).items():
        kinds[name] = grammar.factory(max_tokens, vocab)
    out = {}
    try:
        _run(engine, [prompt], 8, kinds["json_schema_string"])  # warm the constrained path
        for c in concurrency:
            row = {}
            for name, factory in kinds.items():
                runs = [_run(engine, [prompt] * c, max_tokens, factory) for _ in range(repeats)]
                # a run lasts as many decode steps as its longest request (every slot computes each step)
                step = statistics.median(w / max(lengths) for w, lengths in runs)
                tok_s = statistics.median(sum(lengths) / w for w, lengths in runs)
                row[name] = {"ms_per_step": round(1000 * step, 3), "tok_s": round(tok_s, 1),
                             "tokens_per_request": round(statistics.mean(statistics.mean(x) for _, x in runs), 1)}
            base = row["unconstrained"]["ms_per_step"]
            for name in kinds:
                if name != "unconstrained":
                    row[name]["overhead_ms_per_token"] = round(row[name]["ms_per_step"] - base, 3)
            out[f"concurrency_{c}"] = row
    finally:
        engine.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-gqa")
    ap.add_argument("--max-seq-len", type=int, default=None, help="override the preset's context")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--walks", type=int, default=20, help="random walks per grammar for the host cost")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    args = ap.parse_args()

    import llguidance

    tokenizer = Tokenizer(args.tokenizer)
    t0 = time.perf_counter()
    vocabulary.vocabulary(tokenizer)
    result = {"preset": args.preset, "device": str(jax.devices()[0]), "jax": jax.__version__,
              "llguidance": llguidance.__version__ if hasattr(llguidance, "__version__") else "?",
              "vocabulary_build_s": round(time.perf_counter() - t0, 3)}
    t0 = time.perf_counter()
    structured.json_grammar(tokenizer, PERSON)
    result["schema_compile_ms"] = round(1000 * (time.perf_counter() - t0), 2)
    result["host_per_token"] = bench_host(tokenizer, args.walks, args.max_tokens)
    cfg = preset(args.preset)
    if args.max_seq_len:
        cfg = cfg.replace(max_seq_len=args.max_seq_len)
    result["engine"] = bench_engine(init_model(cfg), tokenizer, args.concurrency, args.max_tokens, args.repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
