"""Where a batch-1 decode step's time goes (kvmem, one GGUF, --quantization gguf|none): the step's
wall time split into the model's forward (and in it the linear layers, attention, norms, ...), the
sampler and the engine's own Python (scheduling, metadata, detokenizing), from torch.profiler's
operator self-times over a steady run of decode steps, next to the weight-bandwidth floor (bytes of
weights read per token / the machine's copy bandwidth measured here).

    PYTHONPATH=src python benchmarks/batch1_step_profile.py --quantization gguf --threads 2
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import replace

import torch


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes/s of a large copy (read + write) with this process's threads: an upper bound on how fast
    weights can stream from memory."""
    a = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def main() -> None:
    from kvmem import LLM, SamplingParams
    from kvmem.engine.llm_engine import model_bytes
    from kvmem.models.loader import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--quantization", default="gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    llm = LLM(model=args.gguf or default_model_path(), quantization=args.quantization, num_threads=args.threads,
              enable_prefix_caching=False, kv_cache_memory="256MiB", max_model_len=1024)
    engine = llm.engine
    weight_bytes = model_bytes(engine.model)  # what the load message reports
    params = SamplingParams(temperature=0, max_tokens=args.steps + 60, ignore_eos=True)
    engine.add_request({"prompt_token_ids": list(range(100, 228))}, params)
    for _ in range(20):  # prefill + warm decode steps
        engine.step()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
    profiled = (time.perf_counter() - t0) / args.steps
    # Unprofiled: the step, and within it the model's forward (embedding, layers, lm_head: the native
    # kernels the profiler does not see) and the linear layers alone.

    spent = defaultdict(float)

    def timed(fn, key):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    engine.model.forward = timed(engine.model.forward, "forward")
    # The forward pass calls each layer's kernels as bound once (llama.LayerOps), not through the
    # modules: time those calls.
    layers, lm_head = engine.model._direct_calls
    engine.model._direct_calls = ([replace(ops, qkv=timed(ops.qkv, "linear"), o=timed(ops.o, "linear"),
                                           gate_up=timed(ops.gate_up, "linear"), down=timed(ops.down, "linear"))
                                   for ops in layers], timed(lm_head, "lm_head"))
    t0 = time.perf_counter()
    for _ in range(32):
        engine.step()
    step_s = (time.perf_counter() - t0) / 32
    engine.close()
    ops = defaultdict(float)
    count = defaultdict(int)
    for e in prof.key_averages():
        ops[e.key] += e.self_cpu_time_total / 1e6 / args.steps
        count[e.key] += e.count / args.steps
    op_total = sum(ops.values())
    bw = copy_bandwidth()
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:25]
    out = {"quantization": args.quantization, "threads": args.threads, "step_ms": 1e3 * step_s,
           "forward_ms": 1e3 * spent["forward"] / 32, "linear_layers_ms": 1e3 * spent["linear"] / 32,
           "lm_head_ms": 1e3 * spent["lm_head"] / 32,
           "step_ms_under_profiler": 1e3 * profiled, "ops_ms_per_step": 1e3 * op_total,
           "ops_per_step": sum(count.values()),
           "weights_mib": weight_bytes / 2**20, "copy_bandwidth_gb_s": bw / 1e9,
           "weight_floor_ms": 1e3 * weight_bytes / bw,
           "top_ops": [{"op": k, "ms_per_step": 1e3 * v, "calls_per_step": count[k]} for k, v in top]}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
