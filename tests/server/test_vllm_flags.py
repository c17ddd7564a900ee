"""vLLM's server flags and logs: CORS headers, several served model names, the API key from the
environment, and the lines a person running a server reads (start-up capacity, one line per
finished request, the periodic stats line). Nothing here depends on machine speed: the stats line
is checked with an interval of 0 (every step) and on hand-made snapshots."""

from __future__ import annotations

import asyncio
import logging
import re
import signal

import httpx
import pytest

from kvmem import SamplingParams
from kvmem.config import EngineConfig
from kvmem.engine.async_engine import AsyncLLMEngine, EngineSnapshot, StatsLogger, format_stats
from kvmem.engine.llm_engine import LLMEngine
from kvmem.memory.base import MemoryStats
from kvmem.server.launcher import api_key_from_env
from tests.server.conftest import TINY_ENGINE, start_server
from tests.server.test_launcher import EXIT_BOUND, PATIENCE, start_cli_server

ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir):
    server = start_server(EngineConfig(model=str(tiny_model_dir), **TINY_ENGINE), served_model_name="first",
                          extra_model_names=("second", "third"), allowed_origins=(ORIGIN,), api_key="k3y")
    yield server
    server.stop()


def test_no_cors_headers_by_default(tiny_server):
    response = httpx.get(f"{tiny_server.base_url}/v1/models", headers={"Origin": ORIGIN}, timeout=PATIENCE)
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    preflight = httpx.options(f"{tiny_server.base_url}/v1/completions", timeout=PATIENCE, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_headers_for_allowed_origins_even_on_a_401(vllm_server):
    url = vllm_server.base_url
    preflight = httpx.options(f"{url}/v1/chat/completions", timeout=PATIENCE, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200  # a preflight carries no key
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    unauthorized = httpx.get(f"{url}/v1/models", headers={"Origin": ORIGIN}, timeout=PATIENCE)
    assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{url}/v1/completions", timeout=PATIENCE, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_several_served_names_all_accepted_the_first_reported(vllm_server):
    url, auth = vllm_server.base_url, {"Authorization": "Bearer k3y"}
    listed = httpx.get(f"{url}/v1/models", headers=auth, timeout=PATIENCE).json()["data"]
    assert [m["id"] for m in listed] == ["first", "second", "third"]
    for name in ("first", "third"):
        response = httpx.post(f"{url}/v1/completions", headers=auth, timeout=PATIENCE,
                              json={"model": name, "prompt": "Hello", "max_tokens": 2})
        assert response.status_code == 200 and response.json()["model"] == "first"
    response = httpx.post(f"{url}/v1/completions", headers=auth, timeout=PATIENCE,
                          json={"model": "fourth", "prompt": "Hello", "max_tokens": 2})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.delenv("KVMEM_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert api_key_from_env() is None
    monkeypatch.setenv("VLLM_API_KEY", "v")
    assert api_key_from_env() == "v"
    monkeypatch.setenv("KVMEM_API_KEY", "k")
    assert api_key_from_env() == "k"


def test_kvmem_serve_with_vllm_flags_and_its_logs(tiny_model_dir, monkeypatch):
    """The flags reach the server through `kvmem serve`; the key comes from KVMEM_API_KEY; the log
    says the KV capacity, the concurrency, and a line per request, every line timestamped."""
    monkeypatch.setenv("KVMEM_API_KEY", "from-env")
    proc, url = start_cli_server(tiny_model_dir, "--log-level", "info", "--served-model-name", "a", "b",
                                 "--allowed-origins", f'["{ORIGIN}"]', "--seed", "3", "--disable-log-stats",
                                 "--max-model-len", "64")
    try:
        assert httpx.get(f"{url}/v1/models", timeout=PATIENCE).status_code == 401
        auth = {"Authorization": "Bearer from-env", "Origin": ORIGIN}
        models = httpx.get(f"{url}/v1/models", headers=auth, timeout=PATIENCE)
        assert [m["id"] for m in models.json()["data"]] == ["a", "b"]
        assert models.headers["access-control-allow-origin"] == ORIGIN
        response = httpx.post(f"{url}/v1/completions", headers=auth, timeout=PATIENCE,
                              json={"model": "b", "prompt": "Hello there", "max_tokens": 3, "ignore_eos": True})
        assert response.status_code == 200, response.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=EXIT_BOUND) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log = proc.communicate()[0]
    lines = [line for line in log.splitlines() if line.strip()]
    stamp = re.compile(r"^(INFO|WARNING|ERROR|DEBUG) \d\d-\d\d \d\d:\d\d:\d\d\.\d{3} ")
    assert all(stamp.match(line) for line in lines), log
    assert re.search(r"KV cache size: [\d,]+ tokens \(paged, budget 8\.0 MiB", log), log
    assert re.search(r"Maximum concurrency for 64 tokens per request: [\d.]+x", log), log
    finished = [line for line in lines if "Finished request cmpl-" in line]
    assert len(finished) == 1, log
    assert re.search(r"output 3 tokens, TTFT [\d.]+ s, total [\d.]+ s, finish_reason length", finished[0])
    assert "Avg prompt throughput" not in log  # --disable-log-stats


# --- the log lines, in process --------------------------------------------------------------------
def _snapshot(t: float, steps: int, prompt: int, generation: int, preemptions: int = 0, running: int = 1,
              waiting: int = 0, queries: int = 0, hits: int = 0, allocated: int = 0) -> EngineSnapshot:
    memory = MemoryStats("paged", 1000, 1000, allocated, allocated, 0, running, prefix_cache_queries=queries,
                         prefix_cache_hits=hits, bytes_capacity=1000)
    return EngineSnapshot(time=t, memory=memory, num_requests=running + waiting, num_running=running,
                          num_waiting=waiting, num_preemptions=preemptions, num_prompt_tokens=prompt,
                          num_generation_tokens=generation, num_steps=steps)


def test_stats_line_over_the_interval(caplog):
    caplog.set_level(logging.INFO, logger="kvmem.engine.async_engine")
    stats = StatsLogger(interval=10.0)
    assert stats.observe(_snapshot(100.0, 0, 0, 0)) is None  # the base
    assert stats.observe(_snapshot(105.0, 5, 500, 50)) is None  # not due yet
    assert stats.due_in(_snapshot(105.0, 5, 500, 50)) == pytest.approx(5.0)
    line = stats.observe(_snapshot(110.0, 10, 1000, 200, preemptions=2, running=3, waiting=4, queries=100,
                                   hits=25, allocated=125))
    assert line == ("Avg prompt throughput: 100.0 tokens/s, Avg generation throughput: 20.0 tokens/s, "
                    "Running: 3 seqs, Waiting: 4 seqs, KV cache usage: 12.5%, Prefix cache hit rate: 25.0%, "
                    "Preemptions: 2 (2 in all)")
    assert caplog.messages == [line]
    # nothing happened since: no line, and an idle engine is not woken for one
    idle = _snapshot(130.0, 10, 1000, 200, preemptions=2, running=0, queries=100, hits=25)
    assert stats.due_in(idle) is None and stats.observe(idle) is None
    assert "Preemptions: 0 (2 in all)" in format_stats(idle, _snapshot(131.0, 11, 1000, 201, preemptions=2))


def test_a_line_per_finished_request_and_stats_lines(tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="kvmem.engine.async_engine")
    config = EngineConfig(model=str(tiny_model_dir), **TINY_ENGINE)
    engine = AsyncLLMEngine(lambda: LLMEngine(config), log_requests=True, log_stats=True, stats_interval=0.0)
    engine.start()

    async def run() -> None:
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        _, ids = engine.check_prompt("Hello there")
        async for _ in engine.generate("Hello there", ids, params, "req-1"):
            pass

    try:
        asyncio.run(run())
    finally:
        engine.stop()
    finished = [m for m in caplog.messages if m.startswith("Finished request req-1:")]
    assert len(finished) == 1
    assert re.fullmatch(r"Finished request req-1: prompt \d+ tokens \(0 cached\), output 4 tokens, "
                        r"TTFT [\d.]+ s, total [\d.]+ s, finish_reason length", finished[0]), finished
    stats = [m for m in caplog.messages if m.startswith("Avg prompt throughput:")]
    assert stats and "Running:" in stats[0] and "KV cache usage:" in stats[0]
