"""The model against Hugging Face transformers (the numerical reference) on the same random weights,
and the properties of the KV cache and jitted steps the engine relies on."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaForCausalLM

from llama_jax import steps
from llama_jax.compiles import CompileCounter
from llama_jax.hf_checkpoint import load_hf_model
from llama_jax.kv_cache import init_cache

SHAPES = ["tiny-mha", "tiny-gqa"]
PROMPT = [1, 518, 25580, 29962, 15043, 29991, 1724, 338, 263, 4086, 29973, 518, 29914, 25580, 29962]


def hf_model(path, dtype=torch.float32):
    return LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


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
    """Prefill a prefix, then decode token by token: each step's logits equal the full forward's."""
    model = load_hf_model(tiny_checkpoint("tiny-gqa"))
    graphdef, params = nnx.split(model)
    full = full_forward(model, PROMPT)
    tokens, lengths = steps.pad_prompts([PROMPT[:5]], 16)
    logits, prefix = steps.prefill(graphdef, params, tokens, lengths)
    np.testing.assert_allclose(np.asarray(logits[0]), full[4], rtol=0, atol=1e-5 * np.abs(full).max())
    cache = steps.insert(prefix, init_cache(model.cfg, 2, 64), jnp.int32(1), jnp.int32(0))
    for pos in range(5, len(PROMPT)):
        batch = jnp.array([0, PROMPT[pos]], jnp.int32)  # row 0 is an idle slot
        logits, cache = steps.decode_step(graphdef, params, cache, batch, kv_len=32)
        np.testing.assert_allclose(np.asarray(logits[1]), full[pos], rtol=0, atol=1e-5 * np.abs(full).max())
    assert int(cache.lengths[1]) == len(PROMPT)


def test_rows_are_independent(tiny_checkpoint):
    """A row's logits do not depend on the other rows of the batch, their lengths or contents."""
    model = load_hf_model(tiny_checkpoint("tiny-mha"))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 32000, n).tolist() for n in (3, 17, 9, 30)]
    alone = [steps.prefill(graphdef, params, *steps.pad_prompts([p], 32))[0][0] for p in prompts]
    together, prefix = steps.prefill(graphdef, params, *steps.pad_prompts(prompts, 32))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)

    cache = init_cache(model.cfg, 4, 64)
    for slot, row in [(2, 0), (0, 1), (3, 2), (1, 3)]:  # scrambled slots
        cache = steps.insert(prefix, cache, jnp.int32(slot), jnp.int32(row))
    mixed, _ = steps.decode_step(graphdef, params, cache, jnp.array([7, 8, 5, 6], jnp.int32), kv_len=64)
    for slot, row in [(2, 0), (0, 1), (3, 2), (1, 3)]:
        single = init_cache(model.cfg, 1, 64)
        single = steps.insert(prefix, single, jnp.int32(0), jnp.int32(row))
        one, _ = steps.decode_step(graphdef, params, single, jnp.array([[7, 8, 5, 6][slot]], jnp.int32), kv_len=64)
        np.testing.assert_allclose(np.asarray(mixed[slot]), np.asarray(one[0]), rtol=0, atol=1e-4)


def test_buckets_and_decode_windows():
    assert steps.length_buckets(2048) == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert steps.length_buckets(100, 16) == (16, 32, 64, 100)
    windows = steps.decode_windows(4096)
    assert windows == (128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
    for needed in range(129, 4097):  # a step never reads more than 1.5x the keys it needs
        assert needed <= steps.bucket_for(needed, windows) <= 1.5 * needed
    assert steps.decode_windows(100) == (100,)


def test_no_compiles_after_warmup(tiny_checkpoint):
    """Warm every prefill bucket, the insert and the decode windows; then no prompt length,
    slot or batch content compiles anything."""
    model = load_hf_model(tiny_checkpoint("tiny-gqa"))
    graphdef, params = nnx.split(model)
    max_len = 128
    buckets = steps.length_buckets(max_len)
    windows = steps.decode_windows(max_len, smallest=32)
    slots = 4

    def serve(prompt: list[int], slot: int, cache, rng):
        bucket = steps.bucket_for(len(prompt), buckets)
        _, prefix = steps.prefill(graphdef, params, *steps.pad_prompts([prompt], bucket))
        cache = steps.insert(prefix, cache, jnp.int32(slot), jnp.int32(0))
        for _ in range(3):
            window = steps.bucket_for(int(np.max(np.asarray(cache.lengths))) + 1, windows)
            tokens = rng.integers(3, 32000, slots).astype(np.int32)
            _, cache = steps.decode_step(graphdef, params, cache, tokens, kv_len=window)
        return cache

    rng = np.random.default_rng(1)
    with CompileCounter() as warmup:
        for bucket in buckets:
            serve([5] * (bucket - 3), 0, init_cache(model.cfg, slots, max_len), rng)
        for window in windows:
            steps.decode_step(graphdef, params, init_cache(model.cfg, slots, max_len), np.zeros(slots, np.int32), kv_len=window)
    assert warmup.count >= len(buckets) + len(windows), "the counter must see the warm-up compiles"

    with CompileCounter() as counter:
        cache = init_cache(model.cfg, slots, max_len)
        for _ in range(12):
            n = int(rng.integers(1, 100))
            cache = serve(rng.integers(3, 32000, n).tolist(), int(rng.integers(0, slots)), cache, rng)
    assert counter.count == 0
