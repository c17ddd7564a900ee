"""kv_cache="hybrid" on this CPU: throughput and host-tier residency at a small device budget.

    .venv/bin/python benchmarks/hybrid_cpu.py [--num-prompts 32 --input-len 256 --output-len 64
                                               --device-memory 24MiB --host-memory 512MiB]

Runs, back to back on the embedded SmolLM2 (dtype auto) and the same random prompts (greedy,
ignore_eos): paged with the device budget alone (what does not fit waits or is preempted), paged with
a roomy budget (the ceiling), and hybrid with act_ratio 0, 0.5 and 1 (plus 0.5 with inline copies and
with streamed weights). On a CPU both tiers are host memory: the numbers say what the schedule costs
here, not what a GPU would gain. Each run waits for a quiet machine (kvmem.bench.machine_load) and
records the CPU other processes took meanwhile. Writes benchmarks/results/hybrid/engine_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from kvmem import LLM, SamplingParams
from kvmem.bench.machine_load import timed

RUNS = [
    ("paged, roomy budget", dict(kv_cache="paged", kv_cache_memory="1GiB"), {}),
    ("paged, device budget only", dict(kv_cache="paged", kv_cache_memory="{device}"), {}),
    ("hybrid act_ratio=0", dict(kv_cache="hybrid", act_ratio=0.0), {}),
    ("hybrid act_ratio=0.5", dict(kv_cache="hybrid", act_ratio=0.5), {}),
    ("hybrid act_ratio=1", dict(kv_cache="hybrid", act_ratio=1.0), {}),
    ("hybrid act_ratio=0, inline copies", dict(kv_cache="hybrid", act_ratio=0.0), {"KVMEM_HYBRID_INLINE_COPIES": "1"}),
    ("hybrid act_ratio=0.5, inline copies", dict(kv_cache="hybrid", act_ratio=0.5), {"KVMEM_HYBRID_INLINE_COPIES": "1"}),
    ("hybrid act_ratio=0.5, offload_weights", dict(kv_cache="hybrid", act_ratio=0.5, offload_weights=True), {}),
    ("hybrid act_ratio=None (cost model)", dict(kv_cache="hybrid"), {}),
]


def run_one(name: str, kw: dict, env: dict, prompts, params, wait_quiet_max: float, max_model_len: int) -> dict:
    os.environ.pop("KVMEM_HYBRID_INLINE_COPIES", None)
    os.environ.update(env)
    llm = LLM(max_model_len=max_model_len, **kw)
    # Warm-up on the whole batch (allocator growth, the host tier's first touch), few tokens.
    llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=4),
                 use_tqdm=False)
    llm.release_free_memory()  # the timed run must not hit the warm-up's cached prefixes
    before = dict(llm.stats().extra, num_preemptions=llm.engine.scheduler.counters.num_preemptions)
    outs, elapsed, contention, quiet = timed(
        lambda: llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False), wait_quiet_max)
    stats = llm.stats()
    x = dict(stats.extra)
    for counter in ("num_host_admitted", "num_offloaded", "num_recomputed_tokens"):  # the timed run's share
        if counter in x:
            x[counter] -= before[counter]
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return dict(run=name, settings={**kw, **env}, elapsed_s=round(elapsed, 3),
                output_tokens_per_s=round(num_out / elapsed, 1),
                tokens=[o.outputs[0].token_ids for o in outs],
                num_preemptions=llm.engine.scheduler.counters.num_preemptions - before["num_preemptions"],
                max_host_resident=x.get("max_host_resident"), num_host_admitted=x.get("num_host_admitted"),
                num_offloaded=x.get("num_offloaded"), num_recomputed_tokens=x.get("num_recomputed_tokens"),
                max_minibatches_per_step=x.get("max_minibatches_per_step"),
                act_ratio=x.get("act_ratio"), act_ratio_reason=x.get("act_ratio_reason"),
                device_bytes=x.get("device_bytes_physical", stats.bytes_physical),
                host_bytes=x.get("host_bytes_physical", 0), cpu_contention=contention, wait_quiet=quiet)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--device-memory", default="24MiB")
    ap.add_argument("--host-memory", default="512MiB")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2, help="every run once per round, in turn; the best is kept")
    ap.add_argument("--wait-quiet-max", type=float, default=60.0)
    ap.add_argument("--json", default="benchmarks/results/hybrid/engine_cpu.json")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (args.input_len,), generator=g).tolist() for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    results: dict[str, list[dict]] = {name: [] for name, _, _ in RUNS}
    for _ in range(args.rounds):
        reference = None
        for name, kw, env in RUNS:
            kw = {k: (v.format(device=args.device_memory) if isinstance(v, str) else v) for k, v in kw.items()}
            if kw["kv_cache"] == "hybrid":
                kw.update(device_memory=args.device_memory, host_memory=args.host_memory)
            row = run_one(name, kw, env, prompts, params, args.wait_quiet_max, args.max_model_len)
            tokens = row.pop("tokens")
            if name == "paged, roomy budget":
                reference = tokens
            # bf16 greedy tokens depend on the batch's composition (rounding): count, don't require
            row["sequences_identical_to_paged_roomy"] = None if reference is None else \
                sum(a == b for a, b in zip(tokens, reference))
            results[name].append(row)
            print(f"{name:40s} {row['output_tokens_per_s']:7.1f} out tok/s  preempt {row['num_preemptions']:3d}  "
                  f"host-resident max {row['max_host_resident']} (admitted {row['num_host_admitted']})  "
                  f"other CPU {row['cpu_contention']['other_cores']}", flush=True)
    best = {name: max(rows, key=lambda r: r["output_tokens_per_s"]) for name, rows in results.items()}
    print("\nbest of rounds:")
    for name, row in best.items():
        print(f"  {name:40s} {row['output_tokens_per_s']:7.1f} out tok/s  (all: "
              f"{[r['output_tokens_per_s'] for r in results[name]]})")
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), torch=torch.__version__,
                threads=torch.get_num_threads(), processor=platform.processor() or platform.machine(),
                num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                device_memory=args.device_memory, host_memory=args.host_memory, max_model_len=args.max_model_len,
                rounds=args.rounds)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta=meta, best=best, all_rounds=results), indent=2, default=str) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
