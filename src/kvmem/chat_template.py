"""Chat messages -> prompt text, with a model's Jinja chat template, as transformers renders it.

`ChatTemplate(source).render(...)` validates the messages, compiles the template once (in the same
sandboxed environment transformers uses: trim_blocks, lstrip_blocks, loop controls, the
`{% generation %}` tag, `raise_exception`, `strftime_now`, a plain-JSON `tojson`) and renders it, so
that prompts are byte-identical to `apply_chat_template(..., tokenize=False)`. Every failure is a
ValueError with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate", "compile_chat_template", "normalize_messages"]


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged.

    transformers uses the tag to mark assistant tokens for training masks; templates that contain it
    must still parse here.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; transformers overrides it with plain json.dumps, and so do we.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    # The same environment transformers renders with (trim_blocks, lstrip_blocks, loop controls), so that
    # prompts are byte-identical; sandboxed because templates come with downloaded models.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def normalize_messages(conversation: Any) -> list[dict[str, Any]]:
    """Validate chat messages and flatten text-part content into a string.

    Keys whose value is None are dropped, as transformers does: OpenAI-style clients send
    `content: null` next to `tool_calls`, and templates test for a missing key.
    """
    if not isinstance(conversation, Sequence) or isinstance(conversation, (str, bytes)) or not conversation:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role must be a non-empty string")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(
                        f"messages[{i}].content[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                        "only text content is supported"
                    )
                texts.append(part["text"])
            # Separate parts by a newline, as vLLM does: most templates concatenate content into the prompt.
            message["content"] = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        out.append(message)
    return out


class ChatTemplate:
    """A chat template's source, compiled on first use."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._compiled: jinja2.Template | None = None

    def render(self, conversation: list[dict[str, Any]], add_generation_prompt: bool,
               special_tokens: Mapping[str, str | None], extra: Mapping[str, Any]) -> str:
        """Render `conversation`; `special_tokens` (bos_token, eos_token...; None ones left out) and then
        `extra` (the caller's values, which win, as in transformers) reach the template.

        Raises ValueError when the messages are malformed, the template does not compile, or the
        template itself rejects the conversation (`raise_exception`).
        """
        messages = normalize_messages(conversation)
        if self._compiled is None:
            try:
                self._compiled = compile_chat_template(self.source)
            except jinja2.TemplateError as e:
                raise ValueError(f"the model's chat template does not compile: {e}") from e
        context: dict[str, Any] = {"tools": None, "documents": None}
        context.update({k: v for k, v in special_tokens.items() if v is not None})
        context.update(extra)  # caller's values win, as in transformers
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template rejected the messages: {e}") from e
