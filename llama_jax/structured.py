"""Structured output: JSON mode, JSON schemas and tool calls, valid by construction.

Grammars are compiled by llguidance (a Rust Earley parser + lazy lexer; an abi3 wheel with no
dependencies) against a token table built here from our SentencePiece model: no HF
`tokenizers`/transformers at run time. Each choice gets a `GrammarConstraint` (the engine's
`Constraint` protocol): `allowed()` is llguidance's token mask for the next step (a few us on the
Llama 2 vocabulary) narrowed by the budget rule below, `advance()` feeds the sampled token, and
`done()` is true once the grammar is complete and nothing else may follow.

Token bytes: "▁" is a space, <0xNN> byte pieces are that byte, control/unknown pieces are
special (never allowed inside text). SentencePiece drops the leading "▁" of the first piece
when decoding, so every grammar starts with an optional single space; the first step never
allows the <0x20> byte piece (whose space would survive decoding).

Budget ("valid by construction" includes finishing): a model may never close a string on its
own (random weights pick a closing quote ~1% of the time), so each constraint knows its token
budget (max_tokens, or the rest of the context) and how many tokens it would take to finish:
a greedy *closing plan* from the current state (forced tokens; else a closer `"` `}` `]` `,`;
else a short value `0` `""` `{}` ... or a probe character; else the longest allowed token),
computed on a scratch copy of the matcher. `margin` bounds how much one free token can lengthen
the plan (from the grammar's shortest output). While plan + margin fits in what is left the
model is free (the plan is checked as rarely as that allows). After that, in the *closing zone*,
only string content that opens nothing is still free (when the string could end right away),
otherwise the plan's next token is the only one allowed; when only the plan is left it is forced
to the end: strings are cut short, open containers closed, required members filled with short
values. The result is complete and valid unless the budget is below the shortest valid output
(then it is cut: finish_reason "length"). The plan is a heuristic: formats and patterns are
usually completed with the probe characters, and a string's minLength costs one token per
character (plans are capped at PLAN_CAP tokens).

EOS is allowed exactly when the grammar accepts (llguidance's mask does that); a grammar that
accepts and can take nothing more reports `done()`, so a JSON reply ends with "stop" right at
its closing brace and EOS is never needed.

Tools: the model sees the functions in the system block (`tools_system_prompt`) and answers
either plain text (tool_choice auto only) or one envelope
``{"tool_calls": [{"name": "f", "arguments": {...}}, ...]}`` whose arguments follow each
function's parameter schema (`tools_grammar`). `render_tool_calls` in tokenizer.py writes the
conversation's earlier calls in exactly that form. `ToolCallParser` turns the envelope back into
OpenAI tool calls incrementally (name first, then argument fragments) for streaming.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import llguidance
import llguidance.numpy
import numpy as np

from llama_jax.tokenizer import TOOL_CALLS_KEY, Tokenizer

# Separators the grammar allows (exactly json.dumps' defaults, which render_tool_calls uses):
# no free whitespace, so a model cannot spend its budget on blanks.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
PLAN_CAP = 96  # closing plans are cut at this length (such a grammar enters its closing zone at once)
MIN_MARGIN = 8  # the closing zone starts when the plan + max(this, the grammar's margin) reaches the budget
HARD_SLACK = 2  # the plan is forced to the end when only the plan + this is left
_STRING_CLOSERS = ('"}}', '"}]', '"]}', '"}', '"]', '"')  # inside a string; longest first
_CLOSERS = ('}}}', '}}', ']]', '}]', ']}', '}', ']', ',')  # outside strings (`,`: on to a required member)
_MINIMAL = ('0', ' ""', ' {}', ' []', ' null', ' true', ' false',  # shortest values
            '""', '{}', '[]', 'null', 'true', 'false')
# Single characters tried in turn (rotating, so none repeats forever) where neither a closer nor a
# minimal value fits, e.g. inside a string with a pattern or format: they spell most formats.
_PROBES = ('@', '.', '0', '-', 'a', ':', 'T', 'Z', '/', '_', 'A', '1', '+', ' ', 'x')
_CACHE_SIZE = 64


class StructuredOutputError(ValueError):
    """A schema or tool definition that cannot be compiled; `param` names the request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ------------------------------------------------------------------------------------ vocabulary


