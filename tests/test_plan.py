"""`llama-jax plan` (AOT capacity planning), `--max-slots auto`, and tools/gpu_check.py at a small
preset on CPU (the same code path the GPU day runs)."""

import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx

from llama_jax import attention, cli, plan, platform
from llama_jax.config import preset
from llama_jax.device import program_shapes
from llama_jax.engine import EngineConfig
from llama_jax.hf_checkpoint import param_count
from conftest import SMOLLM2_GGUF

REPO_ROOT = Path(__file__).resolve().parents[1]


SMALL = ["--max-slots", "1", "--max-seq-len", "32"]  # five programs: each compile takes seconds here


def run_plan(capsys, *args) -> dict:
    assert cli.main(["plan", *args, *SMALL, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_plan_reports_programs_bytes_and_fit(capsys):
    cfg = preset("tiny-gqa")
    report = run_plan(capsys, "--preset", "tiny-gqa", "--memory", "64MiB")
    assert set(report) == {"platform", "device_kind", "programs", "compile_s", "devices", "per_device_bytes", "memory",
                           "max_slots_that_fit", "kernels", "per_program"}
    assert report["programs"] == len(program_shapes(EngineConfig(max_slots=1), 32)) == 6 == len(report["per_program"])
    assert report["platform"] == "cpu" and report["kernels"] == []  # the CPU runs its XLA paths
    assert report["memory"] == 64 * 2**20
    assert report["devices"] == 1 and report["compile_s"] > 0
    per = report["per_device_bytes"]
    assert per["weights"] == param_count(cfg) * 4
    assert per["kv_cache"] == 2 * cfg.n_layers * 1 * cfg.n_kv_heads * 32 * cfg.head_dim * 4  # k and v, 1 slot
    assert 0 < per["temp"] < per["weights"]
    slot = plan.slot_bytes(cfg, 32, 1)
    assert report["max_slots_that_fit"] == (64 * 2**20 - per["weights"] - per["temp"]) // slot


@pytest.mark.slow
def test_plan_at_tp_shards_weights_and_cache(capsys):
    one = run_plan(capsys, "--preset", "tiny-mha", "--dtype", "bfloat16")
    four = run_plan(capsys, "--preset", "tiny-mha", "--dtype", "bfloat16", "--tp", "4")
    assert four["devices"] == 4 and four["max_slots_that_fit"] is None
    assert four["per_device_bytes"]["kv_cache"] == one["per_device_bytes"]["kv_cache"] // 4
    assert one["per_device_bytes"]["weights"] / 4 <= four["per_device_bytes"]["weights"] < one["per_device_bytes"]["weights"] / 2


@pytest.mark.slow
def test_plan_beyond_the_visible_devices_runs_on_fake_ones():
    """With one visible device, --tp 2 re-runs itself over two fake CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-m", "llama_jax.cli", "plan", "--preset", "tiny-mha", "--tp", "2", *SMALL, "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["devices"] == 2


def test_plan_refuses_bad_input(capsys):
    assert cli.main(["plan", "--preset", "tiny-mha", "--tp", "3"]) == 1
    assert "does not divide" in capsys.readouterr().err
    assert cli.main(["plan", "--preset", "tiny-mha", "--memory", "lots"]) == 1
    assert "cannot read 'lots' as a size" in capsys.readouterr().err


def test_parse_bytes():
    assert plan.parse_bytes("80GiB") == 80 * 2**30 and plan.parse_bytes("24GB") == 24 * 10**9
    assert plan.parse_bytes("512 MiB") == 512 * 2**20 and plan.parse_bytes("1000") == 1000
    with pytest.raises(ValueError):
        plan.parse_bytes("GiB")


@pytest.mark.slow  # CI only: keeps the quick tier under 4 minutes
def test_auto_slots_is_the_plan_arithmetic():
    cfg = preset("tiny-gqa")
    slots, used = plan.auto_slots(cfg, 256, None, free=100 * 2**20)
    assert used["per_slot"] == plan.slot_bytes(cfg, 256, 1) and used["temp"] > 0
    assert slots == min(plan.MAX_AUTO_SLOTS, int((used["free"] * 0.95 - used["temp"]) // used["per_slot"]))
    assert slots * used["per_slot"] + used["temp"] <= used["free"]
    assert plan.auto_slots(cfg, 256, None, free=used["per_slot"] // 2)[0] == 1, "always at least one slot"


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_cpu(tmp_path, tokenizer_path):
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import gpu_check

    out = tmp_path / "gpu_check.json"
    result = gpu_check.main(["--preset", "tiny-gqa", "--max-seq-len", "256", "--slots", "2", "--concurrency", "2",
                             "--context", "64", "--decode-tokens", "8", "--tokenizer", str(tokenizer_path),
                             "--compilation-cache", str(tmp_path / "xla"), "--smollm2", str(SMOLLM2_GGUF),
                             "--mask-upload", "rows", "--out", str(out)])  # an accelerator's masks, and the A/B
    assert json.loads(out.read_text()) == result
    assert result["kernels"] == {"decode": "xla", "prefill": "xla"}  # CPU keeps its XLA paths
    assert result["kernels_as_planned"] and result["planned_target"] is None  # no target matches a CPU: no kernels
    assert result["device_kernels"] == {"prefill 1 x 256": [], "decode 2 slots": []}
    assert result["logits_random_2_layers_ok"] and result["logits_random_2_layers_rel_max_diff"] < gpu_check.MAX_REL_DIFF
    if SMOLLM2_GGUF.exists():  # the real model, in bf16 on this device and on the CPU (here both the CPU)
        assert result["logits_smollm2_ok"] and result["logits_smollm2_top1"] >= gpu_check.MIN_TOP1
    assert gpu_check.failed_checks(result) == []
    assert result["programs"] == len(program_shapes(
        EngineConfig(max_slots=2, max_seq_len=256, min_prefill_bucket=128, max_prefill_tokens=1024, mask_upload="rows"), 256))
    for key in ("batch1_decode_tok_s", "ceiling_tok_s", "ttft_ms_128", "aggregate_tok_s_2", "copy_bandwidth_gb_s"):
        assert result[key] > 0, key
    assert 0 < result["pct_of_ceiling"]
    assert result["ttft_ms_128_prefix_cached_112"] > 0 and result["prefix_cached_tokens"] == 112  # the next chat turn
    for grammar in ("json_schema", "regex"):
        assert isinstance(result[f"{grammar}_adds_pct_1"], float) and f"{grammar}_adds_pct_8" not in result  # 2 slots
        assert isinstance(result[f"{grammar}_adds_pct_2"], float)
    for mode in ("batch", "rows"):
        for rows in (1, 2):
            p10, median = result[f"mask_upload_us_{mode}_{rows}"]
            assert 0 < p10 <= median


GiB = 2**30


def test_plan_for_an_h200_compiles_7b_with_the_gpu_kernels():
    """Llama-2-7B bf16 at tp 1, compiled here by XLA's GPU compiler for an H200 (no GPU). To keep
    CI short it compiles the two programs whose temporaries bound the plan, the longest (fresh)
    prefill (1 x 4096) and the widest decode forward and sampling (8 slots) (all 37: 12 prefill
    shapes fresh and after a cached prefix, 4 decode buckets, each sampled for any rows and for
    greedy rows only: docs/serving.md); weights and KV cache come from the full shapes'
    shardings, compiled or not."""
    target, devices = platform.target("h200")
    assert target.device_kind == "NVIDIA H200 141GB HBM3e" and target.memory == 151397597184
    cfg = preset("llama-2-7b").replace(dtype="bfloat16")
    largest = lambda kind, shape: shape in ({"rows": 1, "bucket": 4096, "suffix": False}, {"rows": 8})
    report = plan.plan(cfg, EngineConfig(max_slots=8, platform=target), plan.target_mesh(devices), target.memory,
                       select=largest)
    programs = report["per_program"]
    assert programs["prefill 1 x 4096"]["kernels"] == ["cudnn:fmha"]  # cuDNN flash attention
    assert programs["decode 8 slots"]["kernels"] == ["triton:decode_attention"]  # the Pallas kernel, as Triton
    assert programs["sample 8 slots"]["kernels"] == []
    assert all(p["conditionals"] == p["dynamic_whiles"] == 0 for p in programs.values())  # nothing waits on the host
    per = report["per_device_bytes"]
    assert per["weights"] == param_count(cfg) * 2 and round(per["weights"] / GiB, 2) == 12.55
    assert per["kv_cache"] == 16 * GiB  # 8 slots x 4096 tokens x 32 layers x k and v x 4096 x bf16
    # one buffer per layer, unrolled: the 1 x 4096 prefill keeps more activations live (1.23 GiB,
    # against 12 GiB of weight copies a step in the stacked scan: docs/benchmarks.md)
    assert 0 < per["temp"] < 1.5 * GiB
    assert all(p["copy_bytes"] < GiB for p in programs.values())  # no layer's weights copied
    assert report["max_slots_that_fit"] == (target.memory - per["weights"] - per["temp"]) // plan.slot_bytes(cfg, 4096, 1)


@pytest.mark.parametrize("max_len", [1000, 3000, 4000])
def test_pallas_decode_compiles_for_an_h200_at_any_context_length(max_len):
    """The Pallas decode kernel lowers to Triton for a context that is no multiple of 128 (Triton
    takes power-of-two blocks only; the kernel masks the row's tail): the decode program compiled
    for an H200 calls it, with nothing that waits on the host. A one-layer model, one program."""
    target, devices = platform.target("h200")
    cfg = preset("tiny-gqa").replace(dtype="bfloat16", n_layers=1, max_seq_len=max_len)
    config = EngineConfig(max_slots=2, max_seq_len=max_len, platform=target)
    report = plan.plan(cfg, config, plan.target_mesh(devices), select=lambda kind, shape: (kind, shape) == ("decode", {"rows": 2}))
    assert report["per_device_bytes"]["kv_cache"] == 2 * 2 * cfg.n_kv_heads * max_len * cfg.head_dim * 2  # no padding
    assert report["per_program"] == {"decode 2 slots": report["per_program"]["decode 2 slots"]}
    program = report["per_program"]["decode 2 slots"]
    assert program["kernels"] == ["triton:decode_attention"]
    assert (program["conditionals"], program["dynamic_whiles"]) == (0, 0)


def test_plan_target_h100_tp8_splits_70b_eight_ways(capsys, tmp_path):
    """`llama-jax plan --target h100 --tp 8 --checkpoint` for Llama-2-70B's widths over 8 abstract
    H100s, through the CLI (one slot of 16 tokens: eight programs, prefill fresh and after a cached
    prefix, the decode forward, its sampling for any rows and for greedy rows, slot copy and swap, the
    grammar masks' upload; the same kernels as any length). Two of its 80
    layers: a GPU program repeats one layer's code per layer, so depth changes only compile time
    (the full model is `--preset llama-2-70b`, ~100 s here)."""
    cfg = preset("llama-2-70b").replace(n_layers=2)
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert cli.main(["plan", "--target", "h100", "--tp", "8", "--checkpoint", str(tmp_path), "--dtype", "auto",
                     "--max-slots", "1", "--max-seq-len", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["platform"] == "h100" and report["devices"] == 8 and report["programs"] == 8
    whole = param_count(cfg) * 2  # auto: bf16 on a GPU
    assert whole / 8 <= report["per_device_bytes"]["weights"] < whole / 8 * 1.001  # norms are replicated
    assert report["per_program"]["prefill 1 x 16"]["kernels"] == ["cudnn:fmha"]
    assert report["per_program"]["decode 1 slots"]["kernels"] == ["triton:decode_attention"]  # per device, shard_map
    assert report["per_program"]["sample 1 slots"]["kernels"] == report["per_program"]["sample 1 slots (greedy)"]["kernels"] == []
    assert report["per_program"]["prefill 1 x 16 (suffix)"]["kernels"] == []  # the XLA loop over the cache
    assert all(p["conditionals"] == p["dynamic_whiles"] == 0 for p in report["per_program"].values())
    assert report["kernels"] == ["cudnn:fmha", "triton:decode_attention"]


def test_cudnn_refusal_falls_back_to_xla_once_with_one_log_line(caplog):
    """A GPU platform whose cuDNN cannot run the prefill (here: this machine's CPU devices) gets
    the XLA prefill path and keeps the Pallas decode kernel, said in one log line."""
    gpu_here = platform.Platform(kind="gpu", device_kind="test", kernels=frozenset(platform.KERNELS))
    with caplog.at_level(logging.INFO, logger="llama_jax.attention"):
        chosen = attention.choose(gpu_here, 4, 2, 16, jnp.bfloat16)
    assert (chosen.prefill, chosen.decode) == ("xla", "pallas")
    assert len(caplog.records) == 1 and "cuDNN flash attention unavailable" in caplog.records[0].getMessage()
    target, _ = platform.target("h200")
    assert attention.cudnn_refusal(target, 4, 2, 16, jnp.bfloat16) is None  # traced for the target: accepted
    assert attention.cudnn_refusal(target, 4, 2, 16, jnp.float32) is not None  # cuDNN has no float32 flash attention


def test_only_the_platform_module_asks_jax_for_the_backend():
    hits = [f"{path.relative_to(REPO_ROOT)}:{n}" for root in ("llama_jax", "api") for path in (REPO_ROOT / root).rglob("*.py")
            for n, line in enumerate(path.read_text().splitlines(), 1) if "default_backend()" in line]
    assert hits and all(hit.startswith("llama_jax/platform.py:") for hit in hits), hits


SMALL_BF16 = preset("demo").replace(dtype="bfloat16", n_layers=2, ffn_dim=768)


@functools.cache
def _decode_for_h200(split_layers: bool | None) -> plan.Compiled:
    """The decode program of a small bf16 Llama compiled for an H200 in a layer layout (None: the
    engine's default): 2 layers, GQA, matrices of 64-384 KiB whose sides are multiples of 128 like
    the 7B's (at the demo's 688 FFN, XLA also concatenates gate and up for one merged dot)."""
    target, devices = platform.target("h200")
    config = EngineConfig(max_slots=2, max_seq_len=256, platform=target, split_layers=split_layers)
    (program,) = plan.compile_programs(SMALL_BF16, config, plan.target_mesh(devices),
                                       select=lambda kind, shape: (kind, shape) == ("decode", {"rows": 2}))
    assert program.kernels == ["triton:decode_attention"] and program.host_syncs == {"conditionals": 0, "dynamic_whiles": 0}
    return program


def test_stacked_layers_copy_every_weight_matrix_each_gpu_decode_step():
    """What `plan.copies` finds: XLA:GPU runs the dot of a layer's weight sliced out of the stack
    (the layer scan's `dynamic-slice`) on a copy of it, so each decode step writes a copy of every
    layer matrix (Llama 2 7B: 12.1 GiB a step, docs/benchmarks.md); one buffer per layer copies nothing."""
    _, params = plan.abstract_params(SMALL_BF16, None)
    matrices = sum(a.size * 2 for p, a in nnx.to_flat_state(params) if p[0] == "layers" and len(a.shape) == 3)
    assert _decode_for_h200(False).copies == {"count": 7, "bytes": matrices}  # wq wk wv wo gate up down, in the scan body
    assert _decode_for_h200(True).copies == {"count": 0, "bytes": 0}


def test_gpu_decode_program_copies_no_layer_weights():
    """The engine's default layout on a GPU (`layers.split_layers`: one buffer per layer, unrolled)."""
    assert _decode_for_h200(None).copies == {"count": 0, "bytes": 0}
