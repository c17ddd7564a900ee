"""`kvmem serve` drains on SIGTERM (server/drain.py): /health and new requests answer 503, the
request in flight runs to its end (not aborted), then the process exits 0.

The request "in flight" is held open deterministically, not by racing a generation: its client
sends the headers and half the body, and the rest only after the drain has been checked; the
server counts a request from its headers on, so the drain waits for it. No timing asserts."""

from __future__ import annotations

import json
import signal
import socket
import time

import httpx

from kvmem.server.drain import Drain
from tests.server.test_launcher import EXIT_BOUND, PATIENCE, start_cli_server


def read_http_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return status, body


def wait_for(predicate, what: str, bound: float = PATIENCE) -> None:
    deadline = time.monotonic() + bound
    while not predicate():
        assert time.monotonic() < deadline, f"not seen within {bound} s: {what}"
        time.sleep(0.05)


def health_status(url: str) -> int:
    return httpx.get(f"{url}/health", timeout=10).status_code


def test_sigterm_drains_503s_new_work_finishes_what_is_in_flight_and_exits_0(tiny_model_dir):
    proc, url = start_cli_server(tiny_model_dir, "--drain-timeout", "300", "--shutdown-grace", "0.2",
                                 "--request-read-timeout", "300")
    port = int(url.rsplit(":", 1)[1])
    try:
        body = json.dumps({"prompt": "The quick brown fox", "max_tokens": 24, "ignore_eos": True,
                           "temperature": 0}).encode()
        with socket.create_connection(("127.0.0.1", port)) as held:
            held.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10])
            # The server counts the request from its headers on (a GET, such as /get_load, is not counted).
            wait_for(lambda: httpx.get(f"{url}/get_load", timeout=10).json()["http_requests_in_flight"] == 1,
                     "the held request counted in flight")
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: health_status(url) == 503, "/health answering 503 while draining")
            health = httpx.get(f"{url}/health", timeout=10).json()
            assert health["error"]["code"] == "draining"
            refused = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
            assert refused.status_code == 503
            assert refused.json()["error"]["type"] == "service_unavailable"
            assert httpx.get(f"{url}/get_load", timeout=10).json()["draining"] is True
            assert proc.poll() is None  # still serving the held request
            held.sendall(body[10:])
            status, raw = read_http_response(held)
        assert status == 200, raw
        choice = json.loads(raw)["choices"][0]
        assert choice["finish_reason"] == "length"  # ran to its end, not aborted
        assert json.loads(raw)["usage"]["completion_tokens"] == 24
        assert proc.wait(timeout=EXIT_BOUND) == 0, proc.communicate()[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_drain_timeout_0_means_the_old_stop(tiny_model_dir):
    proc, url = start_cli_server(tiny_model_dir, "--drain-timeout", "0")
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=EXIT_BOUND) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_drain_is_done_when_nothing_is_in_flight_or_the_timeout_passed():
    d = Drain()
    assert not d.draining and not d.done(10)
    d.in_flight = 1
    d.start()
    assert d.draining and not d.done(10)
    assert d.done(0)  # timeout passed
    d.in_flight = 0
    assert d.done(10)
