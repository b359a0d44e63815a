"""The two ways a step's sampling gets its grammar masks (issue 30; step_masks.py), host microseconds per step
with one slot constrained: "batch" (a CPU's default: the batch's rows `[rows, words]` passed with the sampling call)
and "rows" (an accelerator's: a device table, the changed rows uploaded by a small donated scatter program before
a sampling call that reads the table). The engine's own `StepMasks` and upload program; the sampling stand-in
expands the masks (`bitmask.expand`) and takes the masked argmax.

    JAX_PLATFORMS=cpu python tools/bench_mask_upload.py [--slots 64] [--calls 400] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_jax import bitmask, step_masks, steps  # noqa: E402


@partial(jax.jit, static_argnames=("rows", "vocab"))
def sample(logits: jax.Array, allowed: jax.Array, rows: int, vocab: int) -> jax.Array:
    """The masked argmax of the first `rows` rows."""
    return jnp.argmax(jnp.where(bitmask.expand(allowed[:rows], vocab), logits, -jnp.inf), axis=-1)


class Constrained:
    """Slot 0's constraint: the same words each step (llguidance's own time is not what is measured)."""

    def fill_mask(self, row: np.ndarray) -> None:
        row[: len(row) // 2] = 0


class Choice:
    constraint = Constrained()


def timed_us(call, calls: int) -> tuple[float, float]:
    """The 10th percentile and median host microseconds of `call` (its result awaited after the clock stops)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
        jax.block_until_ready(out)
    times.sort()
    return times[len(times) // 10] * 1e6, times[len(times) // 2] * 1e6


def compare(slots: int = 64, vocab: int = 32000, calls: int = 400) -> dict:
    """{"mask_upload_us_{mode}_{rows}": [p10, median]} for each mode and batch of 1, 8 and all `slots`."""
    buckets, out = steps.length_buckets(slots, 1), {}
    put = jax.jit(step_masks.put_rows, donate_argnums=0)
    choices = [Choice(), *[None] * (slots - 1)]
    for rows in sorted({r for r in (1, 8, slots) if r <= slots}):
        logits = jnp.zeros((rows, vocab), jnp.float32)
        for mode in step_masks.MODES:
            masks = step_masks.StepMasks(slots, vocab, mode, buckets)

            def step():
                masks.fill(choices)
                return sample(logits, masks.for_step(rows, True, put), rows=rows, vocab=vocab)

            jax.block_until_ready(step())  # compiled
            out[f"mask_upload_us_{mode}_{rows}"] = [round(t, 1) for t in timed_us(step, calls)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    print(f"{jax.devices()[0].device_kind}, {args.slots} slots, one constrained, {args.vocab} pieces; p10 / median host us a step")
    for key, (p10, median) in compare(args.slots, args.vocab, args.calls).items():
        print(f"{key}: {p10} / {median}")


if __name__ == "__main__":
    main()
