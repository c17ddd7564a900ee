"""`kvmem serve` as a user runs it: a process that answers, and on SIGINT/SIGTERM stops accepting,
ends what is in flight, and exits 0.

Bounds are generous (a machine at 4x load passes): they catch a hang, not a slow machine. The work
in flight is small; what matters is only that it is still running when the signal arrives."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.server.conftest import free_port

PATIENCE = 120.0  # starting, and the first token
EXIT_BOUND = 60.0  # from the signal to the exit


def start_cli_server(model_dir, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvmem.cli", "serve", str(model_dir), "--port", str(port),
                             "--dtype", "float32", "--kv-cache-memory", "8MiB", "--log-level", "warning", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start:\n{proc.communicate()[0]}")
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_with_a_stream_in_flight_ends_it_and_exits_0(tiny_model_dir, sig):
    # --drain-timeout 0: the stop without a drain (tests/server/test_drain.py has the drain)
    # One sequence at a time: the request's 8 x 460 tokens are 3,680 steps, so some are still to run
    # when the signal's 0.2 s grace ends however fast the machine (4 x 460 in parallel, 460 steps of
    # a tiny model, once all finished inside the grace on a quick run).
    proc, url = start_cli_server(tiny_model_dir, "--shutdown-grace", "0.2", "--drain-timeout", "0",
                                 "--max-num-seqs", "1")
    first_chunk = threading.Event()
    events: list[str] = []

    def stream() -> None:
        body = {"prompt": "The quick brown fox", "max_tokens": 460, "n": 8, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=PATIENCE) as response:
            if response.status_code != 200:  # fail fast, saying why
                events.append(f"{response.status_code}: {response.read()!r}")
                first_chunk.set()
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(line.removeprefix("data: "))
                    first_chunk.set()

    client = threading.Thread(target=stream)
    client.start()
    try:
        assert first_chunk.wait(PATIENCE)
        proc.send_signal(sig)
        assert proc.wait(timeout=EXIT_BOUND) == 0, proc.communicate()[0]
        client.join(EXIT_BOUND)
        assert not client.is_alive()
        assert events[-1] == "[DONE]"  # the stream was ended properly, not cut
        reasons = {c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"]} - {None}
        assert "abort" in reasons and reasons <= {"abort", "length"}  # the choices not done were aborted
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(f"{url}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_idle_server_exits_0_on_sigterm_and_the_limits_flags_reach_the_server(tiny_model_dir):
    proc, url = start_cli_server(tiny_model_dir, "--served-model-name", "tiny", "--max-prompts-per-request", "2",
                                 "--max-prompt-chars", "100", "--request-read-timeout", "1",
                                 "--timeout-keep-alive", "1", "--health-step-timeout", "30")
    try:
        assert httpx.get(f"{url}/v1/models", timeout=PATIENCE).json()["data"][0]["id"] == "tiny"
        for body in ({"prompt": ["a", "b", "c"]}, {"prompt": "x" * 101}):
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=PATIENCE)
            assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as stalled:
            stalled.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            stalled.settimeout(20)
            assert stalled.recv(1024) == b""  # closed by the server after about 1 s
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=EXIT_BOUND) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