class Vocabulary:
    """Our SentencePiece vocabulary as llguidance sees it, plus the token tables the closing plan
    uses. Built once per Tokenizer (~0.1 s) by `vocabulary()`."""

    def __init__(self, tokenizer: Tokenizer):
        n = tokenizer.vocab_size
        self.size, self.eos_id = n, tokenizer.eos_id
        self._sp_encode = tokenizer.encode
        self._newline = tokenizer.encode("\n")  # the "\n" prefix trick below
        pieces: list[bytes] = []
        special: list[int] = []
        for i in range(n):
            piece = tokenizer.id_to_piece(i)
            if tokenizer.is_control(i) or i == tokenizer.unk_id:
                pieces.append(b"\xff" + piece.encode())  # llguidance's marker for special tokens
                special.append(i)
            elif tokenizer.is_byte(i):
                pieces.append(bytes([int(piece[3:5], 16)]))
            else:
                pieces.append(piece.replace("\u2581", " ").encode())
        self.pieces = pieces
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
        # that leaves a UTF-8 character unfinished
        self.string_safe = np.array([i not in special and b'"' not in p and b"\\" not in p
                                     and not (tokenizer.is_byte(i) and p[0] >= 0x80) for i, p in enumerate(pieces)])
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
        tokenize forced bytes): encode "\\n" + text and drop the ids of the "\\n" prefix."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        ids = self._sp_encode("\n" + text)
        k = len(self._newline)
        if ids[:k] == self._newline:
            return ids[k:]
        return self._sp_encode(text)  # pragma: no cover - the prefix always survives for Llama 2


_vocabularies: weakref.WeakKeyDictionary[Tokenizer, Vocabulary] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def vocabulary(tokenizer: Tokenizer) -> Vocabulary:
    with _lock:
        if (v := _vocabularies.get(tokenizer)) is None:
            v = _vocabularies[tokenizer] = Vocabulary(tokenizer)
        return v


# ------------------------------------------------------------------------------------ grammars


def _lark_str(text: str) -> str:
    """A Lark string literal (JSON escaping is valid Lark escaping)."""
    return json.dumps(text, ensure_ascii=False)


def _lark_json(schema: Mapping[str, Any]) -> str:
    """Inline JSON schema, with our separators and no free whitespace."""
    body = dict(schema)
    body["x-guidance"] = {**(body.get("x-guidance") or {}), **JSON_STYLE}  # our layout wins
    return "%json " + json.dumps(body, ensure_ascii=False)


def json_lark(schema: Mapping[str, Any] | None) -> str:
    """Grammar of one JSON value following `schema` (None: any JSON object)."""
    return f'start: " "? body\nbody: {_lark_json(schema if schema is not None else {"type": "object"})}\n'


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """One OpenAI function tool."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None

    @property
    def schema(self) -> Mapping[str, Any]:
        """The arguments' schema; no parameters means an empty argument list (as OpenAI)."""
        if self.parameters is None:
            return {"type": "object", "properties": {}, "additionalProperties": False}
        return self.parameters


def tools_lark(tools: Sequence[ToolSpec], mode: str = "auto", parallel: bool = True) -> str:
    """Grammar of the tool-call envelope over `tools`. `mode` "auto": the envelope, or plain text
    that does not start with "{"; "required": the envelope. `parallel`: one or more calls, else
    exactly one (a forced function is "required" over that one tool, not parallel)."""
    if mode not in ("auto", "required") or not tools:
        raise ValueError(f"tools_lark needs tools and mode 'auto' or 'required', not {mode!r}")
    rules = []
    for i, tool in enumerate(tools):
        head = "{" + json.dumps("name") + ": " + json.dumps(tool.name) + ", " + json.dumps("arguments") + ": "
        rules.append(f"call_{i}: {_lark_str(head)} args_{i} {_lark_str('}')}")
        rules.append(f"args_{i}: {_lark_json(tool.schema)}")
    calls = f"call ({_lark_str(', ')} call)*" if parallel else "call"
    lines = [
        'start: " "? (envelope | TEXT)' if mode == "auto" else 'start: " "? envelope',
        *([r"TEXT: /[^{\s](.|\n)*/"] if mode == "auto" else []),
        f"envelope: {_lark_str('{' + json.dumps(TOOL_CALLS_KEY) + ': [')} {calls} {_lark_str(']}')}",
        "call: " + " | ".join(f"call_{i}" for i in range(len(tools))),
        *rules,
    ]
    return "\n".join(lines) + "\n"


