"""The built-in demo model, so `llama-jax serve` works on a fresh machine with no weights.

It is a small random-weight Llama with a SentencePiece tokenizer trained here on the package's
own source text (the real Llama 2 tokenizer is the user's, never shipped), with Llama 2's
normalisation options, so that text encodes the way structured output expects: "\n" and other
unseen characters are byte-fallback pieces, whitespace is kept as is, and only the one dummy-prefix
"▁" is added. Built once through the
real path (HF layout → convert-weights) and cached; its replies are gibberish by design.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llama_jax.model import Llama
    from llama_jax.tokenizer import Tokenizer

DEMO_VERSION = 3  # bump whenever the converted format or the demo shape changes
DEMO_VOCAB = 2000
CHECKPOINT_ENV = "LLAMA_JAX_CHECKPOINT"  # the notebooks' real weights, when set


def default_cache_dir() -> Path:
    root = os.environ.get("LLAMA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llama-jax")
    return Path(root) / f"demo-v{DEMO_VERSION}"


def train_demo_tokenizer(out_prefix: Path) -> Path:
    """Train a byte-fallback BPE SentencePiece model on this package's text, with Llama 2's special
    ids and normaliser options (identity rules, whitespace kept, digits split), so the demo path
    tokenizes like the real one."""
    import sentencepiece as spm

    package = Path(__file__).parent
    lines = [line for f in sorted(package.glob("*.py")) for line in f.read_text().splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out_prefix), vocab_size=DEMO_VOCAB, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True, minloglevel=2,
    )
    return out_prefix.with_suffix(".model")


def demo_checkpoint(cache_dir: Path | None = None) -> Path:
    """The converted demo checkpoint directory, built on first use."""
    from llama_jax.config import preset
    from llama_jax.convert import convert
    from llama_jax.hf_checkpoint import write_tiny_checkpoint

    out = cache_dir or default_cache_dir()
    if (out / "manifest.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tokenizer = train_demo_tokenizer(Path(tmp) / "demo-tokenizer")
        hf_dir = write_tiny_checkpoint(Path(tmp) / "hf", preset("demo").replace(vocab_size=DEMO_VOCAB),
                                       seed=0, tokenizer_path=tokenizer)
        convert(hf_dir, out, force=True, progress=False)
    return out


def notebook_model() -> tuple[Llama, Tokenizer]:
    """The model and tokenizer the notebooks run on: $LLAMA_JAX_CHECKPOINT when set (a converted
    checkpoint, a GGUF file or an HF directory: real weights), else the random demo model."""
    from llama_jax import checkpoint
    from llama_jax.model_store import resolve_checkpoint
    from llama_jax.tokenizer import load_tokenizer

    path = os.environ.get(CHECKPOINT_ENV)
    loaded = checkpoint.load(resolve_checkpoint(Path(path), say=lambda _: None) if path else demo_checkpoint())
    if loaded.tokenizer_path is None:
        raise FileNotFoundError(f"{path} has no tokenizer")
    return loaded.model, load_tokenizer(loaded.tokenizer_path)
