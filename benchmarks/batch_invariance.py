"""What batch-invariant greedy output costs: `kvmem bench throughput` as shipped against the same
bench with `--no-batch-invariant`, in alternating rounds (who goes first alternates too).

    python benchmarks/batch_invariance.py --rounds 5 -- --workload random --num-prompts 1 \
        --input-len 128 --output-len 128 --dtype bfloat16 --kv-cache-memory 1GiB

Each run is its own process; the figure is the bench's own output tokens/s (model loading is not
timed). Writes every run, the pairwise ratios and the medians to --out (JSON).
Only batch-1 decode steps have lone rows in every layer; a batched workload has them only in the
lm_head when one sequence is left to sample, so its cost there is within the noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {"invariant": [], "not_invariant": ["--no-batch-invariant"]}


def one_run(extra: list[str], bench_args: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        subprocess.run([sys.executable, "-m", "kvmem.cli", "bench", "throughput", *bench_args, *extra,
                        "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["output_tokens_per_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/batch_invariance/result.json")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then `kvmem bench throughput` arguments")
    args = p.parse_args()
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args

    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            runs[name].append(one_run(VARIANTS[name], bench_args))
        print(f"round {r + 1}: " + ", ".join(f"{n} {runs[n][-1]:.1f} tok/s" for n in VARIANTS), flush=True)
    ratios = [a / b for a, b in zip(runs["invariant"], runs["not_invariant"])]
    summary = {name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in runs.items()}
    summary["ratio_invariant_over_not"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench_args": bench_args, "runs": runs, "ratios": ratios, "summary": summary},
                              indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
