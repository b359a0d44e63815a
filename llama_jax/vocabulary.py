"""A model's vocabulary as llguidance sees it (token bytes, special tokens, an encoder without
SentencePiece's dummy-prefix space for the text it forces), plus the token tables the closing
plan of structured.py uses. Built once per tokenizer (~0.1 s) and shared.

Token bytes (`token_bytes`): for SentencePiece "▁" is a space and <0xNN> byte pieces are that
byte; byte-level BPE tokens are their own bytes; control, special and unknown tokens are special
(never allowed inside text).
"""

from __future__ import annotations

import collections
import threading
import weakref

import llguidance
import numpy as np

from llama_jax.tokenizer import Tokenizer

_STRING_CLOSERS = ('"}}', '"}]', '"]}', '"}', '"]', '"')  # inside a string; longest first
_CLOSERS = ('}}}', '}}', ']]', '}]', ']}', '}', ']', ',')  # outside strings (`,`: on to a required member)
_MINIMAL = ('0', ' ""', ' {}', ' []', ' null', ' true', ' false',  # shortest values
            '""', '{}', '[]', 'null', 'true', 'false')
# Single characters tried in turn (rotating, so none repeats forever) where neither a closer nor a
# minimal value fits, e.g. inside a string with a pattern or format: they spell most formats.
_PROBES = ('@', '.', '0', '-', 'a', ':', 'T', 'Z', '/', '_', 'A', '1', '+', ' ', 'x')


class Vocabulary:
    """A vocabulary as llguidance sees it, plus the token tables the closing plan uses. Built once
    per tokenizer by `vocabulary()`."""

    def __init__(self, tokenizer: Tokenizer):
        n = tokenizer.vocab_size
        self.size, self.eos_id = n, tokenizer.eos_id
        self._sp_encode = tokenizer.encode
        self._dummy_prefix = tokenizer.dummy_prefix
        self._newline = tokenizer.encode("\n")  # the "\n" prefix trick below
        pieces: list[bytes] = []
        special: list[int] = []
        for i in range(n):
            raw = tokenizer.token_bytes(i)
            if raw is None:
                pieces.append(b"\xff" + tokenizer.id_to_piece(i).encode())  # llguidance's marker for special tokens
                special.append(i)
            else:
                pieces.append(raw)
        self.pieces = pieces
        self.text = [p.decode("latin-1") for p in pieces]  # one character per byte: for grammar.json_state
        outer = self

        class _Wrapper:  # what llguidance.TokenizerWrapper expects
            eos_token_id = tokenizer.eos_id
            bos_token_id = tokenizer.bos_id
            tokens = pieces
            special_token_ids = special

            def __call__(self, text):
                return outer.encode(text)

        self.ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapper()))
        # byte piece <0x20>: never first (its space would survive decoding, unlike "▁")
        self.space_byte = next((i for i in range(n) if tokenizer.is_byte(i) and pieces[i] == b" "), None)
        by_text: dict[bytes, list[int]] = collections.defaultdict(list)
        for i, p in enumerate(pieces):
            if i not in special:
                by_text[p].append(i)
        # prefer real pieces over byte pieces for the same text (byte pieces have the low ids)
        pick = {text: max(ids) for text, ids in by_text.items()}
        self.closers = [pick[c.encode()] for c in _CLOSERS if c.encode() in pick]
        self.string_closers = [pick[c.encode()] for c in _STRING_CLOSERS if c.encode() in pick]
        self.probes = [pick[c.encode()] for c in _PROBES if c.encode() in pick]
        self.minimal = [pick[c.encode()] for c in _MINIMAL if c.encode() in pick]
        self.values = self.minimal + [t for t in self.probes if t not in self.minimal]
        # string content that keeps the closing plan as it is: no quote, no backslash, no piece
        # that leaves a UTF-8 character unfinished (or starts inside one)
        self.string_safe = np.array([i not in special and b'"' not in p and b"\\" not in p and _whole_utf8(p)
                                     for i, p in enumerate(pieces)])
        # fallback preference: longer text first (a real piece before the byte piece of the same
        # text), then structure-opening or escaping tokens, then whitespace only
        score = np.array([len(p) - 0.5 * tokenizer.is_byte(i) for i, p in enumerate(pieces)], np.float32)
        opens = np.array([any(c in p for c in b"\\{[,") for p in pieces])
        blank = np.array([not p.strip() for p in pieces])
        score = np.where(opens, score - 100.0, score)
        score = np.where(blank, score - 1000.0, score)
        score[special] = -1e9
        self.fallback_score = score

    def encode(self, text: bytes | str) -> list[int]:
        """Token ids of text *without* SentencePiece's dummy-prefix space (llguidance uses this to
        tokenize forced bytes): encode "\\n" + text and drop the ids of the "\\n" prefix. A BPE
        vocabulary adds no prefix: plain encode."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if not self._dummy_prefix:
            return self._sp_encode(text)
        ids = self._sp_encode("\n" + text)
        k = len(self._newline)
        if ids[:k] == self._newline:
            return ids[k:]
        return self._sp_encode(text)  # pragma: no cover - the prefix always survives for Llama 2


def _whole_utf8(piece: bytes) -> bool:
    """Whether a token's bytes are whole UTF-8 characters."""
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_vocabularies: weakref.WeakKeyDictionary[Tokenizer, Vocabulary] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def vocabulary(tokenizer: Tokenizer) -> Vocabulary:
    """The tokenizer's Vocabulary, built on first use."""
    with _lock:
        if (v := _vocabularies.get(tokenizer)) is None:
            v = _vocabularies[tokenizer] = Vocabulary(tokenizer)
        return v
