"""`kvmem serve --tensor-parallel-size 2`: the same greedy completions as one rank, and a server
whose rank dies exits non-zero instead of serving (or hanging on) a broken engine."""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from kvmem import LLM, SamplingParams
from tests.server.test_launcher import EXIT_BOUND, PATIENCE, start_cli_server

PROMPTS = ["The quick brown fox", "Paged attention keeps", "Hello, world!"]


def children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out


def test_tp2_server_serves_tp1s_greedy_tokens_and_exits_1_when_a_rank_dies(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", kv_cache_memory="8MiB")
    try:
        expected = [o.outputs[0].text for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20,
                                                                                     ignore_eos=True), use_tqdm=False)]
    finally:
        llm.close()
    proc, url = start_cli_server(tiny_model_dir, "--tensor-parallel-size", "2")
    try:
        body = {"prompt": PROMPTS, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=PATIENCE)
        assert response.status_code == 200, response.text
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        assert [c["text"] for c in choices] == expected
        workers = children(proc.pid)
        assert len(workers) == 1  # rank 1
        os.kill(workers[0], signal.SIGKILL)
        assert proc.wait(timeout=EXIT_BOUND) == 1
        output = proc.communicate()[0]
        assert "tensor-parallel rank 1 exited with code -9" in output, output
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
