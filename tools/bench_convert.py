"""Benchmark `convert-weights` on a full-size random checkpoint: wall time, peak RSS, output size.

    python tools/bench_convert.py [--preset llama-2-7b] [--dtype float16] [--workdir /tmp/llama-jax-bench]

Writes a random HF-layout checkpoint at the preset's shape with the tiny-checkpoint writer, runs
`python -m llama_jax.convert` on it in a child process (peak RSS is the child's ru_maxrss), then
restores the result with `checkpoint.load` in another child, and deletes everything afterwards
(unless --keep). 7B in float16 needs about 2 x 13.5 GB of free disk.

Every step runs in its own child and this process imports nothing heavy: on Linux a child's
ru_maxrss includes the RSS of the parent it was (v)forked from, so a big parent would inflate it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "llama2-tokenizer" / "tokenizer.model"

WRITE = """
import sys
from llama_jax.config import preset
from llama_jax.hf_checkpoint import param_count, write_tiny_checkpoint
cfg = preset(sys.argv[1]).replace(dtype=sys.argv[2])
tok = sys.argv[4] if len(sys.argv) > 4 else None
write_tiny_checkpoint(sys.argv[3], cfg, seed=0, tokenizer_path=tok, shard_bytes=5 * 2**30)
print(param_count(cfg))
"""
LOAD = """
import sys, jax
from llama_jax.checkpoint import load
jax.block_until_ready(load(sys.argv[1]).params)
"""


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """Run a command; return (wall seconds, peak RSS of the child in GiB, its stdout)."""
    start = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} … failed with exit code {proc.returncode}")
    return wall, usage.ru_maxrss * 1024 / 2**30, out  # Linux reports KiB


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--workdir", default="/tmp/llama-jax-bench")
    p.add_argument("--no-load", action="store_true", help="skip timing the restore")
    p.add_argument("--keep", action="store_true", help="keep the files")
    p.add_argument("--min-free-gib", type=float, default=30.0, help="refuse to start with less free disk")
    args = p.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free / 2**30
    if free < args.min_free_gib:
        raise SystemExit(f"need {args.min_free_gib:.0f} GiB free under {work}, have {free:.1f} GiB (--min-free-gib)")
    hf, out = work / "hf", work / "converted"
    py = sys.executable
    try:
        tok = [str(TOKENIZER)] if TOKENIZER.exists() else []
        wall, rss, stdout = run_child([py, "-c", WRITE, args.preset, args.dtype, str(hf), *tok])
        n = int(stdout.split()[-1])
        print(f"wrote random {args.preset} ({n / 1e9:.2f}B params, {args.dtype}, {dir_size(hf) / 2**30:.2f} GiB) "
              f"in {wall:.0f} s (writer peak RSS {rss:.2f} GiB)", flush=True)
        os.sync()
        wall, rss, _ = run_child([py, "-m", "llama_jax.convert", str(hf), str(out), "--quiet"])
        size = dir_size(out)
        print(f"convert: wall {wall:.1f} s, peak RSS {rss:.2f} GiB, output {size / 2**30:.2f} GiB "
              f"({size / 1e9:.2f} GB)", flush=True)
        if not args.no_load:
            lwall, lrss, _ = run_child([py, "-c", LOAD, str(out)])
            print(f"load (one CPU device): wall {lwall:.1f} s, peak RSS {lrss:.2f} GiB", flush=True)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM")
    finally:
        if not args.keep:
            shutil.rmtree(hf, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            for leftover in work.glob("converted.tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)


if __name__ == "__main__":
    main()
