"""The API's pure parts, without a server: request decoding rules, logprob token strings, settings
and the `llama-jax serve` command line."""

from __future__ import annotations

import json

import pytest

from api import chat, protocol, replies, validation
from api.cli import build_parser, curl_example
from api.errors import APIError
from api.settings import ServerSettings, api_keys_from
from llama_jax.engine import EngineConfig
from llama_jax.request import TokenLogprob
from llama_jax.tokenizer import Tokenizer

HELLO = [{"role": "user", "content": "Hello!"}]


def decode(**fields) -> protocol.ChatCompletionRequest:
    return validation.decode(json.dumps({"model": "m", "messages": HELLO, **fields}).encode())


def error(**fields) -> APIError:
    with pytest.raises(APIError) as e:
        decode(**fields)
    assert e.value.status == 400
    return e.value


def test_defaults_and_engine_request():
    r = decode(stop="END", seed=9, max_completion_tokens=7, top_logprobs=2, logprobs=True, n=2)
    request = chat.engine_request(r, [1, 2, 3])
    assert request.stop == ("END",) and request.max_tokens == 7 and request.n == 2 and request.top_logprobs == 2
    assert request.sampling.seed == 9 and request.sampling.temperature == 1.0 and request.sampling.top_p == 1.0
    nulls = chat.engine_request(decode(temperature=None, top_k=None, stop=None, n=None), [1])
    assert nulls.sampling.temperature == 1.0 and nulls.sampling.top_k == 0 and nulls.stop == () and nulls.n == 1
    assert nulls.max_tokens is None  # the rest of the context


def test_error_codes_and_params():
    assert (error(temperature="hot").param, error(temperature="hot").code) == ("temperature", "invalid_type")
    assert (error(top_k=1000).param, error(top_k=1000).code) == ("top_k", "invalid_value")
    missing = error(messages=[{"content": "x"}])
    assert (missing.param, missing.code) == ("messages[0].role", "missing_required_parameter")
    with pytest.raises(APIError) as e:
        validation.decode(b'{"messages": []}')
    assert e.value.param in ("model", "messages")
    assert error(max_tokens=3, max_completion_tokens=4).param == "max_completion_tokens"
    assert decode(max_tokens=3, max_completion_tokens=3).max_tokens == 3
    assert error(seed=2**63).param == "seed" and decode(seed=2**63 - 1).seed == 2**63 - 1


def test_error_body_shape():
    body = APIError(429, "busy", headers={"Retry-After": "1"}).body()
    assert body == {"error": {"message": "busy", "type": "rate_limit_error", "param": None,
                              "code": "rate_limit_exceeded"}}


def test_logprob_token_strings(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    text = replies.TokenText(tokenizer)
    hello = tokenizer.encode("Hello")[-1]
    assert tokenizer.id_to_piece(hello) == "\u2581Hello" and text(hello) == (" Hello", list(b" Hello"))
    newline = next(i for i in range(3, 300) if tokenizer.id_to_piece(i) == "<0x0A>")
    assert text(newline) == ("\n", [10])
    high = next(i for i in range(3, 300) if tokenizer.id_to_piece(i) == "<0xE2>")
    assert text(high) == ("\\xe2", [0xE2])
    assert text(tokenizer.eos_id) == ("</s>", None)
    lp = text.logprobs([TokenLogprob(hello, float("-inf"), ((hello, -0.1), (newline, -2.5)))])
    (entry,) = lp.content
    assert entry.logprob == -9999.0 and [t.token for t in entry.top_logprobs] == [" Hello", "\n"]


def test_chunk_encoding_is_openai_ordered():
    chunk = protocol.ChatCompletionChunk("chatcmpl-1", "chat.completion.chunk", 1, "m",
                                          [protocol.ChunkChoice(0, protocol.Delta())])
    assert replies.sse(replies.encode(chunk)) == (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":null}]}\n\n')


def test_settings_and_keys():
    settings = ServerSettings(price_input_per_mtok=0.07, price_output_per_mtok=0.28)
    assert settings.estimated_cost(15, 16) == pytest.approx(15 * 0.07e-6 + 16 * 0.28e-6)
    assert ServerSettings().estimated_cost(1000, 1000) == 0.0
    with pytest.raises(ValueError):
        ServerSettings(price_input_per_mtok=-1)
    assert api_keys_from(["a", "b"], {"LLAMA_JAX_API_KEYS": "b, c,,"}) == ("a", "b", "c")
    assert api_keys_from(None, {}) == ()


def test_serve_command_line():
    args = build_parser().parse_args(["serve"])
    assert (args.checkpoint, args.host, args.port, args.max_slots, args.tp, args.api_key, args.served_model_name) == \
        (None, "127.0.0.1", 8000, 8, 1, [], None)
    args = build_parser().parse_args(["serve", "--checkpoint", "/ckpt", "--port", "0", "--api-key", "k1",
                                      "--api-key", "k2", "--max-seq-len", "2048", "--tp", "2", "--model-name", "x"])
    assert args.api_key == ["k1", "k2"] and args.max_seq_len == 2048 and args.tp == 2 and args.served_model_name == ["x"]
    args = build_parser().parse_args(["serve", "--served-model-name", "a", "meta-llama/Llama-2-7b-chat-hf", "--demo"])
    assert args.served_model_name == ["a", "meta-llama/Llama-2-7b-chat-hf"] and args.demo
    assert build_parser().parse_args(["serve"]).max_prefill_tokens == EngineConfig().max_prefill_tokens
    assert build_parser().parse_args(["serve", "--max-prefill-tokens", "1024"]).max_prefill_tokens == 1024
    assert {"generate", "make-tiny-checkpoint", "serve"} <= set(build_parser()._subparsers._group_actions[0].choices)
    curl = curl_example("http://127.0.0.1:8000", "meta-llama/Llama-2-7b-chat-hf", needs_key=True)
    assert curl.startswith("curl http://127.0.0.1:8000/v1/chat/completions") and "Bearer $LLAMA_JAX_API_KEY" in curl
    assert '"model": "meta-llama/Llama-2-7b-chat-hf"' in curl
