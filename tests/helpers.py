"""Helpers shared by several test modules (test modules never import each other): the
transformers reference model, OpenAI error checks, engine idleness and shared tool specs."""

from __future__ import annotations

import time

import httpx
import numpy as np
import torch
from transformers import LlamaForCausalLM

from llama_jax import tools as T

KEYS = ("key-one", "key-two")  # the API keys of conftest's `strict` server
WEATHER = T.ToolSpec("get_weather", "Weather in a city", {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                                     "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "unit"]})
CLOCK = T.ToolSpec("get_time")


def hf_model(path, dtype=torch.float32):
    """transformers' Llama from an HF checkpoint directory: the numerical reference (eager attention)."""
    return LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def hf_log_softmax(hf, ids: list[int]) -> np.ndarray:
    """transformers' log-probabilities `[T, vocab]` of one sequence, float32."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1).numpy()


def wait_idle(engine, timeout: float = 10.0) -> None:
    """Wait until the engine has no busy slot and no queued request (asserted)."""
    deadline = time.time() + timeout
    while (engine.busy_slots or engine.queue_depth) and time.time() < deadline:
        time.sleep(0.01)
    assert engine.busy_slots == 0 and engine.queue_depth == 0


def error_of(response: httpx.Response) -> dict:
    """The `error` object of an OpenAI-shaped error body (its shape asserted)."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["message"]
    return body["error"]
