"""int8 weights end to end: the scheme's arithmetic, `convert-weights --quantize int8` files,
load-time quantization, quality against the float32 model on the same random weights, tensor
parallelism, and, from the compiled CPU programs, that no dequantized copy of a weight matrix is
ever built."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import checkpoint, plan, quantize, sharding, steps
from llama_jax.config import preset
from llama_jax.convert import main, stored_bytes
from llama_jax.engine import EngineConfig
from llama_jax.kv_cache import init_cache
from llama_jax.model import is_quantized, storage_params, weight_specs

PROMPT = [1, 518, 25580, 29962, 15043, 29991, 1724, 338, 263, 4086, 29973, 518, 29914, 25580, 29962]
# Quality tolerances against float32 on the same random weights (the real model's are in
# test_int8_real_model.py). Random tiny models have many near-ties, so greedy decoding forks
# early; teacher-forced agreement over the 64 float32 greedy tokens is the stable measure.
MAX_REL_ERR = 0.05  # max |dlogit| / max |logit|
MAX_MEAN_KL = 0.01  # nats, next-token KL(f32 || int8)
MIN_AGREEMENT = 0.85  # teacher-forced greedy agreement over 64 tokens
MIN_IDENTICAL_PREFIX = 8  # free-running greedy tokens identical to float32's before the first fork


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    """Factory: (float32 checkpoint, int8 checkpoint) converted from the same HF weights."""
    made = {}

    def get(name: str) -> tuple:
        if name not in made:
            hf, out = tiny_checkpoint(name), tmp_path_factory.mktemp("q")
            assert main([str(hf), str(out / "f32"), "--quiet"]) == 0
            assert main([str(hf), str(out / "int8"), "--quiet", "--quantize", "int8"]) == 0
            made[name] = out / "f32", out / "int8"
        return made[name]

    return get


def test_scheme_blocks_of_32_symmetric_round_to_nearest():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype(np.float32) * rng.uniform(0.01, 3, (48, 96)).astype(np.float32)
    w[7, 32:64] = 0.0  # an all-zero block
    q, scale = quantize.quantize_np(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (48, 3)
    assert np.abs(q.astype(int)).max() == 127 and q.min() >= -127  # symmetric: -128 is never used
    amax = np.abs(w.reshape(48, 3, 32)).max(-1)
    np.testing.assert_array_equal(scale[amax > 0], (amax * quantize.INV_QMAX)[amax > 0])
    assert scale[7, 1] == 1 and not q[7, 32:64].any() and q[7, :32].any()
    steps_ = np.repeat(scale, 32, axis=1)
    err = np.abs(w - q * steps_)
    assert np.all(err <= steps_ / 2 * (1 + 1e-6))  # round to nearest: at most half a step of its own block
    dq = jax.jit(quantize.quantize)(jnp.asarray(w))  # the load-time path gives the same bits
    np.testing.assert_array_equal(np.asarray(dq.q), q)
    np.testing.assert_array_equal(np.asarray(dq.scale), scale)
    np.testing.assert_allclose(np.asarray(quantize.dequantize(dq)), q * steps_, rtol=1e-6)


@pytest.mark.parametrize("cols, block", [(4096, 32), (11008, 32), (688, 16), (40, 8), (27, 27)])
def test_block_size_falls_back_for_odd_input_sizes(cols, block):
    assert quantize.block_size(cols) == block
    assert quantize.scale_shape((2, 5, cols)) == (2, 5, cols // block)


def test_q8_0_blocks_map_bit_for_bit():
    """A GGUF Q8_0 tensor (per block: float16 scale, 32 int8) becomes an Int8Weight with the same
    values as the gguf package's own dequantization, with no float round trip."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

    w = np.random.default_rng(3).standard_normal((6, 64)).astype(np.float32)
    raw = gguf_quantize(w, GGMLQuantizationType.Q8_0)
    got = quantize.from_q8_0(raw, (6, 64))
    assert got.q.dtype == np.int8 and got.scale.shape == (6, 2)
    np.testing.assert_array_equal(np.asarray(quantize.dequantize(got)), gguf_dequantize(raw, GGMLQuantizationType.Q8_0))


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("out", [300, 5000])  # 5000 x 64 goes through the CPU's row blocks
def test_linear_equals_the_dequantized_matmul(rows, out):
    rng = np.random.default_rng(1)
    w = quantize.quantize(jnp.asarray(rng.standard_normal((out, 64)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((rows, 2, 64)), jnp.float32)
    ref = np.asarray(x) @ np.asarray(quantize.dequantize(w)).T
    got = np.asarray(jax.jit(quantize.linear)(x, w))
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))
    emb = quantize.embed(w, jnp.array([[0, 299]]), jnp.float32)
    np.testing.assert_allclose(np.asarray(emb[0]), np.asarray(quantize.dequantize(w))[[0, 299]], rtol=1e-6)


