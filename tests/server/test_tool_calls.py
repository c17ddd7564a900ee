"""Tool calling through the server with the real openai client: a tiny Qwen2-style model whose
template knows tools (`--tool-call-parser hermes --enable-auto-tool-choice`), and the embedded model
(tool_choice "required", enforced by structured outputs). Round trips: call -> tool result -> answer,
streamed and not."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from kvmem.config import EngineConfig
from tests.server.conftest import TINY_ENGINE, start_server
from tests.tools.conftest import make_tiny_qwen_tools_model

PATIENCE = 120
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo"]},
                                                    "unit": {"enum": ["c", "f"]}},
               "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"]}}}
# Random weights write no tool call on their own: for "auto", a grammar makes the model write one in
# Hermes' format, and the parser must find it.
HERMES_CALL = ('root ::= "Checking.\\n<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": '
               '{\\"city\\": \\"" ("Paris" | "Tokyo") "\\", \\"unit\\": \\"c\\"}}\\n</tool_call>"')


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory):
    directory = make_tiny_qwen_tools_model(tmp_path_factory.mktemp("tools-server") / "qwen2")
    server = start_server(EngineConfig(model=str(directory), **TINY_ENGINE), tool_call_parser="hermes",
                          enable_auto_tool_choice=True)
    yield server
    server.stop()


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=PATIENCE)


def streamed(chunks) -> tuple[str | None, list[dict], str]:
    """content, tool calls and finish_reason assembled from a stream's deltas (choice 0)."""
    content, calls, finish = None, {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content = (content or "") + delta.content
            for entry in delta.tool_calls or []:
                if entry.id is not None:
                    assert entry.index not in calls and entry.type == "function"
                    calls[entry.index] = {"id": entry.id, "name": entry.function.name,
                                          "arguments": entry.function.arguments or ""}
                else:
                    assert entry.function.name is None
                    calls[entry.index]["arguments"] += entry.function.arguments
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def as_dicts(message) -> list[dict]:
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []]


def test_auto_hermes_round_trip_streamed_and_not(qwen_server):
    client = client_of(qwen_server)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    kwargs = dict(model=qwen_server.model, tools=[WEATHER, CLOCK], temperature=0, max_tokens=120,
                  extra_body={"guided_grammar": HERMES_CALL})
    reply = client.chat.completions.create(messages=messages, **kwargs)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert arguments["city"] in ("Paris", "Tokyo") and arguments["unit"] == "c"

    content, calls, finish = streamed(client.chat.completions.create(messages=messages, stream=True, **kwargs))
    assert (content, finish) == ("Checking.", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [(call.function.name, call.function.arguments)]

    # The tool's result goes back; the answer is content (tool_choice none: no parsing, no grammar).
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "temp": 21}'}]
    answer = client.chat.completions.create(model=qwen_server.model, messages=messages, tools=[WEATHER, CLOCK],
                                            tool_choice="none", temperature=0, max_tokens=8)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content is not None
    # The template saw the call and the result (count the prompt's tokens against our own rendering).
    tokenizer = qwen_server.engine.tokenizer
    conversation = [m for m in messages]
    conversation[1] = {**conversation[1], "tool_calls": [
        {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
        for c in conversation[1]["tool_calls"]]}
    rendered = tokenizer.apply_chat_template(conversation, True, tools=[WEATHER, CLOCK])
    assert "<tool_response>" in rendered and '"arguments": {"city"' in rendered
    assert answer.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    assert qwen_server.wait_kv_free()["kvmem:kv_cache_allocated_bytes"] == 0


def test_auto_without_a_call_is_content(qwen_server):
    client = client_of(qwen_server)
    reply = client.chat.completions.create(model=qwen_server.model, messages=[{"role": "user", "content": "Hi"}],
                                           tools=[WEATHER], temperature=0, max_tokens=30,
                                           extra_body={"guided_choice": ["Hello there", "Hi!"]})
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content in ("Hello there", "Hi!") and reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("parallel", [True, False])
def test_required_is_enforced_streamed_and_not_with_n(qwen_server, parallel):
    client = client_of(qwen_server)
    kwargs = dict(model=qwen_server.model, messages=[{"role": "user", "content": "Weather and time?"}],
                  tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=parallel, temperature=0.9,
                  seed=11, max_tokens=600)
    reply = client.chat.completions.create(n=2, **kwargs)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls
        assert 1 <= len(calls) and (parallel or len(calls) == 1)
        for call in calls:
            arguments = json.loads(call.function.arguments)
            if call.function.name == "get_weather":
                assert arguments["city"] in ("Paris", "Tokyo") and arguments["unit"] in ("c", "f")
            else:
                assert call.function.name == "get_time" and isinstance(arguments["utc"], bool)
    content, calls, finish = streamed(client.chat.completions.create(stream=True, **kwargs))
    assert content is None and finish == "tool_calls"
    first = reply.choices[0].message.tool_calls
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.function.name, c.function.arguments) for c in first]


