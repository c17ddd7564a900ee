"""`kvmem bench memory`: the KV strategies `static`, `paged` and `virtual` on one request stream.

No model runs. The real `Scheduler` drives each real manager and a fake model step, so what a
strategy costs in memory is exactly what the engine would see, step for step. One concept per
module (each part is in the JSON written by `--json`, and in the PNG written by `--plot`):

1. `memory_stream`: the request stream (ShareGPT-like log-normal lengths, seeded; all at step 0 or
   Poisson arrivals).
2. `memory_sim`: one strategy over the stream (its manager built through the strategy registry),
   memory over time per strategy, waste, the kernel's resident bytes checked against `virtual`'s.
3. `memory_report`: mapping latency (`virtual` with background mapping on and off, compared), the
   targets, the summary table; `memory_plot`: the PNG.
4. `memory_attention`: decode attention, virtual (in place) vs paged (block gather).

This module holds the benchmark's configuration, `run_memory_benchmark` (all of the above, into one
JSON-ready report) and the command line (`add_memory_args`, `cmd_bench_memory`).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass, field

from kvmem.bench.memory_attention import AttentionConfig, run_attention
from kvmem.bench.memory_plot import write_plot
from kvmem.bench.memory_recording import MemoryRecorder
from kvmem.bench.memory_report import latency_report, machine_info, summary_table, targets
from kvmem.bench.memory_sim import STRATEGIES, GiB, SimConfig, StepTrace, StrategyResult, simulate
from kvmem.bench.memory_stream import StreamConfig, make_stream, stream_summary
from kvmem.bench.report_json import write_json
from kvmem.memory.virtual import VirtualOptions

DEFAULT_JSON = "benchmarks/results/memory/memory.json"


@dataclass
class MemoryBenchConfig:
    stream: StreamConfig = field(default_factory=StreamConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    strategies: tuple[str, ...] = STRATEGIES
    run_latency: bool = True
    run_attention: bool = True
    progress: bool = True
    kernel_check_every: int = 1000  # steps between mid-run kernel checks (virtual); 0 = only at the end
    record: str | None = None  # write a recording of the strategies' runs for /dashboard here
    record_frames: int = 200  # at most this many frames per strategy


def run_memory_benchmark(cfg: MemoryBenchConfig, max_trace_points: int = 600) -> tuple[dict, dict[str, StepTrace]]:
    """Everything; returns (the JSON-ready report, the full per-step traces by label)."""
    stream = make_stream(cfg.stream, cfg.sim.max_model_len)
    results: dict[str, StrategyResult] = {}
    traces: dict[str, StepTrace] = {}
    recorder = MemoryRecorder(cfg.record, cfg.record_frames) if cfg.record else None
    if recorder is not None:
        recorder.open({"stream": asdict(cfg.stream), "sim": asdict(cfg.sim), "strategies": list(cfg.strategies)})
    try:
        for strategy in cfg.strategies:
            res, tr = simulate(strategy, stream, cfg.sim, label=strategy, progress=cfg.progress,
                               kernel_check_every=cfg.kernel_check_every, recorder=recorder)
            results[strategy], traces[strategy] = res, tr
    finally:
        if recorder is not None:
            recorder.close()

    latency = None
    if cfg.run_latency and "virtual" in cfg.strategies:
        label = "virtual-no-bg"
        res, tr = simulate("virtual", stream, cfg.sim, VirtualOptions(background_mapping=False),
                           label=label, progress=cfg.progress, kernel_check_every=cfg.kernel_check_every)
        results[label], traces[label] = res, tr
        latency = latency_report(results["virtual"], res)

    attention = run_attention(cfg.attention) if cfg.run_attention else None
    report = {
        "benchmark": "memory",
        "command": " ".join(["kvmem", *sys.argv[1:]]) if sys.argv[1:3] == ["bench", "memory"] else None,
        "settings": {"stream": asdict(cfg.stream), "sim": asdict(cfg.sim),
                     "bytes_per_token": cfg.sim.spec().bytes_per_token,
                     "sampled": "each step after the fake forward pass (KV written), before finished sequences "
                                "leave",
                     "waste": "time averages as ratios of sums over steps: 1 - sum(live)/sum(allocated) and "
                              "1 - sum(live)/sum(physical); *_saturated: only steps where requests waited"},
        "machine": machine_info(),
        "stream": stream_summary(stream),
        "strategies": {k: asdict(v) for k, v in results.items()},
        "latency": latency,
        "attention": attention,
        "traces": {k: v.downsampled(max_trace_points) for k, v in traces.items()},
    }
    report["targets"] = targets(report)
    return report, traces


# --- command line -----------------------------------------------------------------------------
def _rate(value: str) -> float:
    rate = float(value)
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"request rate must be positive or inf, got {value}")
    return rate


def _budget(value: str) -> int:
    from kvmem.config import parse_memory_size

    try:
        size = parse_memory_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if isinstance(size, float):
        raise argparse.ArgumentTypeError(f"--budget must be a size in bytes (e.g. 1GiB), got the fraction {value}")
    return size


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(",") if v)


def add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=2000)
    p.add_argument("--budget", type=_budget, default=GiB, help="physical KV budget, bytes or a size like 1GiB")
    p.add_argument("--max-model-len", type=int, default=2048, help="static reserves this many tokens per request")
    p.add_argument("--block-size", type=int, default=16, help="paged block size in tokens")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step")
    p.add_argument("--request-rate", type=_rate, default=math.inf,
                   help="Poisson arrivals in requests per step (default inf: all at step 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="what the simulated cache stores: auto (bf16), fp8, fp8_e4m3, fp8_e5m2 or int8")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset of static,paged,virtual")
    p.add_argument("--skip-latency", action="store_true", help="skip the second virtual run without background mapping")
    p.add_argument("--skip-attention", action="store_true", help="skip the decode attention microbenchmark")
    p.add_argument("--attention-batch", type=int, default=32)
    p.add_argument("--attention-contexts", type=_ints, default=(1024, 4096))
    p.add_argument("--attention-repeats", type=int, default=20)
    p.add_argument("--json", default=DEFAULT_JSON, help=f"write the results here (default {DEFAULT_JSON})")
    p.add_argument("--plot", default=None, help="write the PNG here (default: the JSON path with .png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--record", default=None, metavar="FILE",
                   help="also write the runs as a recording for /dashboard (JSON lines); watch it with "
                        "`kvmem dashboard --replay FILE`")
    p.add_argument("--record-frames", type=int, default=200,
                   help="at most this many frames per strategy in the recording (evenly spaced steps)")


def config_from_args(args: argparse.Namespace) -> MemoryBenchConfig:
    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ValueError(f"--strategies: unknown {unknown}; choose from {', '.join(STRATEGIES)}")
    return MemoryBenchConfig(
        stream=StreamConfig(num_requests=args.num_requests, request_rate=args.request_rate, seed=args.seed),
        sim=SimConfig(budget_bytes=args.budget, max_model_len=args.max_model_len, block_size=args.block_size,
                      max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                      kv_cache_dtype=args.kv_cache_dtype),
        attention=AttentionConfig(batch=args.attention_batch, contexts=args.attention_contexts,
                                  repeats=args.attention_repeats, seed=args.seed),
        strategies=strategies, run_latency=not args.skip_latency, run_attention=not args.skip_attention,
        progress=not args.no_progress, record=args.record, record_frames=args.record_frames)


def cmd_bench_memory(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    report, traces = run_memory_benchmark(cfg)
    print(summary_table(report))
    json_path = write_json(report, args.json)
    plot_path = write_plot(report, traces, args.plot or json_path.with_suffix(".png"))
    print(f"wrote {json_path} and {plot_path}" + (f"; recording {cfg.record} (kvmem dashboard --replay "
                                                   f"{cfg.record})" if cfg.record else ""))
    return 0