def test_int8_checkpoint_files_and_load(converted):
    f32, int8 = converted("tiny-gqa")
    manifest = json.loads((int8 / "manifest.json").read_text())
    assert manifest["format_version"] == checkpoint.QUANTIZED_FORMAT_VERSION
    assert manifest["quantization"]["scheme"] == "int8" and manifest["quantization"]["block"] == 32
    assert json.loads((int8 / "config.json").read_text())["quantization"] == "int8"
    assert "quantization" not in json.loads((f32 / "config.json").read_text())  # float configs read as before
    ratio = manifest["bytes"] / json.loads((f32 / "manifest.json").read_text())["bytes"]
    cfg = checkpoint.read_config(int8)
    expected = stored_bytes(cfg) / stored_bytes(cfg.replace(quantization=None))  # 1/4 + 1/32 for the scales
    assert 0.28 < expected < 0.29 and abs(ratio - expected) < 0.04, (ratio, expected)  # plus orbax metadata
    loaded = checkpoint.load(int8)  # no flag: the checkpoint says int8
    cfg = loaded.cfg
    assert cfg.quantization == "int8"
    flat = dict(nnx.to_flat_state(loaded.params))
    for path, spec in weight_specs(cfg).items():
        value = flat[path].get_value()
        if is_quantized(cfg, spec):  # every matrix, embedding and LM head included
            assert value.q.dtype == jnp.int8 and value.q.shape == spec.shape
            assert value.scale.dtype == jnp.float32 and value.scale.shape == quantize.scale_shape(spec.shape)
        else:  # norms stay in the model dtype
            assert value.dtype == jnp.float32 and len(spec.tensor_shape) == 1
    assert {p for p, s in weight_specs(cfg).items() if is_quantized(cfg, s)} >= {("embed",), ("lm_head",), ("layers", "wq")}
    bf16 = checkpoint.load(int8, dtype="bfloat16")  # the dtype flag casts norms; int8 stays int8
    assert bf16.params["norm"].get_value().dtype == jnp.bfloat16
    assert bf16.params["layers"]["w_up"].get_value().q.dtype == jnp.int8


def test_old_readers_refuse_and_disagreement_is_caught(converted, tmp_path):
    import shutil

    _, int8 = converted("tiny-gqa")
    bad = tmp_path / "bad"
    shutil.copytree(int8, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "format_version": checkpoint.FORMAT_VERSION}))
    with pytest.raises(checkpoint.CheckpointError, match="disagree on quantization"):
        checkpoint.load(bad)
    (bad / "manifest.json").write_text(json.dumps({**manifest, "format_version": 3}))  # per-channel int8
    with pytest.raises(checkpoint.CheckpointError, match=r"one scale per output channel.*--quantize int8 --force"):
        checkpoint.load(bad)


@pytest.mark.parametrize("tp", [1, 2])
def test_load_time_quantization_equals_converted_int8(converted, tp):
    f32, int8 = converted("tiny-gqa")
    mesh = sharding.make_mesh(tp) if tp > 1 else None
    at_load = dict(nnx.to_flat_state(checkpoint.load(f32, mesh=mesh, quantization="int8").params))
    stored = dict(nnx.to_flat_state(checkpoint.load(int8, mesh=mesh).params))
    assert at_load.keys() == stored.keys()
    for path in stored:
        for a, b in zip(jax.tree.leaves(at_load[path].get_value()), jax.tree.leaves(stored[path].get_value())):
            assert a.dtype == b.dtype and a.sharding.is_equivalent_to(b.sharding, a.ndim)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _logits(loaded, tokens: list[int]) -> tuple[np.ndarray, object]:
    model = loaded.model
    logits, _ = model(jnp.array([tokens]), jnp.arange(len(tokens))[None], init_cache(loaded.cfg, 1, len(tokens)))
    return np.asarray(logits[0], np.float64), model


