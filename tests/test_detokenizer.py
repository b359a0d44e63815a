"""Tests of the streaming detokenizer: deltas always add up to the full decode, never half a character."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_jax.tokenizer import IncrementalDetokenizer, Tokenizer

REPLACEMENT = "\ufffd"


def byte_id(value: int) -> int:
    """Id of the byte-fallback piece <0xNN> in the Llama 2 vocabulary."""
    return value + 3


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path) -> Tokenizer:
    """Our wrapper over the real Llama 2 tokenizer."""
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def whitespace_ids(tokenizer: Tokenizer) -> list[int]:
    """Pieces made only of "▁" (runs of spaces) plus the newline/tab/space bytes."""
    spaces = [i for i in range(tokenizer.vocab_size) if set(tokenizer.id_to_piece(i)) == {"▁"}]
    return spaces + [byte_id(ord(c)) for c in "\n\t "]


def stream(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed ids one by one; return every delta (the flush last) and the detokenizer."""
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas, detok


def assert_consistent(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Deltas join to the full decode, and none has U+FFFD unless the full decode does."""
    deltas, detok = stream(tokenizer, ids)
    full = tokenizer.decode(ids)
    assert "".join(deltas) == full
    assert detok.text == full
    if REPLACEMENT not in full:
        assert not any(REPLACEMENT in d for d in deltas[:-1])
    return deltas


def test_leading_space_pieces(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello world  again")
    assert tokenizer.decode(ids[1:2]) == "world"  # a lone piece loses its space...
    assert assert_consistent(tokenizer, ids)[:2] == ["Hello", " world"]  # ...but not in the stream


def test_first_piece_space_is_stripped_like_full_decode(tokenizer: Tokenizer) -> None:
    hello = tokenizer.encode("Hello")
    assert assert_consistent(tokenizer, [1, *hello]) == ["", "Hello", ""]
    assert "".join(assert_consistent(tokenizer, [1, 29871, *hello])) == " Hello"
    assert "".join(assert_consistent(tokenizer, [1, 29871, 1, *hello])) == " Hello"
    assert "".join(assert_consistent(tokenizer, [*hello, 2, *hello])) == "Hello Hello"


def test_emoji_split_over_byte_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hi 😀!")
    assert [byte_id(b) for b in "😀".encode()] == ids[2:6]
    deltas = assert_consistent(tokenizer, ids)
    assert deltas == ["Hi", " ", "", "", "", "😀", "!", ""]


def test_euro_from_bytes(tokenizer: Tokenizer) -> None:
    ids = [*tokenizer.encode("Price:"), byte_id(0xE2), byte_id(0x82), byte_id(0xAC)]
    assert assert_consistent(tokenizer, ids)[-4:] == ["", "", "€", ""]


def test_incomplete_utf8_is_flushed_as_sentencepiece_decodes_it(tokenizer: Tokenizer) -> None:
    ids = [*tokenizer.encode("Hi"), byte_id(0xE2), byte_id(0x82)]
    deltas = assert_consistent(tokenizer, ids)
    assert deltas == ["Hi", "", "", REPLACEMENT * 2]


def test_control_token_ends_a_byte_run(tokenizer: Tokenizer) -> None:
    assert_consistent(tokenizer, [byte_id(0xE2), 2, byte_id(0x82), byte_id(0xAC)])


def test_unk_and_replacement_pieces(tokenizer: Tokenizer) -> None:
    replacement_piece = tokenizer.encode("x\ufffd")[-1]
    assert not tokenizer.is_byte(replacement_piece)
    deltas = assert_consistent(tokenizer, [0, *tokenizer.encode("a"), 0, replacement_piece, byte_id(0xE2), 0])
    assert deltas[0] == " ⁇ "


def test_long_invalid_byte_run_keeps_window_small(tokenizer: Tokenizer) -> None:
    ids = [byte_id(0xE2)] * 50 + [byte_id(0x82), byte_id(0xAC)] + [byte_id(0x9F)] * 50 + [byte_id(0xF0)] * 3
    detok = IncrementalDetokenizer(tokenizer)
    for i in ids:
        detok.add(i)
        assert len(detok._window) <= 4  # the O(1) bound: never the whole history
    detok.flush()
    assert detok.text == tokenizer.decode(ids)


def test_replacement_char_spelled_in_bytes(tokenizer: Tokenizer) -> None:
    # A literal U+FFFD spelled in bytes (EF BF BD) is final text, not a placeholder for pending bytes.
    ids = [byte_id(b) for b in ("\ufffd" * 10).encode() + b"\xe2\xef" + "\ufffd€".encode()]
    detok = IncrementalDetokenizer(tokenizer)
    for i in ids:
        detok.add(i)
        assert len(detok._window) <= 4
    detok.flush()
    assert detok.text == tokenizer.decode(ids)


text_ids = st.text(
    alphabet=st.one_of(st.characters(codec="utf-8"), st.sampled_from("😀👍🏽🎉中文字日本語 \n\t€éß")), max_size=12
)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_stream_matches_full_decode(tokenizer: Tokenizer, whitespace_ids: list[int], data: st.DataObject) -> None:
    chunk = st.one_of(
        st.lists(st.integers(3, 258), min_size=1, max_size=6),  # byte-fallback pieces
        st.lists(st.sampled_from([byte_id(b) for b in range(0x80, 0x100)]), min_size=1, max_size=12),
        st.lists(st.sampled_from(whitespace_ids), min_size=1, max_size=3),
        st.lists(st.integers(259, tokenizer.vocab_size - 1), min_size=1, max_size=4),  # ordinary pieces
        st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=2),  # unk, bos, eos
        text_ids.map(tokenizer.encode),
    )
    ids = [i for part in data.draw(st.lists(chunk, max_size=10)) for i in part]
    detok = IncrementalDetokenizer(tokenizer)
    deltas = []
    for k, token_id in enumerate(ids, start=1):
        deltas.append(detok.add(token_id))
        so_far, emitted = tokenizer.decode(ids[:k]), detok.text
        waiting = so_far[len(emitted) :]
        assert so_far.startswith(emitted) and len(waiting) <= 3 and set(waiting) <= {REPLACEMENT}  # a partial char
        assert len(detok._window) <= 4  # O(1) work per token
    deltas.append(detok.flush())
    full = tokenizer.decode(ids)
    assert "".join(deltas) == full
    if REPLACEMENT not in full:
        assert not any(REPLACEMENT in d for d in deltas)


def test_a_stream_after_text_keeps_its_leading_space(tokenizer_path):
    """A raw completion continues its prompt's text: its first piece keeps the space a fresh stream drops."""
    tok = Tokenizer(tokenizer_path)
    ids = tok.encode("Hello world")
    for after_text, expected in ((False, "Hello world"), (True, " Hello world")):
        detok = IncrementalDetokenizer(tok, after_text)
        assert "".join(detok.add(i) for i in ids) + detok.flush() == expected
