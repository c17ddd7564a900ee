"""What the peer benchmark scripts share: the workload, the command line, the noise record and
the result file. Imported by scripts in this folder (Python puts a script's folder on sys.path),
so it must work in every peer's virtual environment: standard library and numpy only."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time


def _kvmem_bench_module(name: str):
    """A module of kvmem.bench loaded by file path: kvmem need not be installed in a peer's venv
    (these modules use the standard library and numpy only)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src", "kvmem", "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"kvmem_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


_load = _kvmem_bench_module("machine_load")
timed, cpu_name = _load.timed, _load.cpu_name


def load_workload(args: argparse.Namespace, vocab_size: int):
    """The shared workload (`kvmem.bench.workloads`)."""
    return _kvmem_bench_module("workloads").make_workload(args.workload, vocab_size, args.seed, args.num_prompts,
                                                          args.input_len, args.output_len)


def parse_args(description: str, kv_cache_help: str = "unused; kept for a shared CLI") -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--workload", choices=["random", "sharegpt", "prefix"], default="random")
    ap.add_argument("--num-prompts", type=int, default=None, help="default: the workload's own count")
    ap.add_argument("--input-len", type=int, default=128, help="random workload only")
    ap.add_argument("--output-len", type=int, default=128, help="random workload only")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-gb", type=float, default=2.0, help=kv_cache_help)
    ap.add_argument("--warmup-prompts", type=int, default=4)
    ap.add_argument("--warmup-tokens", type=int, default=8)
    ap.add_argument("--wait-quiet-max", type=float, default=0.0,
                    help="before the timed run, wait up to this many seconds for other processes to go idle")
    ap.add_argument("--json", help="write the result here")
    return ap.parse_args()


def base_result(engine: str, args: argparse.Namespace, workload, elapsed: float, warmup_s: float, n_out: int) -> dict:
    """The fields every engine's result has, under the keys kvmem's benchmark uses too."""
    n_in, n = workload.num_input_tokens, len(workload.prompts)
    return {
        "engine": engine,
        "model": os.path.abspath(args.model),
        "dtype": args.dtype,
        "workload": workload.name,
        "workload_description": workload.describe(),
        "num_prompts": n,
        "seed": args.seed,
        "elapsed_s": elapsed,
        "warmup_s": warmup_s,
        "requests_per_s": n / elapsed,
        "total_tokens_per_s": (n_in + n_out) / elapsed,
        "output_tokens_per_s": n_out / elapsed,
        "input_tokens": n_in,
        "output_tokens": n_out,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_result(result: dict, path: str | None) -> None:
    print(json.dumps(result, indent=2))
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
