"""Structured output: JSON mode, JSON schemas and tool calls, valid by construction.

Grammars (written by grammar.py and tools.py) are compiled by llguidance (a Rust Earley parser +
lazy lexer; an abi3 wheel with no dependencies) against a token table built from our
SentencePiece model (vocabulary.py): no HF `tokenizers`/transformers at run time. Each choice
gets a `GrammarConstraint` (the engine's `Constraint` protocol): `fill_mask()` writes llguidance's
token mask for the next step, packed (bitmask.py), straight into the engine's buffer (a few us
to ~150 us on the Llama 2 vocabulary, by grammar), narrowed by the budget rule below;
`advance()` feeds the sampled token, and `done()` is true once the grammar is complete and
nothing else may follow.

SentencePiece drops the leading "▁" of the first piece when decoding, so every grammar starts
with an optional single space; the first step never allows the <0x20> byte piece (whose space
would survive decoding).

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

Tools: `tools_grammar` compiles the tool-call envelope of tools.py (the protocol: prompt,
rendering, grammar text and parser live there).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import llguidance
import llguidance.numpy
import numpy as np

from llama_jax import bitmask
from llama_jax.grammar import JsonState, choice_lark, json_lark, json_state, nested_lark, regex_lark
from llama_jax.tokenizer import Tokenizer
from llama_jax.tools import ToolSpec, tools_lark
from llama_jax.vocabulary import Vocabulary, vocabulary

PLAN_CAP = 96  # closing plans are cut at this length (such a grammar enters its closing zone at once)
MIN_MARGIN = 8  # the closing zone starts when the plan + max(this, the grammar's margin) reaches the budget
HARD_SLACK = 2  # the plan is forced to the end when only the plan + this is left
_CACHE_SIZE = 64


class StructuredOutputError(ValueError):
    """A schema or tool definition that cannot be compiled; `param` names the request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ------------------------------------------------------------------------------------ grammars


class Grammar:
    """A compiled grammar for one request: validates at construction (StructuredOutputError on a
    schema llguidance rejects) and hands out one fresh constraint per choice."""

    def __init__(self, tokenizer: Tokenizer, lark: str, param: str | None = None, what: str = "schema"):
        self.vocab = vocabulary(tokenizer)
        self.lark = lark
        self._matcher = _compiled(self.vocab, lark, param, what)
        scratch = self._matcher.deep_copy()
        plan = _closing_plan(scratch, self.vocab)
        if _dead_end(scratch, plan, self.vocab):
            raise StructuredOutputError(f"The {what} cannot be satisfied: no sequence of this model's tokens "
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


_lock = threading.Lock()
_compiled_cache: collections.OrderedDict[tuple[int, str], llguidance.LLMatcher] = collections.OrderedDict()


def _compiled(vocab: Vocabulary, lark: str, param: str | None, what: str = "schema") -> llguidance.LLMatcher:
    """A pristine matcher for `lark` (LRU-cached: deep copies are ~10 us, compiling is ~1 ms+)."""
    key = (id(vocab), lark)
    with _lock:
        if (hit := _compiled_cache.get(key)) is not None:
            _compiled_cache.move_to_end(key)
            return hit
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, vocab.ll)
    if is_error:
        raise StructuredOutputError(f"Invalid {what}: {_short(messages[0])}", param)
    matcher = llguidance.LLMatcher(vocab.ll, grammar, log_level=0)
    if matcher.is_error():
        raise StructuredOutputError(f"Invalid {what}: {_short(matcher.get_error())}", param)
    with _lock:
        _compiled_cache[key] = matcher
        while len(_compiled_cache) > _CACHE_SIZE:
            _compiled_cache.popitem(last=False)
    return matcher


def _short(message: str) -> str:
    """llguidance's message without the grammar listing it appends (a regex error keeps its reason)."""
    lines = message.strip().splitlines() or ["rejected by the grammar compiler"]
    first = lines[0].split(": ", 1)[1] if lines[0].startswith("at ") and ": " in lines[0] else lines[0]
    reason = next((line.strip()[len("error: "):] for line in lines[1:] if line.strip().startswith("error: ")), None)
    return f"{first} {reason}" if reason else first


