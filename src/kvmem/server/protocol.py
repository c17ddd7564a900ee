"""The OpenAI API's request bodies, validated, and their translation into `SamplingParams`.

Types are strict (a string is not a number, a float is not an int, a bool is neither), so a
malformed body is a 400 naming the field, not a coerced value. `null` is accepted wherever OpenAI's
schema allows it and means the default.

Structured outputs come from OpenAI's `response_format` (json_object, json_schema) or vLLM's
`structured_outputs` / `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`, one of
them per request (`requested_grammar`).

Unknown keys: nothing is silently ignored. A field kvmem does not implement (OpenAI's `suffix`,
`tools`, `prediction`, ...; vLLM's `guided_whitespace_pattern`, beam search, ...) is refused with a
400 naming it, unless it carries its neutral value (null, or
e.g. `use_beam_search: false`), which changes nothing. A key nobody defined is a 400 naming it too
(extra="forbid"). OpenAI fields that do not change the output (`user`, `metadata`, `store`,
`service_tier`, `parallel_tool_calls`) are accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from kvmem.sampling_params import MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS, SamplingParams
from kvmem.structured_outputs.params import StructuredOutputsParams
from kvmem.tools.choice import ToolPlan, plan_tools

# OpenAI's limit on samples per request; without one, `n` alone could ask for millions of sequences.
MAX_N = 128
# Every generated token is checked against every stop string (cost ~ their total length, per token,
# per sample) and every stop token id: 10,000 stop strings made each step of an n=128 request take
# a second more. OpenAI allows 4 stop strings; these bounds leave room for any real client.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 128
MAX_STOP_TOKEN_IDS = 64
# The roles a chat template may see ("tool": a tool's result; the older "function" role is refused).
CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")


class InvalidRequest(ValueError):
    """A request the server refuses; `param` names the offending field (OpenAI's error body)."""

    def __init__(self, message: str, param: str | None = None, status_code: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status_code = status_code
        self.code = code


# Fields kvmem does not implement, with the values that ask for nothing (null always does): such a
# key is dropped when it carries one of them and refused (400 naming it) otherwise.
_ANY = object()
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    # OpenAI's
    "suffix": ("",), "prediction": (), "audio": (), "modalities": (["text"],), "web_search_options": (),
    "functions": ([],), "function_call": ("none",), "reasoning_effort": (), "tools": ([],),  # tools: chat's
    # vLLM's extras
    "guided_whitespace_pattern": (),
    "use_beam_search": (False,), "length_penalty": (1, 1.0), "early_stopping": (False,),
    "allowed_token_ids": (), "bad_words": ([],), "truncate_prompt_tokens": (),
    "spaces_between_special_tokens": (True,), "return_tokens_as_token_ids": (False,),
    "return_token_ids": (False,), "prompt_embeds": (), "logits_processors": (), "vllm_xargs": (),
    "kv_transfer_params": (), "cache_salt": (), "priority": (0,), "mm_processor_kwargs": (),
    "documents": (), "chat_template": (), "continue_final_message": (False,), "thinking_token_budget": (),
    # SGLang's, which its router and vLLM's router (a fork of it) add to every request they forward
    "no_stop_trim": (False,), "return_hidden_states": (False,),
    # reasoning output: kvmem has no reasoning parser, so either value asks for the same text
    "separate_reasoning": (True, False), "stream_reasoning": (True, False), "include_reasoning": (True, False),
}
# OpenAI fields that do not change what is generated: accepted, and not used.
ACCEPTED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "request_id")


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_neutral_unsupported(cls, data: Any) -> Any:
        """Keys of UNSUPPORTED_FIELDS that ask for nothing are dropped; the others stay and meet
        extra="forbid" (a 400 naming them), unless the model itself declares the field."""
        if isinstance(data, dict):
            for key in [k for k in data if k in UNSUPPORTED_FIELDS and k not in cls.model_fields]:
                value = data[key]
                if value is None or any(value == v and type(value) is type(v) for v in UNSUPPORTED_FIELDS[key]):
                    del data[key]
        return data


