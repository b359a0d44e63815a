"""convert-weights end to end: real safetensors in, real orbax checkpoints out, logits equal to
transformers' after `checkpoint.load`; and every kind of bad input refused with a clear one-line
message, a non-zero exit code and nothing left on disk."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import LlamaForCausalLM

from llama_jax import checkpoint
from llama_jax.config import LlamaConfig, preset
from llama_jax.convert import main
from llama_jax.hf_checkpoint import INDEX_FILE, param_count, write_tiny_checkpoint
from llama_jax.kv_cache import init_cache

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = [1, 518, 25580, 29962, 15043, 29991, 1724, 338, 263, 4086, 29973, 518, 29914, 25580, 29962]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def full_forward(model, tokens: list[int]) -> np.ndarray:
    cache = init_cache(model.cfg, 1, len(tokens))
    logits, _ = model(jnp.array([tokens]), jnp.arange(len(tokens))[None], cache)
    return np.asarray(logits[0])


def leftovers(out: Path) -> list[Path]:
    """Anything the converter may have left next to OUT_DIR (temporary or backup directories)."""
    return [p for p in out.parent.glob(f"{out.name}*") if p != out]


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    """Factory: an HF tiny checkpoint converted with the CLI (once per preset and dtype)."""
    made = {}

    def get(name: str, dtype: str | None = None) -> tuple[Path, Path]:
        if (name, dtype) not in made:
            hf = tiny_checkpoint(name)
            out = tmp_path_factory.mktemp("converted") / f"{name}-{dtype}"
            assert main([str(hf), str(out), "--quiet"] + (["--dtype", dtype] if dtype else [])) == 0
            made[name, dtype] = hf, out
        return made[name, dtype]

    return get


@pytest.mark.parametrize("shape", ["tiny-mha", "tiny-gqa"])
def test_round_trip_logits_equal_hf(converted, shape):
    hf, out = converted(shape)
    loaded = checkpoint.load(out)
    ours = full_forward(loaded.model, PROMPT)
    with torch.no_grad():
        ref_model = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
        ref = ref_model(torch.tensor([PROMPT])).logits[0].numpy()
    assert ref.std() > 1.0
    assert rel_err(ours, ref) <= 1e-5


def test_converted_directory_layout(converted, tokenizer_path):
    hf, out = converted("tiny-gqa")
    cfg = preset("tiny-gqa")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "manifest.json", "params", "tokenizer.model"]
    assert LlamaConfig.from_json((out / "config.json").read_text()) == cfg
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "llama-jax-orbax" and manifest["dtype"] == "float32"
    assert manifest["param_count"] == param_count(cfg) == 4_178_240
    assert manifest["source"] == str(hf.resolve())
    assert manifest["groups"] == ["embed", "layer_0", "layer_1", "head"]
    assert sorted(p.name for p in (out / "params").iterdir()) == sorted(manifest["groups"])
    assert (out / "tokenizer.model").read_bytes() == Path(tokenizer_path).read_bytes()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    loaded = checkpoint.load(out)
    assert loaded.tokenizer_path == out / "tokenizer.model" and loaded.generation_config["bos_token_id"] == 1
    assert not leftovers(out)


def test_default_dtype_is_the_checkpoints_own_and_dtype_flag(tiny_checkpoint, tmp_path):
    hf = tiny_checkpoint("tiny-mha", dtype="float16")
    assert main([str(hf), str(tmp_path / "own"), "--quiet"]) == 0
    own = checkpoint.load(tmp_path / "own")
    assert own.cfg.dtype == "float16" and own.params["layers"]["wq"][...].dtype == jnp.float16
    assert main([str(hf), str(tmp_path / "bf16"), "--quiet", "--dtype", "bfloat16"]) == 0
    bf16 = checkpoint.load(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "manifest.json").read_text())["dtype"] == "bfloat16"
    assert bf16.params["embed"][...].dtype == jnp.bfloat16
    # load(dtype=...) casts on restore: float16 -> float32 is exact.
    f32 = checkpoint.load(tmp_path / "own", dtype="float32")
    assert f32.cfg.dtype == "float32" and f32.params["lm_head"][...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(f32.params["lm_head"][...]),
                                  np.asarray(own.params["lm_head"][...]).astype(np.float32))


def test_single_file_without_index(tmp_path, tokenizer_path):
    """A single model.safetensors with no index.json (how small models are published)."""
    hf = write_tiny_checkpoint(tmp_path / "hf", preset("tiny-mha"), tokenizer_path=tokenizer_path)
    (hf / INDEX_FILE).unlink()
    (only,) = hf.glob("*.safetensors")
    only.rename(hf / "model.safetensors")
    assert main([str(hf), str(tmp_path / "out"), "--quiet"]) == 0
    assert checkpoint.load(tmp_path / "out").cfg == preset("tiny-mha")


@pytest.mark.slow  # real subprocesses
def test_cli_subprocess_success_and_failure(tiny_checkpoint, tmp_path):
    hf = tiny_checkpoint("tiny-mha")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "llama_jax.convert", *a], capture_output=True, text=True,
                                    env=env, cwd=tmp_path, timeout=120)
    ok = run(str(hf), "out")
    assert ok.returncode == 0, ok.stderr
    assert "convert-weights:" in ok.stdout and "parameters, float32" in ok.stdout
    assert "%|" not in ok.stderr, "no progress bar when stderr is not a TTY"
    assert (tmp_path / "out" / "manifest.json").exists()
    again = run(str(hf), "out")
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1] == "convert-weights: error: out already exists (pass --force to replace it)"
    usage = run(str(hf))
    assert usage.returncode == 2 and "usage: convert-weights" in usage.stderr


def test_help_and_usage_errors(capsys):
    assert main(["--help"]) == 0
    assert "HF_DIR|MODEL.gguf OUT_DIR" in capsys.readouterr().out
    assert main(["a", "b", "--dtype", "int8"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_progress_bar_over_bytes_on_a_tty(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main([str(tiny_checkpoint("tiny-mha")), str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "converting" in err and "100%" in err and "MB" in err
    assert main([str(tiny_checkpoint("tiny-mha")), str(tmp_path / "b"), "--quiet"]) == 0
    captured = capsys.readouterr()  # --quiet: no bar, no summary (warnings, e.g. no tokenizer, still show)
    assert captured.out == "" and all(line.startswith("convert-weights: warning:") for line in captured.err.splitlines())


def test_force_replaces_existing_output(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main([str(tiny_checkpoint("tiny-mha")), str(out), "--quiet"]) == 1
    assert "already exists (pass --force to replace it)" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    assert main([str(tiny_checkpoint("tiny-mha")), str(out), "--quiet", "--force"]) == 0
    assert not (out / "precious.txt").exists() and (out / "manifest.json").exists()
    assert not leftovers(out)


def test_force_refuses_to_replace_the_input(tiny_checkpoint, capsys):
    hf = tiny_checkpoint("tiny-mha")
    assert main([str(hf), str(hf), "--force", "--quiet"]) == 1
    assert "holds the input checkpoint" in capsys.readouterr().err
    assert (hf / "config.json").exists()


# --- bad input: each case breaks a copy of a tiny checkpoint ------------------------------------

def _edit_config(hf: Path, **changes) -> None:
    config = json.loads((hf / "config.json").read_text())
    config.update(changes)
    (hf / "config.json").write_text(json.dumps(config))


def _drop_key(hf: Path, key: str) -> None:
    config = json.loads((hf / "config.json").read_text())
    del config[key]
    (hf / "config.json").write_text(json.dumps(config))


def _edit_tensors(hf: Path, edit) -> None:
    """Rewrite the safetensors file holding layer 0's q_proj with `edit(tensors)` applied."""
    index = json.loads((hf / INDEX_FILE).read_text())
    file = hf / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _truncate(hf: Path) -> None:
    file = max(hf.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    os.truncate(file, file.stat().st_size // 2)


def _only_bin(hf: Path) -> None:
    for f in hf.glob("*.safetensors"):
        f.unlink()
    (hf / INDEX_FILE).unlink()
    (hf / "pytorch_model.bin").write_bytes(b"not really a pickle")


def _no_weights(hf: Path) -> None:
    for f in hf.glob("*.safetensors"):
        f.unlink()
    (hf / INDEX_FILE).unlink()


def _lost_shard(hf: Path) -> None:
    sorted(hf.glob("*.safetensors"))[-1].unlink()


BAD_INPUTS = {
    "missing-config": (lambda hf: (hf / "config.json").unlink(), "no config.json in"),
    "config-not-json": (lambda hf: (hf / "config.json").write_text("{oops"), "config.json is not valid JSON"),
    "config-lacks-field": (lambda hf: _drop_key(hf, "hidden_size"), "config.json lacks required field 'hidden_size'"),
    "no-weights": (_no_weights, "no *.safetensors weight files in"),
    "only-bin": (_only_bin, "holds only PyTorch weight files (*.bin/*.pt); download the safetensors version"),
    "shard-missing-from-index": (_lost_shard, "not found in"),
    "architecture": (lambda hf: _edit_config(hf, architectures=["MistralForCausalLM"], model_type="mistral"),
                     "unsupported architecture ['MistralForCausalLM']"),
    "rope-scaling": (lambda hf: _edit_config(hf, rope_scaling={"type": "yarn", "factor": 2.0}),
                     "rope_scaling: type 'yarn' is not implemented"),
    "missing-tensor": (lambda hf: _edit_tensors(hf, lambda t: t.pop("model.layers.0.self_attn.q_proj.weight")),
                       "missing tensors: model.layers.0.self_attn.q_proj.weight"),
    "extra-tensor": (lambda hf: _edit_tensors(hf, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias":
                                                                      np.zeros(64, np.float32)})),
                     "unexpected tensors: model.layers.0.self_attn.q_proj.bias"),
    "misshapen-tensor": (lambda hf: _edit_tensors(hf, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight":
                                                                          np.zeros((64, 32), np.float32)})),
                         "tensor model.layers.0.self_attn.q_proj.weight has shape (64, 32), expected (64, 64)"),
    "truncated-safetensors": (_truncate, "(truncated or corrupt download?)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_cleanly(tiny_checkpoint, tmp_path, capsys, case):
    break_it, message = BAD_INPUTS[case]
    hf = Path(shutil.copytree(tiny_checkpoint("tiny-mha"), tmp_path / "hf"))
    break_it(hf)
    out = tmp_path / "out"
    assert main([str(hf), str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convert-weights: error: "), err
    assert message in err[0]
    assert not out.exists() and not leftovers(out)


def test_missing_input_directory(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == f"convert-weights: error: {tmp_path / 'nope'} does not exist"
    (tmp_path / "model.bin").write_bytes(b"PK\x03\x04 not a gguf")
    assert main([str(tmp_path / "model.bin"), str(tmp_path / "out")]) == 1
    assert "is neither a GGUF file nor a directory" in capsys.readouterr().err


def test_interrupted_conversion_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """A failure after some groups are written (here: Ctrl-C) removes the temporary directory."""
    import llama_jax.convert as convert_module

    real = convert_module.iter_weights

    def interrupted(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 12:  # mid-way through layer 1, after embed and layer_0 were saved
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(convert_module, "iter_weights", interrupted)
    out = tmp_path / "out"
    assert main([str(tiny_checkpoint("tiny-mha")), str(out), "--quiet"]) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert not out.exists() and not leftovers(out)


def test_load_refuses_what_is_not_a_converted_checkpoint(tiny_checkpoint, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not a converted checkpoint.*convert-weights"):
        checkpoint.load(tiny_checkpoint("tiny-mha"))
    half = tmp_path / "half"
    half.mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no manifest.json"):
        checkpoint.load(half)
