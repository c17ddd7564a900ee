"""The request stream of `kvmem bench memory`: ShareGPT-like log-normal lengths, seeded.

Prompt lengths have median 200 and sigma 1.0 (log space), clipped to [4, 1024]; output lengths
median 150, sigma 1.0, clipped to [1, 512]; prompt + output never exceeds max_model_len. sigma = 1.0
gives the long right tail of chat traffic (mean about 1.65x the median before clipping; about 5% of
prompts and 11% of outputs reach the caps). Token ids are random (numpy default_rng), so prefix
caching, left on, finds (almost) nothing. Arrivals: all at step 0 (default), or Poisson with
`request_rate` requests per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class StreamConfig:
    """The request stream: log-normal lengths (median, sigma in log space), clipped."""

    num_requests: int = 2000
    prompt_median: float = 200.0
    prompt_sigma: float = 1.0
    output_median: float = 150.0
    output_sigma: float = 1.0
    min_prompt: int = 4
    max_prompt: int = 1024
    min_output: int = 1
    max_output: int = 512
    request_rate: float = math.inf  # requests per step; inf = all arrive at step 0
    vocab_size: int = 49152  # SmolLM2's
    seed: int = 0


@dataclass
class RequestSpec:
    prompt_token_ids: list[int]
    output_len: int
    arrival_step: int


def make_stream(cfg: StreamConfig, max_model_len: int) -> list[RequestSpec]:
    """Log-normal prompt and output lengths, clipped; arrival steps all 0 or Poisson."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_requests
    prompts = np.clip(np.rint(rng.lognormal(math.log(cfg.prompt_median), cfg.prompt_sigma, n)),
                      cfg.min_prompt, min(cfg.max_prompt, max_model_len - 1)).astype(int)
    outputs = np.clip(np.rint(rng.lognormal(math.log(cfg.output_median), cfg.output_sigma, n)),
                      cfg.min_output, cfg.max_output).astype(int)
    outputs = np.minimum(outputs, max_model_len - prompts)  # the whole sequence fits max_model_len
    if math.isinf(cfg.request_rate):
        arrivals = np.zeros(n, dtype=int)
    else:
        if cfg.request_rate <= 0:
            raise ValueError(f"request_rate must be positive (requests per step) or inf, got {cfg.request_rate}")
        arrivals = np.floor(np.cumsum(rng.exponential(1.0 / cfg.request_rate, n))).astype(int)
    ids = rng.integers(100, cfg.vocab_size - 100, size=int(prompts.sum())).tolist()
    out, start = [], 0
    for p, o, a in zip(prompts.tolist(), outputs.tolist(), arrivals.tolist()):
        out.append(RequestSpec(ids[start:start + p], o, a))
        start += p
    return out


def stream_summary(stream: list[RequestSpec]) -> dict:
    def describe(values: list[int]) -> dict:
        a = np.asarray(values)
        return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99)),
                "min": int(a.min()), "max": int(a.max())}
    return {"prompt_len": describe([len(r.prompt_token_ids) for r in stream]),
            "output_len": describe([r.output_len for r in stream]),
            "total_prompt_tokens": sum(len(r.prompt_token_ids) for r in stream),
            "total_output_tokens": sum(r.output_len for r in stream),
            "last_arrival_step": max(r.arrival_step for r in stream)}