class StreamOptions(_Body):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's: usage in every chunk; not implemented

    def check(self) -> None:
        if self.continuous_usage_stats:
            raise InvalidRequest("stream_options.continuous_usage_stats is not supported",
                                 "stream_options.continuous_usage_stats")


class JsonSchemaFormat(_Body):
    """OpenAI's response_format.json_schema."""

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # kvmem always enforces the schema (strict or not), as vLLM does


class ResponseFormat(_Body):
    """OpenAI's response_format: "text", "json_object" (any JSON object) or "json_schema"."""

    type: str
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(_Body):
    """vLLM's `structured_outputs` request field (the fields of its StructuredOutputsParams)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None


# The request fields that ask for structured outputs, and the StructuredOutputsParams kind each maps to.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
# The grammar backends a request may name (vLLM's names): kvmem has xgrammar.
GRAMMAR_BACKENDS = ("xgrammar", "auto")


@dataclass
class RequestedGrammar:
    """Structured outputs as a request asked for them: the params, and the request field they came
    from (what a 400 names when the spec does not compile)."""

    params: StructuredOutputsParams
    field: str

    def rename(self, message: str) -> str:
        """A compiler or params message ("structured_outputs.regex: ...") in the request's words."""
        return message.replace(f"structured_outputs.{self.params.kind}", self.field, 1)


