"""Hugging Face tokenizers (`tokenizer.json`, e.g. byte-level BPE as in Llama 3, SmolLM2 and GPT-2)
behind the same surface as the SentencePiece `Tokenizer`, and a streaming detokenizer for them.

Special-token text typed by a user stays text: `encode` never parses added special tokens (the
chat template's own markers are encoded by `encode_with_specials`). A token's bytes come from the
byte-level alphabet (each of 256 bytes is one printable character in the vocabulary), so the
detokenizer can hold back a multi-byte character split across tokens.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers


@functools.cache
def byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the
    others are shifted to code points from 256 up (as the ByteLevel pre-tokenizer maps them)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shift = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shift)] = b
            shift += 1
    return chars


def _token_id(tok: tokenizers.Tokenizer, spec: Any) -> int | None:
    """The id of a special token given as a string or as tokenizer_config's {"content": ...}."""
    if isinstance(spec, dict):
        spec = spec.get("content")
    return tok.token_to_id(spec) if isinstance(spec, str) else None


class HFTokenizer:
    """A `tokenizers.Tokenizer` with the SentencePiece Tokenizer's surface (ids, bytes, specials)
    and the model's own BOS/EOS ids, chat template and whether raw prompts start with BOS."""

    byte_level: bool
    dummy_prefix = False  # no SentencePiece-style leading space is ever added

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_id: int | None, eos_ids: Sequence[int], unk_id: int | None,
                 add_bos: bool, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None) -> None:
        """Wrap `tok`; `eos_ids[0]` is the end-of-turn token, any of them ends a reply."""
        self._with_specials = tok
        self._tok = tokenizers.Tokenizer.from_str(tok.to_str())
        self._tok.encode_special_tokens = True  # user text: "<|im_end|>" typed by a user is plain text
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self.eos_ids = tuple(dict.fromkeys(eos_ids))
        self.eos_id = self.eos_ids[0]
        self.bos_id = bos_id if bos_id is not None else self.eos_id  # no BOS: only ever padding, never added
        self.unk_id = unk_id if unk_id is not None else -1
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}  # bos_token, eos_token, ... as the template sees them
        # special tokens by text: a chat template writes them, a user's text never becomes them
        self.special_ids = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self._specials = frozenset(self.special_ids.values())
        self.byte_level = "ByteLevel" in json.dumps(json.loads(tok.to_str()).get("decoder"))
        self._alphabet = byte_alphabet()
        self.piece_texts: dict[int, str] = {}  # IncrementalDetokenizer's memo (SentencePiece-style vocabularies)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS/EOS; special-token text stays text."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_specials(self, text: str) -> list[int]:
        """Token ids of text written by a chat template: its special-token markers become their ids."""
        return self._with_specials.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens skipped (as SentencePiece drops control ids)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of an id (byte-level BPE spells a space "Ġ")."""
        return self._tok.id_to_token(int(token_id)) or ""

    def is_byte(self, token_id: int) -> bool:
        """Never: byte-level BPE has no byte-fallback pieces (every token is its own bytes)."""
        return False

    def is_control(self, token_id: int) -> bool:
        """Whether the id is a special token (BOS, EOS, chat markers), which decodes to ""."""
        return int(token_id) in self._specials

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a token stands for; None for special tokens, which have no text."""
        if self.is_control(token_id):
            return None
        piece = self.id_to_piece(token_id)
        if self.byte_level and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        return self._tok.decode([int(token_id)], skip_special_tokens=False).encode()

    def prompt_ids(self, text: str) -> list[int]:
        """A raw prompt as the model's tokenizer encodes it: BOS first only where the model adds one."""
        return [self.bos_id, *self.encode(text)] if self.add_bos else self.encode(text)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def template_from_config(config: dict) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or a list of named ones ("default" first)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def load(directory: Path) -> HFTokenizer:
    """The HF tokenizer of a model directory: tokenizer.json, with its BOS/EOS, `add_bos_token` and
    chat template from tokenizer_config.json (or chat_template.jinja), EOS ids from
    generation_config.json too."""
    tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    config = _read_json(directory / "tokenizer_config.json")
    generation = _read_json(directory / "generation_config.json")
    eos = _token_id(tok, config.get("eos_token"))
    gen_eos = generation.get("eos_token_id")
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
    eos_ids = [i for i in (eos, *gen_eos) if i is not None]
    if not eos_ids:
        raise ValueError(f"{directory}: no EOS token in tokenizer_config.json or generation_config.json")
    bos = _token_id(tok, config.get("bos_token"))
    if bos is None and generation.get("bos_token_id") is not None:
        bos = int(generation["bos_token_id"])
    template_file = directory / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else template_from_config(config)
    specials = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in config.items()
                if k.endswith("_token") and isinstance(v, str | dict)}
    return HFTokenizer(tok, bos_id=bos, eos_ids=eos_ids, unk_id=_token_id(tok, config.get("unk_token")),
                       add_bos=bool(config.get("add_bos_token", False)), chat_template=template,
                       special_tokens={k: v for k, v in specials.items() if isinstance(v, str)})


class ByteDetokenizer:
    """Token ids to text deltas for tokenizers whose text is the concatenation of token bytes
    (byte-level BPE): the deltas concatenate to `decode(all ids)`, and a multi-byte UTF-8
    character split across tokens is held back (at most 3 bytes) until it is complete."""

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self._tokenizer = tokenizer
        self._pending = b""
        self._deltas: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far (deltas and flush)."""
        return "".join(self._deltas)

    def _emit(self, data: bytes) -> str:
        text = data.decode("utf-8", "replace")
        if text:
            self._deltas.append(text)
        return text

    def add(self, token_id: int) -> str:
        """Feed one id; return the newly settled text (possibly "")."""
        self._pending += self._tokenizer.token_bytes(token_id) or b""
        cut = len(self._pending) - _unfinished_tail(self._pending)
        settled, self._pending = self._pending[:cut], self._pending[cut:]
        return self._emit(settled)

    def flush(self) -> str:
        """End the stream: held-back bytes decode as a full decode would (U+FFFD for a cut character)."""
        settled, self._pending = self._pending, b""
        return self._emit(settled)


def _unfinished_tail(data: bytes) -> int:
    """How many trailing bytes may still become one UTF-8 character: a lead byte followed by fewer
    continuation bytes than it announces (0 when the data ends on a character boundary)."""
    for back in range(1, min(3, len(data)) + 1):
        byte = data[-back]
        if 0x80 <= byte <= 0xBF:
            continue  # a continuation byte: look further back for its lead
        need = 2 if 0xC2 <= byte <= 0xDF else 3 if 0xE0 <= byte <= 0xEF else 4 if 0xF0 <= byte <= 0xF4 else 0
        return back if back < need else 0
    return 0
