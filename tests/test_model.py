"""The model against Hugging Face transformers (the numerical reference) on the same random weights,
and the properties of the KV cache and jitted steps the engine relies on."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from helpers import hf_model
from llama_jax import steps
from llama_jax.compiles import CompileCounter
from llama_jax.config import RopeScaling, preset
from llama_jax.hf_checkpoint import load_hf_model, write_tiny_checkpoint
from llama_jax.kv_cache import init_cache

SHAPES = ["tiny-mha", "tiny-gqa"]
PROMPT = [1, 518, 25580, 29962, 15043, 29991, 1724, 338, 263, 4086, 29973, 518, 29914, 25580, 29962]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|: relative to the logits' scale (elementwise ratios blow up near 0)."""
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def full_forward(model, tokens: list[int]) -> np.ndarray:
    """Logits at every position of one sequence, through a cache of exactly its length."""
    t = len(tokens)
    cache = init_cache(model.cfg, 1, t)
    logits, _ = model(jnp.array([tokens]), jnp.arange(t)[None], cache)
    return np.asarray(logits[0])


@pytest.mark.parametrize("shape", SHAPES)
def test_prefill_logits_match_hf_float32(tiny_checkpoint, shape):
    path = tiny_checkpoint(shape)
    ours = full_forward(load_hf_model(path), PROMPT)
    with torch.no_grad():
        ref = hf_model(path)(torch.tensor([PROMPT])).logits[0].numpy()
    assert ref.std() > 1.0, "test weights should give peaked, non-uniform logits"
    assert rel_err(ours, ref) <= 1e-5


LLAMA_3_STYLE = {  # what Llama 3.x / SmolLM2 / TinyLlama-style checkpoints add to Llama 2's layout
    "tied": dict(tie_embeddings=True),
    "head-dim": dict(head_dim=32),  # 8 heads x 32 != dim 64
    "llama3-rope": dict(rope_scaling=RopeScaling("llama3", 4.0, 1.0, 4.0, original_max_len=64), rope_theta=5e5),
    "linear-rope": dict(rope_scaling=RopeScaling("linear", 2.0)),
}


@pytest.mark.parametrize("variant", LLAMA_3_STYLE)
def test_llama_3_style_configs_match_hf(tmp_path, variant):
    """Tied embeddings, an explicit head_dim and scaled RoPE, on 200 positions (past the
    scaling's original context), against transformers reading the same config.json."""
    cfg = preset("tiny-gqa").replace(**LLAMA_3_STYLE[variant])
    path = write_tiny_checkpoint(tmp_path / variant, cfg, seed=5)
    model = load_hf_model(path)
    assert model.cfg == cfg
    tokens = np.random.default_rng(1).integers(3, cfg.vocab_size, 200).tolist()
    ours = full_forward(model, tokens)
    hf = hf_model(path)
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].numpy()
    assert rel_err(ours, ref) <= 2e-5
    plain = full_forward(load_hf_model(write_tiny_checkpoint(tmp_path / "plain", preset("tiny-gqa"), seed=5)), tokens)
    assert rel_err(plain, ref) > 1e-3, "the variant must change the logits, or this test proves nothing"


def test_blocked_prefill_matches_hf(tiny_checkpoint):
    """Prompts longer than one causal query block, padded together into a 512 bucket: the
    last-token logits of each match HF on that prompt alone."""
    assert steps.PREFILL_QUERY_BLOCK < 200, "the prompts must span several query blocks"
    path = tiny_checkpoint("tiny-gqa")
    graphdef, params = nnx.split(load_hf_model(path))
    rng = np.random.default_rng(3)
    prompts = [[1, *rng.integers(3, 32000, n - 1).tolist()] for n in (300, 200)]
    logits, _ = steps.prefill(graphdef, params, *steps.pad_prompts(prompts, 512))
    hf = hf_model(path)
    for ours, prompt in zip(np.asarray(logits), prompts):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_64_greedy_tokens_match_hf_generate(tiny_checkpoint, shape):
    path = tiny_checkpoint(shape)
    ours = steps.greedy_generate(load_hf_model(path), PROMPT, 64)
    hf = hf_model(path)
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = out[0, len(PROMPT):].tolist()
    assert len(ref) == 64
    assert ours == ref


@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_close_to_hf_bfloat16(tiny_checkpoint, shape):
    """bfloat16 has 8 mantissa bits: logits agree to 3% of their scale, argmax at >= 90% of positions."""
    path = tiny_checkpoint(shape)
    ours = full_forward(load_hf_model(path, dtype="bfloat16"), PROMPT)
    with torch.no_grad():
        ref = hf_model(path, torch.bfloat16)(torch.tensor([PROMPT])).logits[0].float().numpy()
    assert rel_err(ours, ref) <= 3e-2
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= 0.9


