"""The latency plot of one `kvmem bench serve` run (PNG, matplotlib's Agg backend): the distributions
of TTFT and of per-request end-to-end latency, each as a histogram and as a CDF with its median and p99."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _series(result) -> dict[str, list[float]]:
    """TTFT and E2E per request in ms, from a ServeBenchResult or its JSON (a dict); vLLM's saved
    results (`ttfts` in seconds, no per-request E2E) work too."""
    r = result if isinstance(result, dict) else vars(result)
    ttft = r.get("request_ttft_ms") or [t * 1000.0 for t in r.get("ttfts") or [] if t]
    return {"TTFT": list(ttft), "end-to-end latency": list(r.get("request_e2e_ms") or [])}


def plot_latency(result, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = result if isinstance(result, dict) else vars(result)
    series = _series(result)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, len(series), figsize=(6 * len(series), 7), squeeze=False)
    for col, (name, values) in enumerate(series.items()):
        hist_ax, cdf_ax = axes[0][col], axes[1][col]
        hist_ax.set_title(f"{name} ({len(values)} requests)")
        cdf_ax.set_xlabel(f"{name} (ms)")
        hist_ax.set_ylabel("requests")
        cdf_ax.set_ylabel("fraction of requests")
        if not values:
            hist_ax.text(0.5, 0.5, "no successful request", ha="center", va="center", transform=hist_ax.transAxes)
            continue
        a = np.sort(np.asarray(values, dtype=float))
        hist_ax.hist(a, bins=min(50, max(5, len(a) // 2)), color="tab:blue", alpha=0.8)
        cdf_ax.plot(a, np.arange(1, len(a) + 1) / len(a), drawstyle="steps-post", color="tab:blue")
        for q, style in ((50, "--"), (99, ":")):
            v = float(np.percentile(a, q))
            for ax in (hist_ax, cdf_ax):
                ax.axvline(v, color="tab:red", linestyle=style, label=f"p{q} {v:.1f} ms")
        cdf_ax.set_ylim(0, 1.02)
        hist_ax.legend()
        cdf_ax.grid(alpha=0.3)
    rate = r.get("request_rate")
    conc = r.get("max_concurrency") or "none"
    fig.suptitle(f"{r.get('label') or 'kvmem bench serve'}: {r.get('model', '')}, {r.get('completed', '?')} requests, "
                 f"rate {rate}/s, max concurrency {conc}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