def _log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("shape", ["tiny-mha", "tiny-gqa", "demo"])
def test_quality_against_float32(converted, shape):
    """Logits relative error, next-token KL and greedy agreement over 64 tokens, vs float32."""
    f32, int8 = (checkpoint.load(p) for p in converted(shape))
    ref = steps.greedy_generate(f32.model, PROMPT, 64)
    seq = PROMPT + ref
    lf, _ = _logits(f32, seq)
    lq, model = _logits(int8, seq)
    rel = np.max(np.abs(lq - lf)) / np.max(np.abs(lf))
    pf, pq = _log_softmax(lf), _log_softmax(lq)
    kl = np.sum(np.exp(pf) * (pf - pq), axis=-1)
    start = len(PROMPT) - 1  # the position that predicts the first generated token
    agreement = np.mean(np.argmax(lq[start:start + 64], axis=-1) == np.array(ref))
    free = steps.greedy_generate(model, PROMPT, 64)
    prefix = next((i for i, (a, b) in enumerate(zip(free, ref)) if a != b), 64)
    print(f"{shape}: rel {rel:.4f}, KL mean {kl.mean():.5f} max {kl.max():.5f}, "
          f"agreement {agreement:.3f}, identical prefix {prefix}")
    assert rel <= MAX_REL_ERR
    assert kl.mean() <= MAX_MEAN_KL
    assert agreement >= MIN_AGREEMENT
    assert prefix >= MIN_IDENTICAL_PREFIX


def _greedy(loaded, mesh, new_tokens: int = 8):
    prompts = [PROMPT[:9], PROMPT[3:8]]
    params = loaded.params
    tokens, lengths = steps.pad_prompts(prompts, 16)
    cache = sharding.shard_cache(init_cache(loaded.cfg, len(prompts), 64), loaded.cfg, mesh)
    logits, cache = steps.prefill_into(loaded.graphdef, params, cache, tokens, lengths, np.arange(2, dtype=np.int32))
    out, all_logits = [], [np.asarray(logits)]
    for _ in range(new_tokens):
        nxt = np.asarray(jnp.argmax(logits, axis=-1)).astype(np.int32)
        out.append(nxt)
        logits, cache = steps.decode_step(loaded.graphdef, params, cache, nxt)
        all_logits.append(np.asarray(logits))
    return np.stack(all_logits), np.stack(out)


_reference: list = []


@pytest.mark.slow  # CI only: keeps the quick tier under 4 minutes
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel_same_tokens_as_one_device(converted, tp):
    _, int8 = converted("tiny-gqa")
    if not _reference:
        _reference.append(_greedy(checkpoint.load(int8), None))
    ref_logits, ref_tokens = _reference[0]
    mesh = sharding.make_mesh(tp)
    loaded = checkpoint.load(int8, mesh=mesh)
    P = jax.sharding.PartitionSpec
    wq = loaded.params["layers"]["wq"].get_value()  # column-parallel: scales split with the output axis
    assert wq.q.sharding.spec == P(None, "tp", None) and wq.scale.sharding.spec == P(None, "tp", None)
    down = loaded.params["layers"]["w_down"].get_value()  # row-parallel: the blocks split with the inputs
    assert down.q.sharding.spec == P(None, None, "tp")
    # 160 inputs over tp 2, 4, 8 leave 80, 40, 20 per device: not whole blocks of 32, so the scales replicate
    assert down.scale.sharding.is_fully_replicated
    head = loaded.params["lm_head"].get_value()
    assert head.scale.sharding.spec == P("tp", None)
    logits, tokens = _greedy(loaded, mesh)
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert np.max(np.abs(logits - ref_logits)) <= 1e-5 * np.abs(ref_logits).max()


def _weight_shaped_f32(hlo: str, cfg) -> list[str]:
    """Float arrays in the compiled program that hold a whole weight matrix: two adjacent
    dimensions equal to a matrix's [out, in] (or transposed)."""
    pairs = {tuple(s.tensor_shape) for s in weight_specs(cfg).values() if len(s.tensor_shape) == 2}
    pairs |= {p[::-1] for p in pairs}
    found = []
    for shape in re.findall(r"(?:f32|bf16|f16)\[([0-9,]+)\]", hlo):
        dims = tuple(int(d) for d in shape.split(","))
        if any(dims[i:i + 2] in pairs for i in range(len(dims) - 1)):
            found.append(shape)
    return found


def _cpu_decode(cfg, rows: int = 8):
    """The CPU engine's own decode program (in its own layer layout, `split_layers`), compiled
    from abstract shapes: no weight is allocated."""
    from llama_jax.device import Programs, empty_state
    from llama_jax.layers import split_layers
    from llama_jax.model import abstract_model

    config = EngineConfig(max_slots=8, max_seq_len=256)
    graphdef, state = nnx.split(abstract_model(cfg))
    params = jax.eval_shape(lambda s: storage_params(cfg, s, split_layers(cfg)), state)
    decode = jax.eval_shape(lambda: empty_state(cfg, 8, 256))
    compiled = Programs.build(graphdef, cfg, config, None).decode.lower(params, decode, rows=rows).compile()
    return compiled, plan.per_device_bytes(params)


