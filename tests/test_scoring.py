"""Scoring and the model's hidden states against Hugging Face transformers on the same random weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llama_jax import scoring
from llama_jax.compiles import CompileCounter
from llama_jax.hf_checkpoint import load_hf_model
from llama_jax.kv_cache import init_cache
from llama_jax.model import linear, rms_norm
from helpers import hf_log_softmax, hf_model


@pytest.fixture(scope="module")
def path(tiny_checkpoint):
    return tiny_checkpoint("tiny-gqa")


def test_scores_match_hf_log_softmax_over_several_chunks(path):
    """A 150-token sequence in chunks of 32 (5 chunks, keys of earlier chunks from the cache) and a
    7-token one padded beside it: every logprob and the top-5 alternatives match HF within 1e-4."""
    rng = np.random.default_rng(0)
    seqs = [[1, *rng.integers(3, 32000, 149).tolist()], [1, 450, 4996, 17354, 1701, 29889, 13]]
    ours = scoring.score_batch(load_hf_model(path), seqs, top_k=5, chunk=32)
    hf = hf_model(path)
    for s, seq in zip(ours, seqs):
        ref = hf_log_softmax(hf, seq)
        expected = ref[np.arange(len(seq) - 1), seq[1:]]
        assert np.isnan(s.logprobs[0]) and (s.top_ids[0] == -1).all()
        assert np.abs(s.logprobs[1:] - expected).max() <= 1e-4
        top_lp, top_ids = torch.topk(torch.tensor(ref[:-1]), 5)
        assert np.abs(s.top_logprobs[1:] - top_lp.numpy()).max() <= 1e-4
        assert (s.top_ids[1:] == top_ids.numpy()).mean() > 0.99  # near-ties may swap
        assert s.total == pytest.approx(float(expected.sum()), abs=1e-3)
        assert s.perplexity == pytest.approx(float(np.exp(-expected.mean())), rel=1e-4)
    assert ours[0].top_ids.shape == (150, 5) and ours[1].logprobs.shape == (7,)


def test_warm_up_compiles_every_one_row_program_scoring_runs(path):
    """`warm_up` compiles the one-row programs of every length bucket up to `max_len` (several at
    once, nothing run); scoring one sequence of any length then compiles nothing."""
    model, lengths, seen = load_hf_model(path), [1, 5, 64, 65, 129, 255], []
    scoring.warm_up(model, max(lengths), top_k=5, progress=lambda done, total, what, s: seen.append((done, total, what)))
    assert len(seen) >= 3 and [(d, t) for d, t, _ in seen] == [(d, len(seen)) for d in range(1, len(seen) + 1)]
    with CompileCounter() as compiles:
        scores = [scoring.score(model, [1] * n, top_k=5) for n in lengths]
    assert compiles.count == 0
    assert [s.logprobs.shape for s in scores] == [(n,) for n in lengths]
    with CompileCounter() as compiles:
        scoring.score(model, [1] * 5, top_k=3)  # another k is another program: the server warms only its own
    assert compiles.count == 1


def test_score_rejects_bad_sequences(path):
    model = load_hf_model(path)
    for bad in ([], [1, 32000], list(range(1, 258))):
        with pytest.raises(ValueError, match="sequences must be"):
            scoring.score(model, bad)


def test_hidden_states_are_hfs_residual_stream(path):
    """return_hidden gives the embedding and each layer's output (HF's hidden_states, whose last
    entry HF returns after the final norm); norm + LM head of the last one are the logits."""
    model = load_hf_model(path)
    ids = [1, 450, 4996, 17354, 1701, 29889]
    logits, _, hidden = model(jnp.array([ids]), jnp.arange(len(ids))[None], init_cache(model.cfg, 1, 16),
                              return_hidden=True)
    assert hidden.shape == (model.cfg.n_layers + 1, 1, len(ids), model.cfg.dim)
    with torch.no_grad():
        ref = hf_model(path)(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for ours, theirs in zip(hidden[:-1], ref[:-1]):
        assert np.abs(np.asarray(ours[0]) - theirs[0].numpy()).max() <= 1e-5 * np.abs(theirs.numpy()).max()
    last = rms_norm(hidden[-1], model.norm[...], model.cfg.norm_eps)
    assert np.abs(np.asarray(last[0]) - ref[-1][0].numpy()).max() <= 1e-4
    np.testing.assert_allclose(linear(last, model.lm_head[...], jnp.float32), logits, rtol=1e-6, atol=1e-6)


def test_chunks_bound_the_programs_memory(path):
    """XLA's own accounting: scoring 256 tokens in chunks of 32 needs less scratch memory than the
    [T, vocab] float32 logits alone would take, while one 256-token chunk needs more."""
    from flax import nnx

    graphdef, params = nnx.split(load_hf_model(path))
    tokens, lengths = np.ones((1, 256), np.int32), np.array([256], np.int32)
    temp = {chunk: scoring._score_padded.lower(graphdef, params, tokens, lengths, chunk=chunk, top_k=5)
            .compile().memory_analysis().temp_size_in_bytes for chunk in (32, 256)}
    whole = 256 * 32000 * 4
    assert temp[32] < whole / 2 < whole < temp[256]
