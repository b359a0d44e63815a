"""How long a running stream stalls while prompt scoring (echo + logprobs on /v1/completions) runs
beside it: first with the scoring program compiled on first use (no warm-up), then after
`scoring.warm_up` (what `serve` does at warm-up). Prints the stream's median and largest
inter-token gap while each scoring call runs.

    python tools/bench_scoring_stall.py [--max-seq-len 256] [--prompt 200]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from llama_jax import checkpoint, scoring
from llama_jax.demo import demo_checkpoint
from llama_jax.engine import Engine, EngineConfig
from llama_jax.request import Request, SamplingOptions
from llama_jax.tokenizer import load_tokenizer


def stall(engine: Engine, prompt_len: int) -> tuple[float, float, float]:
    """(median gap, largest gap while scoring ran, scoring seconds) of a 240-token stream."""
    handle = engine.submit(Request(prompt=[engine.tokenizer.bos_id, 100, 200], max_tokens=240, stop_token_ids=[],
                                   sampling=SamplingOptions(seed=0)))
    stamps: list[float] = []
    window: list[float] = []

    def score() -> None:
        window.append(time.perf_counter())
        scoring.score_batch(engine.model, [[0] * prompt_len], top_k=5, max_rows=1)
        window.append(time.perf_counter())

    scorer = threading.Thread(target=score)
    for event in handle:
        stamps.append(time.perf_counter())
        if len(stamps) == 50:
            scorer.start()
    scorer.join()
    gaps = [(b - a, b) for a, b in zip(stamps, stamps[1:])]
    during = [g for g, t in gaps if window[0] <= t <= window[1] + max(g for g, _ in gaps)]
    return statistics.median(g for g, _ in gaps), max(during, default=0.0), window[1] - window[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=200, help="tokens of the scored prompt")
    args = parser.parse_args()
    loaded = checkpoint.load(demo_checkpoint())
    engine = Engine(loaded.model, load_tokenizer(loaded.tokenizer_path),
                    EngineConfig(max_slots=4, max_seq_len=args.max_seq_len, max_prefill_tokens=128)).start()
    try:
        stall(engine, 4)  # the engine's own first-use costs (a freed slot's row reset), and a small bucket
        median, worst, took = stall(engine, args.prompt)
        print(f"compiled on first use: scoring {took:.2f} s; stream gap median {median * 1e3:.0f} ms, "
              f"largest while scoring {worst * 1e3:.0f} ms")
        scoring.warm_up(engine.model, args.max_seq_len - 1, top_k=5)
        median, worst, took = stall(engine, args.prompt)
        print(f"compiled at warm-up:    scoring {took:.2f} s; stream gap median {median * 1e3:.0f} ms, "
              f"largest while scoring {worst * 1e3:.0f} ms")
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
