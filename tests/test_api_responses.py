"""`POST /v1/responses` (issue 26), stateless, on uvicorn over the real engine (the demo model): the
real `openai` client's `client.responses.create`, plain and streamed, and raw HTTP for the exact
SSE framing. The reply must be the chat pipeline's (same prompt, same tokens for the same
sampling), with the Responses API's objects, events and field names."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from api.app import create_app
from api.settings import ServerSettings
from helpers import error_of
from live_server import LiveServer
from llama_jax.tokenizer import apply_chat_template

DEMO = "llama-jax-demo"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CLOCK = {"type": "function", "name": "get_time"}
POINT = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
         "required": ["x", "y"], "additionalProperties": False}
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]


@pytest.fixture(scope="module")
def live(demo_engine):
    server = LiveServer(create_app(demo_engine, ServerSettings(model_name=DEMO)), demo_engine)
    yield server
    server.stop()


@pytest.fixture
def client(live):
    return live.client()


def test_plain_response_is_the_chat_reply(client, live):
    out = client.responses.create(model=DEMO, instructions="Be brief.", input="Hello!", max_output_tokens=12,
                                  temperature=0)
    chat = client.chat.completions.create(model=DEMO, max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}])
    assert out.id.startswith("resp_") and out.object == "response" and out.model == DEMO
    assert out.output_text == chat.choices[0].message.content
    (message,) = out.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [c.type for c in message.content] == ["output_text"]
    if chat.choices[0].finish_reason == "length":
        assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
        assert message.status == "incomplete"
    else:
        assert out.status == "completed" and out.incomplete_details is None
    prompt = apply_chat_template(live.engine.tokenizer, [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "Hello!"}])
    u = out.usage
    assert (u.input_tokens, u.output_tokens) == (len(prompt), chat.usage.completion_tokens)
    assert u.total_tokens == u.input_tokens + u.output_tokens and u.output_tokens_details.reasoning_tokens == 0
    assert out.instructions == "Be brief." and out.max_output_tokens == 12 and out.temperature == 0
    assert out.tools == [] and out.tool_choice == "auto" and out.previous_response_id is None
    assert out.model_extra["store"] is False  # stateless: nothing was stored


def test_streaming_events_rebuild_the_plain_response(client):
    args = dict(model=DEMO, input="Hello!", max_output_tokens=16, temperature=0)
    plain = client.responses.create(**args)
    events = list(client.responses.create(stream=True, **args))
    kinds = [e.type for e in events]
    assert kinds[:4] == TEXT_EVENTS
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{plain.status}"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == plain.output_text == final.output_text == events[-4].text
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {final.output[0].id} and events[2].item.id == final.output[0].id
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert final.usage.output_tokens == plain.usage.output_tokens and final.id == events[0].response.id


def test_raw_sse_framing(live):
    body = {"model": DEMO, "input": "Hello!", "max_output_tokens": 4, "stream": True}
    r = httpx.post(live.url + "/v1/responses", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    raw = r.content
    assert raw.endswith(b"\n\n") and b"[DONE]" not in raw and b"\r" not in raw
    for block in raw[:-2].split(b"\n\n"):
        event, data = block.split(b"\n")
        assert event.startswith(b"event: ") and data.startswith(b"data: ")
        assert json.loads(data[len(b"data: "):])["type"] == event[len(b"event: "):].decode()


def test_message_items_and_a_tool_round_trip(client):
    """Input as items: system/developer/user/assistant messages with text parts, an earlier call and its output."""
    items = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "It is sunny."}]},
        {"type": "message", "role": "user", "content": "And tomorrow?"},
    ]
    out = client.responses.create(model=DEMO, input=items, tools=[WEATHER], tool_choice="none", max_output_tokens=6)
    assert out.status in ("completed", "incomplete") and isinstance(out.output_text, str)


@pytest.mark.parametrize("parallel", [True, False])
def test_function_calls_plain_and_streamed(client, parallel):
    for seed_temperature in (1.0, 0.0):
        args = dict(model=DEMO, input="Weather in Paris, and the time?", tools=[WEATHER, CLOCK],
                    tool_choice="required", parallel_tool_calls=parallel, max_output_tokens=120,
                    temperature=seed_temperature)
        out = client.responses.create(**args)
        calls = [o for o in out.output if o.type == "function_call"]
        assert calls and len(calls) == len(out.output) and (parallel or len(calls) == 1)
        for call in calls:
            assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
            schema = WEATHER["parameters"] if call.name == "get_weather" else {"type": "object", "maxProperties": 0}
            jsonschema.validate(json.loads(call.arguments), schema)
        events = list(client.responses.create(stream=True, **args))
        final = events[-1].response
        for call in (o for o in final.output if o.type == "function_call"):
            streamed = "".join(e.delta for e in events
                               if e.type == "response.function_call_arguments.delta" and e.item_id == call.id)
            done = [e for e in events if e.type == "response.function_call_arguments.done" and e.item_id == call.id]
            assert streamed == call.arguments == done[0].arguments and done[0].name == call.name
        if seed_temperature == 0.0:  # greedy: streamed and plain agree
            assert [(c.name, c.arguments) for c in final.output] == [(c.name, c.arguments) for c in calls]


def test_forced_function_and_json_schema_text_format(client):
    out = client.responses.create(model=DEMO, input="Time?", tools=[WEATHER, CLOCK], max_output_tokens=60,
                                  tool_choice={"type": "function", "name": "get_time"})
    assert [(o.type, o.name) for o in out.output] == [("function_call", "get_time")]
    for seed_input in ("a point", "another point", "a third"):
        out = client.responses.create(model=DEMO, input=seed_input, max_output_tokens=40, text={
            "format": {"type": "json_schema", "name": "point", "schema": POINT, "strict": True}})
        assert out.status == "completed" and out.text.format.type == "json_schema"
        jsonschema.validate(json.loads(out.output_text), POINT)
    out = client.responses.create(model=DEMO, input="json", max_output_tokens=40,
                                  text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(out.output_text), dict)


@pytest.mark.parametrize("fields, param, code", [
    ({"input": []}, "input", "invalid_value"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type", "unsupported_parameter"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "invalid_value"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type", "unsupported_parameter"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id",
     "missing_required_parameter"),
    ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}, {"role": "user", "content": "x"}]},
     "input[0].call_id", "invalid_value"),
    ({"max_output_tokens": 100_000}, "max_output_tokens", "context_length_exceeded"),
    ({"max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"temperature": 3}, "temperature", "invalid_value"),
    ({"text": {"format": {"type": "json_schema", "name": "p", "schema": {"type": "nope"}}}}, "text.format.schema",
     "invalid_schema"),
    ({"text": {"format": {"type": "json_schema", "schema": POINT}}}, "text.format.name", "missing_required_parameter"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type", "invalid_value"),
    ({"text": {"verbosity": "low"}}, "text", "invalid_value"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "invalid_value"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]}, "tools[0].parameters",
     "invalid_schema"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "invalid_value"),
    ({"model": "gpt-4o"}, "model", "model_not_found"),
])
def test_bad_requests_name_the_responses_field(live, fields, param, code):
    r = httpx.post(live.url + "/v1/responses", json={"model": DEMO, "input": "Hi", "max_output_tokens": 4, **fields},
                   timeout=60)
    error = error_of(r)
    assert r.status_code in (400, 404) and (error["param"], error["code"]) == (param, code), error


def test_the_client_raises_on_refusals(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=DEMO, input="Hi", store=True)
    assert e.value.param == "store" and e.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=DEMO, input="Hi", previous_response_id="resp_abc")
    assert e.value.param == "previous_response_id" and "stateless" in e.value.message
