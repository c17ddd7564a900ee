"""Structured outputs over HTTP: OpenAI's response_format and vLLM's structured_outputs / guided_*
fields, on both endpoints, streamed or not, n > 1; what does not compile is a 400 naming the field."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pydantic
import pytest

from kvmem.config import EngineConfig
from tests.server.conftest import TINY_ENGINE, start_server

PATIENCE = 120


class Colour(pydantic.BaseModel):
    ok: bool
    colour: str = pydantic.Field(json_schema_extra={"enum": ["red", "green", "blue"]})


# Random weights end only a bounded grammar: no free whitespace, no unbounded strings or numbers.
BOUNDED_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                                   "colour": {"enum": ["red", "green", "blue"]}},
                  "required": ["ok", "colour"], "additionalProperties": False}
REGEX = r"[a-z]{3,8}"


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=PATIENCE)


def sse(server, path: str, body: dict) -> list[dict]:
    events = []
    with httpx.stream("POST", f"{server.base_url}{path}", json={**body, "stream": True}, timeout=PATIENCE) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def check_colour(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"ok", "colour"} and isinstance(value["ok"], bool) and value["colour"] in (
        "red", "green", "blue"), text


CHAT = {"messages": [{"role": "user", "content": "Pick a colour."}], "max_tokens": 80, "temperature": 0}
COMPLETION = {"prompt": "Pick a colour:", "max_tokens": 80, "temperature": 0}

# (the request fields, how to check the text)
ASKS = [
    ({"structured_outputs": {"json": BOUNDED_SCHEMA, "disable_any_whitespace": True}}, check_colour),
    ({"guided_json": BOUNDED_SCHEMA, "structured_outputs": None}, None),  # guided_json: whitespace may run long
    ({"guided_regex": REGEX}, lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
    ({"guided_choice": ["alpha", "beta", "gamma"]}, lambda t: t in ("alpha", "beta", "gamma") or pytest.fail(t)),
    ({"guided_grammar": 'root ::= "x" [0-9] [0-9]?'}, lambda t: re.fullmatch("x[0-9]{1,2}", t) or pytest.fail(t)),
    ({"structured_outputs": {"regex": REGEX}, "guided_decoding_backend": "xgrammar"},
     lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
]


@pytest.mark.parametrize("fields, check", ASKS)
def test_vllm_fields_on_both_endpoints_streamed_or_not_with_n(tiny_server, fields, check):
    for path, base in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        body = {**base, **fields, "n": 2, "temperature": 0.8, "seed": 5}
        r = post(tiny_server, path, body)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert len(choices) == 2
        texts = [c["message"]["content"] if "message" in c else c["text"] for c in choices]
        events = sse(tiny_server, path, body)
        streamed = ["", ""]
        for event in events:
            for c in event["choices"]:
                streamed[c["index"]] += c["delta"].get("content") or "" if "delta" in c else c["text"]
        assert streamed == texts  # same seed, same grammar: the stream carries the same text
        if check is not None:
            for choice, text in zip(choices, texts):
                assert choice["finish_reason"] == "stop", choice
                check(text)
    assert tiny_server.wait_kv_free()["kvmem:kv_cache_allocated_bytes"] == 0


def test_response_format_json_schema_and_json_object(tiny_server):
    body = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "colour", "schema": BOUNDED_SCHEMA, "strict": True}}}
    r = post(tiny_server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    check_colour(r.json()["choices"][0]["message"]["content"])
    r = post(tiny_server, "/v1/chat/completions", {**CHAT, "max_tokens": 6, "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    assert text.lstrip().startswith("{"), text  # an object starts (random weights need not end it in 6 tokens)


@pytest.mark.parametrize("fields, param", [
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar"),
    ({"guided_json": {"type": 5}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_regex": "a", "min_tokens": 2}, "min_tokens"),
    ({"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(tiny_server, fields, param):
    for path, base in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        r = post(tiny_server, path, {**base, **fields})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param, error
        assert param.split(".")[0] in error["message"], error
        r = post(tiny_server, path, {**base, **fields, "stream": True})  # refused before any stream starts
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert tiny_server.wait_kv_free()["kvmem:kv_cache_allocated_bytes"] == 0


# --- the embedded model and the openai client's parse(), for every strategy ---------------------------
class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=24)
    age: int
    city: str = pydantic.Field(max_length=24)


@pytest.mark.slow
@pytest.mark.parametrize("kv_cache", ["paged", "static", "virtual", "hybrid"])
def test_openai_parse_returns_the_pydantic_object_for_every_strategy(kv_cache):
    server = start_server(EngineConfig(dtype="float32", kv_cache=kv_cache, kv_cache_memory="64MiB", max_model_len=1024))
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)
        messages = [{"role": "user", "content": "Invent a person: name, age and city."}]
        completion = client.beta.chat.completions.parse(model=server.model, messages=messages, response_format=Person,
                                                        temperature=0, max_tokens=120)
        person = completion.choices[0].message.parsed
        assert isinstance(person, Person), completion
        assert completion.choices[0].finish_reason == "stop"
        # Sampled, several at once, and streamed: every answer validates.
        completion = client.beta.chat.completions.parse(model=server.model, messages=messages, response_format=Person,
                                                        temperature=1.0, seed=3, n=3, max_tokens=160)
        assert sum(isinstance(c.message.parsed, Person) for c in completion.choices) >= 2
        with client.beta.chat.completions.stream(model=server.model, messages=messages, response_format=Person,
                                                 temperature=0, max_tokens=120) as stream:
            final = stream.get_final_completion()
        assert final.choices[0].message.parsed == person
        assert server.wait_kv_free()["kvmem:kv_cache_allocated_bytes"] == 0
    finally:
        server.stop()
