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
    cached_tokens: int | None = None  # set: usage reports this many cached prompt tokens per request
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
                if chat:  # every message counts, as a chat template renders them all
                    prompt_tokens = sum(len(fake_tokens(state, m["content"])) for m in body["messages"])
                    prompt_tokens += CHAT_TEMPLATE_TOKENS
                else:
                    prompt_tokens = len(fake_tokens(state, prompt)) if isinstance(prompt, str) else len(prompt)
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
                if state.cached_tokens is not None:
                    usage["prompt_tokens_details"] = {"cached_tokens": state.cached_tokens}
                self._event({"choices": [], "usage": usage})
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


# --- any-model workloads: /tokenize, its fallback, ShareGPT, vLLM's flags, the saved result ----------


def test_random_prompts_have_the_requested_token_count_by_tokenize(fake, tmp_path):
    # A BOS and words of two tokens: the prompt is trimmed by counts, not words, and topped up.
    fake.state.bos, fake.state.long_words_two_tokens, fake.state.first_token_delay = True, True, 0.005
    rc, r = bench(fake, tmp_path, "--base-url", fake.url + "/v1", "--num-prompts", "8", "--input-len", "20",
                  "--output-len", "2", "--num-warmups", "0", "--seed", "4")
    assert rc == 0 and r["completed"] == 8 and fake.state.tokenize_calls > 8
    prompts = [b["prompt"] for b in fake.state.bodies]
    assert all(isinstance(p, str) and len(fake_tokens(fake.state, p)) == 20 for p in prompts)
    assert len(set(prompts)) == 8 and any(len(p.split()) < 19 for p in prompts)  # some two-token words
    assert r["total_input_tokens"] == 8 * 20 and r["request_prompt_tokens"] == [20] * 8
    assert r["settings"]["prompts"] == "random text of 20 tokens by the server's /tokenize"

    fake.state.bodies.clear()  # seeded: the same prompts again
    bench(fake, tmp_path, "--num-prompts", "8", "--input-len", "20", "--output-len", "2", "--num-warmups", "0",
          "--seed", "4")
    assert sorted(b["prompt"] for b in fake.state.bodies) == sorted(prompts)


def test_without_tokenize_falls_back_to_words_and_says_so(fake, tmp_path, capsys):
    fake.state.tokenize, fake.state.first_token_delay = False, 0.005
    rc, r = bench(fake, tmp_path, "--num-prompts", "3", "--input-len", "9", "--output-len", "2")
    assert rc == 0 and r["completed"] == 3
    assert fake.state.tokenize_calls == 0
    assert all(len(b["prompt"].split()) == 9 for b in fake.state.bodies)  # warm-up and timed: words
    assert "no /tokenize: POST /tokenize: HTTP 404" in r["settings"]["prompts"]
    assert "has no usable /tokenize (POST /tokenize: HTTP 404)" in capsys.readouterr().err


def test_vocab_size_sends_the_token_ids_of_bench_throughput(fake, tmp_path):
    fake.state.first_token_delay = 0.005
    rc, r = bench(fake, tmp_path, "--num-prompts", "3", "--input-len", "6", "--output-len", "2",
                  "--vocab-size", "32000", "--seed", "2", "--num-warmups", "0")
    assert rc == 0 and fake.state.tokenize_calls == 0
    expected = random_requests(3, 6, 2, vocab_size=32000, seed=2)
    assert sorted(b["prompt"] for b in fake.state.bodies) == sorted(x.prompt for x in expected)
    assert all(100 <= t < 32000 - 100 for b in fake.state.bodies for t in b["prompt"])
    assert r["settings"]["prompts"].startswith("random token ids below 32000")


