"""`kvmem fleet`: N `kvmem serve` replicas on one machine, each pinned to its own cores, behind
vLLM's cache-aware router (router.py), started, watched and stopped as one command.

    kvmem fleet --replicas 2 --policy cache_aware --port 8000 -- [kvmem serve flags: MODEL, --kv-cache ...]

1. replicas: `kvmem serve ... --host H --port P_i` on ports P_0, P_1, ... (--replica-base-port),
   each with its own disjoint cores (sched_setaffinity + --num-threads), started together;
2. waits (bounded by --startup-timeout, saying what it waits for) until every /health answers 200;
3. the router on --host/--port with the replicas' URLs and the policy; waits for its /health;
4. then watches: a replica that dies is reported (the router's health checks and retries route
   around it); the router dying ends the fleet (exit 1);
5. SIGTERM / SIGINT: replicas get SIGTERM first (they drain: in-flight requests finish), then the
   router; whatever has not exited after --stop-timeout seconds is killed. The launcher killed
   outright takes its children with it (processes.py).

`--policy kv_aware`: each replica started here publishes its KV events (vLLM's ZMQ format) on a
free port, and the router subscribes to them (`--kv-event-source`), with the block size and model
name read from the first replica (/get_server_info, /v1/models).

Across machines: start replicas on each host (`kvmem serve --host 0.0.0.0`, or
`kvmem fleet --no-router --replica-host 0.0.0.0`) and a router anywhere with
`kvmem fleet --worker-urls http://host-a:8001 http://host-b:8001 ...`, which starts no replica.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import json

import httpx

from kvmem.fleet.cores import split_cores
from kvmem.fleet.processes import Child, spawn, stop_all
from kvmem.fleet.router import check_installed, kv_event_args, router_argv

logger = logging.getLogger("kvmem.fleet")

_THREAD_FLAGS = ("--num-threads", "--threads")
_REPORT_EVERY_S = 10.0  # while waiting for start-up


@dataclass
class FleetConfig:
    replicas: int = 2
    policy: str = "cache_aware"
    host: str = "127.0.0.1"  # the router's address
    port: int = 8000  # the router's port
    replica_host: str = "127.0.0.1"  # what replicas bind (0.0.0.0 for a router on another machine)
    replica_base_port: int | None = None  # replica i listens on base + i; None: port + 1; 0: free ports
    metrics_port: int = 29000  # the router's Prometheus port; 0: a free one
    pin: bool = True  # each replica on its own cores
    cores_per_replica: int | None = None  # default: an equal share of this process's cores
    serve_args: list[str] = field(default_factory=list)  # given to every `kvmem serve`
    worker_urls: list[str] = field(default_factory=list)  # front these replicas; start none
    router: bool = True  # False: replicas only (a router elsewhere fronts them)
    router_args: list[str] = field(default_factory=list)  # more vllm-router flags
    startup_timeout: float = 600.0
    stop_timeout: float = 60.0  # after SIGTERM, before SIGKILL (replicas drain within it)

    def __post_init__(self) -> None:
        if self.worker_urls and not self.router:
            raise ValueError("--worker-urls with --no-router would start nothing")
        if not self.worker_urls and self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        for name in ("startup_timeout", "stop_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.policy == "kv_aware" and self.router:
            if any(a.split("=")[0] == "--kv-events-config" for a in self.serve_args):
                raise ValueError("--policy kv_aware sets each replica's --kv-events-config (its own endpoint); "
                                 "do not pass one in the kvmem serve flags")
            if self.worker_urls and "--kv-event-source" not in self.router_args:
                raise ValueError("--policy kv_aware with --worker-urls needs each worker's event endpoint: "
                                 "--router-args '--kv-event-source URL=tcp://HOST:PORT ... --kv-event-model NAME'")


class FleetStopped(Exception):
    """A stop was asked for (a signal) while the fleet was starting."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _url_host(bind_host: str) -> str:
    """Where the router (on this machine) reaches a server bound to `bind_host`."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "", "::") else bind_host


class Fleet:
    """The processes of one fleet. `start()` returns once the router answers; `stop()` ends them."""

    def __init__(self, config: FleetConfig, stop_event: threading.Event | None = None) -> None:
        self.config = config
        self.stop_event = stop_event or threading.Event()
        self.replicas: list[Child] = []
        self.router: Child | None = None
        self.replica_urls: list[str] = list(config.worker_urls)
        self.router_url = f"http://{_url_host(config.host)}:{config.port}"
        self.event_endpoints: dict[str, str] = {}  # kv_aware: replica URL -> its ZMQ event endpoint

    # --- start ------------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        if cfg.router:
            check_installed()
        try:
            if not cfg.worker_urls:
                self._start_replicas()
            self._wait_healthy({url: None for url in self.replica_urls} if cfg.worker_urls
                               else {url: c for url, c in zip(self.replica_urls, self.replicas)}, "replica")
            if cfg.router:
                metrics_port = cfg.metrics_port or free_port(_url_host(cfg.host))
                extra = [*self._kv_event_router_args(), *cfg.router_args]  # the user's flags last: they win
                self.router = spawn("router", router_argv(self.replica_urls, cfg.policy, cfg.host, cfg.port,
                                                          metrics_port, extra))
                self._wait_healthy({self.router_url: self.router}, "router")
        except BaseException:
            self.stop()
            raise

    def _start_replicas(self) -> None:
        cfg = self.config
        cores = split_cores(cfg.replicas, cfg.cores_per_replica) if cfg.pin else [None] * cfg.replicas
        if cfg.replica_base_port == 0:
            ports = [free_port(_url_host(cfg.replica_host)) for _ in range(cfg.replicas)]
        else:
            base = cfg.port + 1 if cfg.replica_base_port is None else cfg.replica_base_port
            ports = [base + i for i in range(cfg.replicas)]
        for i, (port, replica_cores) in enumerate(zip(ports, cores)):
            argv = [sys.executable, "-m", "kvmem", "serve", *cfg.serve_args, "--host", cfg.replica_host,
                    "--port", str(port)]
            url = f"http://{_url_host(cfg.replica_host)}:{port}"
            if cfg.policy == "kv_aware" and cfg.router:
                endpoint = f"tcp://{_url_host(cfg.replica_host)}:{free_port(_url_host(cfg.replica_host))}"
                self.event_endpoints[url] = endpoint
                argv += ["--kv-events-config", json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                                                           "endpoint": endpoint})]
            env = dict(os.environ)
            if replica_cores is not None:
                env["OMP_NUM_THREADS"] = str(len(replica_cores))
                if not any(a.split("=")[0] in _THREAD_FLAGS for a in cfg.serve_args):
                    argv += ["--num-threads", str(len(replica_cores))]
            logger.info("starting replica-%d on port %d%s", i, port,
                        f", cores {replica_cores}" if replica_cores is not None else "")
            self.replicas.append(spawn(f"replica-{i}", argv, replica_cores, env))
            self.replica_urls.append(url)

    def _kv_event_router_args(self) -> list[str]:
        """kv_aware over replicas started here: where their events are, in blocks of what size, of which
        model (the router refuses event sources without a model identity)."""
        if not self.event_endpoints:
            return []
        first = self.replica_urls[0]
        with httpx.Client(timeout=30.0) as client:
            info = client.get(f"{first}/get_server_info").json()
            model = client.get(f"{first}/v1/models").json()["data"][0]["id"]
        return kv_event_args(self.event_endpoints, int(info["kv_block_size"]), model)

    def _wait_healthy(self, servers: dict[str, Child | None], what: str) -> None:
        """Until every URL's /health answers 200; a child that exits, the start-up timeout or a stop
        request ends the wait with an error saying which."""
        pending = dict(servers)
        started = time.monotonic()
        next_report = started + _REPORT_EVERY_S
        with httpx.Client(timeout=5.0) as client:
            while pending:
                for url, child in list(pending.items()):
                    if child is not None and not child.alive():
                        raise RuntimeError(f"{child.name} exited with status {child.proc.returncode} before it "
                                           f"was ready; its last lines:\n{child.last_lines()}")
                    try:
                        if client.get(f"{url}/health").status_code == 200:
                            del pending[url]
                            logger.info("%s %s is ready (%.1f s)", what, url, time.monotonic() - started)
                    except httpx.TransportError:
                        pass
                now = time.monotonic()
                if pending and now - started > self.config.startup_timeout:
                    raise RuntimeError(f"{what}s not ready after {self.config.startup_timeout:g} s "
                                       f"(--startup-timeout): {', '.join(pending)}")
                if pending and now >= next_report:
                    logger.info("waiting for %s(s) %s (%.0f s so far)", what, ", ".join(pending), now - started)
                    next_report = now + _REPORT_EVERY_S
                if pending and self.stop_event.wait(0.25):
                    raise FleetStopped()

    # --- run and stop -----------------------------------------------------------------------------
    def watch(self) -> int:
        """Until a stop is asked for (0) or the fleet cannot serve any more (1)."""
        reported: set[int] = set()
        while not self.stop_event.wait(0.5):
            if self.router is not None and not self.router.alive():
                logger.error("the router exited with status %s; stopping the fleet. Its last lines:\n%s",
                             self.router.proc.returncode, self.router.last_lines())
                return 1
            for i, r in enumerate(self.replicas):
                if not r.alive() and i not in reported:
                    reported.add(i)
                    logger.warning("%s exited with status %s; %s", r.name, r.proc.returncode,
                                   "the router sends its requests to the others" if self.router else "")
            if self.replicas and len(reported) == len(self.replicas):
                logger.error("no replica is left; stopping the fleet")
                return 1
        return 0

    def stop(self) -> None:
        """Replicas first (SIGTERM: they drain), then the router; SIGKILL after --stop-timeout."""
        stop_all(self.replicas, self.config.stop_timeout)
        if self.router is not None:
            stop_all([self.router], self.config.stop_timeout)

    def children(self) -> list[Child]:
        return [*self.replicas, *([self.router] if self.router else [])]


def run_fleet(config: FleetConfig) -> int:
    """`kvmem fleet`: start, serve until SIGTERM/SIGINT, stop; the exit status."""
    stop_event = threading.Event()

    def on_signal(sig: int, _frame) -> None:
        if stop_event.is_set() and sig == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop waiting politely (children still get SIGTERM)
        logger.info("%s: stopping the fleet", signal.Signals(sig).name)
        stop_event.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    fleet = Fleet(config, stop_event)
    try:
        try:
            fleet.start()
        except FleetStopped:
            return 0
        if config.router:
            logger.info("fleet ready: %s/v1 -> %d replicas %s (policy %s)", fleet.router_url,
                        len(fleet.replica_urls), " ".join(fleet.replica_urls), config.policy)
        else:
            logger.info("replicas ready (no router): %s", " ".join(fleet.replica_urls))
        status = fleet.watch()
        fleet.stop()
        return status
    finally:
        for c in fleet.children():  # a KeyboardInterrupt or an error on the way: no orphans either
            if c.alive():
                c.proc.kill()
                c.proc.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)


def split_serve_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`kvmem fleet [fleet flags] -- [kvmem serve flags]`: the two halves."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []
