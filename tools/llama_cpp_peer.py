"""llama.cpp as the CPU peer on the same GGUF: requantize with its own `llama-quantize`, then
decode and prompt speed (`llama-bench`), aggregate tok/s of concurrent requests (`llama-server`
with parallel slots) and perplexity (`llama-perplexity`), each at its best thread count.

Used by `tools/bench_engine.py --gguf FILE --llama-cpp BUILD_DIR`; BUILD_DIR is a CMake build of
llama.cpp (e.g. the `llama-cpp-python` sdist's vendored source) holding `bin/llama-*`.
`--no-repack` (`--repack 0` for llama-bench): its CPU repack path crashes on this machine.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path


def binary(build: Path, name: str) -> Path:
    found = next((p for p in (build / "bin" / name, build / name) if p.exists()), None)
    if found is None:
        raise FileNotFoundError(f"{name} not found in {build} (build it: cmake --build BUILD --target {name})")
    return found


def requantize(build: Path, gguf: Path, out: Path, kind: str) -> Path:
    """`llama-quantize --allow-requantize` into `kind` (F32, F16, Q8_0, …)."""
    subprocess.run([str(binary(build, "llama-quantize")), "--allow-requantize", str(gguf), str(out), kind],
                   check=True, capture_output=True, text=True)
    return out


def bench(build: Path, gguf: Path, threads: int, decode_tokens: int, prompts: tuple[int, ...]) -> dict:
    """`llama-bench`: batch-1 decode tok/s (tg) and prompt tok/s (pp) per prompt length."""
    cmd = [str(binary(build, "llama-bench")), "-m", str(gguf), "-t", str(threads), "--repack", "0", "-r", "3",
           "-o", "json", "-p", ",".join(map(str, prompts)), "-n", str(decode_tokens)]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    out = {}
    for row in rows:
        if row["n_gen"]:
            out["decode_tok_s"] = row["avg_ts"]
        else:
            out[f"prompt_tok_s_{row['n_prompt']}"] = row["avg_ts"]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_aggregate(build: Path, gguf: Path, threads: int, prompts: list[list[int]], decode_tokens: int) -> float:
    """Aggregate decode tok/s of `len(prompts)` concurrent requests to `llama-server` with as many
    parallel slots (greedy, EOS ignored, prompt cache off): generated tokens over wall time."""
    port = _free_port()
    ctx = len(prompts) * (max(map(len, prompts)) + decode_tokens + 16)
    cmd = [str(binary(build, "llama-server")), "-m", str(gguf), "-t", str(threads), "-np", str(len(prompts)),
           "-c", str(ctx), "--port", str(port), "--host", "127.0.0.1", "--no-repack", "--no-webui"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("llama-server did not become healthy in 60 s")

        def complete(ids: list[int], n: int, counts: list[int]) -> None:
            body = json.dumps({"prompt": ids, "n_predict": n, "ignore_eos": True, "temperature": 0,
                               "cache_prompt": False}).encode()
            req = urllib.request.Request(f"{url}/completion", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                counts.append(json.loads(r.read())["tokens_predicted"])

        complete(prompts[0], 4, [])  # warm
        counts: list[int] = []
        workers = [threading.Thread(target=complete, args=(p, decode_tokens, counts)) for p in prompts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - start
        if len(counts) != len(prompts):
            raise RuntimeError("a llama-server request failed")
        return sum(counts) / wall
    finally:
        server.terminate()
        server.wait(timeout=30)


def perplexity(build: Path, gguf: Path, text: Path, threads: int, ctx: int) -> float:
    """`llama-perplexity -c ctx`: chunks of `ctx` tokens (BOS first), the second half of each scored."""
    cmd = [str(binary(build, "llama-perplexity")), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-b", str(ctx),
           "-t", str(threads), "--no-repack"]
    run = subprocess.run(cmd, check=True, capture_output=True, text=True)
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", run.stdout + run.stderr)
    if match is None:
        raise RuntimeError(f"no perplexity in llama-perplexity's output:\n{run.stderr[-2000:]}")
    return float(match.group(1))
