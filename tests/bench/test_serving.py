"""`kvmem bench serve` against a fake OpenAI-compatible streaming server (standard library only, no model).

The fake streams `max_tokens` text chunks — the first after `first_token_delay`, then one every `gap`
— then a usage chunk and `[DONE]`, and records what it received, when, and the peak number of
requests in flight, so the client's counts, timings, concurrency cap and arrival schedule can be checked.
Its `/tokenize` (vLLM's shape) is a word tokenizer: one token per word, optionally a BOS, and
optionally two tokens for words longer than five letters; its `usage` counts with the same tokenizer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from kvmem.bench.serving import (
    ServeBenchResult,
    add_serve_args,
    arrival_offsets,
    cmd_bench_serve,
    config_from_args,
    join_url,
    load_dataset,
    random_requests,
)
from kvmem.bench.serving_datasets import TokenCounter, keep_sharegpt, read_sharegpt, sharegpt_prompts

CHAT_TEMPLATE_TOKENS = 5  # what the fake claims its chat template adds, to tell usage from the fallback


@dataclass
class FakeState:
    first_token_delay: float = 0.05
    gap: float = 0.01
    send_usage: bool = True
    tokenize: bool = True  # False: no /tokenize (404), as a server without it
    bos: bool = False  # /tokenize and usage count a BOS token
    long_words_two_tokens: bool = False
    tokenize_calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0
    peak: int = 0
    bodies: list[dict] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # perf_counter when each POST arrived


def fake_tokens(state: FakeState, text: str) -> list[int]:
    ids = [1] if state.bos else []
    for w in text.split():
        ids += [2 + sum(w.encode()) % 1000] * (2 if state.long_words_two_tokens and len(w) > 5 else 1)
    return ids


class FakeHandler(BaseHTTPRequestHandler):
    server: _FakeHTTPServer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _event(self, obj: dict | str) -> None:
        self.wfile.write(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        else:
            self._send_json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize" and state.tokenize:
            with state.lock:
                state.tokenize_calls += 1
            tokens = fake_tokens(state, body["prompt"])
            self._send_json(200, {"tokens": tokens, "count": len(tokens), "max_model_len": 2048})
            return
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            self._send_json(404, {"detail": "Not Found"})
            return
        with state.lock:
            state.arrivals.append(time.perf_counter())
            state.bodies.append(body)
        chat = self.path == "/v1/chat/completions"
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if isinstance(prompt, str) and "REJECT" in prompt:
            self._send_json(400, {"error": {"message": "prompt rejected by fake server", "code": 400}})
            return
        with state.lock:
            state.active += 1
            state.peak = max(state.peak, state.active)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            if chat:  # like vLLM: an empty role-only delta at once, which must not count as the first token
                self._event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            time.sleep(state.first_token_delay)
            n = body["max_tokens"]
            for i in range(n):
                if i:
                    time.sleep(state.gap)
                if isinstance(prompt, str) and "BREAK" in prompt and i == 1:
                    self._event({"error": {"message": "engine died", "code": 500}})
                    return
                choice = {"index": 0, "finish_reason": None}
                choice.update({"delta": {"content": f" t{i}"}} if chat else {"text": f" t{i}"})
                self._event({"object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]})
            if state.send_usage:
                prompt_tokens = len(fake_tokens(state, prompt)) if isinstance(prompt, str) else len(prompt)
                prompt_tokens += CHAT_TEMPLATE_TOKENS if chat else 0
                self._event({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                      "total_tokens": prompt_tokens + n}})
        finally:
            # Before [DONE]: the client frees its concurrency slot only after [DONE], so the peak seen
            # here can never include a request that the client already counts as finished.
            with state.lock:
                state.active -= 1
        self._event("[DONE]")


class _FakeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 would drop bursts of connections into 1 s SYN retries
    state: FakeState

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that timed out and hung up
            super().handle_error(request, client_address)


class FakeServer:
    def __init__(self) -> None:
        self.httpd = _FakeHTTPServer(("127.0.0.1", 0), FakeHandler)
        self.httpd.state = self.state = FakeState()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.close()


def bench(server: FakeServer, tmp_path, *argv: str) -> tuple[int, dict]:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    out = tmp_path / "result.json"
    args = parser.parse_args(["--base-url", server.url, "--json", str(out), *argv])
    rc = cmd_bench_serve(args)
    return rc, json.loads(out.read_text()) if out.exists() else {}


def test_completions_counts_tokens_times_and_writes_json(fake, tmp_path, capsys):
    fake.state.first_token_delay, fake.state.gap = 0.05, 0.02
    rc, r = bench(fake, tmp_path, "--num-prompts", "6", "--input-len", "16", "--output-len", "5",
                  "--num-warmups", "0", "--label", "fake")
    assert rc == 0
    assert (r["completed"], r["failed"], r["num_prompts"]) == (6, 0, 6)
    assert r["total_output_tokens"] == 30 and r["total_input_tokens"] == 6 * 16
    assert r["model"] == "fake-model" and r["label"] == "fake" and r["request_rate"] == "inf"
    # Timings against the fake's sleeps: lower bounds from the sleeps; upper bounds only catch a
    # wrong unit (10x the sleeps), since the machine may be busy.
    assert 45 <= r["median_ttft_ms"] <= r["p99_ttft_ms"] < 5000
    assert 18 <= r["median_itl_ms"] < 2000
    assert 18 <= r["mean_tpot_ms"] < 2000
    assert r["mean_e2e_ms"] >= 50 + 4 * 20 - 5
    assert r["output_throughput"] == pytest.approx(30 / r["duration_s"])
    assert r["request_throughput"] == pytest.approx(6 / r["duration_s"])
    assert r["total_token_throughput"] == pytest.approx((30 + 96) / r["duration_s"])

    body = fake.state.bodies[0]
    assert body["model"] == "fake-model" and body["max_tokens"] == 5 and body["temperature"] == 0
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
    # Text, 16 tokens by the server's /tokenize: valid for any model's vocabulary.
    assert isinstance(body["prompt"], str) and len(fake_tokens(fake.state, body["prompt"])) == 16
    assert fake.state.peak == 6  # rate inf, no cap: all in flight together

    documented = {f for f in ServeBenchResult.__dataclass_fields__}
    assert documented <= set(r)
    for stat in ("mean", "median", "p99"):
        for metric in ("ttft", "tpot", "itl", "e2e"):
            assert f"{stat}_{metric}_ms" in r
    assert r["settings"]["seed"] == 0 and r["settings"]["input_len"] == 16 and r["started_at"]
    assert "/tokenize" in r["settings"]["prompts"]
    assert len(r["request_ttft_ms"]) == len(r["request_e2e_ms"]) == 6 and min(r["request_ttft_ms"]) >= 45
    assert r["request_output_tokens"] == [5] * 6 and r["request_prompt_tokens"] == [16] * 6
    assert (tmp_path / "result.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the latency plot beside it
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "Successful requests:" in out and "Mean TTFT (ms):" in out


def test_max_concurrency_caps_requests_in_flight(fake, tmp_path):
    fake.state.first_token_delay, fake.state.gap = 0.03, 0.01
    rc, r = bench(fake, tmp_path, "--num-prompts", "6", "--output-len", "3", "--max-concurrency", "2",
                  "--num-warmups", "0")
    assert rc == 0 and r["completed"] == 6 and r["max_concurrency"] == 2
    assert fake.state.peak == 2
    assert r["duration_s"] >= 3 * 0.05 - 0.01  # three waves of two


def test_http_errors_and_stream_errors_are_failures(fake, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "hello there", "output_len": 3}, {"prompt": "please REJECT me", "output_len": 3},
             {"prompt": [101, 102, 103], "output_len": 2}, {"prompt": "BREAK the stream", "output_len": 4},
             {"prompt": "good bye", "output_len": 1}]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    fake.state.first_token_delay = 0.005
    rc, r = bench(fake, tmp_path, "--dataset", str(data), "--num-prompts", "10")  # one warm-up, words
    assert rc == 0
    assert (r["completed"], r["failed"], r["num_prompts"]) == (3, 2, 5)
    assert r["total_output_tokens"] == 3 + 2 + 1 and r["total_input_tokens"] == 2 + 3 + 2
    assert "HTTP 400: prompt rejected by fake server" in r["errors"]
    assert "stream error: engine died" in r["errors"]
    assert len(fake.state.bodies) == 1 + 5
    assert isinstance(fake.state.bodies[0]["prompt"], str)  # warm-up: words, not the dataset's first prompt
    assert sorted(b["max_tokens"] for b in fake.state.bodies[1:]) == [1, 2, 3, 3, 4]
    assert r["mean_tpot_ms"] is not None  # from the requests with > 1 token only
    assert "fewer than --num-prompts" in capsys.readouterr().err


def test_all_failed_or_unusable_server_returns_nonzero(fake, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "REJECT", "output_len": 2}) + "\n")
    rc, r = bench(fake, tmp_path, "--dataset", str(data), "--num-warmups", "0")
    assert rc == 1 and r["completed"] == 0 and r["failed"] == 1 and r["mean_ttft_ms"] is None

    rc, _ = bench(fake, tmp_path, "--model", "m", "--base-url", "http://127.0.0.1:1", "--num-prompts", "1")
    err = capsys.readouterr().err
    assert rc == 1 and "warm-up request to http://127.0.0.1:1/v1/completions failed: ConnectError" in err
    rc, _ = bench(fake, tmp_path, "--base-url", "http://127.0.0.1:1", "--num-prompts", "1")  # model lookup
    assert rc == 1 and "cannot reach http://127.0.0.1:1" in capsys.readouterr().err


def test_timeout_fails_the_request(fake, tmp_path):
    fake.state.first_token_delay = 30.0  # far past the timeout however slow the machine is
    rc, r = bench(fake, tmp_path, "--num-prompts", "1", "--output-len", "2", "--timeout", "0.2",
                  "--num-warmups", "0")
    assert rc == 1 and r["errors"] == ["timed out after 0.2 s"] and r["duration_s"] < 20


def test_poisson_arrivals_follow_the_seeded_schedule(fake, tmp_path):
    fake.state.first_token_delay = 0.002
    rc, r = bench(fake, tmp_path, "--num-prompts", "8", "--output-len", "1", "--request-rate", "5",
                  "--seed", "3", "--num-warmups", "0")
    assert rc == 0 and r["completed"] == 8 and r["request_rate"] == 5.0
    expected = arrival_offsets(8, 5.0, seed=3)
    seen = np.sort(np.array(fake.state.arrivals)) - min(fake.state.arrivals)
    assert expected[-1] > 1.0  # spread over time, not a burst
    # Requests go out on the schedule, not at once: the spread is there whatever the machine's speed
    # (a late first request shifts the others by the same amount, it does not shrink the spread).
    # How late each one may be depends on the machine's load, so only a loose bound is asserted.
    assert seen[-1] >= 0.5 * expected[-1]
    assert np.abs(seen - np.array(expected)).max() < 2.0
    assert r["duration_s"] >= expected[-1]


def test_arrival_offsets_are_poisson_and_seeded():
    assert arrival_offsets(4, float("inf")) == [0.0] * 4
    a = arrival_offsets(2000, 50.0, seed=1)
    assert a == arrival_offsets(2000, 50.0, seed=1) and a != arrival_offsets(2000, 50.0, seed=2)
    gaps = np.diff(a)
    assert a[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.1)
    assert gaps.std() == pytest.approx(1 / 50, rel=0.15)  # exponential: std == mean


def test_chat_endpoint_times_content_and_uses_server_usage(fake, tmp_path):
    rc, r = bench(fake, tmp_path, "--endpoint", "/v1/chat/completions", "--num-prompts", "3",
                  "--input-len", "10", "--output-len", "4", "--num-warmups", "0")
    assert rc == 0 and r["completed"] == 3 and r["endpoint"] == "/v1/chat/completions"
    assert r["total_input_tokens"] == 3 * (10 + CHAT_TEMPLATE_TOKENS)  # the server's count, not ours
    assert r["total_output_tokens"] == 12
    assert r["median_ttft_ms"] >= 45  # the empty role chunk sent at once is not the first token
    msg = fake.state.bodies[0]["messages"]
    assert msg[0]["role"] == "user" and len(msg[0]["content"].split()) == 10


def test_without_usage_counts_text_chunks(fake, tmp_path):
    fake.state.send_usage, fake.state.first_token_delay = False, 0.005
    rc, r = bench(fake, tmp_path, "--num-prompts", "2", "--input-len", "7", "--output-len", "3",
                  "--no-ignore-eos", "--model", "explicit", "--num-warmups", "0")
    assert rc == 0 and r["total_output_tokens"] == 6 and r["total_input_tokens"] == 14
    assert fake.state.bodies[0]["ignore_eos"] is False and fake.state.bodies[0]["model"] == "explicit"


def test_random_workload_matches_bench_throughput_prompts():
    # kvmem.bench.throughput.random_prompts draws one (n, len) matrix; the same ids here means both
    # benchmarks (and the peer scripts) feed every engine identical prompts.
    reqs = random_requests(5, 12, 3, vocab_size=49152, seed=7)
    assert [r.prompt for r in reqs] == np.random.default_rng(7).integers(100, 49052, size=(5, 12)).tolist()
    chat = random_requests(2, 6, 3, vocab_size=49152, seed=7, chat=True)
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == 6 for r in chat)


def test_dataset_validation(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": [1, 2, 3]}) + "\n")
    assert load_dataset(p, 5, default_output_len=9)[0].output_len == 9  # output_len falls back
    with pytest.raises(ValueError, match="token-id prompts"):
        load_dataset(p, 5, 9, chat=True)
    p.write_text(json.dumps({"prompt": "x", "output_len": 0}) + "\n")
    with pytest.raises(ValueError, match="output_len"):
        load_dataset(p, 5, 9)
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match=":1: not JSON"):
        load_dataset(p, 5, 9)


def test_join_url_accepts_a_v1_base():
    assert join_url("http://h:8000/", "/v1/completions") == "http://h:8000/v1/completions"
    assert join_url("http://h:8000/v1", "/v1/models") == "http://h:8000/v1/models"
