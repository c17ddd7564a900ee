"""`kvmem bench hybrid`: predicted throughput of KV-only (FlexGen-like), ACT-only and hybrid host tiers.

Nothing runs on a GPU: `kvmem.hybrid.simulator` predicts prefill + decode time per policy from a
`HardwareProfile` (the documented default, a JSON file from `--profile`, or this machine with
`--measure`) with the same cost-model and policy code the engine will use. Parts of the report:

1. The grid: OPT-30B- and Llama-2-7B-shaped models (multi-head: activations can pay) and a
   Llama-3-8B-shaped control (grouped-query: the hybrid policy must fall back to KV only), at batch
   64–256 and prompt 512–2,048 tokens, output 128; throughput of each policy, the hybrid ratio and why.
2. The speed-up of hybrid over KV-only at equal batch, averaged over the multi-head rows, beside the
   paper's reported 2.19× average over FlexGen (HybridServe, arXiv 2501.01792).
3. Capacity: activations are half the bytes of K,V on multi-head models, so the same host memory
   holds a larger batch. Per model and prompt, the best throughput each policy reaches over batches
   that fit host memory (`max_batch_that_fits` and a sweep below it).
4. Ablation: mini-batch balancing. Whole requests placed as ACT or KV (per-request placement) formed
   into mini-batches in arrival order, vs balanced formation, vs per-block placement.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from kvmem.bench.report_json import write_json
from kvmem.hybrid import profile as hw
from kvmem.hybrid.cost_model import ModelShape
from kvmem.hybrid.profile import DEFAULT_PROFILE, HardwareProfile
from kvmem.hybrid.simulator import (
    POLICIES,
    SimulationResult,
    SimulatorOptions,
    Workload,
    max_batch_that_fits,
    simulate,
)

RESULTS_DIR = "benchmarks/results/hybrid"
DEFAULT_JSON = f"{RESULTS_DIR}/hybrid.json"
PAPER_SPEEDUP_OVER_FLEXGEN = 2.19  # HybridServe's reported average throughput gain over FlexGen
MODELS = {"opt-30b": ModelShape.opt_30b, "llama2-7b": ModelShape.llama2_7b, "llama3-8b": ModelShape.llama3_8b}
CAPACITY_BATCHES = (16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


@dataclass(frozen=True)
class HybridBenchConfig:
    models: tuple[str, ...] = ("opt-30b", "llama2-7b", "llama3-8b")
    batches: tuple[int, ...] = (64, 128, 256)
    prompts: tuple[int, ...] = (512, 1024, 2048)
    output_len: int = 128
    block_size: int = 16
    # "offload": weights stream from the host layer by layer for every model, the setting of the paper's
    # comparison (FlexGen offloading weights and KV); "auto": only when they do not fit the device.
    weights: str = "offload"
    step_stride: int = 1  # 1 = every decode step simulated
    capacity: bool = True
    capacity_step_stride: int = 8  # the capacity sweep simulates every 8th decode step (scaled)
    ablation: bool = True


def _row(r: SimulationResult) -> dict:
    lay = r.layout
    end_ctx = r.prompt_len + r.output_len
    return {
        "policy": r.policy, "output_tokens_per_s": r.output_tokens_per_s, "decode_tokens_per_s": r.decode_tokens_per_s,
        "prefill_s": r.prefill_s, "decode_s": r.decode_s, "act_ratio": lay.act_ratio, "ratio_reason": lay.ratio_reason,
        "offload_weights": lay.offload_weights, "num_minibatches": lay.num_minibatches,
        "host_tier_fraction": (end_ctx - lay.device_tier_tokens_per_request) / end_ctx,
        "host_bytes_needed": lay.host_bytes_needed, "host_budget_bytes": lay.host_budget_bytes, "fits_host": lay.fits_host,
        "layer_ms": {"weights_link": r.layer.weights_link_s * 1e3, "kv_link": r.layer.kv_link_s * 1e3,
                     "act_link": r.layer.act_link_s * 1e3, "compute": r.layer.compute_s * 1e3,
                     "recompute": r.layer.recompute_s * 1e3, "writeback": r.layer.writeback_s * 1e3,
                     "bound": r.layer.bound},
        "decode_link_busy_s": r.decode_link_busy_s, "decode_device_busy_s": r.decode_device_busy_s,
        "minibatch_imbalance": r.minibatch_imbalance,
    }


def _geomean(xs: list[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


WEIGHTS = {"offload": True, "auto": None, "resident": False}


def _options(cfg: HybridBenchConfig, **kw) -> SimulatorOptions:
    if cfg.weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {cfg.weights!r}")
    return SimulatorOptions(block_size=cfg.block_size, offload_weights=WEIGHTS[cfg.weights],
                            step_stride=kw.pop("step_stride", cfg.step_stride), **kw)


def run_grid(profile: HardwareProfile, cfg: HybridBenchConfig) -> list[dict]:
    opts = _options(cfg)
    rows = []
    for key in cfg.models:
        shape = MODELS[key]()
        for prompt in cfg.prompts:
            for batch in cfg.batches:
                w = Workload(batch, prompt, cfg.output_len)
                by_policy = {p: _row(simulate(shape, profile, w, p, opts)) for p in POLICIES}
                kv, act, hyb = (by_policy[p]["output_tokens_per_s"] for p in POLICIES)
                rows.append({"model": shape.name, "model_key": key, "mha": shape.activations_pay_off,
                             "batch_size": batch, "prompt_len": prompt, "output_len": cfg.output_len,
                             "policies": by_policy, "hybrid_over_kv_only": hyb / kv, "hybrid_over_act_only": hyb / act})
    return rows


def summarize(rows: list[dict]) -> dict:
    mha = [r for r in rows if r["mha"]]
    offloaded = [r for r in mha if r["policies"]["kv-only"]["host_tier_fraction"] > 0]
    both_fit = [r for r in mha if r["policies"]["kv-only"]["fits_host"] and r["policies"]["hybrid"]["fits_host"]]
    gqa = [r for r in rows if not r["mha"]]

    def stats(rs: list[dict]) -> dict:
        xs = [r["hybrid_over_kv_only"] for r in rs]
        return {"rows": len(xs), "mean": statistics.fmean(xs) if xs else None, "geomean": _geomean(xs),
                "min": min(xs, default=None), "max": max(xs, default=None)}

    return {
        "paper_speedup_over_flexgen": PAPER_SPEEDUP_OVER_FLEXGEN,
        "hybrid_over_kv_only_mha_all": stats(mha),
        "hybrid_over_kv_only_mha_with_host_tier": stats(offloaded),
        "hybrid_over_kv_only_mha_both_fit_host": stats(both_fit),
        "hybrid_never_below_kv_or_act_mha": all(r["hybrid_over_kv_only"] >= 1 - 1e-9 and r["hybrid_over_act_only"] >= 1 - 1e-9
                                                 for r in mha),
        "gqa_hybrid_equals_kv_only": all(abs(r["hybrid_over_kv_only"] - 1) < 1e-12 for r in gqa) if gqa else None,
    }


def run_capacity(profile: HardwareProfile, cfg: HybridBenchConfig) -> list[dict]:
    """Per model and prompt, the best throughput each policy reaches over batches that fit host memory."""
    opts = _options(cfg, step_stride=cfg.capacity_step_stride)
    out = []
    for key in cfg.models:
        shape = MODELS[key]()
        for prompt in cfg.prompts:
            entry = {"model": shape.name, "model_key": key, "prompt_len": prompt, "output_len": cfg.output_len, "policies": {}}
            for policy in POLICIES:
                limit = max_batch_that_fits(shape, profile, prompt, cfg.output_len, policy, opts, limit=CAPACITY_BATCHES[-1])
                candidates = sorted({b for b in CAPACITY_BATCHES if b <= limit} | ({limit} if limit else set()))
                best = None
                for b in candidates:
                    r = simulate(shape, profile, Workload(b, prompt, cfg.output_len), policy, opts)
                    if best is None or r.output_tokens_per_s > best.output_tokens_per_s:
                        best = r
                entry["policies"][policy] = {
                    "max_batch_fitting_host": limit,
                    "best_batch": best.batch_size if best else 0,
                    "best_output_tokens_per_s": best.output_tokens_per_s if best else 0.0,
                    "act_ratio": best.layout.act_ratio if best else None,
                }
            p = entry["policies"]
            kv = p["kv-only"]["best_output_tokens_per_s"]
            entry["hybrid_over_kv_only"] = p["hybrid"]["best_output_tokens_per_s"] / kv if kv else None
            out.append(entry)
    return out


def run_ablation(profile: HardwareProfile, cfg: HybridBenchConfig) -> dict:
    """OPT-30B, batch 256, prompt 1024, four mini-batches: how much balancing mini-batches matters."""
    shape, w = ModelShape.opt_30b(), Workload(256, 1024, cfg.output_len)
    base = _options(cfg, min_minibatches=4)
    cases = {
        "per-block placement, balanced mini-batches (default)": base,
        "per-request placement, balanced mini-batches": replace(base, placement="per-request"),
        "per-request placement, in-order mini-batches": replace(base, placement="per-request", minibatch_formation="in-order"),
    }
    out = {"model": shape.name, "batch_size": w.batch_size, "prompt_len": w.prompt_len, "output_len": w.output_len,
           "min_minibatches": 4, "cases": {}}
    for name, opts in cases.items():
        r = simulate(shape, profile, w, "hybrid", opts)
        out["cases"][name] = {"output_tokens_per_s": r.output_tokens_per_s, "minibatch_imbalance": r.minibatch_imbalance,
                              "num_minibatches": r.layout.num_minibatches, "act_ratio": r.layout.act_ratio}
    return out


def run_hybrid_benchmark(profile: HardwareProfile, cfg: HybridBenchConfig = HybridBenchConfig()) -> dict:
    rows = run_grid(profile, cfg)
    return {
        "what": "simulator predictions (kvmem.hybrid.simulator), not measurements",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "profile": profile.to_dict(),
        "config": {**cfg.__dict__},
        "paper": {"reference": "HybridServe, arXiv 2501.01792", "speedup_over_flexgen_average": PAPER_SPEEDUP_OVER_FLEXGEN},
        "rows": rows,
        "summary": summarize(rows),
        "capacity": run_capacity(profile, cfg) if cfg.capacity else None,
        "ablation": run_ablation(profile, cfg) if cfg.ablation else None,
    }


# --- output -------------------------------------------------------------------------------------
def summary_table(report: dict) -> str:
    lines = [f"profile: {report['profile']['name']} ({report['profile']['source']})",
             "predicted output tok/s (simulator, not measured)",
             f"{'model':<11} {'batch':>5} {'prompt':>6} {'weights':>8} {'host%':>6} {'ratio':>6} "
             f"{'KV-only':>9} {'ACT-only':>9} {'hybrid':>9} {'hyb/KV':>7}  fits host (KV/hyb)"]
    for r in report["rows"]:
        p = r["policies"]
        lines.append(
            f"{r['model']:<11} {r['batch_size']:>5} {r['prompt_len']:>6} "
            f"{'stream' if p['hybrid']['offload_weights'] else 'device':>8} {100 * p['hybrid']['host_tier_fraction']:>5.0f}% "
            f"{p['hybrid']['act_ratio']:>6.2f} {p['kv-only']['output_tokens_per_s']:>9.1f} "
            f"{p['act-only']['output_tokens_per_s']:>9.1f} {p['hybrid']['output_tokens_per_s']:>9.1f} "
            f"{r['hybrid_over_kv_only']:>6.2f}x  {'yes' if p['kv-only']['fits_host'] else 'NO'}/"
            f"{'yes' if p['hybrid']['fits_host'] else 'NO'}")
    s = report["summary"]
    for key, label in (("hybrid_over_kv_only_mha_all", "all multi-head rows"),
                       ("hybrid_over_kv_only_mha_with_host_tier", "multi-head rows with a host tier"),
                       ("hybrid_over_kv_only_mha_both_fit_host", "multi-head rows where both fit host memory")):
        st = s[key]
        if st["rows"]:
            lines.append(f"hybrid / KV-only, {label} ({st['rows']}): mean {st['mean']:.2f}x, geomean {st['geomean']:.2f}x, "
                         f"range {st['min']:.2f}-{st['max']:.2f}x   (paper: {s['paper_speedup_over_flexgen']}x over FlexGen)")
    if report.get("capacity"):
        lines.append("best throughput over batches that fit host memory (tok/s @ batch):")
        for c in report["capacity"]:
            p = c["policies"]
            cells = "  ".join(f"{name} {p[name]['best_output_tokens_per_s']:.1f}@{p[name]['best_batch']}"
                              f" (max {p[name]['max_batch_fitting_host']})" for name in POLICIES)
            ratio = f"{c['hybrid_over_kv_only']:.2f}x" if c["hybrid_over_kv_only"] else "-"
            lines.append(f"  {c['model']:<11} prompt {c['prompt_len']:>5}: {cells}  hybrid/KV {ratio}")
    if report.get("ablation"):
        a = report["ablation"]
        lines.append(f"mini-batch ablation ({a['model']}, batch {a['batch_size']}, prompt {a['prompt_len']}, hybrid):")
        for name, c in a["cases"].items():
            lines.append(f"  {name:<55} {c['output_tokens_per_s']:>7.1f} tok/s  imbalance {c['minibatch_imbalance']:.2f}")
    return "\n".join(lines)




COLORS = {"kv-only": "tab:red", "act-only": "tab:orange", "hybrid": "tab:blue"}


def write_plot(report: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(r["model"] for r in report["rows"]))
    ncols = 2
    nrows = -(-(len(models) + 1) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(13, 4.3 * nrows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(models) + 1:]:
        ax.set_visible(False)
    width = 0.27
    for ax, model in zip(axes, models):
        rows = [r for r in report["rows"] if r["model"] == model]
        xs = range(len(rows))
        for k, policy in enumerate(POLICIES):
            ax.bar([x + (k - 1) * width for x in xs], [r["policies"][policy]["output_tokens_per_s"] for r in rows],
                   width, color=COLORS[policy], label=policy)
        ax.set_xticks(list(xs), [f"b{r['batch_size']}\np{r['prompt_len']}" for r in rows], fontsize=7)
        ax.set_yscale("log")
        ax.set_title(model + ("" if rows[0]["mha"] else " (GQA: hybrid = KV only)"))
        ax.set_ylabel("predicted output tok/s")
        ax.legend(fontsize=7)
    ax = axes[len(models)]
    for model in models:
        rows = [r for r in report["rows"] if r["model"] == model and r["mha"]]
        if rows:
            ax.plot(range(len(rows)), [r["hybrid_over_kv_only"] for r in rows], "o-", label=model)
            ax.set_xticks(range(len(rows)), [f"b{r['batch_size']}\np{r['prompt_len']}" for r in rows], fontsize=7)
    ax.axhline(PAPER_SPEEDUP_OVER_FLEXGEN, color="k", ls="--", lw=1, label="paper: 2.19x over FlexGen")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("hybrid / KV-only (predicted)")
    ax.set_title("speed-up at equal batch")
    ax.set_ylim(0.9, max(2.4, ax.get_ylim()[1]))
    ax.legend(fontsize=7, loc="lower right")
    prof = report["profile"]
    fig.suptitle(f"kvmem bench hybrid — simulator predictions, profile {prof['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- command line -------------------------------------------------------------------------------
def _ints(value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return out


def _models(value: str) -> tuple[str, ...]:
    out = tuple(x.strip() for x in value.split(",") if x.strip())
    unknown = [m for m in out if m not in MODELS]
    if unknown or not out:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    return out


def add_hybrid_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--profile", default=None, help="hardware profile JSON (default: the built-in A100-40GB/PCIe4 "
                                                     "profile, see kvmem.hybrid.profile.DEFAULT_PROFILE)")
    src.add_argument("--measure", action="store_true", help="measure this machine (about a second) and use that")
    p.add_argument("--save-profile", default=None, help="write the profile used to this JSON file")
    p.add_argument("--models", type=_models, default=HybridBenchConfig.models, help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--batches", type=_ints, default=HybridBenchConfig.batches)
    p.add_argument("--prompts", type=_ints, default=HybridBenchConfig.prompts)
    p.add_argument("--output-len", type=int, default=HybridBenchConfig.output_len)
    p.add_argument("--block-size", type=int, default=HybridBenchConfig.block_size)
    p.add_argument("--weights", choices=tuple(WEIGHTS), default=HybridBenchConfig.weights,
                   help="offload: stream every model's weights from the host (the paper's setting, default); "
                        "auto: only when they do not fit the device; resident: never")
    p.add_argument("--step-stride", type=int, default=1, help="simulate every n-th decode step (faster, approximate)")
    p.add_argument("--skip-capacity", action="store_true", help="skip the best-batch-within-host-memory sweep")
    p.add_argument("--skip-ablation", action="store_true", help="skip the mini-batch balancing ablation")
    p.add_argument("--json", default=None, help=f"write the report here (default {DEFAULT_JSON} for the default "
                                                f"profile, else {RESULTS_DIR}/hybrid-PROFILE_NAME.json)")
    p.add_argument("--plot", default=None, help="write the PNG here (default: the JSON path with .png)")


def cmd_bench_hybrid(args: argparse.Namespace) -> int:
    if args.measure:
        profile = hw.measure()
    elif args.profile:
        profile = hw.load(args.profile)
    else:
        profile = DEFAULT_PROFILE
    if args.save_profile:
        print(f"wrote profile {hw.save(profile, args.save_profile)}")
    if args.output_len < 1 or args.block_size < 1 or args.step_stride < 1:
        raise ValueError("--output-len, --block-size and --step-stride must be >= 1")
    cfg = HybridBenchConfig(models=args.models, batches=args.batches, prompts=args.prompts, output_len=args.output_len,
                            block_size=args.block_size, weights=args.weights, step_stride=args.step_stride,
                            capacity=not args.skip_capacity,
                            ablation=not args.skip_ablation)
    report = run_hybrid_benchmark(profile, cfg)
    print(summary_table(report))
    json_path = Path(args.json or (DEFAULT_JSON if profile == DEFAULT_PROFILE else f"{RESULTS_DIR}/hybrid-{profile.name}.json"))
    print(f"wrote {write_json(report, json_path)}")
    print(f"wrote {write_plot(report, args.plot or json_path.with_suffix('.png'))}")
    return 0
