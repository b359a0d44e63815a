"""Tokenizers and chat prompts: the SentencePiece wrapper (Llama 2), `load_tokenizer` for any
model directory (SentencePiece or a Hugging Face tokenizer.json, see hf_tokenizer.py), Meta's
Llama 2 chat format, the dispatch to a model's own Jinja template (chat_template.py), and the
streaming detokenizers.

Kept free of JAX so the server and tools can import it cheaply.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from llama_jax import chat_template, hf_tokenizer, tools

# Meta's Llama 2 chat markers (llama/generation.py).
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

# Separator used when several messages are merged into one turn or one <<SYS>> block.
MESSAGE_SEPARATOR = "\n\n"
ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's newer name for system


class Tokenizer:
    """Thin wrapper over a SentencePiece model; BOS/EOS are only ever added by our own code."""

    byte_level = False
    dummy_prefix = True  # SentencePiece prepends "▁" to the first piece of a text
    add_bos = True  # raw prompts start with BOS, as HF's Llama tokenizer and Meta do
    special_tokens: dict[str, str] = {}

    def __init__(self, path: str | os.PathLike[str], chat_template: str | None = None) -> None:
        """Load the SentencePiece model file at `path` (with the model's Jinja chat template, if it
        has its own; Llama 2 uses Meta's format, `apply_chat_template`)."""
        self._sp = spm.SentencePieceProcessor(model_file=os.fspath(path))
        # BOS, EOS and unknown ids (1, 2 and 0 for Llama 2) and the number of pieces (32000)
        self.bos_id, self.eos_id, self.unk_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()
        self.eos_ids = (self.eos_id,)
        self.vocab_size: int = self._sp.get_piece_size()
        self.chat_template = chat_template
        self.special_ids = {"<s>": self.bos_id, "</s>": self.eos_id}  # what `encode_with_specials` reads as ids
        self.piece_texts: dict[int, str] = {}  # IncrementalDetokenizer's memo: a non-byte piece's text after text
        if chat_template:
            self.special_tokens = {"bos_token": self.id_to_piece(self.bos_id), "eos_token": self.id_to_piece(self.eos_id)}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS; "<s>"/"</s>" in text stay plain pieces (no control parsing)."""
        return self._sp.encode(text, out_type=int, add_bos=False, add_eos=False)

    def encode_with_specials(self, text: str) -> list[int]:
        """Text written by a chat template: its "<s>"/"</s>" markers become BOS/EOS ids."""
        ids: list[int] = []
        for part in re.split(r"(<s>|</s>)", text):
            if part in ("<s>", "</s>"):
                ids.append(self.bos_id if part == "<s>" else self.eos_id)
            elif part:
                ids += self.encode(part)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control ids (BOS/EOS) decode to "" as in SentencePiece."""
        return self._sp.decode([int(i) for i in ids])

    def prompt_ids(self, text: str) -> list[int]:
        """A raw prompt: BOS, then the text's pieces."""
        return [self.bos_id, *self.encode(text)]

    def id_to_piece(self, token_id: int) -> str:
        """The raw SentencePiece piece of an id (e.g. "▁Hello", "<0x0A>", "<s>")."""
        return self._sp.id_to_piece(int(token_id))

    def is_byte(self, token_id: int) -> bool:
        """Whether the id is a byte-fallback piece (<0x00>..<0xFF>), which decodes jointly with its neighbours."""
        return self._sp.is_byte(int(token_id))

    def is_control(self, token_id: int) -> bool:
        """Whether the id is a control piece (BOS/EOS), which decodes to ""."""
        return self._sp.is_control(int(token_id))

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a piece stands for: "▁" is a space, a byte-fallback piece <0xNN> is byte NN;
        None for control and unknown pieces, which have no text."""
        if self.is_control(token_id) or token_id == self.unk_id:
            return None
        piece = self.id_to_piece(token_id)
        return bytes([int(piece[3:5], 16)]) if self.is_byte(token_id) else piece.replace("\u2581", " ").encode()


# --------------------------------------------------------------------------- chat template


class ChatTemplateError(ValueError):
    """A chat conversation that cannot be rendered with the Llama 2 template."""


def _content_text(content: Any) -> str:
    """Text of an OpenAI message content: a string, None, or a list of {"type": "text"} parts (joined by "\\n")."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatTemplateError(f"unsupported content part {kind!r}: only text parts are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    kind = type(content).__name__
    raise ChatTemplateError(f"message content must be a string, null or a list of text parts, not {kind}")


def _message_text(message: Mapping[str, Any], tool_names: dict[str, str] | None = None) -> str:
    """Text of one non-system message: tool results and assistant tool calls are rendered as plain text.

    In tools mode (`tool_names` given: call id -> function name, filled here from assistant
    calls) calls use `tools.render_tool_calls` and results read "[tool result for <name>]: ...".
    """
    text = _content_text(message.get("content"))
    if message["role"] == "tool":
        call_id = message.get("tool_call_id")
        if tool_names is not None and call_id in tool_names:
            return f"[tool result for {tool_names[call_id]}]: {text}"
        return f"[tool result for call {call_id}]: {text}" if call_id else f"[tool result]: {text}"
    if message["role"] == "assistant" and message.get("tool_calls"):
        try:
            calls = (tools.tool_calls_text if tool_names is None else tools.render_tool_calls)(message["tool_calls"])
        except ValueError as e:
            raise ChatTemplateError(str(e)) from None
        if tool_names is not None:
            for call in message["tool_calls"]:
                if call.get("id"):
                    tool_names[call["id"]] = call["function"]["name"]
        return f"{text}{MESSAGE_SEPARATOR}{calls}" if text else calls
    return text


def to_meta_dialog(messages: Sequence[Mapping[str, Any]], tools_system: str | None = None) -> list[dict[str, str]]:
    """Normalise OpenAI-style messages into Meta's strict user/assistant/.../user dialog, system already merged.

    Policy beyond Meta (who accepts only [system], user, assistant, ..., user):
    - all system messages, wherever they are, are joined in order with "\\n\\n" and merged into the
      first user turn exactly as Meta does: B_SYS + system + E_SYS + user (no extra stripping);
    - consecutive user/tool messages merge into one user turn, consecutive assistant messages into one
      assistant turn, joined with "\\n\\n"; tool results and tool calls are rendered as text;
    - the conversation must start with user/tool (after system) and end with user/tool.
    Message text is otherwise used verbatim; only the whole turn is strip()ped later, as in Meta.

    `tools_system` (tools mode, see llama_jax.tools.tools_system_prompt) is appended to the
    system text, and tool calls/results are rendered as the model is told to emit/expect them.
    """
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    system_texts: list[str] = []
    turns: list[dict[str, str]] = []  # alternating user/assistant after merging
    tool_names: dict[str, str] | None = {} if tools_system is not None else None
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ROLES:
            raise ChatTemplateError(f"message {index}: unknown role {role!r} (expected {', '.join(ROLES)})")
        if role in ("system", "developer"):
            system_texts.append(_content_text(message.get("content")))
            continue
        side = "assistant" if role == "assistant" else "user"
        text = _message_text(message, tool_names)
        if turns and turns[-1]["role"] == side:
            turns[-1]["content"] += MESSAGE_SEPARATOR + text
        else:
            turns.append({"role": side, "content": text})
    if not turns:
        raise ChatTemplateError("conversation has no user message")
    if turns[0]["role"] != "user":
        raise ChatTemplateError("conversation must start with a user message (after any system message)")
    if turns[-1]["role"] != "user":
        raise ChatTemplateError("the last message must be from the user or a tool, so that the assistant can reply")
    if tools_system is not None:
        system_texts.append(tools_system)
    if system_texts:
        system = MESSAGE_SEPARATOR.join(system_texts)
        turns[0]["content"] = B_SYS + system + E_SYS + turns[0]["content"]
    return turns


def apply_chat_template(tokenizer: Tokenizer | hf_tokenizer.HFTokenizer, messages: Sequence[Mapping[str, Any]],
                        tools_system: str | None = None,
                        tool_specs: Sequence[Mapping[str, Any]] | None = None,
                        add_generation_prompt: bool = True) -> list[int]:
    """Prompt token ids for a chat: the model's own Jinja template where it has one
    (`template_prompt`), else Meta's Llama 2 format, identical to Meta's `chat_completion` for the
    dialogs Meta accepts.

    Unlike Meta, text containing "[INST]", "<<SYS>>", "<s>" or "</s>" is not rejected: it is tokenized as
    plain text, and BOS/EOS ids appear only at turn boundaries. `tools_system`: see `to_meta_dialog`;
    `tool_specs` (OpenAI tools) go to templates that render tools themselves. `add_generation_prompt`
    false leaves out a Jinja template's opening of the reply (Meta's format has none to leave out).
    """
    if tokenizer.chat_template:
        return template_prompt(tokenizer, messages, tools_system, tool_specs, add_generation_prompt)
    dialog = to_meta_dialog(messages, tools_system)
    ids: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        turn = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += [tokenizer.bos_id, *tokenizer.encode(turn), tokenizer.eos_id]
    ids += [tokenizer.bos_id, *tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}")]
    return ids


def template_messages(messages: Sequence[Mapping[str, Any]], tools_system: str | None = None,
                      native_tools: bool = False) -> list[dict[str, Any]]:
    """OpenAI messages as a Jinja template takes them: developer becomes system, content parts are
    joined; tool calls and results stay structured for a template that renders tools
    (`native_tools`), else they are text and `tools_system` joins the system message."""
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    out: list[dict[str, Any]] = []
    tool_names: dict[str, str] | None = {} if tools_system is not None else None
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ROLES:
            raise ChatTemplateError(f"message {index}: unknown role {role!r} (expected {', '.join(ROLES)})")
        role = "system" if role == "developer" else role
        if native_tools and (role == "tool" or message.get("tool_calls")):
            out.append(_native_tool_message(message, role))
        elif role in ("tool", "assistant"):
            out.append({"role": "user" if role == "tool" else role, "content": _message_text(message, tool_names)})
        else:
            out.append({"role": role, "content": _content_text(message.get("content"))})
    if tools_system is not None and not native_tools:
        if out[0]["role"] == "system":
            out[0]["content"] += MESSAGE_SEPARATOR + tools_system
        else:
            out.insert(0, {"role": "system", "content": tools_system})
    return out


def _native_tool_message(message: Mapping[str, Any], role: str) -> dict[str, Any]:
    """A tool result or an assistant's tool calls in transformers' shape (arguments as objects)."""
    out: dict[str, Any] = {"role": role, "content": _content_text(message.get("content"))}
    if role == "tool":
        out["tool_call_id"] = message.get("tool_call_id")
        return out
    try:
        calls = tools.function_calls(message["tool_calls"])
    except ValueError as e:
        raise ChatTemplateError(str(e)) from None
    out["tool_calls"] = []
    for call_id, function in calls:
        arguments = function.get("arguments") or "{}"
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass
        out["tool_calls"].append({"id": call_id, "type": "function",
                                  "function": {"name": function["name"], "arguments": arguments}})
    return out


def template_prompt(tokenizer, messages: Sequence[Mapping[str, Any]], tools_system: str | None = None,
                    tool_specs: Sequence[Mapping[str, Any]] | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids under the model's own template, with the reply's opening unless `add_generation_prompt` is false."""
    native = bool(tool_specs) and chat_template.takes_tools(tokenizer.chat_template)
    turns = template_messages(messages, tools_system, native)
    try:
        return chat_template.prompt_ids(tokenizer, tokenizer.chat_template, turns, tool_specs if native else None,
                                        add_generation_prompt)
    except chat_template.TemplateError as e:
        raise ChatTemplateError(str(e)) from None


def load_tokenizer(path: str | os.PathLike[str], chat_template_override: str | None = None):
    """The tokenizer of a model directory (or its tokenizer file): SentencePiece `tokenizer.model`
    where present (Llama 2 and its kin), else a byte-level BPE `tokenizer.json`; with the model's
    chat template, or `chat_template_override` (a template's text) instead. A Llama 2 template
    (`[INST]`) is left to Meta's exact format."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    sp_file = path if path.suffix == ".model" else directory / "tokenizer.model"
    if sp_file.is_file() and not (path.is_file() and path.name == "tokenizer.json"):
        config = json.loads((directory / "tokenizer_config.json").read_text()) \
            if (directory / "tokenizer_config.json").is_file() else {}
        jinja = directory / "chat_template.jinja"
        own = jinja.read_text() if jinja.is_file() else hf_tokenizer.template_from_config(config)
        own = None if own and B_INST in own else own
        return Tokenizer(sp_file, chat_template_override or own)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory} has no tokenizer.model or tokenizer.json")
    tokenizer = hf_tokenizer.load(directory)
    if not tokenizer.byte_level:
        raise ValueError(f"{directory}/tokenizer.json is not byte-level BPE, which is the only kind implemented "
                         "without a tokenizer.model")
    if chat_template_override:
        tokenizer.chat_template = chat_template_override
    return tokenizer


def detokenizer(tokenizer, after_text: bool = False):
    """The streaming detokenizer for this tokenizer: byte-level (`hf_tokenizer.ByteDetokenizer`)
    or SentencePiece (`IncrementalDetokenizer`; `after_text`: see there)."""
    if tokenizer.byte_level:
        return hf_tokenizer.ByteDetokenizer(tokenizer)
    return IncrementalDetokenizer(tokenizer, after_text)


# --------------------------------------------------------------------------- streaming detokenizer


def _utf8_length(lead: int) -> int:
    """Length of the UTF-8 sequence a byte may start (0 if it cannot start one); deliberately permissive."""
    if 0xC0 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF7:
        return 4
    return 0


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation equals `tokenizer.decode(all_ids)`.

    Why a tiny window is enough: SentencePiece decoding concatenates piece texts left to right with only
    two kinds of context:
    1. the leading "▁" of the first non-control piece is dropped when nothing but control ids precede it;
    2. consecutive byte-fallback pieces are decoded together as UTF-8, one U+FFFD per invalid byte.
    A byte can only change meaning while it may still be the start of an unfinished UTF-8 sequence, i.e.
    when it lies in a trailing run of at most 3 bytes that begins with a lead byte and continues with
    continuation bytes only. Everything before that run is final, so we emit it and forget those ids; the
    text after the cut depends on them only through "was anything non-control seen?". We reproduce that
    context by decoding the window behind a fixed ordinary "anchor" piece whose text we slice off. The
    window thus never exceeds 4 ids: O(1) work per token, and a half character is never emitted.
    """

    _MAX_PENDING_BYTES = 3  # a UTF-8 sequence is at most 4 bytes, so at most 3 can be waiting

    def __init__(self, tokenizer: Tokenizer, after_text: bool = False) -> None:
        """Start an empty stream; the first visible piece will lose its leading space, like a full
        decode, unless `after_text` says the stream continues visible text (a raw completion)."""
        self._tokenizer = tokenizer
        self._anchor = next(i for i in reversed(tokenizer.encode("a")) if not tokenizer.is_byte(i))
        self._anchor_len = len(tokenizer.decode([self._anchor]))
        self._window: list[int] = []  # ids whose text is not settled yet (at most 3 bytes between calls)
        self._after_visible = after_text  # whether a non-control id precedes the window
        self._deltas: list[str] = []
        self._texts: dict[int, str] = tokenizer.piece_texts  # shared by every stream of the tokenizer

    @property
    def text(self) -> str:
        """All text emitted so far (deltas and flush)."""
        return "".join(self._deltas)

    def _decode(self, ids: list[int]) -> str:
        """Text of `ids` exactly as it appears inside the full decode of the stream."""
        if not self._after_visible:
            return self._tokenizer.decode(ids)
        return self._tokenizer.decode([self._anchor, *ids])[self._anchor_len :]

    def _pending_bytes(self) -> int:
        """How many trailing byte ids may still become part of a character once more bytes arrive."""
        values: list[int] = []
        for token_id in reversed(self._window[-self._MAX_PENDING_BYTES :]):
            if not self._tokenizer.is_byte(token_id):
                break
            values.insert(0, self._tokenizer.token_bytes(token_id)[0])
        for start, value in enumerate(values):
            rest = values[start + 1 :]
            if len(values) - start < _utf8_length(value) and all(0x80 <= b <= 0xBF for b in rest):
                return len(values) - start
        return 0

    def _emit(self, text: str) -> str:
        """Record and return a delta."""
        if text:
            self._deltas.append(text)
        return text

    def add(self, token_id: int) -> str:
        """Feed one generated id; return the newly settled text (possibly "")."""
        if not self._window and self._after_visible:  # the common case: a whole piece after text, memoized
            text = self._texts.get(token_id)
            if text is None and not self._tokenizer.is_byte(token_id):
                text = self._texts[token_id] = self._decode([token_id])
            if text is not None:
                if text:
                    self._deltas.append(text)  # `_emit`, inlined: this is the per-token path
                return text
        self._window.append(int(token_id))
        pending = self._pending_bytes()
        if pending == len(self._window):
            return ""
        settled = self._window[: len(self._window) - pending]
        delta = self._decode(settled)
        self._after_visible = self._after_visible or any(not self._tokenizer.is_control(i) for i in settled)
        self._window = self._window[len(settled) :]
        return self._emit(delta)

    def flush(self) -> str:
        """End the stream: return the held-back bytes decoded as SentencePiece does (U+FFFD per byte)."""
        delta = self._decode(self._window)
        self._after_visible = self._after_visible or any(not self._tokenizer.is_control(i) for i in self._window)
        self._window = []
        return self._emit(delta)
