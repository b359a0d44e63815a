"""The Pallas int8 kernel against XLA's dequantize + dot on a GPU: same answer, time per matmul,
and the weight bandwidth it reaches (int8 plus scales read once: what decode is bound by).

For a GPU machine (nothing here has run on one yet); exits 1 if the kernel's output differs from
XLA's by more than bf16 rounding. `--interpret` runs small shapes through Pallas's interpreter
on the CPU instead, to check the script itself.

    python tools/bench_int8_kernel.py                     # 7B's matrices at 1, 8 and 64 rows
    python tools/bench_int8_kernel.py --rows 1 --iters 200
    JAX_PLATFORMS=cpu python tools/bench_int8_kernel.py --interpret
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_jax import int8_matmul, quantize  # noqa: E402

SHAPES_7B = {"wq/wk/wv/wo": (4096, 4096), "w_gate/w_up": (11008, 4096), "w_down": (4096, 11008), "head": (32000, 4096)}
SHAPES_SMALL = {"small": (96, 256), "odd": (37, 320)}
MAX_REL_ERR = 1e-2  # bf16 output: a couple of rounding steps of the largest value


def _time(fn, x, weights: tuple, iters: int) -> float:
    """Median seconds of one matmul, from `iters` of them run inside one compiled scan (each on its own
    input, so none is hoisted): a lone call's launch and sync would dwarf a 10 µs GEMV."""
    xs = jnp.stack([x * (1 + i / iters) for i in range(iters)])
    zeros = jnp.zeros(jax.eval_shape(fn, x, *weights).shape, jnp.float32)
    step = lambda total, xi, w: (total + fn(xi, *w).astype(jnp.float32), None)  # every output used: nothing pruned
    looped = jax.jit(lambda xs, *w: jax.lax.scan(lambda c, xi: step(c, xi, w), zeros, xs)[0])
    looped(xs, *weights).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        looped(xs, *weights).block_until_ready()
        times.append((time.perf_counter() - t) / iters)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,8,64", help="comma-separated row counts (decode batch sizes)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--interpret", action="store_true", help="small shapes in Pallas's interpreter (CPU)")
    args = p.parse_args(argv)
    shapes = SHAPES_SMALL if args.interpret else SHAPES_7B
    iters = 2 if args.interpret else args.iters
    kernel = lambda x, q, s: int8_matmul.block_matmul(x, q, s, interpret=args.interpret)
    xla = lambda x, q, s: quantize._contract(x, quantize.dequantize(quantize.Int8Weight(q, s), x.dtype), None)
    dense = lambda x, w: quantize._contract(x, w, None)  # the bf16 model's own matmul, for its bandwidth
    failed = False
    for name, (n, k) in shapes.items():
        w = jax.jit(quantize.quantize)(0.02 * jax.random.normal(jax.random.key(0), (n, k), jnp.float32))
        weight_bytes = w.q.size + 4 * w.scale.size
        dense_w = quantize.dequantize(w, jnp.bfloat16)
        for m in (int(r) for r in args.rows.split(",")):
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            got, want = jax.jit(kernel)(x, w.q, w.scale), jax.jit(xla)(x, w.q, w.scale)
            got, want = got.astype(jnp.float32), want.astype(jnp.float32)
            err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
            t_kernel, t_xla = _time(kernel, x, (w.q, w.scale), iters), _time(xla, x, (w.q, w.scale), iters)
            t_dense = _time(dense, x, (dense_w,), iters)
            failed |= err > MAX_REL_ERR
            print(json.dumps({"matrix": name, "n": n, "k": k, "rows": m, "backend": jax.default_backend(),
                              "rel_err": round(err, 5),
                              "kernel_us": round(t_kernel * 1e6, 1), "xla_us": round(t_xla * 1e6, 1),
                              "kernel_weight_GBps": round(weight_bytes / t_kernel / 1e9, 1),
                              "speedup": round(t_xla / t_kernel, 2), "bf16_us": round(t_dense * 1e6, 1),
                              "bf16_weight_GBps": round(2 * n * k / t_dense / 1e9, 1)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
