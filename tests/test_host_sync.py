"""No serve program compiled for a GPU waits on the host: XLA:GPU runs a `conditional`, or a
`while` whose trip count it does not know, by copying the predicate to the host each time. The
programs are compiled here for an H200 by XLA's real GPU compiler (no GPU needed), at tp 1 (the
Pallas and cuDNN kernels) and at tp 2 with one KV head (the XLA decode loop), each with its
prefill after a cached prefix; the CPU keeps its data-dependent loops."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from llama_jax import plan, platform
from llama_jax.config import preset
from llama_jax.device import program_shapes
from llama_jax.engine import EngineConfig


def test_host_sync_ops_counts_conditionals_and_unknown_trip_counts():
    """The counter on compiled programs: a data-dependent loop and a cond count, a static loop does not."""
    step = lambda i, x: x * 1.5 + jnp.sin(x)
    hlo = lambda f, *a: jax.jit(f).lower(*a).compile().as_text()
    x, n = jnp.ones(8), jnp.int32(5)
    assert plan.host_sync_ops(hlo(lambda x, n: lax.fori_loop(0, n, step, x), x, n)) == {"conditionals": 0, "dynamic_whiles": 1}
    assert plan.host_sync_ops(hlo(lambda x: lax.fori_loop(0, 5, step, x), x)) == {"conditionals": 0, "dynamic_whiles": 0}
    branchy = lambda x, n: lax.cond(n > 2, lambda: jnp.cos(x) @ x, lambda: jnp.sum(jnp.exp(x)))
    assert plan.host_sync_ops(hlo(branchy, x, n)) == {"conditionals": 1, "dynamic_whiles": 0}


@pytest.mark.parametrize("tp, kv_heads, kernels", [
    (1, 2, {"prefill": ["cudnn:fmha"], "suffix": [], "decode": ["triton:decode_attention"]}),
    (2, 1, {"prefill": [], "suffix": [], "decode": []}),  # KV heads replicated over tp: the XLA paths
], ids=["tp1-kernels", "tp2-xla-decode"])
def test_no_host_synchronising_control_flow_in_gpu_serve_programs(tp, kv_heads, kernels):
    target, devices = platform.target("h200", tp)
    cfg = preset("tiny-gqa").replace(dtype="bfloat16", n_layers=1, n_kv_heads=kv_heads)
    config = EngineConfig(max_slots=1, max_seq_len=256, min_prefill_bucket=256, platform=target)  # 8 programs
    report = plan.plan(cfg, config, plan.target_mesh(devices))
    programs = report["per_program"]
    # prefill fresh and after a cached prefix, the decode forward, sampling any rows and greedy rows only, slot copy
    # and swap, the grammar masks' upload (step_masks.py: the table on the device)
    assert sorted(programs) == ["decode 1 slots", "mask upload 1 rows", "prefill 1 x 256", "prefill 1 x 256 (suffix)",
                                "sample 1 slots", "sample 1 slots (greedy)", "slot copy", "slot swap"]
    assert len(programs) == len(program_shapes(config, 256))
    for name, p in programs.items():
        assert (p["conditionals"], p["dynamic_whiles"]) == (0, 0), name
    assert programs["prefill 1 x 256"]["kernels"] == kernels["prefill"]
    assert programs["prefill 1 x 256 (suffix)"]["kernels"] == kernels["suffix"]
    assert programs["decode 1 slots"]["kernels"] == kernels["decode"]
    assert programs["sample 1 slots"]["kernels"] == programs["sample 1 slots (greedy)"]["kernels"] == []


def test_cpu_keeps_one_prefill_per_shape_and_its_data_dependent_loops():
    """On the CPU the prefill chooses its path on the device (one program per shape) and the
    decode loop follows the longest row: both cost no host round trip there, and are faster."""
    config = EngineConfig(max_slots=1, max_seq_len=64, min_prefill_bucket=64)
    assert program_shapes(config, 64) == [("prefill", {"rows": 1, "bucket": 64}), ("decode", {"rows": 1}),
                                          ("sample", {"rows": 1}), ("copy", {}), ("swap", {})]
    cfg = preset("tiny-gqa").replace(n_layers=1)
    programs = plan.plan(cfg, config, select=lambda kind, shape: kind not in ("copy", "swap"))["per_program"]
    assert programs["prefill 1 x 64"]["conditionals"] >= 1  # the path, per layer (and the sampler's branches)
    assert programs["decode 1 slots"]["dynamic_whiles"] >= 1


def test_plan_prints_the_counts_per_program(capsys):
    """`llama-jax plan`'s text report has a row per program with both counts (here the CPU's)."""
    from llama_jax import cli

    assert cli.main(["plan", "--preset", "tiny-gqa", "--max-slots", "1", "--max-seq-len", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if "conditionals  dynamic whiles" in line)
    rows = {line.split("  ")[1].strip(): line.split()[-2:] for line in lines[header + 1:] if line.startswith("  ")
            and not line.startswith("  slots")}
    assert set(rows) == {"prefill 1 x 16", "prefill 1 x 32", "decode 1 slots", "sample 1 slots", "slot copy",
                         "slot swap"}
    assert int(rows["prefill 1 x 32"][0]) >= 1 and int(rows["decode 1 slots"][1]) >= 1  # the CPU's, on purpose
    assert rows["slot copy"] == rows["slot swap"] == ["0", "0"]
