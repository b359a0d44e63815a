"""`llama-jax plan` (AOT capacity planning), `--max-slots auto`, and tools/gpu_check.py at a small
preset on CPU (the same code path the GPU day runs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_jax import cli, plan
from llama_jax.config import preset
from llama_jax.device import program_shapes
from llama_jax.engine import EngineConfig
from llama_jax.hf_checkpoint import param_count

REPO_ROOT = Path(__file__).resolve().parents[1]


SMALL = ["--max-slots", "2", "--max-seq-len", "64"]  # few programs: each compile takes seconds here


def run_plan(capsys, *args) -> dict:
    assert cli.main(["plan", *args, *SMALL, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_plan_reports_programs_bytes_and_fit(capsys):
    cfg = preset("tiny-gqa")
    report = run_plan(capsys, "--preset", "tiny-gqa", "--memory", "64MiB")
    assert set(report) == {"programs", "compile_s", "devices", "per_device_bytes", "max_slots_that_fit"}
    assert report["programs"] == len(program_shapes(EngineConfig(max_slots=2), 64)) == 7
    assert report["devices"] == 1 and report["compile_s"] > 0
    per = report["per_device_bytes"]
    assert per["weights"] == param_count(cfg) * 4
    assert per["kv_cache"] == 2 * cfg.n_layers * 2 * cfg.n_kv_heads * 64 * cfg.head_dim * 4
    assert 0 < per["temp"] < per["weights"]
    slot = plan.slot_bytes(cfg, 64, 1)
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
                             "--compilation-cache", str(tmp_path / "xla"), "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["kernels"] == {"decode": "xla", "prefill": "xla"}  # CPU keeps its XLA paths
    assert result["programs"] == len(program_shapes(
        EngineConfig(max_slots=2, max_seq_len=256, min_prefill_bucket=128, max_prefill_tokens=1024), 256))
    for key in ("batch1_decode_tok_s", "ceiling_tok_s", "ttft_ms_128", "aggregate_tok_s_2", "copy_bandwidth_gb_s"):
        assert result[key] > 0, key
    assert 0 < result["pct_of_ceiling"]
    assert result["ttft_ms_128_prefix_cached_112"] > 0 and result["prefix_cached_tokens"] == 112  # the next chat turn