def test_named_function_is_enforced_streamed_and_not(qwen_server):
    client = client_of(qwen_server)
    kwargs = dict(model=qwen_server.model, messages=[{"role": "user", "content": "Time?"}], tools=[WEATHER, CLOCK],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0,
                  max_tokens=200)
    choice = client.chat.completions.create(**kwargs).choices[0]
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and choice.finish_reason == "stop"  # OpenAI's, for a named choice
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}
    content, calls, finish = streamed(client.chat.completions.create(stream=True, **kwargs))
    assert content is None and finish == "stop"
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)]


def post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=PATIENCE)


@pytest.mark.parametrize("extra, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "guided_regex"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_tool_requests_that_cannot_be_honoured_are_400s_naming_the_field(qwen_server, extra, param):
    for stream in (False, True):
        r = post(qwen_server, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": stream,
                               **extra})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param, error


def test_auto_needs_the_servers_flags(tiny_server):
    r = post(tiny_server, {"messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in r.json()["error"]["message"]
    # "required" and a named function need no parser; "none" just renders the tools.
    r = post(tiny_server, {"messages": [{"role": "user", "content": "Hi"}], "tools": [CLOCK], "max_tokens": 40,
                           "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    r = post(tiny_server, {"messages": [{"role": "user", "content": "Hi"}], "tools": [CLOCK], "max_tokens": 2,
                           "tool_choice": "none"})
    assert r.status_code == 200 and "tool_calls" not in r.json()["choices"][0]["message"]


def test_server_settings_check_the_tool_flags():
    from kvmem.server.api_server import ServerSettings

    with pytest.raises(ValueError, match="tool_call_parser must be one of hermes, llama3_json"):
        ServerSettings(served_model_name="m", tool_call_parser="mistral")
    with pytest.raises(ValueError, match="enable_auto_tool_choice needs a tool_call_parser"):
        ServerSettings(served_model_name="m", enable_auto_tool_choice=True)


@pytest.mark.slow
def test_embedded_model_required_tool_round_trip_streamed_and_not():
    server = start_server(EngineConfig(dtype="float32", kv_cache_memory="64MiB", max_model_len=1024),
                          tool_call_parser="hermes", enable_auto_tool_choice=True)
    try:
        client = client_of(server)
        tools = [{"type": "function", "function": {
            "name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 32}},
                           "required": ["city"]}}}]
        messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
        kwargs = dict(model=server.model, tools=tools, tool_choice="required", temperature=0, max_tokens=100)
        choice = client.chat.completions.create(messages=messages, **kwargs).choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
        content, calls, finish = streamed(client.chat.completions.create(messages=messages, stream=True, **kwargs))
        assert finish == "tool_calls" and [(c["name"], c["arguments"]) for c in calls] == [
            ("get_weather", call.function.arguments)]
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees Celsius."}]
        answer = client.chat.completions.create(model=server.model, messages=messages, tools=tools, temperature=0,
                                                max_tokens=40)  # auto: the model answers in words
        assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None
        streamed_answer = streamed(client.chat.completions.create(model=server.model, messages=messages, tools=tools,
                                                                  temperature=0, max_tokens=40, stream=True))
        assert streamed_answer[0] == answer.choices[0].message.content and streamed_answer[1] == []
        assert server.wait_kv_free()["kvmem:kv_cache_allocated_bytes"] == 0
    finally:
        server.stop()
