"""The offline throughput workloads, as token ids, shared by kvmem and the peer engines.

Standard library and numpy only: the peer scripts in benchmarks/peers load this file by path inside
other engines' virtual environments (where kvmem is not installed), so every engine draws exactly
the same prompts and output lengths from the same seed.

- `random`: `num_prompts` prompts of `input_len` random ids, each → `output_len` tokens (default
  64 × 128 → 128).
- `sharegpt`: 256 requests with ShareGPT-like log-normal lengths (median ~200 in, ~150 out; σ 0.8),
  capped at 1,024 in and 512 out.
- `prefix`: 128 requests sharing one 512-token system prompt, each with 32 own tokens → 64 out.

Ids are drawn from [100, vocab_size - 100), away from the special tokens at either end. Every
request generates exactly its output length (greedy, ignore_eos).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

WORKLOADS = ("random", "sharegpt", "prefix")


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_input_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def max_seq_len(self) -> int:
        return max(len(p) + o for p, o in zip(self.prompts, self.output_lens))

    def describe(self) -> str:
        ins = [len(p) for p in self.prompts]
        return (f"{self.name}: {len(self.prompts)} requests, input {min(ins)}–{max(ins)} "
                f"(mean {np.mean(ins):.0f}), output {min(self.output_lens)}–{max(self.output_lens)} "
                f"(mean {np.mean(self.output_lens):.0f})")


def random_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """One (num_prompts, input_len) matrix of ids: the recipe every engine's benchmark uses."""
    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab_size - 100, size=(num_prompts, input_len)).tolist()


def make_workload(name: str, vocab_size: int, seed: int = 0, num_prompts: int | None = None,
                  input_len: int = 128, output_len: int = 128) -> Workload:
    """`num_prompts` overrides a workload's request count; `input_len`/`output_len` apply to `random`."""
    if vocab_size <= 200:
        raise ValueError(f"vocab_size must be > 200 (ids come from [100, vocab_size - 100)), got {vocab_size}")
    if name == "random":
        n = 64 if num_prompts is None else num_prompts
        return Workload(name, random_prompts(n, input_len, vocab_size, seed), [output_len] * n)
    rng = np.random.default_rng(seed)
    if name == "sharegpt":
        n = 256 if num_prompts is None else num_prompts
        ins = np.clip(np.rint(rng.lognormal(math.log(200), 0.8, n)), 4, 1024).astype(int).tolist()
        outs = np.clip(np.rint(rng.lognormal(math.log(150), 0.8, n)), 1, 512).astype(int).tolist()
        prompts = [rng.integers(100, vocab_size - 100, size=k).tolist() for k in ins]
        return Workload(name, prompts, outs)
    if name == "prefix":
        n = 128 if num_prompts is None else num_prompts
        system = rng.integers(100, vocab_size - 100, size=512).tolist()
        own = rng.integers(100, vocab_size - 100, size=(n, 32)).tolist()
        return Workload(name, [system + o for o in own], [64] * n)
    raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {name!r}")
