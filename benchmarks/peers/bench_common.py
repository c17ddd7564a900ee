"""What the peer benchmark scripts share: the workload, the command line, the noise record and
the result file. Imported by scripts in this folder (Python puts a script's folder on sys.path),
so it must work in every peer's virtual environment: standard library and numpy only."""
from __future__ import annotations

import argparse
import json
import os
import platform
import time


def load_workload(args: argparse.Namespace, vocab_size: int):
    """The shared workload (`kvmem.bench.workloads`), loaded by file path: kvmem need not be installed
    in a peer's virtual environment."""
    import importlib.util
    import sys

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src", "kvmem", "bench", "workloads.py")
    spec = importlib.util.spec_from_file_location("kvmem_bench_workloads", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module.make_workload(args.workload, vocab_size, args.seed, args.num_prompts, args.input_len,
                                args.output_len)


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


def timed(run, wait_quiet_max: float) -> tuple[object, float, dict, dict | None]:
    """Run `run()` once, timed; with the CPU other processes took meanwhile (see `contention`)."""
    quiet = wait_quiet(wait_quiet_max) if wait_quiet_max > 0 else None
    before = cpu_snapshot(os.getpid())
    t0 = time.perf_counter()
    out = run()
    elapsed = time.perf_counter() - t0
    return out, elapsed, contention(before, cpu_snapshot(os.getpid()), elapsed), quiet


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


def cpu_snapshot(root_pid: int) -> dict:
    """System-wide busy CPU seconds and the CPU seconds of root_pid's process tree (Linux /proc).

    The difference over the timed window is CPU taken by *other* processes: on a shared
    2-core machine that is the main source of noise, so each result records it.
    """
    tck = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = sum(v) - v[3] - v[4]  # all but idle and iowait
    parent, cpu = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(d)] = int(fields[1])
        cpu[int(d)] = int(fields[11]) + int(fields[12])  # utime + stime
    def in_tree(pid: int) -> bool:
        while pid > 1:
            if pid == root_pid:
                return True
            pid = parent.get(pid, 0)
        return False
    own = sum(c for p, c in cpu.items() if in_tree(p))
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    return {"busy_s": busy / tck, "own_s": own / tck, "loadavg1": load}


def wait_quiet(max_wait_s: float, threshold_cores: float = 0.1, window_s: float = 3.0) -> dict:
    """Wait (up to max_wait_s) until other processes use < threshold_cores over a window."""
    t_start = time.perf_counter()
    other = None
    while True:
        a = cpu_snapshot(os.getpid())
        time.sleep(window_s)
        b = cpu_snapshot(os.getpid())
        other = contention(a, b, window_s)["other_cores"]
        waited = time.perf_counter() - t_start
        if other < threshold_cores or waited >= max_wait_s:
            return {"waited_s": round(waited, 1), "quiet": other < threshold_cores, "other_cores_last": other}


def contention(before: dict, after: dict, elapsed: float) -> dict:
    busy = (after["busy_s"] - before["busy_s"]) / elapsed
    own = (after["own_s"] - before["own_s"]) / elapsed
    return {
        "system_busy_cores": round(busy, 3),
        "own_cores": round(own, 3),
        "other_cores": round(max(busy - own, 0.0), 3),
        "loadavg1_before": before["loadavg1"],
        "loadavg1_after": after["loadavg1"],
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
