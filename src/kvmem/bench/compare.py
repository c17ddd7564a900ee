"""`kvmem bench throughput --compare vllm,transformers`: kvmem and the installed peers on one
workload, alternating engine by engine within each round so that drift of this shared machine hits
all of them alike; medians, per-round ratios, a JSON summary and a bar chart.

Every engine runs as its own process with the same workload (`kvmem.bench.workloads`), dtype, seed
and KV budget. The peers are the scripts in benchmarks/peers of this repository (see its README for
their setup): vLLM's CPU build in its own virtual environment, tuned as its CPU guide says, and
transformers `generate` in this one. They load a Hugging Face export of the same weights
(`benchmarks/peers/export_hf.py`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PEERS = ("vllm", "transformers", "llamacpp")
# Peers that load the Hugging Face export (--hf-model); llamacpp reads the GGUF itself.
HF_PEERS = ("vllm", "transformers")


@dataclass
class CompareConfig:
    workload: str
    dtype: str
    kv_cache: str
    kv_cache_gib: float
    seed: int
    rounds: int
    out_dir: Path
    hf_model: Path
    peers: tuple[str, ...]
    num_prompts: int | None = None
    input_len: int = 128
    output_len: int = 128
    peers_dir: Path = field(default_factory=lambda: Path(__file__).resolve().parents[3] / "benchmarks" / "peers")
    wait_quiet_max: float = 0.0
    # A run during which other processes took more than this many cores is run again (up to
    # `max_retries` times): one busy neighbour on two cores slows any OpenMP engine several-fold.
    max_other_cores: float = 0.1
    max_retries: int = 2
    # kvmem's --quantization and threads (llamacpp gets the same thread count; None: every core), and
    # the GGUF both read (None: the embedded default).
    quantization: str = "none"
    num_threads: int | None = None
    gguf: Path | None = None


@dataclass
class CompareResult:
    config: dict
    runs: dict[str, list[float]]  # engine -> output tokens/s per round (nan: the run failed)
    median_output_tokens_per_s: dict[str, float]
    kvmem_ratio_per_round: dict[str, list[float]]  # peer -> kvmem / peer, round by round
    kvmem_ratio_median: dict[str, float]
    files: list[str]


def parse_peers(text: str) -> tuple[str, ...]:
    peers = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in peers if p not in PEERS]
    if unknown or not peers:
        raise ValueError(f"--compare takes a comma-separated list of {', '.join(PEERS)}; got {text!r}")
    return peers


def _workload_args(cfg: CompareConfig) -> list[str]:
    args = ["--workload", cfg.workload, "--dtype", cfg.dtype, "--seed", str(cfg.seed),
            "--input-len", str(cfg.input_len), "--output-len", str(cfg.output_len),
            "--wait-quiet-max", str(cfg.wait_quiet_max)]
    return args + (["--num-prompts", str(cfg.num_prompts)] if cfg.num_prompts is not None else [])


def command(engine: str, cfg: CompareConfig, json_path: Path) -> list[str]:
    """The command line that runs one engine once and writes its result to `json_path`."""
    common = _workload_args(cfg)
    if engine == "kvmem":
        extra = ["--quantization", cfg.quantization] + (["--num-threads", str(cfg.num_threads)] if cfg.num_threads else [])
        extra += ["--model", str(cfg.gguf)] if cfg.gguf else []
        return [sys.executable, "-m", "kvmem.cli", "bench", "throughput", *common, "--kv-cache", cfg.kv_cache,
                "--kv-cache-memory", f"{cfg.kv_cache_gib}GiB", "--max-model-len", "2048", *extra,
                "--json", str(json_path)]
    if engine == "llamacpp":
        if cfg.gguf:
            gguf = cfg.gguf
        else:
            from kvmem.models.loader import default_model_path

            gguf = default_model_path()
        return ["bash", str(cfg.peers_dir / "run_llamacpp.sh"), *common, "--model", str(gguf),
                "--threads", str(cfg.num_threads or os.cpu_count()), "--json", str(json_path)]
    peer = [*common, "--model", str(cfg.hf_model), "--kv-cache-gb", str(cfg.kv_cache_gib), "--json", str(json_path)]
    if engine == "vllm":
        return ["bash", str(cfg.peers_dir / "run_vllm.sh"), *peer]
    if engine == "transformers":
        return [sys.executable, str(cfg.peers_dir / "transformers_throughput.py"), *peer]
    raise ValueError(f"unknown engine {engine!r}")


def check_peers(cfg: CompareConfig) -> None:
    if not cfg.peers_dir.is_dir():
        raise FileNotFoundError(f"peer scripts not found at {cfg.peers_dir}: --compare runs from a checkout of "
                                f"the kvmem repository (pip install -e .)")
    if any(p in HF_PEERS for p in cfg.peers) and not (Path(cfg.hf_model) / "config.json").exists():
        raise FileNotFoundError(f"--hf-model {cfg.hf_model} is not a Hugging Face model directory; export the "
                                f"default model with benchmarks/peers/export_hf.py (see benchmarks/peers/README.md)")


def run_compare(cfg: CompareConfig) -> CompareResult:
    check_peers(cfg)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    engines = ("kvmem", *cfg.peers)
    runs: dict[str, list[float]] = {e: [] for e in engines}
    files: list[str] = []
    for r in range(1, cfg.rounds + 1):
        for engine in engines:
            path = cfg.out_dir / f"{engine}_{cfg.workload}_{cfg.dtype}_r{r}.json"
            for attempt in range(cfg.max_retries + 1):
                start = time.perf_counter()
                path.unlink(missing_ok=True)
                proc = subprocess.run(command(engine, cfg, path), capture_output=True, text=True)
                if proc.returncode != 0 or not path.exists():
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                    print(f"  round {r} {engine}: FAILED ({proc.returncode}): {' | '.join(tail)}", file=sys.stderr)
                    tok_s = float("nan")
                    break
                result = json.loads(path.read_text())
                tok_s, other = result["output_tokens_per_s"], other_cores(result)
                print(f"  round {r} {engine:<12} {tok_s:8.1f} output tok/s  ({time.perf_counter() - start:.0f} s wall, "
                      f"other processes {other:.2f} cores)")
                if other <= cfg.max_other_cores:
                    files.append(str(path))
                    break
                if attempt == cfg.max_retries:
                    print(f"  round {r} {engine}: still contended after {attempt + 1} runs; kept", file=sys.stderr)
                    files.append(str(path))
            runs[engine].append(tok_s)
    medians = {e: _median(v) for e, v in runs.items()}
    ratios = {p: [k / v if v == v and k == k else float("nan") for k, v in zip(runs["kvmem"], runs[p])]
              for p in cfg.peers}
    result = CompareResult(config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                           runs=runs, median_output_tokens_per_s=medians, kvmem_ratio_per_round=ratios,
                           kvmem_ratio_median={p: _median(v) for p, v in ratios.items()}, files=files)
    stem = cfg.out_dir / f"compare_{cfg.workload}_{cfg.dtype}"
    stem.with_suffix(".json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))
    return result


def other_cores(result: dict) -> float:
    """CPU other processes took during the timed run (peers record it at the top, kvmem in settings)."""
    record = result.get("cpu_contention") or result.get("settings", {}).get("cpu_contention") or {}
    return float(record.get("other_cores", 0.0))


def _median(values: list[float]) -> float:
    ok = [v for v in values if v == v]
    return statistics.median(ok) if ok else float("nan")


def plot(result: CompareResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = list(result.runs)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    medians = [result.median_output_tokens_per_s[e] for e in engines]
    bars = ax.bar(engines, medians, color=["#2a7ab9"] + ["#999999"] * (len(engines) - 1))
    for e, bar in zip(engines, bars):
        for v in result.runs[e]:  # each round as a dot on its bar
            ax.plot(bar.get_x() + bar.get_width() / 2, v, "k.", alpha=0.6)
    ax.bar_label(bars, fmt="%.0f")
    c = result.config
    ax.set_ylabel("output tokens/s (median)")
    ax.set_title(f"{c['workload']} workload, {c['dtype']}, {c['kv_cache_gib']} GiB KV — {c['rounds']} rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(result: CompareResult) -> None:
    print("median output tokens/s: " + ", ".join(f"{e} {v:.1f}" for e, v in result.median_output_tokens_per_s.items()))
    for peer, ratio in result.kvmem_ratio_median.items():
        rounds = " / ".join(f"{r:.2f}" for r in result.kvmem_ratio_per_round[peer])
        print(f"  kvmem / {peer}: {ratio:.2f}x (rounds: {rounds})")
