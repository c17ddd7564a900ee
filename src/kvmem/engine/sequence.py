"""A sequence: the unit the scheduler schedules and the memory manager holds KV for.

One request with `n` samples starts as one sequence; when its prompt is done it forks into `n`.
Prefill, chunked prefill, decode and recompute after preemption are the same thing here: each step
computes some of the tokens in `token_ids[num_computed_tokens:]`; when none are left, the sequence
samples a new token.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvmem.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvmem.engine.detokenizer import IncrementalDetokenizer
    from kvmem.outputs import Logprob

class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]  # prompt followed by output
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int  # resolved: never runs past max_model_len
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None
    seq_id: int = field(kw_only=True)  # unique within one engine (its scheduler and manager key on it)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    pending_forks: int = 0  # samples still to fork off once the prompt is computed
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    # Structured outputs: the xgrammar matcher, advanced by every output token. A preempted sequence
    # keeps its tokens and recomputes them, so the matcher's state stays right as it is.
    grammar: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def reuses_prefix_cache(self) -> bool:
        """Whether admission may take a cached prefix: not when the request asks for prompt
        logprobs, which need every prompt row's logits (as in vLLM)."""
        return self.params.prompt_logprobs is None

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
