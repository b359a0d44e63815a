"""Tests of the SentencePiece wrapper and the Llama 2 chat template against Meta's algorithm."""

from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_jax.tokenizer import ChatTemplateError, Tokenizer, apply_chat_template, to_meta_dialog

HELLO_IDS = [1, 518, 25580, 29962, 15043, 29991, 518, 29914, 25580, 29962]
MARKERS = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>", " ", "  ", "\n", "\t", "😀", "中文", "é"]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path) -> Tokenizer:
    """Our wrapper over the real Llama 2 tokenizer."""
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def meta_tokens(tokenizer_path: Path):
    """Meta's llama/generation.py chat_completion (Llama 2), transcribed, over a raw SentencePiece model."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    b_inst, e_inst = "[INST]", "[/INST]"
    b_sys, e_sys = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def encode(s: str, bos: bool, eos: bool) -> list[int]:
        return ([sp.bos_id()] if bos else []) + sp.encode(s) + ([sp.eos_id()] if eos else [])

    def chat(dialog: list[dict]) -> list[int]:
        if dialog[0]["role"] == "system":
            dialog = [
                {"role": dialog[1]["role"], "content": b_sys + dialog[0]["content"] + e_sys + dialog[1]["content"]}
            ] + dialog[2:]
        assert all(m["role"] == "user" for m in dialog[::2]) and all(m["role"] == "assistant" for m in dialog[1::2])
        tokens = sum(
            [
                encode(f"{b_inst} {(p['content']).strip()} {e_inst} {(a['content']).strip()} ", bos=True, eos=True)
                for p, a in zip(dialog[::2], dialog[1::2])
            ],
            [],
        )
        assert dialog[-1]["role"] == "user"
        tokens += encode(f"{b_inst} {(dialog[-1]['content']).strip()} {e_inst}", bos=True, eos=False)
        return tokens

    return chat


def meta_dialog(contents: list[str], system: str | None = None) -> list[dict]:
    """A Meta-shaped dialog: optional system, then alternating user/assistant contents (odd count)."""
    roles = ["user" if i % 2 == 0 else "assistant" for i in range(len(contents))]
    dialog = [{"role": r, "content": c} for r, c in zip(roles, contents)]
    return ([{"role": "system", "content": system}] if system is not None else []) + dialog


def assert_special_ids_only_at_boundaries(ids: list[int], n_turns: int) -> None:
    """BOS opens each turn, EOS closes each finished turn, and neither appears anywhere else."""
    assert ids[0] == 1
    assert ids.count(1) == n_turns
    assert ids.count(2) == n_turns - 1
    assert all(ids[i + 1] == 1 for i, t in enumerate(ids) if t == 2)
    assert ids[-1] != 2


# --------------------------------------------------------------------------- Tokenizer


def test_tokenizer_properties(tokenizer: Tokenizer) -> None:
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.vocab_size) == (1, 2, 0, 32000)
    assert [tokenizer.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    assert tokenizer.is_control(1) and tokenizer.is_control(2) and not tokenizer.is_control(15043)
    assert tokenizer.is_byte(3) and tokenizer.is_byte(258) and not tokenizer.is_byte(259)


def test_encode_known_ids_without_bos_eos(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("[INST]") == [518, 25580, 29962]
    assert tokenizer.encode("[/INST]") == [518, 29914, 25580, 29962]
    assert tokenizer.encode("") == []


@pytest.mark.parametrize("text", ["<s>", "</s>", "<s>[INST] hi [/INST]</s>", "<unk>"])
def test_control_markup_in_text_is_plain(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert not {0, 1, 2} & set(ids)
    assert tokenizer.decode(ids) == text


def test_decode_round_trip_and_controls(tokenizer: Tokenizer) -> None:
    text = "Hello, world! 😀 中文 €\n  indented"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([1, *ids, 2]) == text


# --------------------------------------------------------------------------- chat template vs Meta


def test_single_user_turn_hello(tokenizer: Tokenizer) -> None:
    assert apply_chat_template(tokenizer, [{"role": "user", "content": "Hello!"}]) == HELLO_IDS


@pytest.mark.parametrize(
    ("contents", "system"),
    [
        (["Hello!"], None),
        (["Hello!"], "You are a helpful assistant."),
        (["Hi", "Hello! How can I help?", "Tell me a joke.", "Why did the chicken...", "Go on"], None),
        (["Hi", "Hello! How can I help?", "Tell me a joke.", "Why did the chicken...", "Go on"], "Be terse."),
        (["  padded user  \n", "\n padded answer \t", "\tnext  "], "  padded system \n"),
        (["", "", ""], ""),
        (["Ça va? 😀👍🏽 中文 العربية", "très bien 🎉", "日本語"], "Réponds en français 🇫🇷"),
        (["[INST] inner [/INST] <<SYS>>\nx\n<</SYS>>\n\n <s> </s>", "<s>ok</s>", "</s>[/INST]"], "<s>[INST]</s>"),
    ],
)
def test_matches_meta(tokenizer: Tokenizer, meta_tokens, contents: list[str], system: str | None) -> None:
    dialog = meta_dialog(contents, system)
    ids = apply_chat_template(tokenizer, dialog)
    assert ids == meta_tokens(dialog)
    assert_special_ids_only_at_boundaries(ids, n_turns=(len(contents) + 1) // 2)


content_text = st.lists(st.one_of(st.text(st.characters(codec="utf-8"), max_size=8), st.sampled_from(MARKERS)), max_size=6).map("".join)


@settings(max_examples=150, deadline=None)
@given(
    contents=st.integers(0, 3).flatmap(lambda n: st.lists(content_text, min_size=2 * n + 1, max_size=2 * n + 1)),
    system=st.none() | content_text,
)
def test_matches_meta_property(tokenizer: Tokenizer, meta_tokens, contents: list[str], system: str | None) -> None:
    dialog = meta_dialog(contents, system)
    ids = apply_chat_template(tokenizer, dialog)
    assert ids == meta_tokens(dialog)
    assert_special_ids_only_at_boundaries(ids, n_turns=(len(contents) + 1) // 2)


# --------------------------------------------------------------------------- policy beyond Meta


def test_system_anywhere_is_merged_in_order(tokenizer: Tokenizer, meta_tokens) -> None:
    messages = [
        {"role": "system", "content": "First rule."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "system", "content": "Second rule."},
        {"role": "user", "content": "Bye"},
    ]
    expected = meta_tokens(meta_dialog(["Hi", "Hello", "Bye"], "First rule.\n\nSecond rule."))
    assert apply_chat_template(tokenizer, messages) == expected
    late_only = [m for m in messages if m["content"] != "First rule."]
    assert apply_chat_template(tokenizer, late_only) == meta_tokens(meta_dialog(["Hi", "Hello", "Bye"], "Second rule."))


def test_consecutive_messages_merge(tokenizer: Tokenizer, meta_tokens) -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"},
    ]
    assert apply_chat_template(tokenizer, messages) == meta_tokens(meta_dialog(["a\n\nb", "c\n\nd", "e"]))


def test_tool_calls_and_results_render_as_text(tokenizer: Tokenizer, meta_tokens) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18°C"},
        {"role": "tool", "content": "sunny"},
    ]
    calls_text = '[tool calls]: [{"id": "call_1", "name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}]'
    results_text = "[tool result for call call_1]: 18°C\n\n[tool result]: sunny"
    assert to_meta_dialog(messages) == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": calls_text},
        {"role": "user", "content": results_text},
    ]
    expected = meta_tokens(meta_dialog(["Weather in Paris?", calls_text, results_text]))
    assert apply_chat_template(tokenizer, messages) == expected
    with_text = dict(messages[1], content="Let me check.")
    assert to_meta_dialog([messages[0], with_text, messages[2]])[1]["content"] == "Let me check.\n\n" + calls_text


def test_content_parts_and_none(tokenizer: Tokenizer, meta_tokens) -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    assert apply_chat_template(tokenizer, [{"role": "user", "content": parts}]) == meta_tokens(
        meta_dialog(["Hello\nthere"])
    )
    assert to_meta_dialog([{"role": "user", "content": None}]) == [{"role": "user", "content": ""}]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "empty"),
        ([{"role": "system", "content": "x"}], "no user message"),
        ([{"role": "wizard", "content": "x"}], "unknown role"),
        ([{"content": "x"}], "unknown role"),
        (["not a dict"], "unknown role"),
        ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "start with a user"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "image_url"),
        ([{"role": "user", "content": ["raw string part"]}], "unsupported content part"),
        ([{"role": "user", "content": 42}], "content must be"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"id": "c"}]}, {"role": "user"}],
            "name",
        ),
    ],
)
def test_errors(tokenizer: Tokenizer, messages: list, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        apply_chat_template(tokenizer, messages)


def test_error_is_value_error() -> None:
    assert issubclass(ChatTemplateError, ValueError)
