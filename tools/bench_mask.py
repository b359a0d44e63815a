"""Host cost of one constrained slot's mask per step, packed (today) against the bool mask it replaced.

For `[a-z ]{0,4000}` (bench_host.py's regex) on the real 32000-piece vocabulary, per step:
`llguidance` alone (its mask after a new token), `packed` (the engine's path: `fill_mask` into the
persistent buffer, a copy of the busy rows' words, their upload) and `bool` (the path before issue
30's packed masks: the same mask unpacked to bool, a fresh `[slots, vocab]` bool array, its upload).
Medians in microseconds of the calling thread's CPU time; the matcher advances between steps.

    JAX_PLATFORMS=cpu python tools/bench_mask.py [--tokenizer PATH] [--slots 64] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import llguidance.numpy
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_jax import bitmask  # noqa: E402
from llama_jax.structured import regex_grammar  # noqa: E402
from llama_jax.tokenizer import Tokenizer  # noqa: E402

VOCAB = 32000


def per_step(grammar, token: int, steps: int, step) -> float:
    """Median thread-CPU microseconds of `step(constraint)` over `steps` steps of a fresh constraint."""
    constraint, times = grammar.constraint(4000, VOCAB), []
    for _ in range(steps):
        start = time.thread_time()
        jax.block_until_ready(step(constraint))
        times.append(time.thread_time() - start)
        constraint.advance(token)
    return round(1e6 * statistics.median(times), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, default=Path("../shared/llama2-tokenizer/tokenizer.model"))
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    tokenizer = Tokenizer(str(args.tokenizer))
    grammar, token = regex_grammar(tokenizer, "[a-z ]{0,4000}"), tokenizer.encode(" abc")[0]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    buffer, scratch = bitmask.everything(args.slots, VOCAB), bitmask.everything(1, VOCAB)

    def packed(rows: int):
        return lambda c: (c.fill_mask(buffer[0]), jax.device_put(buffer[:rows].copy(), device))[1]

    def as_bool(c):
        allowed = np.ones((args.slots, VOCAB), bool)
        c.fill_mask(scratch[0])
        allowed[0] = bitmask.unpack(scratch[0], VOCAB)
        return jax.device_put(allowed, device)

    out = {"llguidance": per_step(grammar, token, args.steps,
                                  lambda c: llguidance.numpy.fill_next_token_bitmask(c.matcher, scratch)),
           "bool": per_step(grammar, token, args.steps, as_bool)}
    out |= {f"packed_{rows}_rows": per_step(grammar, token, args.steps, packed(rows)) for rows in (1, 8, args.slots)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
