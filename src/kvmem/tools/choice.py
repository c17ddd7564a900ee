"""What a chat request's `tools` and `tool_choice` ask of generation and of the answer (`ToolPlan`).

- "none": the tools reach the template (the model reads them), the answer is content only.
- "auto": the model decides; the server's `--tool-call-parser` finds calls in what it wrote
  (needs `--enable-auto-tool-choice`, as in vLLM).
- "required": structured outputs force a JSON array of one or more calls (one with
  parallel_tool_calls false), each `{"name": <one of the tools>, "parameters": <its schema>}`.
- a named function: structured outputs force that function's arguments (its parameters schema).
Those two are vLLM's; they work with any model and without a parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvmem.structured_outputs.params import StructuredOutputsParams
from kvmem.tools.parsers import TOOL_PARSERS, NamedFunctionParser, RequiredArrayParser, ToolParser

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    parser: ToolParser | None = None  # None for "none"
    structured_outputs: StructuredOutputsParams | None = None  # what enforces "required" / named
    max_calls: int | None = None  # 1 with parallel_tool_calls false

    @property
    def finish_reason_on_calls(self) -> str | None:
        """OpenAI's finish_reason when the answer holds calls: "tool_calls", except for a named
        function, which OpenAI ends with "stop"."""
        return None if self.mode == "named" else "tool_calls"


def required_schema(functions: list[dict[str, Any]], parallel: bool) -> dict:
    """The JSON schema of a non-empty array of calls to these functions."""
    variants = [{"type": "object",
                 "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                "parameters": f.get("parameters") or EMPTY_PARAMETERS},
                 "required": ["name", "parameters"], "additionalProperties": False} for f in functions]
    schema: dict = {"type": "array", "minItems": 1,
                    "items": variants[0] if len(variants) == 1 else {"anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def plan_tools(functions: list[dict[str, Any]], tool_choice: str | dict | None, parallel: bool,
               parser_name: str | None, auto_enabled: bool) -> ToolPlan:
    """`functions`: the request's tools' `function` objects (validated). Raises ValueError whose
    message starts with the field at fault (tool_choice) when the choice cannot be honoured."""
    if tool_choice is None:
        tool_choice = "auto" if functions else "none"
    max_calls = None if parallel else 1
    if tool_choice == "none":
        return ToolPlan("none")
    if not functions:
        raise ValueError(f"tool_choice {tool_choice!r} needs tools")
    if tool_choice == "auto":
        if not auto_enabled or parser_name is None:
            raise ValueError('tool_choice "auto" needs the server started with --enable-auto-tool-choice and '
                             "--tool-call-parser (or send tool_choice \"required\", a named function, or \"none\")")
        return ToolPlan("auto", TOOL_PARSERS[parser_name](), max_calls=max_calls)
    if tool_choice == "required":
        return ToolPlan("required", RequiredArrayParser(),
                        StructuredOutputsParams(json=required_schema(functions, parallel),
                                                disable_any_whitespace=True), max_calls)
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise ValueError('tool_choice must be "none", "auto", "required" or '
                             '{"type": "function", "function": {"name": ...}}')
        for f in functions:
            if f["name"] == name:
                return ToolPlan("named", NamedFunctionParser(name),
                                StructuredOutputsParams(json=f.get("parameters") or EMPTY_PARAMETERS,
                                                        disable_any_whitespace=True), 1)
        raise ValueError(f"tool_choice names function {name!r}, which is not among the tools")
    raise ValueError(f'tool_choice must be "none", "auto", "required" or a named function, got {tool_choice!r}')
