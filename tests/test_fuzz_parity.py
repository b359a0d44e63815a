"""Schemathesis over the routes issue 26 added, from the server's own /schema/openapi.json (a real
uvicorn on the demo model): /v1/responses, /tokenize and /detokenize. Generated requests, valid and
not, never get a 5xx and every error is OpenAI-shaped; every other case is steered to a served
model name (and a short reply), so some are answered and reach the engine. Hypothesis also throws
generated regexes, choice lists and Lark grammars at chat's `structured_outputs`: a constraint is
either served (and its reply in the language) or a 400 naming it, never a 5xx."""

from __future__ import annotations

import re

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.app import create_app
from api.settings import ServerSettings
from live_server import LiveServer

MODEL = "llama-jax-demo"
HELLO = [{"role": "user", "content": "Hello!"}]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                derandomize=True)  # the same cases every run: a failure reproduces


@pytest.fixture(scope="module")
def server(demo_engine):
    live = LiveServer(create_app(demo_engine, ServerSettings(model_name=MODEL)), demo_engine)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/schema/openapi.json")


def checked(response) -> int:
    """The status of an answer that is no 5xx and, when an error, OpenAI-shaped."""
    assert response.status_code < 500, (response.request.url, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text
    return response.status_code


@pytest.mark.parametrize("path, answered", [("/v1/responses", 5), ("/tokenize", 5), ("/detokenize", 5)])
def test_generated_requests_to_the_new_routes_never_get_a_5xx(api_schema, path, answered):
    statuses: list[int] = []

    @given(case=api_schema[path]["POST"].as_strategy())
    @FUZZ
    def run(case):
        if isinstance(case.body, dict) and len(statuses) % 2:
            case.body["model"] = MODEL
            if path == "/v1/responses":
                case.body["max_output_tokens"] = 16  # the point is the status, not the text
                if len(statuses) % 4 == 1:  # a plain conversation; the sampling fields stay generated
                    kept = {k: v for k, v in case.body.items() if k in ("model", "temperature", "top_p", "stream")}
                    case.body.clear()
                    case.body.update(kept, input="Hello!", max_output_tokens=16)
            elif path == "/tokenize" and len(statuses) % 4 == 1:  # a prompt; its other options stay generated
                prompt = case.body.get("prompt") if isinstance(case.body.get("prompt"), str) else "Hello!"
                kept = {k: v for k, v in case.body.items() if k in ("add_special_tokens", "return_token_strs")}
                case.body.clear()
                case.body.update(kept, model=MODEL, prompt=prompt)
            elif path == "/detokenize" and len(statuses) % 4 == 1:  # ids of this vocabulary
                tokens = case.body.get("tokens") if isinstance(case.body.get("tokens"), list) else []
                case.body.clear()
                case.body.update(model=MODEL, tokens=[t % 2000 for t in tokens if isinstance(t, int)])
        statuses.append(checked(case.call(timeout=120)))

    run()
    assert len(statuses) >= 60 and statuses.count(200) >= answered, sorted(set(statuses))


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=24)
CONSTRAINTS = st.one_of(
    st.fixed_dictionaries({"regex": st.one_of(TEXT, st.from_regex(r"[a-z0-9\[\]{}()|*+?.\\-]{1,16}", fullmatch=True))}),
    st.fixed_dictionaries({"choice": st.lists(TEXT, min_size=1, max_size=5)}),
    st.fixed_dictionaries({"grammar": st.one_of(TEXT, st.builds(lambda a, b: f'start: "{a}" /{b}/\n',
                                                                st.from_regex(r"[a-z ]{0,6}", fullmatch=True),
                                                                st.from_regex(r"[a-z0-9|+*]{1,8}", fullmatch=True)))}),
)


def test_generated_structured_outputs_are_served_or_refused(server):
    statuses: list[int] = []

    @given(constraint=CONSTRAINTS)
    @FUZZ
    def run(constraint):
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 16, "structured_outputs": constraint}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
        statuses.append(checked(r))
        if r.status_code == 400:
            assert r.json()["error"]["param"].startswith("structured_outputs"), r.text
        elif "choice" in constraint and r.json()["choices"][0]["finish_reason"] == "stop":
            assert r.json()["choices"][0]["message"]["content"] in constraint["choice"]
        elif "regex" in constraint and r.json()["choices"][0]["finish_reason"] == "stop":
            text = r.json()["choices"][0]["message"]["content"]
            try:
                pattern = re.compile(constraint["regex"])
            except re.error:
                return  # Rust syntax Python does not read
            assert pattern.fullmatch(text), (constraint, text)

    run()
    assert len(statuses) >= 60 and statuses.count(200) >= 10 and statuses.count(400) >= 5, sorted(set(statuses))
