"""One step's sampled tokens as one int32 array: packed on the device at the end of a step, so
the host makes one device-to-host copy per step (not one per field), and unpacked there.

Layout, `[rows, positions, 3 + 2 * top]` (a plain step has one position, a verify step k + 1):
the token, its logprob (float32 bits), how many positions lead the output (1 for a plain step),
then the top ids and their logprobs (float32 bits), most probable first.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.platform import Platform
from llama_jax.sampling import SampleResult

__all__ = ["StepTokens", "copy_soon", "pack", "unpack"]


def copy_soon(result, platform: Platform) -> None:
    """Start copying a dispatched step's result (any pytree) to the host: reading it later waits for no copy. Not on a
    CPU, whose arrays are the host's: there it copies nothing and costs the scheduler ~30 us (docs/benchmarks.md)."""
    if not platform.cpu:
        for leaf in jax.tree.leaves(result):
            leaf.copy_to_host_async()


def pack(result: SampleResult, emitted: jax.Array | None = None) -> jax.Array:
    """`result` (fields `[rows]` or `[rows, positions]`, top fields with one more axis) and the
    output positions per row `emitted` `[rows]` (default 1) as one int32 array (module docstring)."""
    tokens = result.tokens if result.tokens.ndim == 2 else result.tokens[:, None]
    rows, positions = tokens.shape
    shaped = lambda a: a.reshape(rows, positions, -1)
    bits = lambda a: jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)
    emitted = jnp.ones((rows,), jnp.int32) if emitted is None else emitted.astype(jnp.int32)
    return jnp.concatenate([shaped(tokens.astype(jnp.int32)), shaped(bits(result.logprobs)),
                            shaped(jnp.broadcast_to(emitted[:, None], (rows, positions))),
                            shaped(result.top_ids.astype(jnp.int32)), shaped(bits(result.top_logprobs))], axis=-1)


@dataclasses.dataclass(frozen=True)
class StepTokens:
    """A packed step on the host: Python lists for the per-token loop, numpy for the top alternatives."""

    tokens: list[list[int]]  # [rows][positions]
    logprobs: list[list[float]]  # [rows][positions]
    emitted: list[int]  # [rows]
    top_ids: np.ndarray  # int32 [rows, positions, top]
    top_logprobs: np.ndarray  # float32 [rows, positions, top]

    def top(self, row: int, position: int, k: int) -> tuple[tuple[int, float], ...]:
        """The `k` most probable (id, logprob) pairs at `row`'s `position`, most probable first (() for k = 0)."""
        return tuple(zip(self.top_ids[row, position, :k].tolist(), self.top_logprobs[row, position, :k].tolist())) if k else ()


def unpack(packed: np.ndarray) -> StepTokens:
    """The host copy of a `pack`ed step, split into its fields (no copy of the top alternatives)."""
    top = (packed.shape[-1] - 3) // 2
    floats = packed.view(np.float32)
    return StepTokens(tokens=packed[:, :, 0].tolist(), logprobs=floats[:, :, 1].tolist(), emitted=packed[:, 0, 2].tolist(),
                      top_ids=packed[:, :, 3:3 + top], top_logprobs=floats[:, :, 3 + top:])
