"""What generation returns, shaped like vLLM's `RequestOutput` so code written for vLLM reads it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token; None when not computed
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # per generated token: top tokens (+ the chosen one)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or token id, when finish_reason == "stop"
    # Text that appeared since this sequence's previous output, for streaming. A tail that could be
    # the start of a stop string is held back until it is known not to be one, so concatenating the
    # deltas gives `text` exactly, and nothing a stop string cuts is ever sent.
    text_delta: str = ""

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # With SamplingParams.prompt_logprobs: per prompt token, None for the first, then the token's
    # own logprob (with its rank) plus the top ones. None until the whole prompt is computed.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    metrics: dict = field(default_factory=dict)
