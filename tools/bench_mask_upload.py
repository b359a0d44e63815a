"""Two ways to give a step's sampling its grammar masks (issue 30), host microseconds per step, one row
constrained: (a) the whole batch's packed masks `[rows, words]` passed with the sampling call, as the engine
does; (b) a device-resident table of every slot's masks, its constrained rows uploaded by a small scatter
program (donated, in place) before a sampling call that reads the table. The sampling stand-in expands the
masks (`bitmask.expand`) and takes the masked argmax over a 32000-piece vocabulary.

    JAX_PLATFORMS=cpu python tools/bench_mask_upload.py [--slots 64] [--calls 400]
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

from llama_jax import bitmask  # noqa: E402

VOCAB = 32000


@partial(jax.jit, static_argnames="rows")
def sample(logits: jax.Array, allowed: jax.Array, rows: int) -> jax.Array:
    """The masked argmax of the first `rows` rows."""
    return jnp.argmax(jnp.where(bitmask.expand(allowed[:rows], VOCAB), logits, -jnp.inf), axis=-1)


@partial(jax.jit, donate_argnums=0)
def set_rows(table: jax.Array, rows: jax.Array, words: jax.Array) -> jax.Array:
    """The table with `rows` replaced by `words`, in place."""
    return table.at[rows].set(words, mode="drop")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args()
    host = bitmask.everything(args.slots, VOCAB)
    table = [jax.device_put(host)]
    print(f"{jax.devices()[0].device_kind}, {args.slots} slots, one constrained; p10 / median host us a step")
    for rows in [r for r in (1, 8, 64) if r <= args.slots]:
        logits = jnp.zeros((rows, VOCAB), jnp.float32)

        def whole_batch():
            return sample(logits, host[:rows].copy(), rows=rows)

        def constrained_rows_only():
            table[0] = set_rows(table[0], np.array([0], np.int32), host[[0]])
            return sample(logits, table[0], rows=rows)

        for call in (whole_batch, constrained_rows_only):
            jax.block_until_ready(call())  # compiled
        a, b = timed_us(whole_batch, args.calls), timed_us(constrained_rows_only, args.calls)
        print(f"{rows:3d} rows: whole batch {a[0]:.1f} / {a[1]:.1f}   constrained rows only {b[0]:.1f} / {b[1]:.1f}")


if __name__ == "__main__":
    main()