class Grammar:
    """A compiled grammar for one request: validates at construction (StructuredOutputError on a
    schema llguidance rejects) and hands out one fresh constraint per choice."""

    def __init__(self, tokenizer: Tokenizer, lark: str, param: str | None = None):
        self.vocab = vocabulary(tokenizer)
        self.lark = lark
        self._matcher = _compiled(self.vocab, lark, param)
        scratch = self._matcher.deep_copy()
        plan = _closing_plan(scratch, self.vocab)
        if _dead_end(scratch, plan, self.vocab):
            raise StructuredOutputError("The schema cannot be satisfied: no sequence of this model's tokens "
                                        "completes it.", param)
        # how much one token can lengthen the closing plan, roughly: the shortest complete output,
        # also from "{" (for tools auto, whose shortest output is text)
        shortest = len(plan)
        brace = self._matcher.deep_copy()
        if brace.try_consume_tokens(self.vocab.encode("{")) == 1:
            shortest = max(shortest, 1 + len(_closing_plan(brace, self.vocab)))
        self.margin = max(MIN_MARGIN, shortest + 2)

    def constraint(self, budget: int | None = None, vocab_size: int | None = None) -> GrammarConstraint:
        return GrammarConstraint(self, budget, vocab_size)

    def factory(self, budget: int | None = None, vocab_size: int | None = None) -> Callable[[], GrammarConstraint]:
        """For `Request.constraint`: `budget` is the choice's token budget (max_tokens), `vocab_size`
        the model's (masks are padded with False beyond the tokenizer's pieces)."""
        return lambda: self.constraint(budget, vocab_size)

    def new_matcher(self) -> llguidance.LLMatcher:
        return self._matcher.deep_copy()


_compiled_cache: collections.OrderedDict[tuple[int, str], llguidance.LLMatcher] = collections.OrderedDict()


def _compiled(vocab: Vocabulary, lark: str, param: str | None) -> llguidance.LLMatcher:
    """A pristine matcher for `lark` (LRU-cached: deep copies are ~10 us, compiling is ~1 ms+)."""
    key = (id(vocab), lark)
    with _lock:
        if (hit := _compiled_cache.get(key)) is not None:
            _compiled_cache.move_to_end(key)
            return hit
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, vocab.ll)
    if is_error:
        raise StructuredOutputError(f"Invalid schema: {_short(messages[0])}", param)
    matcher = llguidance.LLMatcher(vocab.ll, grammar, log_level=0)
    if matcher.is_error():
        raise StructuredOutputError(f"Invalid schema: {_short(matcher.get_error())}", param)
    with _lock:
        _compiled_cache[key] = matcher
        while len(_compiled_cache) > _CACHE_SIZE:
            _compiled_cache.popitem(last=False)
    return matcher


def _short(message: str) -> str:
    """llguidance's message without the grammar listing it appends."""
    first = message.strip().splitlines()[0] if message.strip() else "rejected by the grammar compiler"
    return first.split(": ", 1)[1] if first.startswith("at ") and ": " in first else first


def json_grammar(tokenizer: Tokenizer, schema: Mapping[str, Any] | None = None,
                 param: str | None = "response_format") -> Grammar:
    """response_format json_object (schema None) or json_schema."""
    return Grammar(tokenizer, json_lark(schema), param)


def check_tools(tokenizer: Tokenizer, tools: Sequence[ToolSpec]) -> None:
    """Compile each function's parameters on its own, so that a schema llguidance rejects is
    reported as tools[i].function.parameters."""
    for i, tool in enumerate(tools):
        _compiled(vocabulary(tokenizer), json_lark(tool.schema), f"tools[{i}].function.parameters")


def tools_grammar(tokenizer: Tokenizer, tools: Sequence[ToolSpec], mode: str = "auto",
                  parallel: bool = True) -> Grammar:
    """The envelope grammar (see `tools_lark`); call `check_tools` first for precise errors."""
    return Grammar(tokenizer, tools_lark(tools, mode, parallel), "tools")


# ------------------------------------------------------------------------------------ constraint


def _string_state(piece: bytes, state: tuple[bool, bool]) -> tuple[bool, bool]:
    """(inside a JSON string, after a backslash there) once `piece` is appended. Every grammar here
    is JSON plus literals with balanced quotes, so counting unescaped quotes tells strings apart."""
    inside, escape = state
    for c in piece:
        if not inside:
            inside = c == 0x22
        elif escape:
            escape = False
        elif c == 0x5C:
            escape = True
        elif c == 0x22:
            inside = False
    return inside, escape


