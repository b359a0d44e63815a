"""`POST /tokenize` and `POST /detokenize`, in vLLM's request and response shapes.

tokenize takes a raw `prompt` (tokenized as `/v1/completions` does: BOS first where the model adds
one, unless `add_special_tokens` is false) or chat `messages` (the exact ids `/v1/chat/completions`
would prefill: the model's chat template with its markers; `add_generation_prompt` false leaves a
Jinja template's reply opening out), and answers `tokens`, `count`, `max_model_len` and, with
`return_token_strs`, each token's vocabulary piece. detokenize turns ids back into text (control
tokens such as BOS/EOS decode to nothing, as in the replies). Neither needs the engine to be warm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

import msgspec
from litestar import Request, Response
from msgspec import Meta, Struct

from api import fields
from api.context import ServerContext, context
from api.errors import invalid
from api.openapi import body_operation, post_route
from api.protocol import Message
from api.replies import json_reply
from llama_jax.tokenizer import ChatTemplateError, apply_chat_template

MAX_TOKENS = 1_000_000  # token ids in one detokenize request
B = TypeVar("B", "TokenizeRequest", "DetokenizeRequest")


class TokenizeRequest(Struct, kw_only=True):
    """POST /tokenize: exactly one of `prompt` and `messages`."""

    model: Annotated[str, Meta(description="optional; when given, a served model name")] | None = None
    prompt: Annotated[str, Meta(description="raw text, tokenized as /v1/completions does")] | None = None
    messages: Annotated[list[Message], Meta(description="a chat, rendered with the model's template",
                                            min_length=1)] | None = None
    add_special_tokens: Annotated[bool, Meta(description="prompt: BOS first where the model adds one (default "
                                                         "true); messages: BOS first unless the template put it "
                                                         "there (default false)")] | None = None
    add_generation_prompt: Annotated[bool, Meta(description="messages: open the assistant's reply (default "
                                                            "true)")] | None = None
    return_token_strs: Annotated[bool, Meta(description="also answer each token's vocabulary piece")] | None = None


class TokenizeResponse(Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeRequest(Struct, kw_only=True):
    """POST /detokenize."""

    tokens: Annotated[list[int], Meta(description="token ids of this model", max_length=MAX_TOKENS)]
    model: Annotated[str, Meta(description="optional; when given, a served model name")] | None = None


class DetokenizeResponse(Struct):
    prompt: str


_ERRORS = {400: "invalid request (param names the field)", 401: "bad or missing key", 404: "model_not_found",
           413: "body too large"}


def _route(path: str, body: type, reply: type, summary: str) -> Callable:
    return post_route(path, reply, summary, _ERRORS, reply.__name__,
                      operation_class=body_operation(body, f"{body.__name__}; an unknown field is a 400 naming it."))


async def _read(request: Request, type: type[B]) -> tuple[ServerContext, B]:
    """The context and the decoded body; a 404 when the body names a model this server does not serve."""
    ctx = context(request)
    body = await ctx.read_request(request, type, fields.FieldPolicy())
    if body.model is not None:
        ctx.require_model(body.model)
    return ctx, body


def prompt_tokens(tokenizer, body: TokenizeRequest) -> list[int]:
    """The ids of a tokenize request (a 400 naming the field for a request that has none)."""
    if (body.prompt is None) == (body.messages is None):
        raise invalid("Give exactly one of 'prompt' and 'messages'.", "prompt" if body.prompt is None else "messages",
                      "missing_required_parameter" if body.prompt is None else "invalid_value")
    if body.prompt is not None:
        if body.add_generation_prompt is not None:
            raise invalid("'add_generation_prompt' applies to 'messages' only.", "add_generation_prompt")
        return tokenizer.prompt_ids(body.prompt) if body.add_special_tokens in (None, True) \
            else tokenizer.encode(body.prompt)
    try:
        ids = apply_chat_template(tokenizer, [msgspec.to_builtins(m) for m in body.messages],
                                  add_generation_prompt=body.add_generation_prompt is not False)
    except ChatTemplateError as e:
        raise invalid(str(e), "messages") from None
    bos = getattr(tokenizer, "add_bos", True) and tokenizer.bos_id is not None
    if body.add_special_tokens and bos and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id, *ids]
    return ids


@_route("/tokenize", TokenizeRequest, TokenizeResponse, "Tokenize a prompt or a chat (vLLM's shape)")
async def tokenize(request: Request) -> Response:
    ctx, body = await _read(request, TokenizeRequest)
    tokenizer = ctx.engine.tokenizer
    ids = prompt_tokens(tokenizer, body)
    strs = [tokenizer.id_to_piece(t) for t in ids] if body.return_token_strs else None
    return json_reply(TokenizeResponse(len(ids), ctx.engine.max_seq_len, ids, strs))


@_route("/detokenize", DetokenizeRequest, DetokenizeResponse, "Turn token ids back into text (vLLM's shape)")
async def detokenize(request: Request) -> Response:
    ctx, body = await _read(request, DetokenizeRequest)
    tokenizer = ctx.engine.tokenizer
    for i, t in enumerate(body.tokens):
        if not 0 <= t < tokenizer.vocab_size:
            raise invalid(f"Token ids must be in [0, {tokenizer.vocab_size}); got {t}.", f"tokens[{i}]")
    return json_reply(DetokenizeResponse(tokenizer.decode(body.tokens)))
