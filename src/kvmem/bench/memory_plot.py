"""The PNG of `kvmem bench memory`: (a) KV bytes physical and live over the steps, (b) waste,
(c) running requests, per strategy, and (d) the decode attention microbenchmark."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvmem.bench.memory_sim import STRATEGIES, GiB, StepTrace

COLORS = {"static": "tab:red", "paged": "tab:blue", "virtual": "tab:green", "virtual-no-bg": "tab:olive"}


def write_plot(report: dict, traces: dict[str, StepTrace], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    (ax_mem, ax_waste), (ax_run, ax_attn) = axes
    shown = [k for k in traces if k in STRATEGIES]
    for i, name in enumerate(shown):
        tr, c = traces[name], COLORS.get(name, None)
        steps = np.arange(len(tr.running))
        # Physical lines often coincide at the budget: thicker first, so each stays visible.
        ax_mem.plot(steps, np.asarray(tr.bytes_physical) / GiB, color=c, lw=3.0 - i, alpha=0.6, zorder=1,
                    label=f"{name} physical")
        ax_mem.plot(steps, np.asarray(tr.bytes_live) / GiB, color=c, lw=1, ls="--", zorder=2, label=f"{name} live")
        alloc = np.asarray(tr.bytes_allocated, dtype=np.float64)
        live = np.asarray(tr.bytes_live, dtype=np.float64)
        waste = np.full_like(alloc, np.nan)
        np.divide(alloc - live, alloc, out=waste, where=alloc > 0)
        r = report["strategies"][name]
        ax_waste.plot(steps, 100 * waste, color=c, lw=1,
                      label=f"{name}: {100 * r['waste_vs_allocated']:.1f}% (vs physical {100 * r['waste_vs_physical']:.1f}%)")
        ax_run.plot(steps, tr.running, color=c, lw=1,
                    label=f"{name}: peak {r['peak_running']}, {r['steps']} steps, {r['preemptions']} preemptions")
    sim = report["settings"]["sim"]
    # Static takes several times the steps; zoom (a) and (b) on the others so their detail shows.
    others = [len(traces[k].running) for k in shown if k != "static"]
    if "static" in shown and others and len(traces["static"].running) > 1.5 * max(others):
        for ax in (ax_mem, ax_waste):
            ax.set_xlim(0, 1.15 * max(others))
            ax.annotate(f"static runs on to step {len(traces['static'].running)} (see c)", (0.99, 0.02),
                        xycoords="axes fraction", ha="right", fontsize=8, color=COLORS["static"])
    ax_mem.set(title=f"(a) KV bytes: physical (solid) and live (dashed), budget {sim['budget_bytes'] / GiB:g} GiB",
               xlabel="step", ylabel="GiB")
    ax_mem.legend(fontsize=8, ncol=2)
    ax_waste.set(title="(b) waste = 1 - live/allocated (legend: time average)", xlabel="step", ylabel="%",
                 ylim=(0, 100))
    ax_waste.legend(fontsize=8)
    ax_run.set(title=f"(c) running requests ({report['stream']['prompt_len']['median']:.0f}-token median prompt, "
                     f"max_num_seqs {sim['max_num_seqs']})", xlabel="step", ylabel="requests")
    ax_run.legend(fontsize=8)
    attention = report.get("attention")
    if attention:
        cases = attention["cases"]
        labels = [f"ctx {c['context']}" + (" ragged" if c["ragged"] else "") for c in cases]
        x = np.arange(len(cases))
        for off, name in ((-0.2, "paged"), (0.2, "virtual")):
            vals = [c[f"{name}_ms_min"] for c in cases]
            bars = ax_attn.bar(x + off, vals, 0.4, color=COLORS[name], label=f"{name} (bar: min, tick: median)")
            ax_attn.bar_label(bars, fmt="%.2f", fontsize=8, label_type="center", color="white", weight="bold")
            ax_attn.scatter(x + off, [c[f"{name}_ms_median"] for c in cases], marker="_", s=300, color="black",
                            zorder=3)
        for xi, c in zip(x, cases):
            top = max(c["paged_ms_min"], c["virtual_ms_min"])
            ax_attn.annotate(f"{c['speedup_min']:.2f}x", (xi, top), textcoords="offset points", xytext=(0, 14),
                             ha="center", fontsize=9, weight="bold")
        ax_attn.set_xticks(x, labels)
        cfg = attention["config"]
        ax_attn.set(title=f"(d) decode attention, one layer, batch {cfg['batch']}, min of {cfg['repeats']} "
                          f"(paged/virtual above)", ylabel="ms per layer call")
        ax_attn.margins(y=0.2)
        ax_attn.legend(fontsize=8)
    else:
        ax_attn.set_axis_off()
        ax_attn.text(0.5, 0.5, "attention microbenchmark skipped", ha="center", va="center")
    m = report["machine"]
    fig.suptitle(f"kvmem bench memory: {report['settings']['stream']['num_requests']} requests, "
                 f"{sim['num_layers']}x{sim['num_kv_heads']}x{sim['head_dim']} {sim['dtype']} "
                 f"({report['settings']['bytes_per_token']} B/token) — {m['processor']}, {m['nproc']} CPUs, "
                 f"torch {m['torch']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
