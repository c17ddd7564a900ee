"""What a request constrains its output to, with vLLM's names (`StructuredOutputsParams`).

Exactly one of `json` (a JSON schema, as a dict or its JSON text), `json_object` (any JSON object),
`regex`, `choice` (one of these strings, verbatim) or `grammar` (xgrammar's EBNF, or a Lark grammar)
is set. Checks here are the ones that need no tokenizer: types, exactly one kind, the schema being
JSON. Whether a regex, grammar or schema compiles is the compiler's to say (`GrammarCompiler`),
because only compiling finds out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Bounds on what one request may ask the compiler for: compile time grows with the spec, and the
# compile worker is shared by every request of the engine.
MAX_SPEC_CHARS = 256 * 1024
MAX_CHOICES = 1024


@dataclass(frozen=True)
class GrammarKey:
    """What the compiler compiles and caches by: the kind, its canonical text, and the whitespace
    option (which changes the JSON grammars)."""

    kind: str  # "json" | "json_object" | "regex" | "choice" | "grammar"
    spec: str
    any_whitespace: bool = True


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # JSON kinds: no whitespace between tokens beyond the separators (vLLM's option). Small models
    # otherwise sometimes fill a constrained answer with newlines until max_tokens.
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ValueError("structured_outputs must set exactly one of json, json_object, regex, choice, grammar; "
                             f"got {', '.join(given) if given else 'none'}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError(f"structured_outputs.disable_any_whitespace must be a bool, "
                             f"got {self.disable_any_whitespace!r}")
        if self.json is not None:
            self.json = _check_schema(self.json)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str) or not value:
                    raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
                if len(value) > MAX_SPEC_CHARS:
                    raise ValueError(f"structured_outputs.{name} is {len(value)} characters; at most {MAX_SPEC_CHARS}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
            if len(self.choice) > MAX_CHOICES or sum(map(len, self.choice)) > MAX_SPEC_CHARS:
                raise ValueError(f"structured_outputs.choice may hold at most {MAX_CHOICES} strings "
                                 f"of {MAX_SPEC_CHARS} characters in all")
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"

    @property
    def key(self) -> GrammarKey:
        kind = self.kind
        if kind == "json":
            spec = json.dumps(self.json, separators=(",", ":"))  # key order kept: it is the output's order
        elif kind == "choice":
            spec = json.dumps(self.choice)
        elif kind == "json_object":
            spec = ""
        else:
            spec = getattr(self, kind)
        return GrammarKey(kind, spec, not self.disable_any_whitespace)


def _check_schema(schema: Any) -> dict:
    """The schema as a dict: a dict, or JSON text of an object."""
    if isinstance(schema, str):
        if len(schema) > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs.json is {len(schema)} characters; at most {MAX_SPEC_CHARS}")
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from e
    if not isinstance(schema, dict):
        raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(schema).__name__}")
    return schema
