"""What structured outputs cost in `kvmem bench throughput`: this tree with 0 %, 50 % and 100 % of the
requests under a JSON schema, and a peer tree without the feature (the branch point) at 0 %, in
alternating rounds (each run its own process, under `flock -x` on the shared machine's gate so no
test runs beside it). Prints per-run output tokens/s, then medians, ratios to this tree's 0 % and
their spreads (min-max over the per-round ratios); writes everything to --out as JSON.

    git archive BRANCH_POINT src | tar -x -C /tmp/base   # the peer
    git archive HEAD src | tar -x -C /tmp/this           # this tree, frozen while the rounds run
    python benchmarks/structured_outputs_cost.py --peer-src /tmp/base/src --this-src /tmp/this/src --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKLOAD = ["--num-prompts", "64", "--input-len", "64", "--output-len", "128", "--kv-cache-memory", "1GiB",
            "--max-model-len", "512", "--seed", "0"]


def run(src: Path, ratio: float, out: Path, gate: str | None) -> float:
    cmd = [sys.executable, "-m", "kvmem", "bench", "throughput", *WORKLOAD, "--json", str(out)]
    if ratio:
        cmd += ["--structured-output-ratio", str(ratio)]
    if gate:
        cmd = ["flock", "-x", "-w", "1800", gate, *cmd]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True)
    return json.loads(out.read_text())["output_tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--peer-src", required=True, help="src/ of the tree without structured outputs")
    p.add_argument("--this-src", default=str(REPO / "src"), help="src/ of the tree with structured outputs")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--gate", default="/work/cpu.gate", help="flock file held exclusively per run ('' for none)")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/structured_outputs/cost.json"))
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    this = Path(args.this_src)
    configs = [("peer_0", Path(args.peer_src), 0.0), ("this_0", this, 0.0), ("this_50", this, 0.5),
               ("this_100", this, 1.0)]
    runs: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else configs[::-1]  # alternate who goes first
        for name, src, ratio in order:
            tps = run(src, ratio, out.parent / f"{name}_r{r}.json", args.gate or None)
            runs[name].append(tps)
            print(f"round {r} {name:9s} {tps:8.1f} output tok/s", flush=True)
    summary = {}
    for name in runs:
        per_round = [a / b for a, b in zip(runs[name], runs["this_0"])]
        summary[name] = {"median_tok_s": statistics.median(runs[name]),
                         "ratio_to_this_0_median": statistics.median(per_round),
                         "ratio_to_this_0_min": min(per_round), "ratio_to_this_0_max": max(per_round)}
        s = summary[name]
        print(f"{name:9s} median {s['median_tok_s']:8.1f} tok/s   x{s['ratio_to_this_0_median']:.3f} of this_0 "
              f"(rounds {s['ratio_to_this_0_min']:.3f}-{s['ratio_to_this_0_max']:.3f})")
    out.write_text(json.dumps({"workload": WORKLOAD, "rounds": args.rounds, "runs": runs, "summary": summary},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
