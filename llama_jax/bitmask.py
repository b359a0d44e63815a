"""Token masks as llguidance packs them: int32 words, bit i of word w allows token 32w + i.

Structured output writes a constrained row's mask straight into such words (llguidance's
`fill_next_token_bitmask`), the engine uploads them (1/8 of a bool mask: 4 KB a row at a
32000-piece vocabulary; step_masks.py) and the device programs `expand` them before sampling. A row of
`EVERYTHING` words allows every token. The host helpers below edit or read one row in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

EVERYTHING = -1  # a word with all 32 bits set


def words(vocab: int) -> int:
    """The int32 words of one row's mask over `vocab` tokens."""
    return (vocab + 31) // 32


def everything(rows: int, vocab: int) -> np.ndarray:
    """int32 [rows, words(vocab)]: masks that allow every token."""
    return np.full((rows, words(vocab)), EVERYTHING, np.int32)


def pack(allowed: np.ndarray) -> np.ndarray:
    """bool [..., vocab] as int32 [..., words(vocab)] (for constraints that think in bools, and tests)."""
    vocab = allowed.shape[-1]
    padded = np.zeros((*allowed.shape[:-1], 32 * words(vocab)), bool)
    padded[..., :vocab] = allowed
    return np.packbits(padded, axis=-1, bitorder="little").view(np.int32)


def unpack(row: np.ndarray, vocab: int) -> np.ndarray:
    """One row's int32 words as bool [vocab], on the host (tests, tools, rare fallbacks: never per step)."""
    return np.unpackbits(np.ascontiguousarray(row).view(np.uint8), bitorder="little", count=vocab).view(bool)


def only(row: np.ndarray, token: int) -> None:
    """Make `row` allow `token` alone."""
    row[:] = 0
    row.view(np.uint32)[token >> 5] = np.uint32(1 << (token & 31))


def forbid(row: np.ndarray, token: int) -> None:
    """Take `token` out of `row`."""
    row.view(np.uint32)[token >> 5] &= np.uint32(~(1 << (token & 31)) & 0xFFFFFFFF)


def count(row: np.ndarray) -> int:
    """How many tokens `row` allows (with any bits past the vocabulary: llguidance never sets them)."""
    return int(np.bitwise_count(row.view(np.uint32)).sum())


def expand(masks: jax.Array, vocab: int) -> jax.Array:
    """int32 [..., words] as bool [..., vocab], on the device: one fused shift-and-test per token."""
    bits = jnp.right_shift(masks[..., None], jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(*masks.shape[:-1], -1)[..., :vocab].astype(bool)
