"""The tables of benchmarks/fleet_cache_aware.sh (Markdown, for docs/benchmarks.md) from its JSONs."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path


def load(out: Path, pattern: str) -> dict[tuple[str, int], dict]:
    runs = {}
    for path in sorted(out.glob("*.json")):
        m = re.fullmatch(pattern, path.stem)
        if m:
            runs[(m.group(1), int(m.group(2)))] = json.loads(path.read_text())
    return runs


def spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def round_of(seed: int) -> int:
    return (seed // 100) % 10  # seeds are PART*1000 + 100*round + i


def tenants_table(out: Path, name: str) -> None:
    tenants = load(out, name + r"_(cache_aware|kv_aware|round_robin)_s(\d+)")
    if not tenants:
        return
    rounds = sorted({round_of(seed) for _, seed in tenants})
    print(f"### {name}")
    print()
    print("| round | policy | prefix hit rate (replicas' /metrics) | requests per replica | req/s | output tok/s "
          "| TTFT p50 ms | TTFT p99 ms | failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    by = {}
    for r in rounds:
        for (policy, seed), d in sorted(tenants.items()):
            if round_of(seed) != r:
                continue
            m = d["server_metrics"]
            by[(policy, r)] = d
            print(f"| {r} | {policy} | {m['prefix_cache_hit_rate']:.1%} | "
                  f"{' / '.join(f'{n:.0f}' for n in m['requests_per_server'])} | {d['request_throughput']:.2f} | "
                  f"{d['output_throughput']:.1f} | {d['median_ttft_ms']:.0f} | {d['p99_ttft_ms']:.0f} | {d['failed']} |")
    print()
    for policy in ("cache_aware", "kv_aware"):
        both = [r for r in rounds if (policy, r) in by and ("round_robin", r) in by]
        if not both:
            continue

        def ratio(key: str) -> list[float]:
            return [by[(policy, r)][key] / by[("round_robin", r)][key] for r in both]

        hit = [by[(policy, r)]["server_metrics"]["prefix_cache_hit_rate"] for r in both]
        hit_rr = [by[("round_robin", r)]["server_metrics"]["prefix_cache_hit_rate"] for r in both]
        print(f"{policy} vs round_robin over {len(both)} rounds, median (min–max): prefix hit rate "
              f"{spread([h * 100 for h in hit], '{:.1f}')} % vs {spread([h * 100 for h in hit_rr], '{:.1f}')} %; "
              f"request throughput x{spread(ratio('request_throughput'), '{:.2f}')}; "
              f"TTFT p50 x{spread(ratio('median_ttft_ms'), '{:.2f}')}; TTFT p99 x{spread(ratio('p99_ttft_ms'), '{:.2f}')}")
        print()


def main(out: Path) -> None:
    tenants_table(out, "tenants")
    tenants_table(out, "saturated")

    hop = load(out, r"hop_(router|direct)_s(\d+)")
    hop_rounds = sorted({round_of(seed) for _, seed in hop})
    print("### router hop, batch 1")
    print()
    print("| round | TTFT p50 direct ms | TTFT p50 via router ms | E2E p50 direct ms | E2E p50 via router ms |")
    print("|---|---|---|---|---|")
    diffs_ttft, diffs_e2e, ratios_e2e = [], [], []
    for r in hop_rounds:
        pair = {t: d for (t, seed), d in hop.items() if round_of(seed) == r}
        if len(pair) < 2:
            continue
        d, v = pair["direct"], pair["router"]
        diffs_ttft.append(v["median_ttft_ms"] - d["median_ttft_ms"])
        diffs_e2e.append(v["median_e2e_ms"] - d["median_e2e_ms"])
        ratios_e2e.append(v["median_e2e_ms"] / d["median_e2e_ms"])
        print(f"| {r} | {d['median_ttft_ms']:.1f} | {v['median_ttft_ms']:.1f} | {d['median_e2e_ms']:.1f} | "
              f"{v['median_e2e_ms']:.1f} |")
    if diffs_ttft:
        print()
        print(f"router hop at batch 1, median (min–max) over {len(diffs_ttft)} rounds: TTFT "
              f"+{spread(diffs_ttft, '{:.1f}')} ms, E2E +{spread(diffs_e2e, '{:.1f}')} ms "
              f"(x{spread(ratios_e2e, '{:.3f}')})")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/fleet"))
