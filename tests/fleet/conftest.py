"""`kvmem fleet` as a user runs it (a subprocess), on loopback, with a tiny random model; helpers to
read a replica's /metrics and the launcher's process tree. Skips where vllm-router is missing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.server.conftest import free_port

PATIENCE = 180.0  # start-up of replicas + router on a loaded 2-core machine; catches hangs only
TINY_SERVE_ARGS = ("--dtype", "float32", "--kv-cache-memory", "8MiB", "--log-level", "warning",
                   "--disable-log-requests")


@dataclass
class RunningFleet:
    proc: subprocess.Popen
    url: str  # the router
    replica_urls: list[str]
    output: list[str] = field(default_factory=list)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_fleet(*args: str, serve_args: tuple[str, ...] = ()) -> RunningFleet:
    """`kvmem fleet ARGS -- SERVE_ARGS` on a free router port; returns once it says it is ready."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvmem", "fleet", *args, "--port", str(port),
                             "--replica-base-port", "0", "--router-metrics-port", "0", "--", *serve_args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    fleet = RunningFleet(proc, f"http://127.0.0.1:{port}", [])
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            fleet.output.append(line.rstrip("\n"))
            m = re.search(r"(fleet ready: \S+ -> \d+ replicas|replicas ready \(no router\):) (.*?)(?: \(policy|$)",
                          line)
            if m:
                fleet.replica_urls = m.group(2).split()
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + PATIENCE
    while not ready.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail("fleet did not start:\n" + "\n".join(fleet.output[-60:]))
    return fleet


def metrics(url: str) -> dict[str, float]:
    """A server's /metrics samples by name (labels dropped; request_success summed over reasons)."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
    return values


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], bound: float) -> list[int]:
    deadline = time.monotonic() + bound
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def replica_pid(fleet_pid: int, replica_url: str) -> int:
    port = replica_url.rsplit(":", 1)[1]
    for pid in descendants(fleet_pid):
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                argv = f.read().split("\0")
        except OSError:
            continue
        if "serve" in argv and "--port" in argv and argv[argv.index("--port") + 1] == port:
            return pid
    raise AssertionError(f"no replica process on port {port}")


from tests.server.conftest import tiny_model_dir  # noqa: E402,F401  (the session fixture, shared)
