"""`kvmem serve` as a user runs it: a process that answers, and on SIGINT/SIGTERM stops accepting,
ends what is in flight, and exits 0 within a few seconds."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.server.conftest import free_port


def start_cli_server(model_dir, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvmem.cli", "serve", str(model_dir), "--port", str(port),
                             "--dtype", "float32", "--kv-cache-memory", "8MiB", "--log-level", "warning", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start:\n{proc.communicate()[0]}")
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_with_a_stream_in_flight_ends_it_and_exits_0(tiny_model_dir, sig):
    proc, url = start_cli_server(tiny_model_dir, "--shutdown-grace", "0.2")
    first_chunk = threading.Event()
    events: list[str] = []

    def stream() -> None:
        body = {"prompt": "The quick brown fox", "max_tokens": 460, "n": 64, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(line.removeprefix("data: "))
                    first_chunk.set()

    client = threading.Thread(target=stream)
    client.start()
    try:
        assert first_chunk.wait(30)
        signalled = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0, proc.communicate()[0]
        assert time.monotonic() - signalled < 10
        client.join(10)
        assert events[-1] == "[DONE]"  # the stream was ended properly, not cut
        reasons = {c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"]} - {None}
        assert "abort" in reasons and reasons <= {"abort", "length"}
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_idle_server_exits_0_on_sigterm(tiny_model_dir):
    proc, url = start_cli_server(tiny_model_dir, "--served-model-name", "tiny")
    try:
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