_grammars: collections.OrderedDict[tuple[int, str], Grammar] = collections.OrderedDict()


def cached_grammar(tokenizer: Tokenizer, lark: str, param: str | None = None, what: str = "schema",
                   source: str | None = None) -> Grammar:
    """The Grammar of `lark`, built once per distinct grammar text and vocabulary (LRU, at most
    _CACHE_SIZE): a repeated constraint costs a dictionary lookup, not a compile and a closing plan.
    Errors name `param` and say `what` was invalid; `source`, when given, is checked on its own first
    (a user's grammar before it was nested), so that messages point into it."""
    vocab = vocabulary(tokenizer)
    key = (id(vocab), lark)
    with _lock:
        if (hit := _grammars.get(key)) is not None:
            _grammars.move_to_end(key)
            return hit
    if source is not None:
        _check_lark(vocab, source, param, what)
    grammar = Grammar(tokenizer, lark, param, what)
    with _lock:
        _grammars[key] = grammar
        while len(_grammars) > _CACHE_SIZE:
            _grammars.popitem(last=False)
    return grammar


def json_grammar(tokenizer: Tokenizer, schema: Mapping[str, Any] | None = None,
                 param: str | None = "response_format") -> Grammar:
    """response_format json_object (schema None) or json_schema."""
    return cached_grammar(tokenizer, json_lark(schema), param)


def _lead_space(tokenizer: Tokenizer, continues_prompt: bool) -> bool:
    """Whether output opens with the space SentencePiece drops when decoding (grammar.LEAD_SPACE):
    a dummy-prefix tokenizer, and a reply that does not continue visible prompt text."""
    return bool(getattr(tokenizer, "dummy_prefix", False)) and not continues_prompt


def regex_grammar(tokenizer: Tokenizer, pattern: str, param: str | None = "regex",
                  continues_prompt: bool = False) -> Grammar:
    """Text that fully matches `pattern` (Rust regex syntax, as llguidance reads it)."""
    return cached_grammar(tokenizer, regex_lark(pattern, _lead_space(tokenizer, continues_prompt)), param, "regex")


def choice_grammar(tokenizer: Tokenizer, choices: Sequence[str], param: str | None = "choice",
                   continues_prompt: bool = False) -> Grammar:
    """Exactly one of `choices`."""
    return cached_grammar(tokenizer, choice_lark(list(choices), _lead_space(tokenizer, continues_prompt)), param,
                          "choice")


def lark_grammar(tokenizer: Tokenizer, grammar: str, param: str | None = "grammar",
                 continues_prompt: bool = False) -> Grammar:
    """Text in the language of a Lark grammar (llguidance's dialect)."""
    return cached_grammar(tokenizer, nested_lark(grammar, _lead_space(tokenizer, continues_prompt)), param,
                          "grammar", source=grammar)


def _check_lark(vocab: Vocabulary, lark: str, param: str | None, what: str) -> None:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_lark(lark), vocab.ll)
    if is_error:
        raise StructuredOutputError(f"Invalid {what}: {_short(messages[0])}", param)


def check_tools(tokenizer: Tokenizer, tools: Sequence[ToolSpec]) -> None:
    """Compile each function's parameters on its own, so that a schema llguidance rejects is
    reported as tools[i].function.parameters."""
    for i, tool in enumerate(tools):
        _compiled(vocabulary(tokenizer), json_lark(tool.schema), f"tools[{i}].function.parameters")


def tools_grammar(tokenizer: Tokenizer, tools: Sequence[ToolSpec], mode: str = "auto",
                  parallel: bool = True) -> Grammar:
    """The envelope grammar (see `tools_lark`); call `check_tools` first for precise errors."""
    return cached_grammar(tokenizer, tools_lark(tools, mode, parallel), "tools")


# ------------------------------------------------------------------------------------ constraint


