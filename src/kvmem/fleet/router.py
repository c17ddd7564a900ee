"""The router in front of the replicas: vLLM's `vllm-router` (pip `vllm-router`), a Rust binary in a
wheel, run as `python -m vllm_router.launch_router`.

Why this one (README, "A fleet"): it installs from PyPI as a wheel with no toolchain, it is
maintained by the vLLM project (releases through 2026), it has the `cache_aware` policy (an
approximate radix tree of the prompts it sent to each worker, balanced against load) and a
`kv_aware` one fed by vLLM's KV events, it does health checks, retries on another worker and
circuit breaking, and it discovers workers in Kubernetes by label. SGLang's `sglang-router` is
the same code (vLLM's is a fork of it), with an older release here; Ray Serve would bring a
cluster runtime to start one process per replica.

What it needs from a worker, all answered by `kvmem serve`: `GET /health` (startup and periodic
checks; 503 takes a worker out), `GET /get_load` (`{"load": int}`), `POST /tokenize` (prompt ->
token ids for the cache-aware tree, after trying vLLM's `/v1/.../render`, which kvmem does not
have: a 404 it falls back from), the OpenAI routes, to which it adds SGLang's neutral
sampling fields (`no_stop_trim`, `return_hidden_states`, ... accepted by server/protocol.py), and for
`kv_aware` each worker's KV events (vLLM's ZMQ format, `--kv-events-config`): the router keeps an
index of which worker holds which blocks, from what the workers say they stored and evicted, instead
of guessing from what it sent (cache_aware), and credits blocks by `medium` (GPU, CPU, STORAGE).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

POLICIES = ("cache_aware", "kv_aware", "round_robin", "power_of_two", "consistent_hash", "random")

# Health checks every few seconds, not the router's default minute: a dead or draining replica
# leaves the rotation within seconds. Between two checks, a request sent to a replica that just died
# fails and is retried (the router's default: up to 5 times); the policy may pick the same replica
# again, so its circuit opens after 2 failures (default 10) and the retries go to the others; after
# 5 s (default 60) one request tries it again.
DEFAULT_ROUTER_ARGS = ("--health-check-interval-secs", "2", "--health-failure-threshold", "2",
                       "--health-success-threshold", "1", "--worker-startup-check-interval", "1",
                       "--cb-failure-threshold", "2", "--cb-timeout-duration-secs", "5")


def check_installed() -> None:
    if importlib.util.find_spec("vllm_router") is None:
        raise ValueError("kvmem fleet needs vLLM's router: pip install 'kvmem[fleet]' (or pip install vllm-router)")


def kv_event_args(sources: dict[str, str], block_size: int, model: str) -> list[str]:
    """The router flags of `kv_aware`: each worker's ZMQ event endpoint (its `--kv-events-config`), the
    block size of the events' token runs, and the model identity the workers share."""
    argv: list[str] = []
    for url, endpoint in sources.items():
        argv += ["--kv-event-source", f"{url}={endpoint}"]
    return argv + ["--kv-event-block-size", str(block_size), "--kv-event-model", model]


def router_argv(worker_urls: Sequence[str], policy: str, host: str, port: int, metrics_port: int,
                extra: Sequence[str] = ()) -> list[str]:
    """The command line of the router; `extra` (vllm-router flags) comes last, so it overrides."""
    if policy not in POLICIES:
        raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return [sys.executable, "-m", "vllm_router.launch_router", "--worker-urls", *worker_urls, "--policy", policy,
            "--host", host, "--port", str(port), "--prometheus-host", host, "--prometheus-port", str(metrics_port),
            *DEFAULT_ROUTER_ARGS, *extra]