def _conv(human: str, gpt: str, first: str = "human") -> dict:
    turns = [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    if first == "gpt":
        turns.insert(0, {"from": "gpt", "value": "Hello, how can I help?"})
    return {"id": f"c{len(human)}-{len(gpt)}", "conversations": turns}


def _words(n: int, word: str = "alpha") -> str:
    return " ".join([word] * n)


@pytest.fixture
def sharegpt_file(tmp_path):
    items = [
        _conv(_words(5, "a"), _words(7)),  # kept
        _conv(_words(10, "b"), _words(30)),  # kept
        _conv(_words(6, "c"), _words(9), first="gpt"),  # kept: the first human turn, not turn 0
        _conv(_words(3, "d"), _words(20)),  # prompt < 4 tokens: dropped
        _conv(_words(8, "e"), _words(3)),  # answer < 4 tokens: dropped
        _conv(_words(1025, "f"), _words(10)),  # prompt > 1024: dropped
        _conv(_words(1000, "g"), _words(1049)),  # total 2049 > 2048: dropped
        _conv(_words(1000, "h"), _words(1048)),  # total 2048: kept
        {"id": "x", "conversations": [{"from": "human", "value": _words(9, "i")}]},  # no answer: skipped
        {"id": "y"},  # no conversations: skipped
        _conv(_words(4, "j"), _words(4)),  # kept (the bounds are inclusive)
    ]
    path = tmp_path / "ShareGPT_tiny.json"
    path.write_text(json.dumps(items))
    return path


def test_sharegpt_file_parsed_filtered_and_shuffled(fake, sharegpt_file):
    pairs = read_sharegpt(sharegpt_file)
    assert len(pairs) == 9 and pairs[2] == (_words(6, "c"), _words(9))
    assert keep_sharegpt(4, 4, False) and not keep_sharegpt(4, 3, False) and keep_sharegpt(4, 3, True)

    async def run(num_prompts: int, seed: int, output_len: int | None = None, counter: bool = True):
        import httpx

        async with httpx.AsyncClient(trust_env=False) as client:
            c = TokenCounter(client, fake.url, "fake-model") if counter else None
            return await sharegpt_prompts(sharegpt_file, num_prompts, seed, c, output_len)

    rows = asyncio.run(run(100, seed=0))
    assert sorted((p.split()[0], n, out) for p, n, out in rows) == [
        ("a", 5, 7), ("b", 10, 30), ("c", 6, 9), ("h", 1000, 1048), ("j", 4, 4)]
    # vLLM's order: random.Random(seed).shuffle over the parsed conversations, then the filter.
    order = list(pairs)
    random.Random(0).shuffle(order)
    kept = {p for p, _, _ in rows}
    assert [p for p, _, _ in rows] == [p for p, _ in order if p in kept]
    assert [p for p, _, _ in asyncio.run(run(2, seed=0))] == [p for p, _, _ in rows[:2]]
    assert asyncio.run(run(100, seed=1)) != rows and sorted(asyncio.run(run(100, seed=1))) == sorted(rows)
    # A fixed output length replaces the answers': short answers are no longer dropped, nor is "g"'s
    # long one; a prompt over 1024 tokens still is.
    fixed = asyncio.run(run(100, seed=0, output_len=16))
    assert sorted(p.split()[0] for p, _, _ in fixed) == ["a", "b", "c", "e", "g", "h", "j"]
    assert {o for *_, o in fixed} == {16}
    # Without /tokenize: lengths estimated from words (1.3 tokens a word), so "j" (4 words -> 5) is kept.
    est = asyncio.run(run(100, seed=0, counter=False))
    assert ("j", 5, 5) in [(p.split()[0], n, o) for p, n, o in est]


def test_sharegpt_through_the_command_line(fake, sharegpt_file, tmp_path, capsys):
    fake.state.first_token_delay, fake.state.gap = 0.002, 0.0
    rc, r = bench(fake, tmp_path, "--dataset-name", "sharegpt", "--dataset-path", str(sharegpt_file),
                  "--num-prompts", "3", "--num-warmups", "0")
    assert rc == 0 and r["completed"] == 3 and r["settings"]["dataset_name"] == "sharegpt"
    assert r["settings"]["input_len"] is None and "ShareGPT" in r["settings"]["prompts"]
    got = sorted((len(b["prompt"].split()), b["max_tokens"]) for b in fake.state.bodies)
    valid = {(5, 7), (10, 30), (6, 9), (1000, 1048), (4, 4)}
    assert len(got) == 3 and set(got) <= valid
    fake.state.bodies.clear()
    rc, r = bench(fake, tmp_path, "--dataset-path", str(sharegpt_file), "--num-prompts", "9", "--num-warmups", "0")
    assert rc == 0 and r["completed"] == 5  # --dataset-path alone means sharegpt; only 5 pass the filter
    assert "5 usable conversations, fewer than --num-prompts 9" in capsys.readouterr().err


def test_vllm_flag_aliases_parse():
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args([
        "--host", "10.0.0.2", "--port", "8100", "--model", "m", "--endpoint", "/v1/chat/completions",
        "--dataset-name", "random", "--random-input-len", "64", "--random-output-len", "32", "--num-prompts", "7",
        "--request-rate", "2.5", "--max-concurrency", "4", "--seed", "9", "--save-result", "--result-dir", "out",
        "--result-filename", "r.json", "--disable-tqdm"])
    cfg = config_from_args(args)
    assert cfg.base_url == "http://10.0.0.2:8100" and cfg.model == "m" and cfg.chat
    assert (cfg.input_len, cfg.output_len, cfg.num_prompts, cfg.request_rate, cfg.max_concurrency, cfg.seed) == (
        64, 32, 7, 2.5, 4, 9)
    assert cfg.dataset_name == "random" and not cfg.show_progress and cfg.vocab_size is None
    assert args.save_result and args.result_dir == "out" and args.result_filename == "r.json"
    # kvmem's spellings still work, and --base-url wins over --host/--port.
    args = parser.parse_args(["--base-url", "http://h:1/v1", "--input-len", "5", "--output-len", "6",
                              "--dataset-name", "sharegpt", "--dataset-path", "d.json", "--sharegpt-output-len", "8"])
    cfg = config_from_args(args)
    assert (cfg.base_url, cfg.input_len, cfg.output_len) == ("http://h:1/v1", 5, 6)
    assert (cfg.dataset_name, cfg.dataset_path, cfg.sharegpt_output_len) == ("sharegpt", "d.json", 8)
    assert config_from_args(parser.parse_args([])).base_url == "http://127.0.0.1:8000"


def test_incompatible_dataset_flags_are_errors(fake, tmp_path):
    with pytest.raises(ValueError, match="needs --dataset-path"):
        bench(fake, tmp_path, "--dataset-name", "sharegpt")
    with pytest.raises(ValueError, match="needs --dataset-name sharegpt"):
        bench(fake, tmp_path, "--dataset-name", "random", "--dataset-path", "x.json")
    with pytest.raises(ValueError, match="alternatives"):
        bench(fake, tmp_path, "--dataset", "x.jsonl", "--dataset-path", "y.json")


def test_save_result_writes_json_and_latency_png(fake, tmp_path, capsys):
    fake.state.first_token_delay = 0.005
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    out = tmp_path / "results"
    args = parser.parse_args(["--base-url", fake.url, "--num-prompts", "4", "--output-len", "2", "--num-warmups", "0",
                              "--max-concurrency", "2", "--label", "fake", "--save-result", "--result-dir", str(out)])
    assert cmd_bench_serve(args) == 0
    (json_path,) = out.glob("*.json")
    assert json_path.name.startswith("fake-infqps-concurrency2-fake-model-")
    r = json.loads(json_path.read_text())
    assert r["completed"] == 4 and len(r["request_ttft_ms"]) == 4
    png = json_path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"wrote {png}" in capsys.readouterr().out

    args = parser.parse_args(["--base-url", fake.url, "--num-prompts", "1", "--output-len", "1", "--num-warmups", "0",
                              "--save-result", "--result-dir", str(out), "--result-filename", "named.json",
                              "--no-plot"])
    assert cmd_bench_serve(args) == 0
    assert (out / "named.json").exists() and not (out / "named.png").exists()
