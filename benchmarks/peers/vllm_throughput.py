"""Offline throughput of vLLM (CPU build) on a fixed random-token workload.

Workload (shared with kvmem's and transformers' benchmarks): ``num_prompts`` prompts of
``input_len`` random token ids from ``numpy.random.default_rng(seed)``, each generating exactly
``output_len`` tokens (greedy, ignore_eos). One small warm-up generate, then the whole workload
is timed as one ``LLM.generate`` call.

Run it with the vLLM venv, through run_vllm.sh, which sets the CPU-tuning environment
(VLLM_CPU_KVCACHE_SPACE, OMP binding, tcmalloc + Intel OpenMP preloads).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time


def make_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    import numpy

    rng = numpy.random.default_rng(seed)
    return rng.integers(100, vocab_size - 100, size=(num_prompts, input_len)).tolist()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-gb", type=float, default=2.0,
                    help="KV cache size; exported as VLLM_CPU_KVCACHE_SPACE unless already set")
    ap.add_argument("--warmup-prompts", type=int, default=4)
    ap.add_argument("--wait-quiet-max", type=float, default=0.0,
                    help="before the timed run, wait up to this many seconds for other processes to go idle")
    ap.add_argument("--json", help="write the result here")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    # vLLM's CPU backend reads the KV cache size (GiB) from the environment.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(args.kv_cache_gb) if args.kv_cache_gb.is_integer()
                                                        else args.kv_cache_gb))

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(os.path.join(args.model, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    prompts = make_prompts(args.num_prompts, args.input_len, vocab_size, args.seed)

    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.input_len + args.output_len + 16,
        seed=args.seed,
    )
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)

    warm = [TokensPrompt(prompt_token_ids=p) for p in prompts[: args.warmup_prompts]]
    t0 = time.perf_counter()
    llm.generate(warm, params, use_tqdm=False)
    warmup_s = time.perf_counter() - t0

    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    quiet = _wait_quiet(args.wait_quiet_max) if args.wait_quiet_max > 0 else None
    snap0 = _cpu_snapshot(os.getpid())
    t0 = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    contention = _contention(snap0, _cpu_snapshot(os.getpid()), elapsed)

    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    expected = args.num_prompts * args.output_len
    if n_out != expected or n_in != args.num_prompts * args.input_len:
        raise SystemExit(f"token counts off: in {n_in}, out {n_out} (expected out {expected})")

    result = {
        "engine": "vllm",
        "model": os.path.abspath(args.model),
        "dtype": args.dtype,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "seed": args.seed,
        "kv_cache_gb": args.kv_cache_gb,
        "elapsed_s": elapsed,
        "warmup_s": warmup_s,
        "requests_per_s": args.num_prompts / elapsed,
        "total_tokens_per_s": (n_in + n_out) / elapsed,
        "output_tokens_per_s": n_out / elapsed,
        "input_tokens": n_in,
        "output_tokens": n_out,
        "first_output_ids": list(outs[0].outputs[0].token_ids[:16]),
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in (
            "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
            "LD_PRELOAD", "OMP_NUM_THREADS", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR")},
        "cpu_contention": contention,
        "wait_quiet": quiet,
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


def _cpu_snapshot(root_pid: int) -> dict:
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


def _wait_quiet(max_wait_s: float, threshold_cores: float = 0.1, window_s: float = 3.0) -> dict:
    """Wait (up to max_wait_s) until other processes use < threshold_cores over a window."""
    t_start = time.perf_counter()
    other = None
    while True:
        a = _cpu_snapshot(os.getpid())
        time.sleep(window_s)
        b = _cpu_snapshot(os.getpid())
        other = _contention(a, b, window_s)["other_cores"]
        waited = time.perf_counter() - t_start
        if other < threshold_cores or waited >= max_wait_s:
            return {"waited_s": round(waited, 1), "quiet": other < threshold_cores, "other_cores_last": other}


def _contention(before: dict, after: dict, elapsed: float) -> dict:
    busy = (after["busy_s"] - before["busy_s"]) / elapsed
    own = (after["own_s"] - before["own_s"]) / elapsed
    return {
        "system_busy_cores": round(busy, 3),
        "own_cores": round(own, 3),
        "other_cores": round(max(busy - own, 0.0), 3),
        "loadavg1_before": before["loadavg1"],
        "loadavg1_after": after["loadavg1"],
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