class _SamplingFields(_Body):
    """What completions and chat share; the names are OpenAI's, then vLLM's extras."""

    model: str | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # accepted, not used (see ACCEPTED_FIELDS)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    request_id: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    prompt_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    # structured outputs, vLLM's ways (the OpenAI way is response_format)
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None

    @property
    def num_samples(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _logit_bias(self) -> dict[int, float] | None:
        if self.logit_bias is None:
            return None
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidRequest(f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries, "
                                 f"got {len(self.logit_bias)}", "logit_bias")
        bias = {}
        for key, value in self.logit_bias.items():
            token = key.strip()
            if not token.isascii() or not token.isdigit() or len(token) > 12:
                raise InvalidRequest(f"logit_bias keys must be token ids (decimal strings), got {key!r}", "logit_bias")
            bias[int(token)] = value
        return bias

    def _check_common(self) -> None:
        if self.n is not None and self.n > MAX_N:
            raise InvalidRequest(f"n must be <= {MAX_N}, got {self.n}", "n")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise InvalidRequest(f"each stop string may be at most {MAX_STOP_STRING_CHARS} characters long", "stop")
        if self.stop_token_ids is not None and len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, "
                                 f"got {len(self.stop_token_ids)}", "stop_token_ids")
        if self.stream_options is not None:
            if not self.stream:
                raise InvalidRequest("stream_options is only allowed when stream is true", "stream_options")
            self.stream_options.check()
        if self.guided_decoding_backend is not None and self.guided_decoding_backend not in GRAMMAR_BACKENDS:
            raise InvalidRequest(f"guided_decoding_backend {self.guided_decoding_backend!r} is not available; "
                                 f"kvmem has {', '.join(map(repr, GRAMMAR_BACKENDS))}", "guided_decoding_backend")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}",
                                 "prompt_logprobs")

    def requested_grammar(self) -> RequestedGrammar | None:
        """What the request constrains its output to, from whichever one field asks (two that ask is
        a 400 naming the second; tool_choice "required" or named asks too)."""
        asked: list[tuple[str, dict[str, Any]]] = []
        plan = getattr(self, "_tool_plan", None)
        if plan is not None and plan.structured_outputs is not None:
            asked.append(("tool_choice", {}))
        rf = self.response_format
        if rf is not None:
            if rf.type == "json_object":
                asked.append(("response_format", {"json_object": True}))
            elif rf.type == "json_schema":
                if rf.json_schema is None or rf.json_schema.schema_ is None:
                    raise InvalidRequest("response_format of type 'json_schema' needs json_schema.schema",
                                         "response_format.json_schema.schema" if rf.json_schema
                                         else "response_format.json_schema")
                asked.append(("response_format.json_schema.schema", {"json": rf.json_schema.schema_}))
            elif rf.type != "text":
                raise InvalidRequest(f"response_format.type must be 'text', 'json_object' or 'json_schema', "
                                     f"got {rf.type!r}", "response_format.type")
            elif rf.json_schema is not None:
                raise InvalidRequest("response_format.json_schema goes with type 'json_schema'",
                                     "response_format.json_schema")
        if self.structured_outputs is not None:
            fields = self.structured_outputs.model_dump(exclude_none=True)
            if "json_" in fields:
                fields["json"] = fields.pop("json_")
            asked.append(("structured_outputs", fields))
        for name, kind in GUIDED_FIELDS.items():
            if getattr(self, name) is not None:
                asked.append((name, {kind: getattr(self, name)}))
        if not asked:
            return None
        if len(asked) > 1:
            raise InvalidRequest(f"{asked[1][0]} cannot be combined with {asked[0][0]}: ask for one output "
                                 "constraint", asked[1][0].split(".", 1)[0])
        field, fields = asked[0]
        if field == "tool_choice":
            return RequestedGrammar(plan.structured_outputs, "tools")  # a bad parameters schema: the tools' fault
        try:
            params = StructuredOutputsParams(**fields)
        except ValueError as e:
            message = str(e)
            if field == "structured_outputs":  # name the sub-field where the message does
                param = message.split(" ", 1)[0].rstrip(":") if message.startswith("structured_outputs.") else field
                raise InvalidRequest(message, param) from e
            raise InvalidRequest(message.replace("structured_outputs." + next(iter(fields)), field, 1)
                                 .replace("structured_outputs", field, 1), field) from e
        if field == "structured_outputs":
            field = f"structured_outputs.{params.kind}"
        return RequestedGrammar(params, field)

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        def given(value: Any, default: Any) -> Any:
            return default if value is None else value

        grammar = self.requested_grammar()
        if grammar is not None and self.min_tokens:
            raise InvalidRequest(f"min_tokens cannot be combined with {grammar.field}: the grammar decides where "
                                 "the output may end", "min_tokens")

        try:
            return SamplingParams(
                n=self.num_samples, temperature=given(self.temperature, 1.0), top_p=given(self.top_p, 1.0),
                top_k=given(self.top_k, 0), min_p=given(self.min_p, 0.0),
                repetition_penalty=given(self.repetition_penalty, 1.0),
                presence_penalty=given(self.presence_penalty, 0.0),
                frequency_penalty=given(self.frequency_penalty, 0.0), seed=self.seed, max_tokens=max_tokens,
                min_tokens=given(self.min_tokens, 0), stop=self.stop, stop_token_ids=self.stop_token_ids,
                ignore_eos=given(self.ignore_eos, False),
                include_stop_str_in_output=given(self.include_stop_str_in_output, False),
                skip_special_tokens=given(self.skip_special_tokens, True), logprobs=logprobs,
                prompt_logprobs=self.prompt_logprobs, logit_bias=self._logit_bias(),
                structured_outputs=grammar.params if grammar is not None else None)
        except ValueError as e:
            message = str(e)
            # SamplingParams' messages start with the parameter's name.
            raise InvalidRequest(message, param=message.split(" ", 1)[0]) from e


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    # vLLM's: only its default (the tokenizer's special tokens around a text prompt)
    add_special_tokens: bool | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            prompts: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise InvalidRequest("prompt must not be empty", "prompt")
        return prompts

    def sampling_params(self) -> SamplingParams:
        self._check_common()
        if self.add_special_tokens is False:
            raise InvalidRequest("add_special_tokens false is not supported on completions", "add_special_tokens")
        if self.best_of is not None and self.best_of != self.num_samples:
            raise InvalidRequest("best_of must equal n (kvmem returns every sample it draws)", "best_of")
        if self.echo and self.logprobs is not None and self.stream:
            raise InvalidRequest("echo with logprobs is not supported when streaming", "echo")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")
        params = self._sampling_params(self.max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None and self.prompt_logprobs is None:
            params.prompt_logprobs = self.logprobs  # echoed tokens carry logprobs too (as in vLLM)
        return params


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None  # the schema is always enforced where kvmem enforces it


class ToolDefinition(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_call_id, ... reach the template

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: as many as fit in the context
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict[str, Any] | None = None
    _tool_plan: ToolPlan | None = PrivateAttr(None)
    _tools_planned: bool = PrivateAttr(False)
    # vLLM's extras
    add_generation_prompt: bool | None = None
    add_special_tokens: bool | None = None  # only its default (false: the template writes them)
    echo: bool | None = None  # vLLM's chat echo: only false
    chat_template_kwargs: dict[str, Any] | None = None

    def conversation(self) -> list[dict[str, Any]]:
        messages = [m.model_dump(exclude_none=True) for m in self.messages]
        for message in messages:
            if message.get("tool_calls") and "content" not in message:
                # A call without words: empty content, as vLLM renders it (templates without tool
                # support read message['content'] of every turn).
                message["content"] = ""
            # OpenAI sends a call's arguments as JSON text; templates expect the object (vLLM does this too).
            for call in message.get("tool_calls") or []:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except ValueError:
                        pass  # not JSON: the template gets the text
        return messages

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template receives them (transformers' `tools=`)."""
        return [t.model_dump(exclude_none=True, by_alias=True) for t in self.tools] if self.tools else None

    def plan_tools(self, parser_name: str | None, auto_enabled: bool) -> ToolPlan | None:
        """What tools and tool_choice ask for (see kvmem.tools.choice); None without tools. Call
        before sampling_params(), which then adds what enforces the choice."""
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise InvalidRequest("tools must have distinct function names", "tools")
        try:
            plan = plan_tools([t.function.model_dump(exclude_none=True, by_alias=True) for t in self.tools or []],
                              self.tool_choice, self.parallel_tool_calls is not False, parser_name, auto_enabled)
        except ValueError as e:
            raise InvalidRequest(str(e), "tool_choice") from e
        self._tool_plan = plan if plan.mode != "none" else None
        self._tools_planned = True
        return self._tool_plan

    def check_roles(self) -> None:
        """OpenAI refuses an unknown role (400 naming messages[i].role); a template would render
        it as if it were a real turn."""
        for i, message in enumerate(self.messages):
            if message.role not in CHAT_ROLES:
                why = " (the legacy function role: send tool results with role tool)" if message.role == "function" else ""
                raise InvalidRequest(f"Invalid value: {message.role!r}{why}. Supported roles are: "
                                     f"{', '.join(CHAT_ROLES)}.", f"messages[{i}].role", code="invalid_value")

    def sampling_params(self) -> SamplingParams:
        self._check_common()
        self.check_roles()
        if not self._tools_planned:
            self.plan_tools(None, False)  # without the server's settings "auto" is refused, never ignored
        if self.add_special_tokens:
            raise InvalidRequest("add_special_tokens true is not supported on chat completions", "add_special_tokens")
        if self.echo:
            raise InvalidRequest("echo is not supported on chat completions", "echo")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise InvalidRequest("top_logprobs needs logprobs to be true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise InvalidRequest(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                                     "top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)



class TokenizeRequest(_Body):
    """POST /tokenize (vLLM's): a text prompt, or chat messages rendered by the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    return_token_strs: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("send exactly one of prompt and messages", "prompt" if self.prompt is None
                                 else "messages")
        if self.messages is not None:
            if not self.messages:
                raise InvalidRequest("messages must not be empty", "messages")
            ChatCompletionRequest.check_roles(self)  # same rule as chat completions
        elif self.add_generation_prompt is not None or self.chat_template_kwargs is not None:
            raise InvalidRequest("add_generation_prompt and chat_template_kwargs go with messages",
                                 "add_generation_prompt" if self.add_generation_prompt is not None
                                 else "chat_template_kwargs")
        if self.continue_final_message:
            raise InvalidRequest("continue_final_message is not supported", "continue_final_message")

    def conversation(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages or []]


class DetokenizeRequest(_Body):
    """POST /detokenize (vLLM's)."""

    model: str | None = None
    tokens: list[int]
