"""lm-evaluation-harness against a live `llama-jax serve`, offline: lm-eval's `local-completions`
model runs the tiny multiple-choice task in tests/lm_eval_tasks/ (YAML + JSONL) through /v1/completions
(echo + prompt logprobs), and every per-item loglikelihood must equal Hugging Face's on the same
random weights. The same run as a command is in docs/serving.md."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from live_server import REPO_ROOT
from llama_jax.convert import convert
from helpers import hf_model

pytestmark = pytest.mark.slow  # lm-eval against a real server

if importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("lm_eval.evaluator") is None:
    pytest.skip("lm-eval is not installed: `pip install -e '.[eval]'` (~500 MB, 40 packages, ~1 min from a local "
                "index); see docs/serving.md", allow_module_level=True)

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"  # not "lm_eval": that name would shadow the package
TASK = "llama_jax_tiny_mc"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def hf_tokenizer_dir(tokenizer_path: Path, out: Path) -> Path:
    """The Llama 2 tokenizer as HF loads it offline (SentencePiece file + tokenizer_config.json)."""
    out.mkdir()
    shutil.copy(tokenizer_path, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return out


def serve(checkpoint: Path, cache: Path) -> tuple[subprocess.Popen, str, list[str]]:
    """`llama-jax serve` from this checkout on a free port; returns (process, base URL, its stderr lines)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0",
                             "--max-seq-len", "64", "--max-slots", "1", "--model-name", "tiny",
                             "--compilation-cache-dir", str(cache)],
                            cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "ready in" in line:
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.time() + 300
    while not ready.wait(0.5):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("llama-jax serve did not become ready:\n" + "".join(lines[-30:]))
    url = re.search(r"at (http://\S+)/v1 ", next(line for line in lines if "ready in" in line)).group(1)
    return proc, url, lines


def lm_eval_split(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """The tokens lm-eval sends for (context, continuation) and the context's length in them
    (TemplateLM._encode_pair: trailing spaces of the context move to the continuation)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=True).input_ids
    return whole, len(tokenizer(context, add_special_tokens=True).input_ids)


@pytest.mark.slow
def test_lm_eval_loglikelihoods_equal_hf(tiny_checkpoint, tokenizer_path, tmp_path):
    hf_dir = tiny_checkpoint("tiny-gqa")
    convert(hf_dir, tmp_path / "jax", force=True, progress=False)
    tok_dir = hf_tokenizer_dir(tokenizer_path, tmp_path / "tokenizer")
    proc, url, _ = serve(tmp_path / "jax", tmp_path / "xla")
    try:
        model_args = (f"model=tiny,base_url={url}/v1/completions,tokenizer={tok_dir},tokenizer_backend=huggingface,"
                      "add_bos_token=True,max_length=64,max_retries=1")
        run = subprocess.run(
            [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
             "--tasks", TASK, "--include_path", str(TASK_DIR), "--log_samples", "--output_path", str(tmp_path / "out")],
            cwd=TASK_DIR, env={**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf")},
            capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    finally:
        proc.terminate()
        proc.wait(30)
    (samples_file,) = (tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 4

    from transformers import AutoTokenizer

    tokenizer, hf = AutoTokenizer.from_pretrained(tok_dir), hf_model(hf_dir)
    for sample in samples:
        assert len(sample["arguments"]) == len(sample["doc"]["choices"]) >= 2
        assert len({round(float(ll), 4) for ll, _ in sample["filtered_resps"]}) > 1  # the choices are told apart
        for args, (loglikelihood, _greedy) in zip(sample["arguments"].values(), sample["filtered_resps"]):
            ids, ctxlen = lm_eval_split(tokenizer, args["arg_0"], args["arg_1"])
            with torch.no_grad():
                logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
            expected = sum(float(logprobs[i - 1, ids[i]]) for i in range(ctxlen, len(ids)))
            assert expected < 0 and float(loglikelihood) == pytest.approx(expected, abs=1e-4), (sample["doc_id"], args)
