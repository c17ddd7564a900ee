"""Tables of kvmem's server vs a peer's server over alternated rounds, from vLLM's client's result
JSONs (`vllm bench serve --save-result`), as written by benchmarks/serving_batch1_llamacpp.sh
(DIR/<engine>_r<round>.json) and benchmarks/serving_vllm_client.sh
(DIR/<engine>_<dataset>_r<round>.json). Prints Markdown: per workload, each engine's numbers per
round, then kvmem/peer per round with the median and the range over rounds.

    python benchmarks/serving_summary.py DIR [DIR ...] [--output-len N]

Decode tok/s is 1000 / mean TPOT (time per output token after the first, per request, averaged
over requests): one request's decode speed, the batch-1 figure. Output tok/s is the run's
throughput (all output tokens / wall time, TTFT included).
"""

import argparse
import json
import re
import statistics
from pathlib import Path

NAME = re.compile(r"^(?P<engine>[a-z0-9]+?)(?:_(?P<dataset>[a-z0-9]+))?_r(?P<round>\d+)\.json$")

# (label, result key, ratio wanted: "higher" is better for kvmem/peer > 1, "lower" for < 1)
METRICS = [
    ("output tok/s", "output_throughput", "higher"),
    ("decode tok/s (1000/TPOT)", None, "higher"),
    ("TPOT mean ms", "mean_tpot_ms", "lower"),
    ("TTFT mean ms", "mean_ttft_ms", "lower"),
    ("TTFT median ms", "median_ttft_ms", "lower"),
    ("TTFT p99 ms", "p99_ttft_ms", "lower"),
]


def value(result: dict, key: str | None) -> float:
    return 1000.0 / result["mean_tpot_ms"] if key is None else result[key]


def with_output_len(result: dict, n: int) -> dict:
    """The result as if the client had counted `n` output tokens for every request: vLLM's client
    takes a request's output length from the server's `usage`, and where a server sends none
    (llama-cpp-python's stream) it tokenizes the text again, which miscounts (97-160 for 128 tokens
    generated here), and TPOT = (latency - TTFT) / (output length - 1) inherits the error. Needs the
    per-request latencies and TTFTs (`--save-detailed`)."""
    ok = [(lat, ttft) for lat, ttft, err in zip(result["latencies"], result["ttfts"], result["errors"]) if not err]
    fixed = dict(result)
    fixed["mean_tpot_ms"] = statistics.mean((lat - ttft) / (n - 1) for lat, ttft in ok) * 1000
    fixed["output_throughput"] = n * len(ok) / result["duration"]
    return fixed


def load(root: Path, output_len: int | None = None) -> dict[str, dict[str, dict[int, dict]]]:
    """dataset -> engine -> round -> result"""
    runs: dict[str, dict[str, dict[int, dict]]] = {}
    for path in sorted(root.glob("*_r*.json")):
        m = NAME.match(path.name)
        if not m:
            continue
        result = json.loads(path.read_text())
        if output_len:
            result = with_output_len(result, output_len)
        runs.setdefault(m["dataset"] or "", {}).setdefault(m["engine"], {})[int(m["round"])] = result
    return runs


