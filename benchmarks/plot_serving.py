"""Summarize `kvmem bench serve` results (benchmarks/results/serving/*.json): a markdown table of
medians over rounds and a PNG bar chart, per engine and request rate. With --latency, also each
run's latency PNG beside its JSON (TTFT and end-to-end latency distributions, as `--save-result`
writes them; results saved before per-request latencies were kept have no data for it).

    .venv/bin/python benchmarks/plot_serving.py [--dir benchmarks/results/serving] [--latency]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

METRICS = [("output_throughput", "output tok/s"), ("mean_ttft_ms", "mean TTFT (ms)"),
           ("mean_tpot_ms", "mean TPOT (ms)"), ("median_itl_ms", "median ITL (ms)"),
           ("p99_itl_ms", "p99 ITL (ms)")]


def load(directory: Path) -> dict[tuple[str, str], list[dict]]:
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for path in sorted(directory.glob("*.json")):
        r = json.loads(path.read_text())
        r["_path"] = str(path)
        runs[(r["label"], str(r["request_rate"]))].append(r)
    return runs


def table(runs: dict[tuple[str, str], list[dict]]) -> str:
    head = "| engine | request rate | runs | " + " | ".join(name for _, name in METRICS) + " |"
    lines = [head, "|" + "---|" * (3 + len(METRICS))]
    for (label, rate), rs in sorted(runs.items(), key=lambda kv: (float(kv[0][1]), kv[0][0])):
        cells = []
        for key, _ in METRICS:
            values = [r[key] for r in rs]
            cells.append(f"{statistics.median(values):.1f} ({' / '.join(f'{v:.1f}' for v in values)})")
        lines.append(f"| {label} | {rate}/s | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[tuple[str, str], list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({label for label, _ in runs})
    rates = sorted({rate for _, rate in runs}, key=float)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    width = 0.8 / len(labels)
    for ax, (key, name) in zip(axes, METRICS[:4]):
        for i, label in enumerate(labels):
            values = [statistics.median(r[key] for r in runs[(label, rate)]) if (label, rate) in runs else 0
                      for rate in rates]
            ax.bar([x + i * width for x in range(len(rates))], values, width, label=label)
        ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(rates))], [f"{r} req/s" for r in rates])
        ax.set_title(name)
    axes[0].legend()
    fig.suptitle("kvmem bench serve: 64 requests, 128 in / 128 out, SmolLM2-135M bf16, 2-core CPU (median of rounds)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="benchmarks/results/serving")
    ap.add_argument("--latency", action="store_true", help="also each run's latency PNG beside its JSON")
    args = ap.parse_args()
    runs = load(Path(args.dir))
    print(table(runs))
    out = Path(args.dir) / "serving_vs_vllm.png"
    plot(runs, out)
    print(f"wrote {out}")
    if args.latency:
        from kvmem.bench.serving_plot import plot_latency

        for rs in runs.values():
            for r in rs:
                if r.get("request_ttft_ms") or r.get("ttfts"):
                    print(f"wrote {plot_latency(r, Path(r['_path']).with_suffix('.png'))}")


if __name__ == "__main__":
    main()
