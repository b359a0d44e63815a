"""A GGUF file's vocabulary (`tokenizer.ggml.*`) as a Hugging Face `tokenizers` tokenizer, written
beside a converted checkpoint as `tokenizer.json` + `tokenizer_config.json` (special tokens, BOS,
EOS, `add_bos_token`, the chat template from `tokenizer.chat_template`).

Byte-level BPE (`tokenizer.ggml.model = gpt2`: Llama 3, SmolLM2, Qwen-style vocabularies) is
built as transformers builds it from the same file: the BPE merges, a ByteLevel pre-tokenizer and
decoder, and the control tokens as special added tokens. SentencePiece vocabularies (`llama`)
are refused by name: convert the Hugging Face checkpoint, which carries its tokenizer.model.
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from llama_jax.config import UnsupportedModelError
from llama_jax.gguf_checkpoint import metadata

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types


def tokenizer_from_gguf(reader) -> tokenizers.Tokenizer:
    """The byte-level BPE tokenizer a GGUF's metadata describes."""
    kind = metadata(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(f"tokenizer.ggml.model {kind!r}: only byte-level BPE ('gpt2') GGUF vocabularies "
                                    "are implemented; convert the Hugging Face checkpoint instead")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    types = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in metadata(reader, "tokenizer.ggml.merges", [])]
    tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                          fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(t, special=types[i] == CONTROL, normalized=False)
             for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)]
    tok.add_tokens(added)
    return tok


def write_tokenizer_files(reader, out_dir: Path) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json for the GGUF's vocabulary into `out_dir`;
    returns their names."""
    tok = tokenizer_from_gguf(reader)
    tokens = metadata(reader, "tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        i = metadata(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(metadata(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(metadata(reader, "llama.context_length", 4096)),
    }
    if (template := metadata(reader, "tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    tok.save(str(Path(out_dir) / "tokenizer.json"))
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return ["tokenizer.json", "tokenizer_config.json"]
