"""The OpenAI API's request bodies, validated, and their translation into `SamplingParams`.

Types are strict (a string is not a number, a float is not an int, a bool is neither), so a
malformed body is a 400 naming the field, not a coerced value. Fields the OpenAI API defines but
kvmem cannot honour (`suffix`, `logit_bias`, `tools`, JSON response formats) are refused with a
400 rather than silently ignored; fields nobody defined are ignored, as vLLM does, so clients that
send vendor extras keep working.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kvmem.sampling_params import MAX_LOGPROBS, SamplingParams

# OpenAI's limit on samples per request; without one, `n` alone could ask for millions of sequences.
MAX_N = 128
# Every generated token is checked against every stop string (cost ~ their total length, per token,
# per sample) and every stop token id: 10,000 stop strings made each step of an n=128 request take
# a second more. OpenAI allows 4 stop strings; these bounds leave room for any real client.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 128
MAX_STOP_TOKEN_IDS = 64
# The roles a chat template may see. "tool" (and the older "function") carry tool results, which only
# follow tool calls: refused like `tools` itself.
CHAT_ROLES = ("system", "user", "assistant", "developer")


class InvalidRequest(ValueError):
    """A request the server refuses; `param` names the offending field (OpenAI's error body)."""

    def __init__(self, message: str, param: str | None = None, status_code: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status_code = status_code
        self.code = code


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """What completions and chat share; the names are OpenAI's, then vLLM's extras."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def _check_common(self) -> None:
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported", "logit_bias")
        if self.n > MAX_N:
            raise InvalidRequest(f"n must be <= {MAX_N}, got {self.n}", "n")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise InvalidRequest(f"each stop string may be at most {MAX_STOP_STRING_CHARS} characters long", "stop")
        if self.stop_token_ids is not None and len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, "
                                 f"got {len(self.stop_token_ids)}", "stop_token_ids")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", "stream_options")

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        def given(value: Any, default: Any) -> Any:
            return default if value is None else value

        try:
            return SamplingParams(
                n=self.n, temperature=given(self.temperature, 1.0), top_p=given(self.top_p, 1.0),
                top_k=given(self.top_k, 0), min_p=given(self.min_p, 0.0),
                repetition_penalty=given(self.repetition_penalty, 1.0),
                presence_penalty=given(self.presence_penalty, 0.0),
                frequency_penalty=given(self.frequency_penalty, 0.0), seed=self.seed, max_tokens=max_tokens,
                min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens, logprobs=logprobs)
        except ValueError as e:
            message = str(e)
            # SamplingParams' messages start with the parameter's name.
            raise InvalidRequest(message, param=message.split(" ", 1)[0]) from e


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

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
        if self.suffix:
            raise InvalidRequest("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequest("best_of must equal n (kvmem returns every sample it draws)", "best_of")
        if self.echo and self.logprobs is not None:
            raise InvalidRequest("echo with logprobs is not supported (prompt logprobs are not computed)", "echo")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")
        return self._sampling_params(self.max_tokens, self.logprobs)


class ChatMessage(_Body):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_call_id, ... reach the template

    role: str
    content: str | list[dict[str, Any]] | None = None


class ResponseFormat(_Body):
    type: str


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: as many as fit in the context
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # vLLM's extras
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def conversation(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]

    def check_roles(self) -> None:
        """OpenAI refuses an unknown role (400 naming messages[i].role); a template would render
        it as if it were a real turn."""
        for i, message in enumerate(self.messages):
            if message.role not in CHAT_ROLES:
                why = (" (tool results need tools, which are not supported)" if message.role in ("tool", "function")
                       else "")
                raise InvalidRequest(f"Invalid value: {message.role!r}{why}. Supported roles are: "
                                     f"{', '.join(CHAT_ROLES)}.", f"messages[{i}].role", code="invalid_value")

    def sampling_params(self) -> SamplingParams:
        self._check_common()
        self.check_roles()
        if self.tools:
            raise InvalidRequest("tools are not supported", "tools")
        if self.tool_choice not in (None, "none"):
            raise InvalidRequest("tool_choice is not supported", "tool_choice")
        if self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequest(f"response_format {self.response_format.type!r} is not supported; "
                                 "only 'text'", "response_format")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise InvalidRequest("top_logprobs needs logprobs to be true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise InvalidRequest(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                                     "top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)

