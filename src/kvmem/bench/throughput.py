"""`kvmem bench throughput`: offline generation speed on a fixed random workload.

The workload is `num_prompts` prompts of `input_len` random token ids, each generating exactly
`output_len` tokens (greedy, ignore_eos). The ids come from numpy's default_rng(seed), the same
recipe the peer scripts in benchmarks/peers use, so every engine sees identical prompts.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch


def random_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Token ids away from both ends of the vocabulary, where special tokens usually sit."""
    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab_size - 100, size=(num_prompts, input_len)).tolist()


@dataclass
class ThroughputResult:
    num_prompts: int
    input_len: int
    output_len: int
    elapsed_s: float
    requests_per_s: float
    total_tokens_per_s: float
    output_tokens_per_s: float
    settings: dict = field(default_factory=dict)


def run_throughput(num_prompts: int = 64, input_len: int = 128, output_len: int = 128, seed: int = 0,
                   warmup: bool = True, **llm_kwargs) -> ThroughputResult:
    from kvmem import LLM, SamplingParams

    llm = LLM(**llm_kwargs)
    engine = llm.engine
    prompts = random_prompts(num_prompts, input_len, engine.model_config.vocab_size, seed)
    # ignore_eos alone makes every request produce exactly max_tokens (as in vLLM's benchmark)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    if warmup:  # first calls pay for allocator growth and kernel selection
        llm.generate([{"prompt_token_ids": p} for p in prompts[:4]],
                     SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        llm.release_free_memory()  # the warm-up must not give the timed run prefix-cache hits
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert num_out == num_prompts * output_len, "ignore_eos run ended early"
    settings = dict(llm_kwargs, dtype=str(engine.dtype).removeprefix("torch."), kv_cache=engine.manager.name,
                    max_model_len=engine.max_model_len, torch=torch.__version__, threads=torch.get_num_threads(),
                    machine=platform.machine(), processor=platform.processor() or platform.machine(),
                    seed=seed, num_preemptions=engine.scheduler.counters.num_preemptions)
    return ThroughputResult(num_prompts, input_len, output_len, elapsed, num_prompts / elapsed,
                            num_prompts * (input_len + output_len) / elapsed, num_out / elapsed, settings)


def write_json(result: ThroughputResult, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