def _closing_plan(m: llguidance.LLMatcher, vocab: Vocabulary, string: JsonState = JsonState(),
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
                string = json_state(vocab.text[t], string)
            continue
        inside = string.inside and not string.escape
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
            allowed = bitmask.unpack(mask[0], vocab.size)
            allowed[vocab.eos_id] = False
            if not allowed.any():
                break
            t = int(np.argmax(np.where(allowed, vocab.fallback_score, -np.inf)))
            if not m.consume_token(t):
                break
        plan.append(t)
        string = json_state(vocab.text[t], string)
    return plan


def _dead_end(m: llguidance.LLMatcher, plan: list[int], vocab: Vocabulary) -> bool:
    """Whether a closing plan ended in an error, or short of PLAN_CAP where nothing is allowed,
    rather than at a complete output: the grammar cannot be completed with this vocabulary."""
    if m.is_error():  # e.g. a forced text whose tokenization the grammar then rejects
        return True
    complete = m.is_stopped() or (bool(plan) and plan[-1] == vocab.eos_id)
    return not complete and len(plan) < PLAN_CAP


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
        self._string = JsonState()  # JSON string state of the output so far
        self._words = bitmask.words(self.vocab.size)  # the words llguidance fills
        self._string_safe = np.zeros(self.vocab_size, bool)
        self._string_safe[: self.vocab.size] = self.vocab.string_safe
        self._string_safe_words = bitmask.pack(self._string_safe)

    def _fill_grammar(self, row: np.ndarray) -> None:
        """llguidance's mask straight into `row` (tokens past the tokenizer's pieces: none)."""
        llguidance.numpy.fill_next_token_bitmask(self.matcher, row[None, :self._words])
        row[self._words:] = 0

    def closing_plan(self, cap: int = PLAN_CAP) -> list[int]:
        """The tokens that would complete the output from here (EOS last where one is needed)."""
        if self._plan is None or self.matcher.validate_tokens(self._plan) != len(self._plan):
            plan = _closing_plan(self.matcher.deep_copy(), self.vocab, self._string, cap)
            self._plan_eos = bool(plan) and plan[-1] == self.vocab.eos_id
            self._plan = plan[:-1] if self._plan_eos else plan
        return self._plan + [self.vocab.eos_id] * self._plan_eos

    def fill_mask(self, row: np.ndarray) -> None:
        """Write the tokens that may come next into `row`, int32 [bitmask.words(vocab_size)] (bitmask.py)."""
        if self.matcher.is_error():  # the engine did not honour the mask: fail the choice, never a fake "stop"
            raise StructuredOutputError(f"the output left its grammar: {_short(self.matcher.get_error())}")
        if self.forced:
            return bitmask.only(row, self.forced[0])
        soft = False
        if self.budget is not None and self.generated >= self._check_at and not self.matcher.is_accepting():
            left = self.budget - self.generated  # tokens still allowed, this one included
            plan = self.closing_plan(min(PLAN_CAP, max(left, 1)))
            slack = left - len(plan) - self.margin
            if slack <= 0 and plan:  # the closing zone: from here on the plan is checked every step
                if left <= len(plan) + HARD_SLACK:
                    self.forced = list(plan)  # no room left: follow the plan to the end
                if self.forced or not (plan[0] in self.vocab.string_closers and left > len(plan) + self.margin // 2):
                    return bitmask.only(row, plan[0])  # nothing may open: take the plan's next step
                soft = True  # in a string that could end now: content that cannot open anything
            # one free token shortens the budget by 1 and lengthens the plan by at most `margin`
            self._check_at = self.generated + max(slack, 0) // (self.margin + 1)
        self._fill_grammar(row)
        if soft:
            row &= self._string_safe_words
            if not row.any():
                bitmask.only(row, plan[0])
            return
        if self.generated == 0 and self.vocab.space_byte is not None and bitmask.count(row) > 1:
            bitmask.forbid(row, self.vocab.space_byte)
        if not row.any():  # a dead end: no token continues the output, so it can never be valid
            raise StructuredOutputError("the output cannot be completed: no token of this model continues it")

    def allowed(self) -> np.ndarray:
        """`fill_mask` as bool [vocab_size] (tests and tools; the engine uploads the packed words)."""
        row = np.empty(bitmask.words(self.vocab_size), np.int32)
        self.fill_mask(row)
        return bitmask.unpack(row, self.vocab_size)

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
            self._string = json_state(self.vocab.text[token_id], self._string)

    def done(self) -> bool:
        return self.matcher.is_stopped() and not self.matcher.is_error()
