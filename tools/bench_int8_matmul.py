"""The matmuls of one decode step alone, float32 against int8: the ceiling of what int8 weights
can gain in the engine on this backend.

Runs every matrix product of a decode step of `--preset` (each layer's q, k, v, o, gate, up and
down, then the LM head; nothing else: no attention, no sampler) in one jitted function, with
float32 weights and with int8 weights (blocks of 32) through `quantize.linear`, at 1 and 8 rows. The step's other work costs int8 and float32 the same, so float32 time / int8 time here
bounds the engine's int8 speed-up from above.

    python tools/bench_int8_matmul.py                  # cpu-bench, all cores
    taskset -c 0 python tools/bench_int8_matmul.py     # one core: the kernels' own rate
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
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_jax import quantize  # noqa: E402
from llama_jax.config import preset  # noqa: E402
from llama_jax.model import linear  # noqa: E402


def step_weights(cfg, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random float32 `[out, in]` matrices of every layer, plus the LM head as a last entry."""
    rng = np.random.default_rng(seed)
    d, f, kv = cfg.dim, cfg.ffn_dim, cfg.n_kv_heads * cfg.dim // cfg.n_heads
    shapes = {"wq": (d, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, d), "w1": (f, d), "w3": (f, d), "w2": (d, f)}
    layers = [{n: 0.02 * rng.standard_normal(s, dtype=np.float32) for n, s in shapes.items()} for _ in range(cfg.n_layers)]
    return layers + [{"head": 0.02 * rng.standard_normal((cfg.vocab_size, d), dtype=np.float32)}]


def matmuls(x, weights):
    """Every product of the step, each layer's input depending on the last (as in the model)."""
    *layers, head = weights
    for w in layers:
        q, k, v = linear(x, w["wq"]), linear(x, w["wk"]), linear(x, w["wv"])
        x = x + 1e-3 * linear(q + jnp.pad(k + v, ((0, 0), (0, q.shape[-1] - k.shape[-1]))), w["wo"])
        x = x + 1e-3 * linear(jax.nn.silu(linear(x, w["w1"])) * linear(x, w["w3"]), w["w2"])
    return linear(x, head["head"], jnp.float32)


def median_ms(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu-bench")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    cfg = preset(args.preset)
    float_weights = step_weights(cfg)
    n_weights = sum(w.size for layer in float_weights for w in layer.values())
    forms = {"float32": jax.tree.map(jnp.asarray, float_weights)}
    forms["int8"] = jax.tree.map(lambda w: quantize.Int8Weight(*map(jnp.asarray, quantize.quantize_np(w))), float_weights)
    step = jax.jit(matmuls)
    out = {"preset": args.preset, "backend": jax.default_backend(), "weights": n_weights, "ms": {}}
    rng = np.random.default_rng(1)
    for rows in args.rows:
        x = jnp.asarray(rng.standard_normal((rows, cfg.dim), dtype=np.float32))
        for name, weights in forms.items():
            ms = median_ms(step, x, weights, iters=args.iters)
            out["ms"][f"{name}, {rows} rows"] = round(ms, 2)
            print(f"{rows} rows  {name:22s} {ms:8.2f} ms  {n_weights / ms / 1e6:6.2f} G weights/s", flush=True)
        out[f"ceiling_{rows}_rows"] = round(out["ms"][f"float32, {rows} rows"] / out["ms"][f"int8, {rows} rows"], 2)
        print(f"{rows} rows  float32 / int8 = {out[f'ceiling_{rows}_rows']}x", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
