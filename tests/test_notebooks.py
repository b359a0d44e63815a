"""The research notebooks run top to bottom against the current library, so they never rot: on the
real SmolLM2-135M-Instruct where ../shared has it (converted once for all of them), else on the
random demo model."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # each notebook starts a kernel and runs a model

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


SMOLLM2 = Path(__file__).resolve().parents[2] / "shared" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def real_model_env(tmp_path_factory) -> dict[str, str]:
    """The kernels' environment: the real model and one cache, so it is converted once."""
    if not SMOLLM2.exists():
        return {}
    return {"LLAMA_JAX_CHECKPOINT": str(SMOLLM2), "LLAMA_JAX_CACHE": str(tmp_path_factory.mktemp("notebook-cache"))}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, real_model_env, monkeypatch):
    for key, value in real_model_env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    if real_model_env and path.name.startswith("01"):
        assert "Paris" in nb.cells[-1].outputs[-1]["text"], "the real model completes the sentence"
