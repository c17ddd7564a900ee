"""Profile kvmem's decode steps: where one step of `--num-prompts` sequences spends its time.

    .venv/bin/python benchmarks/profile_decode.py [--dtype bfloat16] [--kv-cache paged]

Prefills the throughput workload's prompts, times 10 decode steps, then prints torch.profiler's
table for 3 more, grouped by operator and input shape, and a cProfile of 20 more: the native
kernels (attention, fused small ops) are pybind calls that torch.profiler does not list, and
cProfile also shows the Python around the ops (the source of docs/performance.md's tables).
"""

import argparse
import cProfile
import pstats
import time

from torch.profiler import ProfilerActivity, profile

from kvmem import LLM, SamplingParams
from kvmem.bench.throughput import random_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-cache", default="paged")
    ap.add_argument("--kv-cache-memory", default="2GiB")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    args = ap.parse_args()

    llm = LLM(dtype=args.dtype, kv_cache=args.kv_cache, kv_cache_memory=args.kv_cache_memory)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    for prompt in random_prompts(args.num_prompts, args.input_len, engine.model_config.vocab_size):
        engine.add_request({"prompt_token_ids": prompt}, params)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                          for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):  # warm up the decode path
        engine.step()
    start = time.perf_counter()
    for _ in range(10):
        engine.step()
    print(f"decode step: {(time.perf_counter() - start) / 10 * 1000:.1f} ms "
          f"({args.num_prompts} sequences, {args.dtype}, {args.kv_cache})")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            engine.step()
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15,
                                                             max_name_column_width=30, max_shapes_column_width=70))
    steps = 20
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    profiler.disable()
    stats = pstats.Stats(profiler)
    print(f"cProfile, {steps} steps: ms per step by function (self time), largest first")
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]  # (file, line, name) -> (.., .., tottime, ..)
    for (file, line, name), (_, _, tottime, _, _) in rows:
        where = name if file == "~" else f"{file.rsplit('/', 1)[-1]}:{line}({name})"
        print(f"  {tottime / steps * 1e3:7.2f}  {where}")
    print(f"  {sum(v[2] for v in stats.stats.values()) / steps * 1e3:7.2f}  total")


if __name__ == "__main__":
    main()