def test_cache_decode_equals_full_forward(tiny_checkpoint):
    """Prefill a prefix into one row of a decode cache, then decode token by token: each step's
    logits equal the full forward's."""
    model = load_hf_model(tiny_checkpoint("tiny-gqa"))
    graphdef, params = nnx.split(model)
    full = full_forward(model, PROMPT)
    tokens, lengths = steps.pad_prompts([PROMPT[:5]], 16)
    logits, prefix = steps.prefill(graphdef, params, tokens, lengths)
    np.testing.assert_allclose(np.asarray(logits[0]), full[4], rtol=0, atol=1e-5 * np.abs(full).max())
    logits, cache = steps.prefill_into(graphdef, params, init_cache(model.cfg, 2, 64), tokens, lengths,
                                       np.array([1], np.int32))
    np.testing.assert_allclose(np.asarray(logits[0]), full[4], rtol=0, atol=1e-5 * np.abs(full).max())
    for pos in range(5, len(PROMPT)):
        batch = jnp.array([0, PROMPT[pos]], jnp.int32)  # row 0 is an idle slot
        logits, cache = steps.decode_step(graphdef, params, cache, batch)
        np.testing.assert_allclose(np.asarray(logits[1]), full[pos], rtol=0, atol=1e-5 * np.abs(full).max())
    assert int(cache.lengths[1]) == len(PROMPT)


SLOTS = [(2, 0), (0, 1), (3, 2), (1, 3)]  # (slot, prompt): scrambled


@pytest.mark.slow  # CI only: keeps the quick tier under 4 minutes
def test_rows_are_independent(tiny_checkpoint):
    """A row's logits do not depend on the other rows of the batch, their lengths or contents,
    nor on the stale keys an earlier occupant left in its slot (NaN included)."""
    model = load_hf_model(tiny_checkpoint("tiny-mha"))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 32000, n).tolist() for n in (3, 17, 9, 30)]
    alone = [steps.prefill(graphdef, params, *steps.pad_prompts([p], 32))[0][0] for p in prompts]
    together, _ = steps.prefill(graphdef, params, *steps.pad_prompts(prompts, 32))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)

    stale = init_cache(model.cfg, 4, 64)
    stale = stale.replace(k=stale.k.at[:, :, :, 40:].set(jnp.nan), v=stale.v.at[:, :, :, 40:].set(jnp.nan))
    order = [p for _, p in SLOTS]
    _, cache = steps.prefill_into(graphdef, params, stale, *steps.pad_prompts([prompts[p] for p in order], 32),
                                  np.array([s for s, _ in SLOTS], np.int32))
    mixed, _ = steps.decode_step(graphdef, params, cache, jnp.array([7, 8, 5, 6], jnp.int32))
    assert np.isfinite(np.asarray(mixed)).all(), "stale NaN keys past a row's length must not leak in"
    for slot, row in SLOTS:
        tokens, lengths = steps.pad_prompts([prompts[row]], 32)
        _, single = steps.prefill_into(graphdef, params, init_cache(model.cfg, 1, 64), tokens, lengths,
                                       np.zeros(1, np.int32))
        one, _ = steps.decode_step(graphdef, params, single, jnp.array([[7, 8, 5, 6][slot]], jnp.int32))
        np.testing.assert_allclose(np.asarray(mixed[slot]), np.asarray(one[0]), rtol=0, atol=1e-4)


def test_buckets():
    assert steps.length_buckets(2048) == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert steps.length_buckets(100, 16) == (16, 32, 64, 100)


def test_no_compiles_after_warmup(tiny_checkpoint):
    """Warm every prefill bucket and the decode step; then no prompt length, slot, context
    length or batch content compiles anything."""
    model = load_hf_model(tiny_checkpoint("tiny-gqa"))
    graphdef, params = nnx.split(model)
    max_len = 128
    buckets = steps.length_buckets(max_len)
    slots = 4

    def serve(prompt: list[int], slot: int, cache, rng):
        tokens, lengths = steps.pad_prompts([prompt], steps.bucket_for(len(prompt), buckets))
        _, cache = steps.prefill_into(graphdef, params, cache, tokens, lengths, np.array([slot], np.int32))
        for _ in range(3):
            _, cache = steps.decode_step(graphdef, params, cache, rng.integers(3, 32000, slots).astype(np.int32))
        return cache

    rng = np.random.default_rng(1)
    with CompileCounter() as warmup:
        for bucket in buckets:
            serve([5] * (bucket - 3), 0, init_cache(model.cfg, slots, max_len), rng)
    assert warmup.count >= len(buckets) + 1, "the counter must see the warm-up compiles"

    with CompileCounter() as counter:
        cache = init_cache(model.cfg, slots, max_len)
        for _ in range(12):
            n = int(rng.integers(1, 100))
            cache = serve(rng.integers(3, 32000, n).tolist(), int(rng.integers(0, slots)), cache, rng)
    assert counter.count == 0