def _closing_plan(m: llguidance.LLMatcher, vocab: Vocabulary, string: tuple[bool, bool] = (False, False),
                  cap: int = PLAN_CAP) -> list[int]:
    """Tokens that take `m` (a scratch matcher, consumed) to a complete output: forced tokens,
    else a closer (of the string we are in, or of containers), else a minimal value, else a probe
    character, else the best-scoring allowed token; EOS last when the grammar accepts but could go on. At most `cap`
    tokens (then incomplete). `string` is the JSON string state at the start. Heuristic: formats
    and patterns are usually completed by the probe characters, a string's minLength one
    character per token."""
    plan: list[int] = []
    mask = None
    probes = 0
    while len(plan) < cap and not m.is_stopped():
        if m.is_accepting():
            plan.append(vocab.eos_id)
            break
        ff = m.compute_ff_tokens()
        if ff and (k := m.try_consume_tokens(ff[: cap - len(plan)])):
            plan += ff[:k]
            for t in ff[:k]:
                string = _string_state(vocab.pieces[t], string)
            continue
        inside = string[0] and not string[1]
        closers = vocab.string_closers if inside else vocab.closers
        rotating = vocab.probes if inside else vocab.values  # rotate: `0` alone never satisfies "> 0"
        k = probes % len(rotating)
        for t in (*closers, *rotating[k:], *rotating[:k]):
            if m.try_consume_tokens([t]) == 1:
                probes += t not in closers
                break
        else:
            if mask is None:
                mask = llguidance.numpy.allocate_token_bitmask(1, vocab.size)
            llguidance.numpy.fill_next_token_bitmask(m, mask)
            allowed = _unpack(mask[0], vocab.size)
            allowed[vocab.eos_id] = False
            if not allowed.any():
                break
            t = int(np.argmax(np.where(allowed, vocab.fallback_score, -np.inf)))
            if not m.consume_token(t):
                break
        plan.append(t)
        string = _string_state(vocab.pieces[t], string)
    return plan


def _dead_end(m: llguidance.LLMatcher, plan: list[int], vocab: Vocabulary) -> bool:
    """Whether a closing plan ended in an error, or short of PLAN_CAP where nothing is allowed,
    rather than at a complete output: the grammar cannot be completed with this vocabulary."""
    if m.is_error():  # e.g. a forced text whose tokenization the grammar then rejects
        return True
    complete = m.is_stopped() or (bool(plan) and plan[-1] == vocab.eos_id)
    return not complete and len(plan) < PLAN_CAP


def _unpack(bits: np.ndarray, n: int) -> np.ndarray:
    """llguidance's bitmask (int32 words, bit i of word w = token 32w + i) as bool[n]."""
    return np.unpackbits(bits.view(np.uint8), bitorder="little", count=n).view(bool)


