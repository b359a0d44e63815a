"""16-bit floats carried as their uint16 bit patterns on CPU, so that only the layer or key block
in use is ever converted to float32 (see `to_bits`). Weights enter this form in
`model.storage_params` and the cache in `kv_cache.init_cache`; they leave it in `layers.LayerWeights`
and where attention reads a block of keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_bits(x: jax.Array) -> jax.Array:
    """A 16-bit float array as its uint16 bit patterns (other arrays unchanged).

    XLA's CPU backend computes every 16-bit float op in float32 (float normalization), and then
    hoists the convert of a loop-invariant operand out of the layer loop: the whole stacked
    weights and cache would be upcast at once (60 GB of temporaries at 7B). Carried and sliced as
    integers, only the one layer or key block in use is ever converted.
    """
    floating16 = jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 2
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if floating16 else x


def from_bits(x: jax.Array, dtype) -> jax.Array:
    """Undo `to_bits`: uint16 bit patterns back to the 16-bit float `dtype` (others unchanged)."""
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 else x
