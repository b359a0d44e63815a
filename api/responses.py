"""The chat-completions wire format, outbound: the OpenAI response, chunk, error and model bodies,
their JSON encoding and SSE framing, and `TokenText`, OpenAI's view of a token in `logprobs`.
Requests and their validation are schemas.py's.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType

from llama_jax.request import TokenLogprob
from llama_jax.tokenizer import Tokenizer


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ContentLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Struct):
    content: list[ContentLogprob] | None


class FunctionCallOut(Struct):
    name: str
    arguments: str  # a JSON object as a string, valid against the function's parameters


class ToolCallOut(Struct):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(Struct, omit_defaults=True):
    role: str
    content: str | None  # null when the reply is tool calls
    tool_calls: list[ToolCallOut] | UnsetType = UNSET


class Choice(Struct):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class PromptTokensDetails(Struct):
    cached_tokens: int  # prompt tokens whose keys the prefix cache held (not prefilled again)


class CompletionTokensDetails(Struct):
    """OpenAI's counts for predicted outputs, here of speculative drafts: accepted and rejected."""

    accepted_prediction_tokens: int
    rejected_prediction_tokens: int


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated_cost: float
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails | UnsetType = UNSET  # only when drafts were verified


class ChatCompletion(Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaFunction(Struct, omit_defaults=True):
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class DeltaToolCall(Struct, omit_defaults=True):
    """A streamed tool call: first index, id, type and name (arguments ""), then argument fragments."""

    index: int
    id: str | UnsetType = UNSET
    type: Literal["function"] | UnsetType = UNSET
    function: DeltaFunction | UnsetType = UNSET


class Delta(Struct, omit_defaults=True):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[DeltaToolCall] | UnsetType = UNSET


class ChunkChoice(Struct):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Struct, omit_defaults=True):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None | UnsetType = UNSET  # only with stream_options.include_usage: null, then the totals


class ErrorDetail(Struct):
    message: str
    type: str
    param: str | None
    code: str


class ErrorBody(Struct):
    """Every non-2xx body (and a mid-stream `data:` error event)."""

    error: ErrorDetail


class Model(Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Struct):
    object: Literal["list"]
    data: list[Model]


def usage(prompt_tokens: int, completion_tokens: int, cost: float, cached_tokens: int = 0,
          drafts: tuple[int, int] = (0, 0)) -> Usage:
    """`drafts`: speculative (drafted, accepted) tokens, reported as OpenAI's prediction tokens."""
    details = CompletionTokensDetails(drafts[1], drafts[0] - drafts[1]) if drafts[0] else UNSET
    return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, cost,
                 PromptTokensDetails(cached_tokens), details)


_encoder = msgspec.json.Encoder()


def encode(obj: Struct) -> bytes:
    """Compact JSON; field order is OpenAI's (id, object, created, model, choices, usage)."""
    return _encoder.encode(obj)


def sse(payload: bytes) -> bytes:
    """One server-sent event, framed exactly as OpenAI does: `data: ...` and a blank line."""
    return b"data: " + payload + b"\n\n"




class TokenText:
    """OpenAI's view of a token: `token` text and its UTF-8 `bytes`, cached per id.

    - ordinary pieces: the piece with SentencePiece's "▁" turned into a space (so the first
      token of a reply keeps the space the decoded text drops);
    - byte-fallback pieces <0xNN>: bytes [NN], token = those bytes decoded with
      backslashreplace ("\\xe2" for a lone non-ASCII byte, the character itself for ASCII);
    - control pieces (<s>, </s>, <unk>): the piece text, bytes null (no text representation).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int] | None]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int] | None]:
        if (hit := self._cache.get(token_id)) is not None:
            return hit
        raw = self._tokenizer.token_bytes(token_id)
        out = (self._tokenizer.id_to_piece(token_id), None) if raw is None else \
            (raw.decode("utf-8", "backslashreplace"), list(raw))
        self._cache[token_id] = out
        return out

    def logprobs(self, tokens: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> ChoiceLogprobs:
        """OpenAI `choices[].logprobs` for these generated tokens."""
        content = []
        for t in tokens:
            token, raw = self(t.token_id)
            top = [TopLogprob(self(i)[0], _finite(lp), self(i)[1]) for i, lp in t.top]
            content.append(ContentLogprob(token, _finite(t.logprob), raw, top))
        return ChoiceLogprobs(content)


def _finite(logprob: float) -> float:
    """JSON has no -inf: clamp to OpenAI's customary floor."""
    return max(float(logprob), -9999.0)
