"""Packed token masks (bitmask.py): llguidance's layout on the host and the device agree."""

import jax.numpy as jnp
import llguidance.numpy
import numpy as np
import pytest

from llama_jax import bitmask


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 32000, 32064, 49153])
def test_pack_unpack_and_device_expand_agree_with_llguidance(vocab):
    rng = np.random.default_rng(vocab)
    allowed = rng.random((3, vocab)) < 0.5
    words = bitmask.pack(allowed)
    assert words.shape == llguidance.numpy.get_bitmask_shape(3, vocab) and words.dtype == np.int32
    logits = np.zeros((3, vocab), np.float32)
    llguidance.numpy.apply_token_bitmask_inplace(logits, words)  # llguidance's own reading of the words
    assert np.array_equal(logits == 0, allowed)
    assert all(np.array_equal(bitmask.unpack(words[r], vocab), allowed[r]) for r in range(3))
    assert np.array_equal(np.asarray(bitmask.expand(jnp.asarray(words), vocab)), allowed)


def test_row_edits():
    vocab = 32000
    row = bitmask.everything(2, vocab)[1]
    assert bitmask.unpack(row, vocab).all()
    bitmask.forbid(row, 31)  # the sign bit of word 0
    assert bitmask.count(row) == 32 * bitmask.words(vocab) - 1 and not bitmask.unpack(row, vocab)[31]
    bitmask.only(row, 31999)
    assert np.flatnonzero(bitmask.unpack(row, vocab)).tolist() == [31999] and bitmask.count(row) == 1
