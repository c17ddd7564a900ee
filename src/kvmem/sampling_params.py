"""Per-request sampling settings, shaped like vLLM's `SamplingParams` so code written for vLLM ports over.

Everything is validated once, here, so the sampler and detokenizer can trust the values and stay
free of checks on the hot path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvmem.structured_outputs.params import StructuredOutputsParams

# vLLM's default `max_logprobs`: asking for more top tokens per step than this is refused.
MAX_LOGPROBS = 20

# OpenAI's bound on a logit bias, and on how many tokens one request may bias (each entry is a
# scatter into the row's logits at every step).
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 300

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS). Dividing float32 logits by a tinier one
# overflows to +-inf, and softmax of several infinities is NaN: temperature=1e-40 then sampled the
# *least* likely token instead of the most likely one.
SAMPLING_EPS = 1e-5


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but `top_k=True` is a bug in the caller, not a 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value):
        expected = "an int or None" if allow_none else "an int"
        raise ValueError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


def _check_float(name: str, value: Any) -> float:
    """Accepts ints and floats (not bools, not strings, not NaN/inf); returns a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    - `temperature == 0` is greedy decoding (see `greedy`), and so is any temperature below
      `SAMPLING_EPS`. Greedy with `n > 1` is allowed, as in
      vLLM, but every one of the n samples is then the same sequence.
    - `top_k` of 0 or -1 turns top-k off; `top_p == 1` and `min_p == 0` turn those off.
    - `max_tokens=None` means "as many as fit": the engine resolves it to `max_model_len - prompt`.
    - `logprobs=k` returns, per generated token, the chosen token's logprob and the k most likely
      tokens' (k = 0: only the chosen one's); at most `MAX_LOGPROBS`. They are computed from the raw
      model logits, before penalties and temperature, as vLLM does by default.
    - `prompt_logprobs=k` returns, per prompt token after the first, its logprob given the tokens
      before it and the k most likely tokens' there (vLLM's); at most `MAX_LOGPROBS`. Such a request
      takes no prefix-cache hit (every prompt row's logits are computed), as in vLLM.
    - `logit_bias` maps token ids to a bias in [-100, 100] added to that token's logit before
      sampling (greedy too), after the penalties; at most `MAX_LOGIT_BIAS_ENTRIES` entries. Ids
      outside the vocabulary are refused by the engine, which knows its size.
    - `stop` strings end generation when they appear in the output text; the text is cut before
      them unless `include_stop_str_in_output`. `stop_token_ids` end it on those token ids.
    - `min_tokens` forbids EOS / `stop_token_ids` (and stop strings) until that many tokens exist.
    - `structured_outputs` (vLLM's `StructuredOutputsParams`, or a dict of its fields) constrains the
      output to a JSON schema, any JSON object, a regex, one of several strings, or a grammar; the
      request ends when the grammar is complete and the model ends it (or at max_tokens, cut short).
      It cannot be combined with `min_tokens` (the grammar says where the output may end).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

        self.temperature = _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

        self.top_p = _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

        _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (both disable it) or >= 1, got {self.top_k}")

        self.min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
            setattr(self, name, value)

        _check_int("seed", self.seed, allow_none=True)

        _check_int("max_tokens", self.max_tokens, allow_none=True)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")

        _check_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")

        self.stop = self._normalize_stop(self.stop)
        self.stop_token_ids = self._normalize_stop_token_ids(self.stop_token_ids)

        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check_bool(name, getattr(self, name))

        _check_int("logprobs", self.logprobs, allow_none=True)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}] or None, got {self.logprobs}")

        _check_int("prompt_logprobs", self.prompt_logprobs, allow_none=True)
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}] or None, got {self.prompt_logprobs}")

        self.logit_bias = self._normalize_logit_bias(self.logit_bias)

        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:  # a key that is not a field
                raise ValueError(f"structured_outputs: {e}") from e
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError("structured_outputs must be a StructuredOutputsParams or a dict of its fields, "
                                 f"got {type(self.structured_outputs).__name__}")
            if self.min_tokens:
                raise ValueError("min_tokens cannot be combined with structured_outputs: the grammar decides "
                                 "where the output may end")

    @staticmethod
    def _normalize_logit_bias(bias: Any) -> dict[int, float] | None:
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias or None, got {type(bias).__name__}")
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(bias)}")
        out: dict[int, float] = {}
        for token, value in bias.items():
            if not _is_int(token) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {token!r}")
            value = _check_float("logit_bias", value)
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for token {token}")
            out[token] = value
        return out or None

    @staticmethod
    def _normalize_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        elif not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a string, a list of strings or None, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain only non-empty strings, got {s!r}")
        return list(stop)

    @staticmethod
    def _normalize_stop_token_ids(ids: Any) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of ints or None, got {type(ids).__name__}")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must contain only ints >= 0, got {t!r}")
        return list(ids)

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or one so small (< SAMPLING_EPS) that sampling at it is
        argmax anyway, save for float overflow. With n > 1 every sample is identical (allowed, as
        in vLLM)."""
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def max_stop_len(self) -> int:
        """Length of the longest stop string (0 without any)."""
        return max((len(s) for s in self.stop), default=0)
