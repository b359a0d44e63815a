"""Schemathesis against the server's own /schema/openapi.json (a real uvicorn on the demo model):
valid and invalid requests generated from every operation's schema must never get a 5xx, and every
error is OpenAI-shaped. Most generated chat requests name the served model, so they reach the engine."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from api.app import create_app
from api.settings import ServerSettings
from live_server import LiveServer

MODEL = "meta-llama/Llama-2-7b-chat-hf"
EXTENSIONS = ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "min_tokens",
              "stop_token_ids", "logit_bias", "response_format", "tools", "tool_choice", "max_completion_tokens")


@pytest.fixture(scope="module")
def api_schema(demo_engine):
    server = LiveServer(create_app(demo_engine, ServerSettings()), demo_engine)
    yield schemathesis.openapi.from_url(server.url + "/schema/openapi.json")
    server.stop()


schema = schemathesis.pytest.from_fixture("api_schema")


def call(case) -> int:
    """Send one generated case (3 in 4 name the served model, so they reach the engine); check the
    answer is no 5xx and any error is OpenAI-shaped; return its status."""
    if isinstance(case.body, dict) and len(json.dumps(case.body, default=str)) % 4:
        case.body["model"] = MODEL
        if case.body.get("max_tokens") is None and case.body.get("max_completion_tokens") is None:
            case.body["max_tokens"] = 16  # not the whole context: the point is the status, not the text
    response = case.call(timeout=120)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text
    return response.status_code


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                derandomize=True)  # the same cases every run: a failure reproduces
def test_no_generated_request_gets_a_5xx(case):
    call(case)


def test_generated_chat_requests_reach_the_engine(api_schema):
    """On its own (no shared state with the test above): generated chat requests really run, and
    some are valid enough to be answered (every other one gets the served model, a valid
    conversation, 16 tokens and no schemas, tools or vLLM extensions; its sampling fields stay
    generated)."""
    statuses: list[int] = []

    @given(case=api_schema["/v1/chat/completions"]["POST"].as_strategy())
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                derandomize=True)  # the same cases every run: a failure reproduces
    def run(case):
        if isinstance(case.body, dict) and len(statuses) % 2:
            case.body.update(model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=16)
            for field in EXTENSIONS:  # random schemas, tools, token ids and constraint pairs: 400s far more often
                case.body.pop(field, None)
        statuses.append(call(case))

    run()
    assert len(statuses) >= 40 and statuses.count(200) >= 3, sorted(set(statuses))