def fmt(x: float) -> str:
    return f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def table(title: str, engines: dict[str, dict[int, dict]]) -> None:
    peer = next(e for e in engines if e != "kvmem")
    rounds = sorted(set(engines["kvmem"]) & set(engines[peer]))
    print(f"**{title}** (rounds {', '.join(map(str, rounds))}; kvmem vs {peer})\n")
    print("| metric | engine | " + " | ".join(f"r{r}" for r in rounds) + " | median |")
    print("|---|---|" + "---|" * len(rounds) + "---|")
    ratios: dict[str, list[float]] = {}
    for label, key, _ in METRICS:
        for engine in ("kvmem", peer):
            vals = [value(engines[engine][r], key) for r in rounds]
            print(f"| {label} | {engine} | " + " | ".join(fmt(v) for v in vals) + f" | {fmt(statistics.median(vals))} |")
        ratios[label] = [value(engines["kvmem"][r], key) / value(engines[peer][r], key) for r in rounds]
    failed = {e: sum(engines[e][r].get("failed", 0) or 0 for r in rounds) for e in ("kvmem", peer)}
    completed = {e: sum(engines[e][r].get("completed", 0) or 0 for r in rounds) for e in ("kvmem", peer)}
    print(f"\ncompleted / failed requests over all rounds: kvmem {completed['kvmem']} / {failed['kvmem']}, "
          f"{peer} {completed[peer]} / {failed[peer]}\n")
    print(f"| kvmem / {peer} | " + " | ".join(f"r{r}" for r in rounds) + " | median (range) | better for kvmem |")
    print("|---|" + "---|" * len(rounds) + "---|---|")
    for label, _, better in METRICS:
        rs = ratios[label]
        print(f"| {label} | " + " | ".join(f"{r:.2f}" for r in rs)
              + f" | **{statistics.median(rs):.2f}** ({min(rs):.2f}-{max(rs):.2f}) | {'> 1' if better == 'higher' else '< 1'} |")
    print()


def compact(roots: list[Path], output_len: int | None) -> None:
    """One table of medians (ranges) per engine, then one of kvmem/peer ratios per round, for every
    dataset of every DIR: the form of docs/benchmarks.md."""
    shown = [("output tok/s", "output_throughput"), ("TPOT mean ms", "mean_tpot_ms"),
             ("TTFT mean ms", "mean_ttft_ms"), ("TTFT p99 ms", "p99_ttft_ms")]
    groups = [(root, dataset, engines) for root in roots
              for dataset, engines in sorted(load(root, output_len).items()) if "kvmem" in engines and len(engines) == 2]
    print("| run | dataset | engine | rounds | " + " | ".join(f"{label} median (range)" for label, _ in shown) + " |")
    print("|---|---|---|---|" + "---|" * len(shown))
    for root, dataset, engines in groups:
        peer = next(e for e in engines if e != "kvmem")
        rounds = sorted(set(engines["kvmem"]) & set(engines[peer]))
        for engine in ("kvmem", peer):
            cells = []
            for _, key in shown:
                vals = [value(engines[engine][r], key) for r in rounds]
                cells.append(f"{fmt(statistics.median(vals))} ({fmt(min(vals))}-{fmt(max(vals))})")
            print(f"| {root.parent.name}/{root.name} | {dataset} | {engine} | {len(rounds)} | " + " | ".join(cells) + " |")
    print()
    print("| run | dataset | kvmem / peer | per round | median (range) |")
    print("|---|---|---|---|---|")
    for root, dataset, engines in groups:
        peer = next(e for e in engines if e != "kvmem")
        rounds = sorted(set(engines["kvmem"]) & set(engines[peer]))
        for label, key in shown:
            rs = [value(engines["kvmem"][r], key) / value(engines[peer][r], key) for r in rounds]
            print(f"| {root.parent.name}/{root.name} | {dataset} | {label} | {', '.join(f'{r:.2f}' for r in rs)} | "
                  f"**{statistics.median(rs):.2f}** ({min(rs):.2f}-{max(rs):.2f}) |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", type=Path, nargs="+")
    ap.add_argument("--output-len", type=int,
                    help="every request generated exactly this many tokens (checked from the servers' own "
                         "counts): recompute TPOT and output tok/s with it instead of the client's count")
    ap.add_argument("--compact", action="store_true", help="two tables over all DIRs (medians, then ratios)")
    args = ap.parse_args()
    if args.compact:
        compact(args.dirs, args.output_len)
        return
    for root in args.dirs:
        for dataset, engines in sorted(load(root, args.output_len).items()):
            if "kvmem" in engines and len(engines) == 2:
                table(f"{root}" + (f", {dataset}" if dataset else ""), engines)


if __name__ == "__main__":
    main()
