"""The decoder layers' weights in one of two explicit layouts, and the one loop that runs them.

*Stacked*: every layer weight is one array (or `Int8Weight`) leading with `n_layers`, and
`lax.scan` hands each iteration its layer's slices. int8 weights on CPU use it (the dequantizing
fusion reads its slice in place).

*Split* (`SplitWeight`): one buffer per layer. XLA's CPU backend cannot hand a library dot a
slice of a bigger buffer: in a scan over stacked float weights it copies each layer's matrices
out first, and decode runs 1.2-1.45x slower (docs/benchmarks.md). So float weights on CPU keep
one buffer per layer, and the scan picks layer `i`'s buffers with a `lax.switch` around each group
of matmuls: the dots read the buffers in place, while the rest of the layer (norms, rotary
embeddings, attention) is traced once.

On CPU either way the layers run as one scan: compile time and program size do not grow with
depth, and the stacked KV cache is carried through the loop and updated in place. On a GPU the
split layers run *unrolled*: XLA:GPU also copies each layer's slice of a stacked weight before its
GEMM (12 GiB a 7B decode step, docs/benchmarks.md), and a switch would wait on the host; the
cost is compile time that grows with depth.

16-bit floats on CPU stay `bits.to_bits` patterns between the two boundaries: `storage_params`
(weights enter) and `LayerWeights` (a layer's weights leave for its matmuls and norms).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig
from llama_jax.bits import from_bits
from llama_jax.platform import Platform, resolve

Matmul = Callable[[jax.Array, Any], jax.Array]  # (x, one layer's weight) -> x @ w.T


@partial(jax.tree_util.register_dataclass, data_fields=["parts"], meta_fields=["unrolled"])
@dataclasses.dataclass(frozen=True)
class SplitWeight:
    """One layer weight as one buffer per layer: `parts[i]` is layer i's, a one-layer stack
    `[1, ...]` (so each keeps the stacked weight's axes and shardings). `unrolled`: the layers
    run one after another in the program (accelerators) rather than in a switching scan (CPU)."""

    parts: tuple[Any, ...]
    unrolled: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape[1:])


def split_layers(cfg: LlamaConfig, platform: Platform | None = None) -> bool:
    """The layout that moves the fewest bytes (default platform: the host's): split everywhere
    but for int8 weights on a CPU (their dequantizing fusion reads a stacked slice in place)."""
    return not resolve(platform).cpu or cfg.quantization is None


def split_weight(w, unrolled: bool = False) -> SplitWeight:
    """A stacked layer weight (array or `Int8Weight`) as one buffer per layer (idempotent)."""
    return w if isinstance(w, SplitWeight) else SplitWeight(tuple(w[i:i + 1] for i in range(w.shape[0])), unrolled)


def unbits(w, dtype):
    """`from_bits` on every array of a weight (an array, or an Int8Weight's q and scale)."""
    return jax.tree.map(lambda a: from_bits(a, dtype), w)


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One layer's weights inside the scan, as the layer uses them: `norm(name)` and
    `linear(names, x)`, each weight back from `to_bits` form at this boundary. `pick(fn)` runs
    `fn(layer's weights dict)` on the weights of the current layer: the slices (stacked) or,
    split, inside a `lax.switch` over the layers' own buffers."""

    pick: Callable[[Callable[[dict], Any], tuple], Any]  # (fn(weights, *args), args) -> fn's result
    dtype: Any
    matmul: Matmul

    def norm(self, name: str) -> jax.Array:
        return self.pick(lambda w: from_bits(w[name], self.dtype), ())

    def linear(self, names: tuple[str, ...], x: jax.Array) -> tuple[jax.Array, ...]:
        """`x @ w.T` for each weight named, from one pick of the layer (one switch when split).
        The matmuls see `x` as rows `[N, in]`: inside a switch branch a reshape would be one more
        kernel per branch to compile (30 layers x 4 switches)."""
        rows = x.reshape(-1, x.shape[-1])
        out = self.pick(lambda w, rows: tuple(self.matmul(rows, unbits(w[n], self.dtype)) for n in names), (rows,))
        return tuple(y.reshape(*x.shape[:-1], y.shape[-1]) for y in out)


@dataclasses.dataclass(frozen=True)
class StackedLayers:
    """Layer weights stacked along a leading `n_layers` axis: the scan slices them."""

    weights: dict[str, Any]

    def scan(self, body: Callable, carry, n_layers: int, dtype, matmul: Matmul):
        """`body(carry, LayerWeights, layer index) -> (carry, y)` over every layer; (carry, stacked ys)."""
        def step(carry, xs):
            w, layer = xs
            return body(carry, LayerWeights(lambda fn, args: fn(w, *args), dtype, matmul), layer)

        return jax.lax.scan(step, carry, (self.weights, jnp.arange(n_layers, dtype=jnp.int32)))


@dataclasses.dataclass(frozen=True)
class SplitLayers:
    """Layer weights as one buffer per layer (`SplitWeight`): the scan switches between them, or
    (`unrolled`) the layers run one after another."""

    weights: dict[str, SplitWeight]
    unrolled: bool = False

    def scan(self, body: Callable, carry, n_layers: int, dtype, matmul: Matmul):
        """As `StackedLayers.scan`; each group of matmuls is a switch whose branch i reads layer i's
        buffers in place (a dot's only copy-free operand on CPU). Unrolled (accelerators, where a
        switch waits on the host and a sliced stack is copied), each layer reads its own buffers."""
        layers = [{name: w.parts[i][0] for name, w in self.weights.items()} for i in range(n_layers)]
        if self.unrolled:
            ys = []
            for i, w in enumerate(layers):
                carry, y = body(carry, LayerWeights(lambda fn, args, w=w: fn(w, *args), dtype, matmul), jnp.int32(i))
                ys.append(y)
            return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)

        def step(carry, layer):
            def pick(fn, args):
                return jax.lax.switch(layer, [partial(fn, w) for w in layers], *args)

            return body(carry, LayerWeights(pick, dtype, matmul), layer)

        return jax.lax.scan(step, carry, jnp.arange(n_layers, dtype=jnp.int32))


def layout(weights: dict[str, Any]) -> StackedLayers | SplitLayers:
    """The layout the layer weights are stored in (`storage_params`): split or stacked, never mixed."""
    kinds = {w.unrolled if isinstance(w, SplitWeight) else None for w in weights.values()}
    if len(kinds) != 1:
        raise ValueError("layer weights must be all stacked, or all split the same way")
    (kind,) = kinds
    return StackedLayers(weights) if kind is None else SplitLayers(weights, unrolled=kind)

