"""A kvmem server on a free loopback port, run by uvicorn in a thread of the test process, so tests
talk to it over real HTTP (the `openai` client, httpx) and can also look at its engine."""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from kvmem.config import EngineConfig
from kvmem.engine.async_engine import AsyncLLMEngine
from kvmem.engine.llm_engine import LLMEngine
from kvmem.server.api_server import ServerSettings, build_app
from kvmem.server.connection import uvicorn_config
from tests.oracle import make_tiny_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str
    engine: AsyncLLMEngine
    settings: ServerSettings
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def model(self) -> str:
        return self.settings.served_model_name

    def metrics(self) -> dict[str, float]:
        """The /metrics samples, keyed by name (labels dropped; one server, one label set)."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=120).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
            if m and "finished_reason" not in (m.group(2) or ""):
                values[m.group(1)] = float(m.group(3))
            elif m:
                reason = re.search(r'finished_reason="([^"]+)"', m.group(2)).group(1)
                values[f"{m.group(1)}[{reason}]"] = float(m.group(3))
        return values

    def wait_kv_free(self, timeout: float = 60.0) -> dict[str, float]:
        """Poll /metrics until no request runs and no KV memory is held; return the last sample.
        The bound is generous (a loaded machine is slow); an idle server returns at once."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["kvmem:num_requests_running"] == 0 and m["kvmem:num_requests_waiting"] == 0
                    and m["kvmem:kv_cache_allocated_bytes"] == 0 and m["kvmem:kv_cache_resident_sequences"] == 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(config: EngineConfig, **settings_kwargs) -> RunningServer:
    async_engine = AsyncLLMEngine(lambda: LLMEngine(config))
    async_engine.start()  # builds the engine on its own thread, as `kvmem serve` does
    settings = ServerSettings(served_model_name=settings_kwargs.pop("served_model_name",
                                                                    async_engine.engine.model_config.name),
                              **settings_kwargs)
    port = free_port()
    server = uvicorn.Server(uvicorn_config(build_app(async_engine, settings), settings, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    return RunningServer(f"http://127.0.0.1:{port}", async_engine, settings, server, thread)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("server") / "llama", "llama-mha")


TINY_ENGINE = dict(dtype="float32", kv_cache_memory="8MiB", max_num_seqs=64)


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    server = start_server(EngineConfig(model=str(tiny_model_dir), **TINY_ENGINE))
    yield server
    server.stop()
