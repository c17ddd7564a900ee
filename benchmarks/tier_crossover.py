"""Where loading a prefix from a tier beats recomputing it (kvmem.memory.tiers.policy's thresholds).

For prefix lengths P (whole blocks) and a fixed 16-token suffix, the time to first token of one
request (max_tokens=1) whose P prefix tokens are
- recomputed (an engine without tiers and a cold prefix cache),
- loaded from the host tier (the prefix evicted there by release_free_memory),
- loaded from disk, page cache warm (the files just written), and cold (each file dropped from the
  page cache with posix_fadvise(DONTNEED) first),
in alternating rounds, medians and spreads; plus per-block load times from the tiers' histograms.
Engines are built first; the timed part holds /work/cpu.gate exclusively (the machine is shared).

    PYTHONPATH=src python benchmarks/tier_crossover.py --rounds 5 --json benchmarks/results/tiers/crossover.json
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from kvmem import LLM, SamplingParams

ONE = SamplingParams(temperature=0, max_tokens=1)


def prompt(tok, n_tokens: int, salt: int) -> list[int]:
    words = " ".join(f"item{salt}x{i} weighs {i * 7 % 13} grams;" for i in range(n_tokens))
    return tok.encode(words)[:n_tokens]


def ttft(llm: LLM, ids: list[int]) -> tuple[float, int]:
    start = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids}], ONE, use_tqdm=False)[0]
    return time.perf_counter() - start, out.num_cached_tokens


def drop_page_cache(directory: Path) -> None:
    for f in directory.glob("*/*.kv"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@contextlib.contextmanager
def exclusive_gate(path: str):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefixes", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024])
    ap.add_argument("--suffix", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--gate", default="/work/cpu.gate")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="kvmem-tiers-"))
    common = dict(dtype=args.dtype, kv_cache_memory="256MiB", max_model_len=2048, num_threads=2)
    plain = LLM(**common)
    host = LLM(**common, kv_offload_memory="512MiB")
    disk = LLM(**common, kv_offload_dir=str(directory), kv_offload_disk_bytes="2GiB")
    tok = plain.get_tokenizer()
    from kvmem.memory.tiers.policy import LoadPolicy

    for llm in (host, disk):  # measure every length: the policy's thresholds are what this finds
        llm.engine.manager.tiers.store.policy = LoadPolicy(min_host_tokens=1, min_disk_tokens=1)
    for llm in (plain, host, disk):  # warm-up: kernels, allocator
        ttft(llm, prompt(tok, 200, 999))
        llm.release_free_memory()

    rows = []
    with exclusive_gate(args.gate):
        for p in args.prefixes:
            times: dict[str, list[float]] = {"recompute": [], "host": [], "disk_warm": [], "disk_cold": []}
            for r in range(args.rounds):
                ids = prompt(tok, p + args.suffix, salt=p * 100 + r)
                # recompute: no cache at all
                plain.release_free_memory()
                times["recompute"].append(ttft(plain, ids)[0])
                # host: compute once, evict everything to the host tier, time the repeat
                ttft(host, ids)
                host.release_free_memory()
                t, cached = ttft(host, ids)
                assert cached >= p, (cached, p)
                times["host"].append(t)
                # disk, warm then cold page cache
                for kind in ("disk_warm", "disk_cold"):
                    ttft(disk, ids) if kind == "disk_warm" else None
                    disk.release_free_memory()
                    assert disk.engine.manager.tiers.store.flush(timeout=120)
                    if kind == "disk_cold":
                        drop_page_cache(directory)
                    t, cached = ttft(disk, ids)
                    assert cached >= p, (kind, cached, p)
                    times[kind].append(t)
            row = {"prefix_tokens": p, "suffix_tokens": args.suffix}
            for k, v in times.items():
                row[k] = {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)}
            for k in ("host", "disk_warm", "disk_cold"):
                row[f"{k}_vs_recompute"] = row[k]["median_s"] / row["recompute"]["median_s"]
            rows.append(row)
            print(json.dumps(row))

    per_block = {}
    for name, llm, tier in (("host", host, "host"), ("disk", disk, "disk")):
        s = llm.stats().extra["kv_offload"][tier]
        for kind in ("store_seconds", "load_seconds"):
            h = s[kind]
            n = sum(h["counts"])
            per_block[f"{name}_{kind}_mean"] = h["sum"] / n if n else None
    result = {"machine": "2-core shared CPU box (5 sessions), no GPU", "dtype": args.dtype,
              "block_bytes": host.stats().extra["kv_offload"]["block_bytes"], "rounds": args.rounds,
              "rows": rows, "per_block": per_block}
    print(json.dumps(per_block))
    for llm in (plain, host, disk):
        llm.close()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
