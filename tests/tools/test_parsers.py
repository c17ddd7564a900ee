from __future__ import annotations

import json

import pytest

from kvmem.tools.parsers import (HermesParser, Llama3JsonParser, NamedFunctionParser, RequiredArrayParser,
                                 value_end)
from kvmem.tools.streaming import ToolCallStream

HERMES_TWO = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris \\"CET\\" {x}"}}\n'
              '</tool_call>')


def calls_of(parsed):
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


def test_value_end_tracks_nesting_and_strings():
    text = '{"a": "}{\\"", "b": [1, {"c": 2}]} tail'
    assert text[:value_end(text, 0)] == '{"a": "}{\\"", "b": [1, {"c": 2}]}'
    assert value_end('{"a": [1, 2', 0) is None
    assert value_end('12, 3', 0) == 2 and value_end('"x\\"y" z', 0) == 6


def test_hermes_content_and_two_calls():
    parsed = HermesParser().finish(HERMES_TWO)
    assert parsed.content == "Let me check."
    assert calls_of(parsed) == [("get_weather", {"city": "Paris", "unit": "c"}),
                                ("get_time", {"tz": 'Europe/Paris "CET" {x}'})]
    assert parsed.calls[0].arguments == '{"city": "Paris", "unit": "c"}'  # as the model wrote it


def test_hermes_without_calls_or_with_a_broken_one_is_all_content():
    assert HermesParser().finish("Just text.\n").content == "Just text.\n"
    broken = 'Hi <tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>'
    parsed = HermesParser().finish(broken)
    assert parsed.content == broken and parsed.calls == []
    other_order = '<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>'
    assert calls_of(HermesParser().finish(other_order)) == [("f", {"a": 1})]


def test_llama3_json_calls_or_content():
    parsed = Llama3JsonParser().finish(' {"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}')
    assert parsed.content == "" and calls_of(parsed) == [("f", {"x": 1}), ("g", {})]
    assert Llama3JsonParser().finish("The answer is {x}.").content == "The answer is {x}."
    assert Llama3JsonParser().finish('{"name": "f", "parameters": {"x": ').calls == []


def test_forced_formats():
    parsed = RequiredArrayParser().finish('[{"name": "f", "parameters": {"x": 1}}, {"name": "g", "parameters": {}}]')
    assert calls_of(parsed) == [("f", {"x": 1}), ("g", {})]
    parsed = NamedFunctionParser("f").finish('{"x": [1, 2]}')
    assert calls_of(parsed) == [("f", {"x": [1, 2]})]


@pytest.mark.parametrize("parser, text", [
    (HermesParser(), HERMES_TWO),
    (HermesParser(), "No tools needed <tool here, just text.  \n"),
    (Llama3JsonParser(), '{"name": "f", "parameters": {"x": "a;b", "y": [1, 2]}}; {"name": "g", "parameters": {}}'),
    (Llama3JsonParser(), "  plain answer"),
    (RequiredArrayParser(), '[{"name": "f", "parameters": {"q": "}]"}}, {"name": "g", "parameters": {"n": 5}}]'),
    (NamedFunctionParser("f"), '{"q": "x", "n": 5}'),
])
@pytest.mark.parametrize("step", [1, 2, 7])
def test_streamed_deltas_add_up_to_the_final_answer(parser, text, step):
    stream = ToolCallStream(parser)
    content, calls = "", {}
    for end in list(range(step, len(text), step)) + [len(text)]:
        delta = stream.update(text[:end], final=end == len(text))
        content += delta.get("content", "")
        for entry in delta.get("tool_calls", []):
            if "id" in entry:
                assert entry["index"] == len(calls) and entry["type"] == "function"
                calls[entry["index"]] = [entry["function"]["name"], entry["function"]["arguments"]]
            else:
                assert set(entry) == {"index", "function"} and set(entry["function"]) == {"arguments"}
                calls[entry["index"]][1] += entry["function"]["arguments"]
    final = parser.finish(text)
    assert content == final.content
    assert [tuple(calls[i]) for i in sorted(calls)] == [(c.name, c.arguments) for c in final.calls]


def test_parallel_tool_calls_false_streams_only_the_first():
    stream = ToolCallStream(HermesParser(), max_calls=1)
    delta = stream.update(HERMES_TWO, final=True)
    assert [e["function"]["name"] for e in delta["tool_calls"]] == ["get_weather"]
