"""Tool calls in generated text.

Every parser reads the text generated so far (`final` once the choice has ended) and returns a
`ParsedOutput`: the content (text that is not a call) and the calls found, the last one possibly
still growing. The same function serves a streamed choice (called on each longer prefix) and a
finished one, so what a stream sends adds up to what the non-streamed answer holds:

- content only grows: a suffix that may still turn into the start of a call (a partial
  `<tool_call>` tag, trailing whitespace) is held back until the text says otherwise;
- a call's arguments are the raw JSON text of its "arguments" value as the model wrote it (checked
  to be JSON once complete), so they too only grow.

Where the final text holds something that looks like a call but does not parse, there are no calls
and the whole text is content (vLLM's behaviour).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

# "{" "name": "<name>", "arguments"|"parameters": -- the order models are trained (and forced) to write.
_HEADER = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_WS = " \t\r\n"


@dataclass
class ToolCall:
    name: str | None  # None until the text has it
    arguments: str = ""  # the JSON text of the arguments so far
    complete: bool = False
    valid: bool = True  # False: complete, but not a call (bad JSON, no name)


@dataclass
class ParsedOutput:
    content: str
    calls: list[ToolCall] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return all(c.complete and c.valid for c in self.calls)


def value_end(text: str, start: int) -> int | None:
    """Index just past the JSON value starting at text[start]; None when the text ends first. Only
    nesting and strings are tracked (validity is json.loads' to judge, once complete)."""
    if start >= len(text):
        return None
    first = text[start]
    if first not in "{[\"":  # a scalar ends at a delimiter
        for i in range(start, len(text)):
            if text[i] in ",}]" + _WS:
                return i
        return None
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 0:
                    return i + 1
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def scan_call(text: str, start: int) -> tuple[ToolCall, int | None]:
    """The call object starting at text[start] ("{"), and the index past it (None: not complete)."""
    header = _HEADER.match(text, start)
    end = value_end(text, start)
    if header is not None:
        name = json.loads(f'"{header.group(1)}"')
        args_start = header.end()
        args_end = value_end(text, args_start)
        arguments = text[args_start:args_end] if args_end is not None else text[args_start:]
        if end is None:
            return ToolCall(name, arguments), None
        return _checked(ToolCall(name, arguments, complete=True)), end
    if end is None:
        return ToolCall(None), None
    # Another key order: only the complete object tells name and arguments apart.
    try:
        obj = json.loads(text[start:end])
        name = obj["name"]
        args = obj.get("arguments", obj.get("parameters", {}))
        if not isinstance(name, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return ToolCall(None, complete=True, valid=False), end
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return _checked(ToolCall(name, arguments, complete=True)), end


def _checked(call: ToolCall) -> ToolCall:
    try:
        call.valid = isinstance(json.loads(call.arguments), dict)
    except ValueError:
        call.valid = False
    return call


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _held_tag_prefix(text: str, tag: str) -> int:
    """How many trailing characters of `text` could be the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolParser:
    """Finds calls in text; `--tool-call-parser NAME` picks a subclass by its `name`."""

    name = ""

    def parse(self, text: str, final: bool) -> ParsedOutput:
        raise NotImplementedError

    def finish(self, text: str) -> ParsedOutput:
        """The finished text: its calls, or none and all of it as content when a call is broken."""
        parsed = self.parse(text, final=True)
        return parsed if parsed.valid else ParsedOutput(text)


class HermesParser(ToolParser):
    """Qwen2.5 / Hermes: content, then `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
    blocks. The content is what precedes the first block, without trailing whitespace."""

    name = "hermes"
    start_tag = "<tool_call>"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        first = text.find(self.start_tag)
        if first < 0:
            if final:
                return ParsedOutput(text)
            # Held back: a partial tag at the end, and whitespace that may precede a call.
            return ParsedOutput(text[:len(text) - _held_tag_prefix(text, self.start_tag)].rstrip(_WS))
        parsed = ParsedOutput(text[:first].rstrip(_WS))
        i = first
        while (i := text.find(self.start_tag, i)) >= 0:
            j = _skip_ws(text, i + len(self.start_tag))
            if j == len(text):
                break  # the call's JSON has not started yet
            if text[j] != "{":
                parsed.calls.append(ToolCall(None, complete=True, valid=False))
                break
            call, end = scan_call(text, j)
            parsed.calls.append(call)
            if end is None:
                break
            i = end
        return parsed


class Llama3JsonParser(ToolParser):
    """Llama 3.x: the whole answer is a call, `{"name": ..., "parameters": {...}}` (several joined
    by ";"), or it is content. A leading `<|python_tag|>` is a special token, gone from the text."""

    name = "llama3_json"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        i = _skip_ws(text, 0)
        if i == len(text):
            return ParsedOutput(text if final else "")
        if text[i] != "{":
            return ParsedOutput(text)
        return ParsedOutput("", _calls_separated(text, i, ";"))


def _calls_separated(text: str, i: int, separator: str) -> list[ToolCall]:
    calls = []
    while i < len(text) and text[i] == "{":
        call, end = scan_call(text, i)
        calls.append(call)
        if end is None:
            break
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == separator:
            i = _skip_ws(text, i + 1)
    return calls


class RequiredArrayParser(ToolParser):
    """What kvmem forces for tool_choice "required": `[{"name": ..., "parameters": {...}}, ...]`."""

    name = "required"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        i = _skip_ws(text, 0)
        if i == len(text) or text[i] != "[":
            return ParsedOutput("", [ToolCall(None, complete=True, valid=False)] if final else [])
        return ParsedOutput("", _calls_separated(text, _skip_ws(text, i + 1), ","))

    def finish(self, text: str) -> ParsedOutput:
        return self.parse(text, final=True)  # forced: the calls, even cut short by max_tokens


class NamedFunctionParser(ToolParser):
    """What kvmem forces for a named tool_choice: the function's arguments, nothing else."""

    def __init__(self, function_name: str) -> None:
        self.function_name = function_name

    def parse(self, text: str, final: bool) -> ParsedOutput:
        return ParsedOutput("", [_checked(ToolCall(self.function_name, text, complete=True)) if final
                                 else ToolCall(self.function_name, text)])

    def finish(self, text: str) -> ParsedOutput:
        return self.parse(text, final=True)


# --tool-call-parser names (vLLM's).
TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser)}
