"""Time `llama_jax.sampling.sample` per step against a naive full-sort sampler, side by side.

    JAX_PLATFORMS=cpu PYTHONPATH=. python tools/bench_sampling.py [--vocab 32000] [--batches 1 32] [--iters 30]

Prints the median of --iters timed calls after warm-up (block_until_ready), for default knobs
(top_k and top_p off) and for top_k=50, top_p=0.9, min_p=0.05, plus the penalty step alone,
and checks that both samplers keep the same token sets.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import sampling as S


def full_sort_mask(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """The textbook truncation: sort the whole vocabulary, cumulative sum, scatter back."""
    vocab = scaled.shape[-1]
    order = jnp.argsort(-scaled, axis=-1)
    desc = jnp.take_along_axis(scaled, order, axis=-1)
    kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    keep_sorted = (top_k[:, None] <= 0) | (desc >= kth)
    probs = jax.nn.softmax(jnp.where(keep_sorted, desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted &= (top_p[:, None] >= 1) | (mass_before < top_p[:, None])
    keep_sorted &= probs >= min_p[:, None] * probs[:, :1]
    rows = jnp.arange(scaled.shape[0])[:, None]
    return jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)


@jax.jit
def naive_sample(logits: jax.Array, params: S.SamplingParams, state: S.SamplerState) -> tuple[jax.Array, jax.Array]:
    """Same pipeline as `sample` (no mask, same noise), with `full_sort_mask` for the truncation."""
    x = S.apply_penalties(logits, params, state)
    logprobs = jax.nn.log_softmax(x, axis=-1)
    greedy = params.temperature < S.MIN_TEMPERATURE
    scaled = x / jnp.where(greedy, 1.0, params.temperature)[:, None]
    keep = full_sort_mask(scaled, params.top_k, params.top_p, params.min_p)
    weights = jnp.where(keep, jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True)), 0.0)
    drawn = S._argmax(weights / S._exponential_noise(S._token_keys(params, state.step), x.shape[1]))
    tokens = jnp.where(greedy, S._argmax(x), drawn)
    top = jax.lax.top_k(logprobs, S.MAX_TOP_LOGPROBS)
    return tokens, top


@jax.jit
def penalties_step(logits: jax.Array, params: S.SamplingParams, state: S.SamplerState) -> tuple[jax.Array, jax.Array]:
    """The penalty state's own cost: apply the penalties and count one token per row."""
    x = S.apply_penalties(logits, params, state)
    tokens = jnp.argmax(x, axis=-1)
    return x, state.counts.at[jnp.arange(x.shape[0]), tokens].add(1)


def median_ms(fn: Callable[[], object], iters: int) -> float:
    """Median wall time of fn() in ms after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()[0].device_kind}")
    print(f"vocab {args.vocab}, float32 logits, median of {args.iters} after warm-up, ms per step")
    print(f"{'batch':>5} {'knobs':<24} {'sample':>9} {'full sort':>10} {'ratio':>7} {'same sets':>10}")

    rng = np.random.default_rng(0)
    configs = {
        "default": dict(),
        "top_k50 top_p.9 min_p.05": dict(top_k=50, top_p=0.9, min_p=0.05),
    }
    for batch in args.batches:
        logits = jnp.asarray(rng.normal(0, 3, (batch, args.vocab)), jnp.float32)
        state = S.init_state(batch, args.vocab)
        prompt = jnp.asarray(rng.integers(0, args.vocab, 512), jnp.int32)
        for i in range(batch):
            state = S.reset_row(state, i, prompt, 512)
        for name, knobs in configs.items():
            params = S.stack_params(
                [S.make_params(seed=i, repetition_penalty=1.1, frequency_penalty=0.5, **knobs) for i in range(batch)]
            )
            fast = median_ms(lambda: S.sample(logits, params, state), args.iters)
            slow = median_ms(lambda: naive_sample(logits, params, state), max(5, args.iters // 3))
            scaled = S.apply_penalties(logits, params, state)
            same = bool(
                jnp.array_equal(
                    S.truncation_mask(scaled, params.top_k, params.top_p, params.min_p),
                    full_sort_mask(scaled, params.top_k, params.top_p, params.min_p),
                )
            )
            print(f"{batch:>5} {name:<24} {fast:>9.3f} {slow:>10.3f} {slow / fast:>6.1f}x {str(same):>10}")
        pen = median_ms(lambda: penalties_step(logits, params, state), args.iters)
        print(f"{batch:>5} {'penalties + count only':<24} {pen:>9.3f}")


if __name__ == "__main__":
    main()
