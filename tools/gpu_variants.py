"""Raw decode step times of random Llama 2 7B bf16 weights under several XLA settings, layer
layouts and int8 weights, each in its own process (XLA reads its flags once per process): where
the batch-1 step loses 37 % to the bandwidth ceiling (docs/benchmarks.md, "The first run on a
GPU": 699 kernel launches a step; "The second GPU run": the figures).

    PYTHONUNBUFFERED=1 python tools/gpu_variants.py                    # on the GPU, all variants
    python tools/gpu_variants.py --preset tiny-gqa --variants default stacked --max-seq-len 256   # CPU

Each variant builds random weights on the device, compiles only the decode programs it times
(1 and `--rows` slots), and reports ms a step at context `--context`. Writes the table as JSON to
`--out` (default $OUT/gpu_variants.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # name: (XLA_FLAGS added, EngineConfig overrides, ModelConfig overrides)
    "default": ("", {}, {}),
    "command-buffers": ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN "
                        "--xla_gpu_graph_min_graph_size=1", {}, {}),
    "no-command-buffers": ("--xla_gpu_enable_command_buffer=", {}, {}),
    "cublas-gemms": ("--xla_gpu_enable_triton_gemm=false --xla_gpu_dot_merger_threshold_mb=0", {}, {}),
    "stacked": ("", {"split_layers": False}, {}),
    "int8": ("", {}, {"quantization": "int8"}),
}


def measure(args: argparse.Namespace) -> dict:
    """One variant, in this process: compile and time the decode programs."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import jax

    from gpu_check import decode_steps, random_params
    from llama_jax.config import EngineConfig, preset
    from llama_jax.engine import Engine
    from llama_jax.model import abstract_model
    from llama_jax.tokenizer import Tokenizer
    from flax import nnx

    cfg = preset(args.preset).replace(dtype=args.dtype, **VARIANTS[args.worker][2])
    params = random_params(cfg)
    model = nnx.merge(nnx.split(abstract_model(cfg))[0], params)
    config = EngineConfig(max_slots=args.rows, max_seq_len=min(args.max_seq_len, cfg.max_seq_len),
                          **VARIANTS[args.worker][1])
    engine = Engine(model, Tokenizer(args.tokenizer), config)
    out = {"variant": args.worker, "device": jax.devices()[0].device_kind,
           "weight_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(params))}
    for rows in (1, args.rows):
        start = time.perf_counter()
        decode_steps(engine, rows, args.context, steps=2)  # compiles
        out[f"compile_s_{rows}"] = round(time.perf_counter() - start, 1)
        out[f"step_ms_{rows}"] = round(1000 * decode_steps(engine, rows, args.context), 3)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--rows", type=int, default=64, help="the wide batch timed besides batch 1")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--timeout", type=float, default=150, help="seconds per variant")
    ap.add_argument("--tokenizer", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "llama2-tokenizer" / "tokenizer.model")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) / "gpu_variants.json" if os.environ.get("OUT") else None)
    ap.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)), flush=True)
        return []
    rows = []
    common = ["--preset", args.preset, "--dtype", args.dtype, "--rows", str(args.rows), "--context", str(args.context),
              "--max-seq-len", str(args.max_seq_len), "--tokenizer", str(args.tokenizer)]
    for name in args.variants:
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {VARIANTS[name][0]}".strip()}
        try:
            done = subprocess.run([sys.executable, __file__, "--worker", name, *common], env=env, capture_output=True,
                                  text=True, timeout=args.timeout)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if done.returncode == 0 and lines else \
                {"variant": name, "error": done.stderr.strip().splitlines()[-1:] or f"exit {done.returncode}"}
        except subprocess.TimeoutExpired:
            row = {"variant": name, "error": f"over {args.timeout:.0f} s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
