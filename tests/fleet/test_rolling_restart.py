"""A rolling restart through the router loses no request: a replica sent SIGTERM while a client keeps
sending (round robin, so it gets its share) drains (finishes what it runs, answers 503 to the rest,
which the router retries on the other replica) and exits 0; every request completes in full."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.fleet.conftest import PATIENCE, TINY_SERVE_ARGS, replica_pid, start_fleet, wait_gone

pytest.importorskip("vllm_router", reason="vllm-router is not installed (pip install 'kvmem[fleet]')")

MAX_TOKENS = 24


def one_request(url: str, i: int) -> tuple[int, int, str | None]:
    """(status, tokens received, finish_reason) of request i; even ones streamed."""
    body = {"prompt": f"Rolling restart request {i}", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    if i % 2:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=PATIENCE)
        if r.status_code != 200:
            return r.status_code, 0, None
        return 200, r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["finish_reason"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    tokens, reason = 0, None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=PATIENCE) as r:
        if r.status_code != 200:
            return r.status_code, 0, None
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line.removeprefix("data: "))
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event["choices"]:
                    reason = choice.get("finish_reason") or reason
    return 200, tokens, reason


def test_sigterm_of_a_replica_behind_the_router_loses_no_request(tiny_model_dir):
    fleet = start_fleet(str(tiny_model_dir), "--replicas", "2", "--policy", "round_robin", "--no-pin",
                        serve_args=TINY_SERVE_ARGS)
    try:
        victim = replica_pid(fleet.proc.pid, fleet.replica_urls[1])
        results: list[tuple[int, int, str | None]] = []
        four_done = threading.Event()

        def client() -> None:
            for i in range(16):
                try:
                    results.append(one_request(fleet.url, i))
                except httpx.TransportError as e:
                    results.append((-1, 0, repr(e)))
                if len(results) == 4:
                    four_done.set()

        thread = threading.Thread(target=client)
        thread.start()
        assert four_done.wait(PATIENCE)
        os.kill(victim, signal.SIGTERM)
        thread.join(PATIENCE * 2)
        assert not thread.is_alive()
        assert results == [(200, MAX_TOKENS, "length")] * 16
        assert wait_gone([victim], PATIENCE) == []
        # The launcher reaps it and says how it ended (its watch loop polls every 0.5 s).
        deadline = time.monotonic() + PATIENCE
        while not any("replica-1 exited with status" in line for line in fleet.output):
            assert time.monotonic() < deadline, "\n".join(fleet.output[-30:])
            time.sleep(0.1)
        assert any("replica-1 exited with status 0" in line for line in fleet.output), "\n".join(fleet.output[-30:])
    finally:
        fleet.stop()
