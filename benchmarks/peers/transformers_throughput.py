"""Offline throughput of Hugging Face transformers ``generate`` on the shared workload.

Same workload and JSON keys as vllm_throughput.py: ``num_prompts`` random-token prompts of
``input_len`` tokens (``numpy.random.default_rng(seed)``), exactly ``output_len`` new tokens each,
greedy. All prompts have the same length, so they run as one batch with no padding. One small
warm-up generate, then the whole batch is timed.

Run it with the project venv: /work/main/.venv/bin/python
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
    ap.add_argument("--kv-cache-gb", type=float, default=2.0, help="unused; kept for a shared CLI")
    ap.add_argument("--warmup-prompts", type=int, default=4)
    ap.add_argument("--warmup-tokens", type=int, default=8)
    ap.add_argument("--wait-quiet-max", type=float, default=0.0,
                    help="before the timed run, wait up to this many seconds for other processes to go idle")
    ap.add_argument("--json", help="write the result here")
    return ap.parse_args()


def main() -> None:
    args = parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.eval()
    vocab_size = model.config.vocab_size
    prompts = make_prompts(args.num_prompts, args.input_len, vocab_size, args.seed)
    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)

    def run(input_ids, attention_mask, n):
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            min_new_tokens=n,
            max_new_tokens=n,
            pad_token_id=model.config.eos_token_id,
        )

    with torch.inference_mode():
        w = args.warmup_prompts
        t0 = time.perf_counter()
        run(ids[:w], mask[:w], args.warmup_tokens)
        warmup_s = time.perf_counter() - t0

        quiet = _wait_quiet(args.wait_quiet_max) if args.wait_quiet_max > 0 else None
        snap0 = _cpu_snapshot(os.getpid())
        t0 = time.perf_counter()
        out = run(ids, mask, args.output_len)
        elapsed = time.perf_counter() - t0
        contention = _contention(snap0, _cpu_snapshot(os.getpid()), elapsed)

    n_in = ids.numel()
    n_out = (out.shape[1] - args.input_len) * out.shape[0]
    if n_out != args.num_prompts * args.output_len:
        raise SystemExit(f"token counts off: out {n_out}")

    result = {
        "engine": "transformers",
        "model": os.path.abspath(args.model),
        "dtype": args.dtype,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "seed": args.seed,
        "kv_cache_gb": None,
        "elapsed_s": elapsed,
        "warmup_s": warmup_s,
        "requests_per_s": args.num_prompts / elapsed,
        "total_tokens_per_s": (n_in + n_out) / elapsed,
        "output_tokens_per_s": n_out / elapsed,
        "input_tokens": n_in,
        "output_tokens": n_out,
        "first_output_ids": out[0, args.input_len: args.input_len + 16].tolist(),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
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