class GrammarConstraint:
    """One choice's automaton (see the module docstring for the budget rule).

    States: free (llguidance's mask; the closing plan is checked every few steps, as rarely as
    the slack allows), the closing zone (plan checked every step: inside a string that could end
    now any content that opens nothing, elsewhere the plan's next token), and forced (no room
    left: the plan to its end). The plan is cached and only recomputed when it no longer
    validates (string content leaves it valid; checking costs ~1 us, computing ~30-150 us).
    """

    def __init__(self, grammar: Grammar, budget: int | None = None, vocab_size: int | None = None):
        self.vocab = grammar.vocab
        self.matcher = grammar.new_matcher()
        self.budget = budget
        self.margin = grammar.margin
        self.vocab_size = vocab_size or self.vocab.size
        self.generated = 0
        self.forced: list[int] = []  # the rest of the closing plan once it is forced
        self._plan: list[int] | None = None  # the last closing plan (EOS excluded), while it may still be valid
        self._plan_eos = False
        self._check_at = 0  # the next step at which the closing plan must be checked
        self._string = (False, False)  # JSON string state of the output so far
        self._bits = llguidance.numpy.allocate_token_bitmask(1, self.vocab.size)
        self._string_safe = np.zeros(self.vocab_size, bool)
        self._string_safe[: self.vocab.size] = self.vocab.string_safe

    def _mask(self) -> np.ndarray:
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self._bits)
        allowed = _unpack(self._bits[0], self.vocab.size)
        if self.vocab_size == self.vocab.size:
            return allowed
        padded = np.zeros(self.vocab_size, bool)  # the model's vocabulary may be padded
        padded[: self.vocab.size] = allowed
        return padded

    def _only(self, token: int) -> np.ndarray:
        allowed = np.zeros(self.vocab_size, bool)
        allowed[token] = True
        return allowed

    def closing_plan(self, cap: int = PLAN_CAP) -> list[int]:
        """The tokens that would complete the output from here (EOS last where one is needed)."""
        if self._plan is None or self.matcher.validate_tokens(self._plan) != len(self._plan):
            plan = _closing_plan(self.matcher.deep_copy(), self.vocab, self._string, cap)
            self._plan_eos = bool(plan) and plan[-1] == self.vocab.eos_id
            self._plan = plan[:-1] if self._plan_eos else plan
        return self._plan + [self.vocab.eos_id] * self._plan_eos

    def allowed(self) -> np.ndarray:
        if self.matcher.is_error():  # the engine did not honour the mask: fail the choice, never a fake "stop"
            raise StructuredOutputError(f"the output left its grammar: {_short(self.matcher.get_error())}")
        if self.forced:
            return self._only(self.forced[0])
        soft = False
        if self.budget is not None and self.generated >= self._check_at and not self.matcher.is_accepting():
            left = self.budget - self.generated  # tokens still allowed, this one included
            plan = self.closing_plan(min(PLAN_CAP, max(left, 1)))
            slack = left - len(plan) - self.margin
            if slack <= 0 and plan:  # the closing zone: from here on the plan is checked every step
                if left <= len(plan) + HARD_SLACK:
                    self.forced = list(plan)  # no room left: follow the plan to the end
                if self.forced or not (plan[0] in self.vocab.string_closers and left > len(plan) + self.margin // 2):
                    return self._only(plan[0])  # nothing may open: take the plan's next step
                soft = True  # in a string that could end now: content that cannot open anything
            # one free token shortens the budget by 1 and lengthens the plan by at most `margin`
            self._check_at = self.generated + max(slack, 0) // (self.margin + 1)
        allowed = self._mask()
        if soft:
            safe = allowed & self._string_safe
            return safe if safe.any() else self._only(plan[0])
        if self.generated == 0 and self.vocab.space_byte is not None and allowed.sum() > 1:
            allowed[self.vocab.space_byte] = False
        if not allowed.any():  # a dead end: no token continues the output, so it can never be valid
            raise StructuredOutputError("the output cannot be completed: no token of this model continues it")
        return allowed

    def advance(self, token_id: int) -> None:
        token_id = int(token_id)
        self.generated += 1
        if self.forced:
            if token_id == self.forced[0]:
                self.forced.pop(0)
            else:  # the engine did not honour the mask: plan again
                self.forced = []
        if self._plan and token_id == self._plan[0]:
            self._plan = self._plan[1:]
        elif token_id >= self.vocab_size or not self._string_safe[token_id]:
            self._plan = None  # only string content is known to leave the plan valid and complete
        if token_id == self.vocab.eos_id and self.matcher.is_accepting():
            return
        self.matcher.consume_token(token_id)
        if token_id < self.vocab.size:
            self._string = _string_state(self.vocab.pieces[token_id], self._string)

    def done(self) -> bool:
        return self.matcher.is_stopped() and not self.matcher.is_error()


# ------------------------------------------------------------------------------------ tool prompt


def tools_system_prompt(tools: Sequence[ToolSpec], mode: str = "auto", function: str | None = None,
                        parallel: bool = True) -> str:
    """The system-block text that describes the tools and the envelope to the model (kept short:
    it is part of every prompt). `mode`: "auto", "required" or "none" (tools described, the model
    told not to call them now); `function`: the one function it must call."""
    lines = ["Functions (name, description, JSON schema of the arguments):"]
    for tool in tools:
        entry: dict[str, Any] = {"name": tool.name}
        if tool.description:
            entry["description"] = tool.description
        entry["parameters"] = tool.parameters if tool.parameters is not None else {}
        lines.append(json.dumps(entry, ensure_ascii=False, separators=(",", ":")))
    envelope = '{"' + TOOL_CALLS_KEY + '": [{"name": ..., "arguments": {...}}' + (", ..." if parallel else "") + "]}"
    lines.append(f"To call functions, reply with only {envelope}. Results come as \"[tool result for <name>]: ...\".")
    if function is not None:
        lines.append(f"Call {function} now.")
    elif mode == "required":
        lines.append("Call at least one function now.")
    elif mode == "none":
        lines.append("Do not call functions now; answer in plain text.")
    else:
        lines.append("Without a function, answer in plain text.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ tool-call parser


@dataclasses.dataclass
class ParsedCall:
    index: int
    name: str
    arguments: str = ""
    complete: bool = False


class ToolCallParser:
    """Incremental parser of one choice's output under a tools grammar.

    `feed(text)` returns events: ("content", text) for a plain-text answer (auto), ("call", index,
    name) when a call's name is complete, then ("arguments", index, fragment) as its arguments'
    JSON text arrives. The envelope's layout is fixed by the grammar (separators ", " and ": ",
    "name" before "arguments"), so this follows it literally; anything else stops the parse
    (only a truncated or stop-string-cut output can do that).
    """

    _HEAD = "{" + json.dumps(TOOL_CALLS_KEY) + ": ["
    _NAME = '{"name": '
    _ARGS = ', "arguments": '

    def __init__(self) -> None:
        self.mode: str | None = None  # None until the first visible character, then "content" or "calls"
        self.calls: list[ParsedCall] = []
        self.text = ""  # everything fed
        self._buf = ""  # unparsed envelope text
        self._state = "head"
        self._depth = 0
        self._in_string = self._escape = False

    @property
    def complete(self) -> bool:
        """The envelope has been read to its end."""
        return self._state == "end"

    def feed(self, text: str) -> list[tuple]:
        self.text += text
        events: list[tuple] = []
        if self.mode is None:
            stripped = self.text.lstrip()
            if not stripped:
                return events
            self.mode = "calls" if stripped.startswith("{") else "content"
            if self.mode == "content":
                return [("content", self.text)]
            self._buf = stripped
        elif self.mode == "content":
            return [("content", text)] if text else events
        else:
            self._buf += text
        self._parse(events)
        return events

    def _expect(self, literal: str) -> bool | None:
        """Consume `literal` from the buffer: True, None if the buffer is still a prefix, False on a mismatch."""
        if self._buf.startswith(literal):
            self._buf = self._buf[len(literal):]
            return True
        if literal.startswith(self._buf):
            return None
        self._state = "error"
        return False

    def _parse(self, events: list[tuple]) -> None:
        while self._buf and self._state not in ("end", "error"):
            state = self._state
            if state == "head":
                if not self._expect(self._HEAD):
                    return
                self._state = "call"
            elif state == "call":
                if not self._expect(self._NAME):
                    return
                self._state = "name"
            elif state == "name":
                end = _string_end(self._buf)
                if end is None:
                    if not self._buf.startswith('"'):
                        self._state = "error"
                    return
                name = json.loads(self._buf[:end])
                self._buf = self._buf[end:]
                self.calls.append(ParsedCall(len(self.calls), name))
                events.append(("call", len(self.calls) - 1, name))
                self._state = "args_key"
            elif state == "args_key":
                if not self._expect(self._ARGS):
                    return
                self._state, self._depth, self._in_string, self._escape = "args", 0, False, False
            elif state == "args":
                taken = self._scan_value()
                fragment, self._buf = self._buf[:taken], self._buf[taken:]
                call = self.calls[-1]
                call.arguments += fragment
                if fragment:
                    events.append(("arguments", call.index, fragment))
                if self._depth == 0 and taken and not self._in_string:
                    call.complete = True
                    self._state = "call_end"
                else:
                    return
            elif state == "call_end":
                if not self._expect("}"):
                    return
                self._state = "next"
            elif state == "next":
                if self._buf.startswith(", "):
                    self._buf = self._buf[2:]
                    self._state = "call"
                elif self._buf.startswith("]}"):
                    self._buf = self._buf[2:]
                    self._state = "end"
                elif self._buf in (",", "]"):
                    return
                else:
                    self._state = "error"

    def _scan_value(self) -> int:
        """How many characters of the buffer belong to the arguments value (an object or array)."""
        for i, c in enumerate(self._buf):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
            elif self._depth == 0:
                self._state = "error"  # arguments are always an object
                return i
        return len(self._buf)


def _string_end(buf: str) -> int | None:
    """End index (exclusive) of the JSON string at the start of `buf`, None if unfinished."""
    if not buf.startswith('"'):
        return None
    escape = False
    for i in range(1, len(buf)):
        c = buf[i]
        if escape:
            escape = False
        elif c == "\\":
            escape = True
        elif c == '"':
            return i + 1
    return None


def parse_tool_calls(text: str) -> ToolCallParser:
    """Parse a whole output at once (the non-streamed reply): the same parser as streaming."""
    parser = ToolCallParser()
    parser.feed(text)
    return parser
