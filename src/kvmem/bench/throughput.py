"""`kvmem bench throughput`: offline generation speed on a fixed, seeded workload.

The workloads (`kvmem.bench.workloads`) are token ids that the peer scripts in benchmarks/peers draw
identically, so every engine sees the same prompts. Every request generates exactly its output
length (greedy, ignore_eos); the whole workload is submitted at once and timed as one `generate`.

`structured_output_ratio` puts that fraction of the requests (spread evenly) under a JSON schema
(`BENCH_SCHEMA`): an array of person records with more items required than any output length
holds, so a constrained request also generates exactly its output length, every token through the
grammar's mask -- the cost of structured outputs, on the same token counts.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvmem.bench.machine_load import timed
from kvmem.bench.workloads import Workload, make_workload, random_prompts  # noqa: F401  (re-exported)


# Objects with strings, integers and a nested array: the masks vary (string bodies allow most of the
# vocabulary, numbers and punctuation few tokens). minItems keeps the grammar from ever completing.
BENCH_SCHEMA = {"type": "array", "minItems": 100000, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                                     "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                              "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}}


def constrained_indices(num_requests: int, ratio: float) -> list[int]:
    """Which requests go under the schema: round(ratio * n) of them, spread evenly over the workload."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"structured_output_ratio must be in [0, 1], got {ratio}")
    return [i for i in range(num_requests) if int((i + 1) * ratio + 0.5) > int(i * ratio + 0.5)]


@dataclass
class ThroughputResult:
    workload: str
    num_prompts: int
    input_tokens: int
    output_tokens: int
    elapsed_s: float
    requests_per_s: float
    total_tokens_per_s: float
    output_tokens_per_s: float
    settings: dict = field(default_factory=dict)
    engine: str = "kvmem"


def run_throughput(workload: str = "random", num_prompts: int | None = None, input_len: int = 128,
                   output_len: int = 128, seed: int = 0, warmup: bool = True, wait_quiet_max: float = 0.0,
                   structured_output_ratio: float = 0.0, **llm_kwargs) -> ThroughputResult:
    """`wait_quiet_max`: wait up to this many seconds for other processes to leave the CPU before the
    timed run (on a shared 2-core machine one busy neighbour slows an OpenMP engine severalfold)."""
    from kvmem import LLM

    with LLM(**llm_kwargs) as llm:
        return _run(llm, workload, num_prompts, input_len, output_len, seed, warmup, wait_quiet_max, llm_kwargs,
                    structured_output_ratio)


def _run(llm, workload: str, num_prompts: int | None, input_len: int, output_len: int, seed: int, warmup: bool,
         wait_quiet_max: float, llm_kwargs: dict, structured_output_ratio: float = 0.0) -> ThroughputResult:
    from kvmem import SamplingParams, StructuredOutputsParams

    engine = llm.engine
    w: Workload = make_workload(workload, engine.model_config.vocab_size, seed, num_prompts, input_len, output_len)
    if w.max_seq_len > engine.max_model_len:
        raise ValueError(f"the {workload} workload needs max_model_len >= {w.max_seq_len}, "
                         f"the engine has {engine.max_model_len}")
    # ignore_eos alone makes every request produce exactly max_tokens (as in vLLM's benchmark)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in w.output_lens]
    constrained = constrained_indices(len(params), structured_output_ratio)
    if constrained:
        schema = StructuredOutputsParams(json=BENCH_SCHEMA)
        for i in constrained:
            params[i] = SamplingParams(temperature=0, max_tokens=w.output_lens[i], ignore_eos=True,
                                       structured_outputs=schema)
        llm.engine.grammars.compile(schema)  # compiled once, before the clock (then cached)
    if warmup:  # first calls pay for allocator growth and kernel selection
        llm.generate([{"prompt_token_ids": p[:64]} for p in w.prompts[:4]],
                     SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        llm.release_free_memory()  # the warm-up must not give the timed run prefix-cache hits
    outputs, elapsed, contention, quiet = timed(
        lambda: llm.generate([{"prompt_token_ids": p} for p in w.prompts], params, use_tqdm=False), wait_quiet_max)
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    if num_out != w.num_output_tokens:
        raise RuntimeError(f"ignore_eos run produced {num_out} tokens, expected {w.num_output_tokens}")
    stats = engine.stats()
    settings = dict(llm_kwargs, dtype=str(engine.dtype).removeprefix("torch."), kv_cache=engine.kv_cache_strategy,
                    max_model_len=engine.max_model_len, torch=torch.__version__, threads=torch.get_num_threads(),
                    machine=platform.machine(), processor=platform.processor() or platform.machine(),
                    seed=seed, num_preemptions=engine.load().num_preemptions,
                    prefix_cache_hit_tokens=stats.prefix_cache_hits, workload_description=w.describe(),
                    cpu_contention=contention, wait_quiet=quiet, structured_output_ratio=structured_output_ratio,
                    num_structured_requests=len(constrained))
    n = len(w.prompts)
    return ThroughputResult(workload, n, w.num_input_tokens, num_out, elapsed, n / elapsed,
                            (w.num_input_tokens + num_out) / elapsed, num_out / elapsed, settings)


def write_json(result: ThroughputResult, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
