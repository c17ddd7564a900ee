"""OpenAI's streamed shape of one choice's tool calls, from the growing text.

`ToolCallStream.update(text, final)` returns the delta to send: `content` new since the last call,
and `tool_calls` entries -- a call's first entry carries its index, id, type and name (and whatever
arguments exist by then), later ones `{"index": i, "function": {"arguments": piece}}`. The pieces
of each call's arguments add up to the non-streamed answer's arguments.
"""

from __future__ import annotations

import uuid

from kvmem.tools.parsers import ToolCall, ToolParser


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_json(call: ToolCall, call_id: str) -> dict:
    """A finished call as a (non-streamed) message's `tool_calls` entry."""
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


class ToolCallStream:
    def __init__(self, parser: ToolParser, max_calls: int | None = None) -> None:
        self.parser = parser
        self.max_calls = max_calls  # parallel_tool_calls false: 1
        self.content_sent = 0
        self.ids: list[str] = []
        self.arguments_sent: list[int] = []

    @property
    def num_calls(self) -> int:
        return len(self.ids)

    def update(self, text: str, final: bool) -> dict:
        parsed = self.parser.parse(text, final)
        delta: dict = {}
        if len(parsed.content) > self.content_sent:
            delta["content"] = parsed.content[self.content_sent:]
            self.content_sent = len(parsed.content)
        entries = []
        for i, call in enumerate(parsed.calls[:self.max_calls]):
            if call.name is None or not call.valid:
                break  # calls go out in order: nothing of a later one before this one's name
            if i == len(self.ids):
                self.ids.append(new_call_id())
                self.arguments_sent.append(len(call.arguments))
                entries.append({"index": i, "id": self.ids[i], "type": "function",
                                "function": {"name": call.name, "arguments": call.arguments}})
            elif len(call.arguments) > self.arguments_sent[i]:
                entries.append({"index": i, "function": {"arguments": call.arguments[self.arguments_sent[i]:]}})
                self.arguments_sent[i] = len(call.arguments)
        if entries:
            delta["tool_calls"] = entries
        return delta
