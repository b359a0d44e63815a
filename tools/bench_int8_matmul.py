"""The matmuls of one decode step alone, float32 against int8: the ceiling of what int8 weights
can gain in the engine on this backend.

Runs every matrix product of a decode step of `--preset` (each layer's q, k, v, o, gate, up and
down, then the LM head; nothing else: no attention, no sampler) in one jitted function, with
float32 weights and with int8 weights (blocks of 32) through `quantize.linear`, at 1 and 8 rows;
and, for the record of what was tried, two int8 x int8 forms the project does not ship: the
input quantized per row against one weight scale per output channel (XLA:CPU's fast int8 dot,
but +5.4 % perplexity on the real model), and both in blocks of 32 (a dot batched over blocks). The step's other work costs int8 and float32 the same, so float32 time / int8 time here
bounds the engine's int8 speed-up from above.

    python tools/bench_int8_matmul.py                  # cpu-bench, all cores
    python tools/bench_int8_matmul.py --gguf ../shared/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   # its shapes
    taskset -c 0 python tools/bench_int8_matmul.py     # one core: the kernels' own rate
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
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


def per_row(w: np.ndarray) -> quantize.Int8Weight:
    """`w` in int8 with one scale per output channel (the scheme before blocks), as a 1-block Int8Weight."""
    scale = np.maximum(np.abs(w).max(-1, keepdims=True), 1e-30) / 127
    return quantize.Int8Weight(jnp.asarray(np.clip(np.rint(w / scale), -127, 127).astype(np.int8)),
                               jnp.asarray(scale.astype(np.float32)))


def int8_by_row(x, w: quantize.Int8Weight, out_dtype=None):
    """int8 x int8 dot, the input quantized per row; `w` has one scale per row (a 1-block scale)."""
    n = x.shape[0]
    rows = x if n > 1 else jnp.concatenate([x, jnp.zeros_like(x)])  # YNNPACK takes no one-row dot
    xs = jnp.max(jnp.abs(rows), -1, keepdims=True) / 127
    xq = jnp.clip(jnp.round(rows / jnp.where(xs > 0, xs, 1)), -127, 127).astype(jnp.int8)
    y = jax.lax.dot_general(xq, w.q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return (y.astype(jnp.float32) * xs * w.scale[:, 0])[:n].astype(out_dtype or x.dtype)


def int8_by_block(x, w: quantize.Int8Weight, out_dtype=None):
    """int8 x int8, the input quantized per block of 32 like the weight: a dot batched over blocks."""
    (n, k), nb = x.shape, w.scale.shape[-1]
    xb = x.reshape(n, nb, k // nb)
    xs = jnp.max(jnp.abs(xb), -1, keepdims=True) / 127
    xq = jnp.clip(jnp.round(xb / jnp.where(xs > 0, xs, 1)), -127, 127).astype(jnp.int8)
    parts = jax.lax.dot_general(xq, w.q.reshape(-1, nb, k // nb), (((2,), (2,)), ((1,), (1,))),
                                preferred_element_type=jnp.int32)  # [blocks, n, out]
    return jnp.einsum("bno,nb,ob->no", parts.astype(jnp.float32), xs[..., 0], w.scale).astype(out_dtype or x.dtype)


def matmuls(x, weights, linear=linear):
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
    ap.add_argument("--gguf", type=Path, default=None, help="the shapes of this GGUF's model instead of --preset")
    args = ap.parse_args()
    if args.gguf:
        from llama_jax.gguf_checkpoint import open_reader, read_config

        cfg = read_config(open_reader(args.gguf))
    else:
        cfg = preset(args.preset)
    float_weights = step_weights(cfg)
    n_weights = sum(w.size for layer in float_weights for w in layer.values())
    blocks = jax.tree.map(lambda w: quantize.Int8Weight(*map(jnp.asarray, quantize.quantize_np(w))), float_weights)
    by_row = jax.tree.map(per_row, float_weights)
    forms = {"float32": (jax.tree.map(jnp.asarray, float_weights), linear), "int8": (blocks, linear),
             "int8 x int8, per row (not shipped)": (by_row, int8_by_row),
             "int8 x int8, blocks of 32 (not shipped)": (blocks, int8_by_block)}
    steps = {name: jax.jit(partial(matmuls, linear=lin)) for name, (_, lin) in forms.items()}
    out = {"preset": args.preset, "backend": jax.default_backend(), "weights": n_weights, "ms": {}}
    rng = np.random.default_rng(1)
    for rows in args.rows:
        x = jnp.asarray(rng.standard_normal((rows, cfg.dim), dtype=np.float32))
        for name, (weights, _) in forms.items():
            ms = median_ms(steps[name], x, weights, iters=args.iters)
            out["ms"][f"{name}, {rows} rows"] = round(ms, 2)
            print(f"{rows} rows  {name:40s} {ms:8.2f} ms  {n_weights / ms / 1e6:6.2f} G weights/s", flush=True)
        out[f"ceiling_{rows}_rows"] = round(out["ms"][f"float32, {rows} rows"] / out["ms"][f"int8, {rows} rows"], 2)
        print(f"{rows} rows  float32 / int8 = {out[f'ceiling_{rows}_rows']}x", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
