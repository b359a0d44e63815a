"""Schemathesis against the server's own /schema/openapi.json (a real uvicorn on the demo model):
valid and invalid requests generated from every operation's schema must never get a 5xx, and every
error is OpenAI-shaped. Most generated chat requests name the served model, so they reach the engine."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from api.app import create_app
from api.settings import ServerSettings
from live_server import LiveServer

MODEL = "meta-llama/Llama-2-7b-chat-hf"
STATUSES: list[int] = []  # every generated case's status, for the count check below


@pytest.fixture(scope="module")
def api_schema(demo_engine):
    server = LiveServer(create_app(demo_engine, ServerSettings()), demo_engine)
    yield schemathesis.openapi.from_url(server.url + "/schema/openapi.json")
    server.stop()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_generated_request_gets_a_5xx(case):
    if isinstance(case.body, dict) and len(json.dumps(case.body, default=str)) % 4:  # 3 in 4 reach the engine
        case.body["model"] = MODEL
        if case.body.get("max_tokens") is None and case.body.get("max_completion_tokens") is None:
            case.body["max_tokens"] = 16  # not the whole context: the point is the status, not the text
    response = case.call(timeout=120)
    STATUSES.append(response.status_code)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text


def test_the_fuzzing_ran_a_few_hundred_cases():
    """Runs after the generated tests (file order): they really ran, and some reached the engine."""
    assert len(STATUSES) >= 200 and STATUSES.count(200) >= 5 and max(STATUSES) < 500, sorted(set(STATUSES))
