"""Time to first token of a long prompt after a server restart: computed from scratch vs answered from
the disk tier of the prefix cache (`--kv-offload-dir`).

Each round, with a fresh empty tier directory:
  1. start `kvmem serve` with the tier flags; send the prompt (cold: nothing cached anywhere); send it
     again (warm: a hit in the KV budget itself, the best case for reference); stop the server (SIGTERM,
     its drain flushes what it writes);
  2. start it again on the same directory; send the prompt (after restart: from disk if the tier works,
     else computed again); stop.
The prompt is random token ids (seeded, the same every round) sent to /v1/completions with
max_tokens 1, so TTFT is the prefill (or the load) plus one step. Results: one JSON with every
sample and the medians; the table goes to docs/benchmarks.md.

    python benchmarks/kv_offload_restart.py --rounds 3 --prompt-len 4000 \
        --server-args "--kv-offload-memory 1GiB --kv-offload-disk-bytes 4GiB --kv-cache-memory 256MiB"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from kvmem.bench.serving import send_request

VOCAB = 49152  # the embedded SmolLM2's; ids are drawn below it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, offload_dir: Path, log) -> subprocess.Popen:
    with socket.socket() as s:  # another server on the port would answer in this one's place
        if s.connect_ex(("127.0.0.1", args.port)) == 0:
            raise RuntimeError(f"port {args.port} is already taken by another server")
    cmd = [sys.executable, "-m", "kvmem", "serve", "--port", str(args.port), "--log-level", "warning",
           "--kv-offload-dir", str(offload_dir), *shlex.split(args.server_args)]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} while starting: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=2).status_code == 200 and proc.poll() is None:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health within {args.startup_timeout} s")


def stop_server(proc: subprocess.Popen, timeout: float = 120.0) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def ask(port: int, prompt: list[int]) -> dict:
    """One streamed completion: TTFT (ms) and the cached prompt tokens the server reports."""
    async def go():
        async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
            payload = {"model": (await client.get(f"http://127.0.0.1:{port}/v1/models")).json()["data"][0]["id"],
                       "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}
            return await send_request(client, f"http://127.0.0.1:{port}/v1/completions", payload, False, len(prompt))

    out = asyncio.run(go())
    if not out.success:
        raise RuntimeError(f"request failed: {out.error}")
    return {"ttft_ms": out.ttft_s * 1000.0, "prompt_tokens": out.prompt_tokens, "cached_tokens": out.cached_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=4000)
    ap.add_argument("--model", default=None, help="default: the embedded model")
    ap.add_argument("--server-args", default="", help="more `kvmem serve` flags (the tiers' budgets, dtype, ...)")
    ap.add_argument("--port", type=int, default=None, help="default: a free port")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--json", default="benchmarks/results/kv_offload/restart.json")
    args = ap.parse_args()
    args.port = args.port or free_port()
    prompt = np.random.default_rng(0).integers(100, VOCAB - 100, size=args.prompt_len).tolist()
    samples: dict[str, list[dict]] = {"cold": [], "warm": [], "after_restart": []}
    with tempfile.TemporaryDirectory(prefix="kvmem-restart-") as tmp:
        log = open(Path(tmp) / "server.log", "w")
        for r in range(args.rounds):
            tier = Path(tmp) / f"tier{r}"
            tier.mkdir()
            proc = start_server(args, tier, log)
            try:
                samples["cold"].append(ask(args.port, prompt))
                samples["warm"].append(ask(args.port, prompt))
            finally:
                stop_server(proc)
            on_disk = sum(f.stat().st_size for f in tier.rglob("*") if f.is_file())
            proc = start_server(args, tier, log)
            try:
                samples["after_restart"].append({**ask(args.port, prompt), "tier_bytes_on_disk": on_disk})
            finally:
                stop_server(proc)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]['ttft_ms']:.0f} ms (cached {v[-1]['cached_tokens']})"
                                                 for k, v in samples.items()), flush=True)
    medians = {k: statistics.median(s["ttft_ms"] for s in v) for k, v in samples.items()}
    spreads = {k: [min(s["ttft_ms"] for s in v), max(s["ttft_ms"] for s in v)] for k, v in samples.items()}
    result = {"prompt_len": args.prompt_len, "rounds": args.rounds, "server_args": args.server_args,
              "model": args.model or "embedded SmolLM2-135M-Instruct", "machine": os.uname().nodename,
              "median_ttft_ms": medians, "ttft_ms_range": spreads,
              "cold_over_after_restart": medians["cold"] / medians["after_restart"], "samples": samples}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_ttft_ms", "ttft_ms_range", "cold_over_after_restart")}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
