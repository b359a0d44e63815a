"""Replies shaped for the wire, in one place: JSON bodies and SSE frames as OpenAI writes them, the
plain and streamed responses every generating route returns, a stream whose error after the headers
becomes an error event (how the shutdown's drain and engine failures reach a streaming client),
`usage`, and `TokenText`, OpenAI's view of a token in `logprobs`. The bodies are api/protocol.py's;
the error body is api/errors.py's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import msgspec
from msgspec import UNSET
from litestar import Response
from litestar.response import Stream

from api.errors import APIError
from api.protocol import ChoiceLogprobs, CompletionTokensDetails, ContentLogprob, PromptTokensDetails, TopLogprob, Usage
from llama_jax.request import TokenLogprob
from llama_jax.tokenizer import Tokenizer

DONE = b"data: [DONE]\n\n"
_encoder = msgspec.json.Encoder()


def encode(obj: Any) -> bytes:
    """Compact JSON; a Struct's field order is OpenAI's (id, object, created, model, choices, usage)."""
    return _encoder.encode(obj)


def sse(payload: bytes) -> bytes:
    """One server-sent event, framed exactly as OpenAI does: `data: ...` and a blank line."""
    return b"data: " + payload + b"\n\n"


def json_reply(obj: Any) -> Response:
    """A 200 `application/json` response of `obj`."""
    return Response(encode(obj), media_type="application/json")


def stream_reply(body: AsyncIterator[bytes]) -> Stream:
    """A `text/event-stream` response of `body`, uncached and unbuffered by proxies."""
    return Stream(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def sse_body(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """An SSE body whose generator may raise APIError after the headers went out: the error becomes
    one `data: {"error": ...}` event, followed by `data: [DONE]` when the drain ended the request
    (the stream is complete, only cut short) and nothing more when the engine failed it."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as e:
        yield sse(encode(e.body()))
        if e.code == "server_shutting_down":
            yield DONE


class Rendering(Protocol):
    """One request's engine events rendered as a whole reply or as SSE chunks (each route has one)."""

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def complete(self, receive: Callable) -> Any: ...


async def respond(rendering: Rendering, stream: bool, receive: Callable) -> Response:
    """The reply of a generating route: the SSE stream of `rendering` (an APIError raised after the
    headers becomes an error event: `sse_body`), or its whole reply as JSON."""
    if stream:
        return stream_reply(sse_body(rendering.chunks()))
    return json_reply(await rendering.complete(receive))


def usage(prompt_tokens: int, completion_tokens: int, cost: float, cached_tokens: int = 0,
          drafts: tuple[int, int] = (0, 0)) -> Usage:
    """The `usage` of a reply; `drafts`: speculative (drafted, accepted) tokens, reported as OpenAI's
    prediction tokens."""
    details = CompletionTokensDetails(drafts[1], drafts[0] - drafts[1]) if drafts[0] else UNSET
    return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, cost,
                 PromptTokensDetails(cached_tokens), details)


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