@pytest.mark.parametrize("rows", [1, 8])
def test_cpu_decode_builds_no_dequantized_weight(rows):
    """From the compiled CPU decode program at the cpu-bench shape: temporaries far below the int8
    weights' bytes and no larger than the float32 model's plus one layer's int8 weights (the layer
    scan's slice of the stacked int8 weights), and no float array as large as a weight matrix
    anywhere in the program."""
    cfg = preset("cpu-bench").replace(quantization="int8")
    compiled, weights = _cpu_decode(cfg, rows)
    temp = compiled.memory_analysis().temp_size_in_bytes
    float_temp = _cpu_decode(cfg.replace(quantization=None), rows)[0].memory_analysis().temp_size_in_bytes
    print(f"{rows} rows: int8 weights {weights / 2**20:.1f} MiB, decode temporaries {temp / 2**20:.2f} MiB "
          f"(float32 model: {float_temp / 2**20:.2f} MiB)")
    assert temp < 0.1 * weights
    layer = sum(np.prod(s.tensor_shape) * (1 + 4 / quantize.BLOCK) for s in weight_specs(cfg).values()
                if s.stacked and len(s.tensor_shape) == 2)
    assert temp <= float_temp + layer + quantize.CPU_BLOCK_BYTES * 3
    hlo = compiled.as_text()
    assert not _weight_shaped_f32(hlo, cfg)
    naive = jax.jit(lambda x, q: x @ q.astype(jnp.float32).T).lower(  # the check does see a dequantized copy
        jax.ShapeDtypeStruct((rows, 768), jnp.float32), jax.ShapeDtypeStruct((2048, 768), jnp.int8)).compile()
    assert _weight_shaped_f32(naive.as_text(), cfg)


def test_plan_counts_int8_weights():
    """`llama-jax plan`'s weight bytes for int8: one byte a weight plus a float32 scale per 32, about
    9/32 of float32's, and the same split over tp."""
    cfg = preset("llama-2-7b").replace(dtype="float32")
    f32 = plan.per_device_bytes(plan.abstract_params(cfg, None)[1])
    q = cfg.replace(quantization="int8")
    int8 = plan.per_device_bytes(plan.abstract_params(q, None)[1])
    n_matrix = sum(int(np.prod(s.shape)) for s in weight_specs(q).values() if is_quantized(q, s))
    n_scale = sum(int(np.prod(quantize.scale_shape(s.shape))) for s in weight_specs(q).values() if is_quantized(q, s))
    n_norm = sum(int(np.prod(s.shape)) for s in weight_specs(q).values() if not is_quantized(q, s))
    assert int8 == n_matrix + 4 * n_scale + 4 * n_norm
    assert 0.281 <= int8 / f32 < 0.282
    tp8 = plan.per_device_bytes(plan.abstract_params(q, sharding.make_mesh(8))[1])
    assert tp8 < int8 / 7.9


@pytest.mark.slow
def test_plan_cli_int8(capsys, converted):
    """`llama-jax plan --quantize int8`, and an int8 checkpoint planned as int8 with no flag."""
    from llama_jax import cli

    small = ["--max-slots", "2", "--max-seq-len", "64", "--json"]
    cfg = preset("tiny-gqa").replace(quantization="int8")
    assert cli.main(["plan", "--preset", "tiny-gqa", "--quantize", "int8", *small]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["per_device_bytes"]["weights"] == stored_bytes(cfg)
    assert cli.main(["plan", "--checkpoint", str(converted("tiny-gqa")[1]), *small]) == 0
    assert json.loads(capsys.readouterr().out)["per_device_bytes"]["weights"] == stored_bytes(cfg)


@pytest.mark.slow
def test_gpu_check_int8_fusion_check_on_cpu(tmp_path, tokenizer_path):
    """tools/gpu_check.py --quantize int8 runs the same path as on the GPU day, here on CPU (the
    real-model logits step is test_plan's, so not run again)."""
    import sys

    from live_server import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import gpu_check

    result = gpu_check.main(["--preset", "tiny-gqa", "--dtype", "float32", "--quantize", "int8", "--max-seq-len", "256",
                             "--slots", "2", "--concurrency", "2", "--context", "64", "--decode-tokens", "8",
                             "--tokenizer", str(tokenizer_path), "--compilation-cache", str(tmp_path / "xla"),
                             "--smollm2", str(tmp_path / "absent.gguf")])
    assert result["quantization"] == "int8" and result["int8_check_target"] == "h200"  # a CPU host checks the GPU's path
    assert result["int8_no_whole_matrix_copy"] is True and "triton:int8_block_matmul" in result["int8_kernels"]
    assert result["batch1_decode_tok_s"] > 0
