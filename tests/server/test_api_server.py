"""The OpenAI-compatible server, through the real `openai` client: answers equal `LLM.generate`'s,
streams are well formed, concurrency shares steps, disconnects and errors give the memory back."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest

from kvmem import LLM, SamplingParams
from kvmem.config import EngineConfig
from tests.server.conftest import TINY_ENGINE, start_server

PROMPTS = ["The quick brown fox", "Paged attention keeps", "Hello, world!", "Memory is the bottleneck"]
PATIENCE = 120.0  # how long a test waits for something that takes CPU (a machine at 4x load passes)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The offline engine on the same model: what the server must answer."""
    return LLM(str(tiny_model_dir), **TINY_ENGINE)


@pytest.fixture
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="none", max_retries=0)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


# --- answers equal LLM.generate -------------------------------------------------------------------
def test_completion_equals_llm_generate(client, tiny_server, reference):
    expected = reference.generate(PROMPTS, greedy(12), use_tqdm=False)
    got = client.completions.create(model=tiny_server.model, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in got.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in got.choices] == [o.outputs[0].text for o in expected]
    assert [c.finish_reason for c in got.choices] == [o.outputs[0].finish_reason for o in expected]
    assert got.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert got.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in expected)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_streamed_completion_equals_llm_generate(client, tiny_server, reference, monkeypatch):
    ids = reference.get_tokenizer().encode("The quick brown fox jumps")
    expected = reference.generate([{"prompt_token_ids": ids}], greedy(20, ignore_eos=True), use_tqdm=False)[0]
    # Really streamed: after 10 steps the engine waits until the client has received some text, so
    # that text must arrive while the request is still running. (Without the gate, how many chunks
    # a client gets depends on its pace: outputs it has not taken yet are merged.)
    text_received, num_steps = threading.Event(), 0
    real_step = tiny_server.engine.engine.step

    def gated_step():
        nonlocal num_steps
        num_steps += 1
        if num_steps > 10:
            text_received.wait(PATIENCE)
        return real_step()

    monkeypatch.setattr(tiny_server.engine.engine, "step", gated_step)
    chunks = []
    for c in client.completions.create(model=tiny_server.model, prompt=ids, max_tokens=20, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True}):
        chunks.append(c)
        if c.choices and c.choices[0].text:
            text_received.set()
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected.outputs[0].text
    first_text = next(c for c in chunks if c.choices and c.choices[0].text)
    assert first_text.choices[0].finish_reason is None and first_text is not chunks[-2]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_equals_llm_chat_streamed_and_not(client, tiny_server, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    expected = reference.chat(messages, greedy(16), use_tqdm=False)[0].outputs[0]
    got = client.chat.completions.create(model=tiny_server.model, messages=messages, max_tokens=16, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == expected.text
    assert got.choices[0].finish_reason == expected.finish_reason
    assert got.usage.completion_tokens == len(expected.token_ids)

    stream = client.chat.completions.create(model=tiny_server.model, messages=messages, max_tokens=16,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_text_parts_and_max_completion_tokens(client, tiny_server, reference):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    expected = reference.chat([{"role": "user", "content": "Hello\nworld"}], greedy(5), use_tqdm=False)[0]
    got = client.chat.completions.create(model=tiny_server.model, messages=[{"role": "user", "content": parts}],
                                         max_completion_tokens=5, temperature=0)
    assert got.choices[0].message.content == expected.outputs[0].text
    assert got.usage.completion_tokens == 5 or got.choices[0].finish_reason == "stop"


def test_n_samples_seeded_logprobs_and_stop(client, tiny_server, reference):
    got = client.completions.create(model=tiny_server.model, prompt=PROMPTS[:2], max_tokens=6, n=3, temperature=1.0,
                                    seed=7, logprobs=2)
    assert sorted(c.index for c in got.choices) == list(range(6))
    again = client.completions.create(model=tiny_server.model, prompt=PROMPTS[:2], max_tokens=6, n=3,
                                      temperature=1.0, seed=7, logprobs=2)
    assert [c.text for c in got.choices] == [c.text for c in again.choices]  # seeded: reproducible
    for c in got.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert all(v <= 0 for v in lp.token_logprobs)
        assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)  # top 2, plus the chosen one if not in them

    # A stop string cuts the text, and the stream never sends what the cut removes.
    full = reference.generate([PROMPTS[0]], greedy(12), use_tqdm=False)[0].outputs[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    if stop.strip():
        cut = client.completions.create(model=tiny_server.model, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                        stop=[stop])
        assert cut.choices[0].text == full[:full.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=tiny_server.model, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop], stream=True))
        assert streamed == cut.choices[0].text


def test_chat_logprobs(client, tiny_server):
    got = client.chat.completions.create(model=tiny_server.model, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the chosen is the best
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob


def test_models_health_version(tiny_server):
    models = openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="x").models.list()
    assert [m.id for m in models.data] == [tiny_server.model]
    assert httpx.get(f"{tiny_server.base_url}/health", timeout=PATIENCE).status_code == 200
    assert httpx.get(f"{tiny_server.base_url}/version", timeout=PATIENCE).json()["version"]


# --- concurrency ----------------------------------------------------------------------------------
def test_64_concurrent_streams_complete_with_the_right_text(tiny_server, reference, monkeypatch):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(64)]
    expected = [o.outputs[0].text for o in reference.generate(prompts, greedy(24), use_tqdm=False)]
    steps_before = tiny_server.metrics()["kvmem:engine_steps_total"]
    # The engine starts stepping once all 64 requests are in, so how many steps they share does not
    # depend on how fast this machine sends them.
    engine = tiny_server.engine.engine
    real_has_unfinished = engine.has_unfinished_requests
    all_in = threading.Event()

    def has_unfinished_once_all_are_in() -> bool:
        if len(engine.requests) >= 64:
            all_in.set()
        return all_in.is_set() and real_has_unfinished()

    monkeypatch.setattr(engine, "has_unfinished_requests", has_unfinished_once_all_are_in)

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(model=tiny_server.model, prompt=prompt, max_tokens=24,
                                                 temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def all_of_them() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="none", max_retries=0,
                                      http_client=openai.DefaultAsyncHttpxClient(
                                          limits=httpx.Limits(max_connections=100))) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(all_of_them()) == expected
    m = tiny_server.wait_kv_free()
    assert m["kvmem:kv_cache_allocated_bytes"] == 0 and m["kvmem:num_requests_running"] == 0
    assert m["kvmem:kv_cache_usage_perc"] == 0
    # Continuous batching across clients: far fewer steps than 64 requests x 24 tokens one by one.
    assert m["kvmem:engine_steps_total"] - steps_before < 64 * 24 / 4


# --- disconnects ----------------------------------------------------------------------------------
def test_disconnect_mid_stream_aborts_and_frees_memory(tiny_server):
    aborted_before = tiny_server.metrics().get("kvmem:request_success_total[abort]", 0)
    body = {"model": tiny_server.model, "prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0,
            "stream": True, "ignore_eos": True, "n": 4}
    generated_before = tiny_server.metrics()["kvmem:generation_tokens_total"]
    with httpx.stream("POST", f"{tiny_server.base_url}/v1/completions", json=body, timeout=PATIENCE) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
        assert received
    m = tiny_server.wait_kv_free()
    assert m["kvmem:kv_cache_allocated_bytes"] == 0 and m["kvmem:num_requests_running"] == 0
    assert m["kvmem:request_success_total[abort]"] >= aborted_before + 4  # the 4 samples were aborted
    # ... long before they could have finished: freed at the disconnect, not at the end.
    assert m["kvmem:generation_tokens_total"] - generated_before < 4 * 480


def test_disconnect_while_waiting_for_a_non_streamed_answer(tiny_server):
    aborted_before = tiny_server.metrics().get("kvmem:request_success_total[abort]", 0)
    body = json.dumps({"model": tiny_server.model, "prompt": PROMPTS[1], "max_tokens": 480, "temperature": 0,
                       "ignore_eos": True, "n": 8}).encode()
    host, port = tiny_server.base_url.removeprefix("http://").split(":")
    generated_before = tiny_server.metrics()["kvmem:generation_tokens_total"]
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + PATIENCE  # hang up once it is generating, however long that takes
        while tiny_server.metrics()["kvmem:generation_tokens_total"] == generated_before:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    m = tiny_server.wait_kv_free()
    assert m["kvmem:kv_cache_allocated_bytes"] == 0
    assert m["kvmem:request_success_total[abort]"] >= aborted_before + 8
    assert m["kvmem:generation_tokens_total"] - generated_before < 8 * 480


# --- errors ---------------------------------------------------------------------------------------
def post(server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.base_url}{path}", content=content, headers={"Content-Type": "application/json"},
                      timeout=PATIENCE, **kw)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def test_bad_requests_are_400_with_an_openai_error_body(tiny_server):
    s, m = tiny_server, tiny_server.model
    assert_error(post(s, "/v1/completions", b"{not json"), 400)
    assert_error(post(s, "/v1/completions", b"[1, 2]"), 400)
    assert_error(post(s, "/v1/completions", {"model": m}), 400, "prompt")
    assert_error(post(s, "/v1/completions", {"prompt": "x", "max_tokens": "5"}), 400, "max_tokens")
    assert_error(post(s, "/v1/completions", {"prompt": "x", "temperature": -1}), 400, "temperature")
    assert_error(post(s, "/v1/completions", {"prompt": "x", "top_p": 0}), 400, "top_p")
    assert_error(post(s, "/v1/completions", {"prompt": "x", "n": 0}), 400, "n")
    assert_error(post(s, "/v1/completions", {"prompt": "x", "logprobs": 99}), 400, "logprobs")
    assert_error(post(s, "/v1/completions", {"prompt": [99999]}), 400, "prompt")
    assert_error(post(s, "/v1/completions", {"prompt": ""}), 400, "prompt")
    assert_error(post(s, "/v1/completions", {"prompt": "x", "suffix": "y"}), 400, "suffix")
    assert_error(post(s, "/v1/chat/completions", {"messages": []}), 400, "messages")
    assert_error(post(s, "/v1/chat/completions", {"messages": [{"content": "hi"}]}), 400)
    assert_error(post(s, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                  "tools": [{"type": "function"}]}), 400, "tools[0].function")
    assert_error(post(s, "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                 400, "messages")


def test_too_long_prompt_unknown_model_and_big_body(tiny_server):
    s = tiny_server
    long_prompt = list(range(3, 3 + s.engine.max_model_len))
    assert_error(post(s, "/v1/completions", {"prompt": long_prompt}), 400, "prompt")
    assert_error(post(s, "/v1/completions", {"prompt": [5] * 500, "max_tokens": 100}), 400, "max_tokens")
    assert_error(post(s, "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404, "model")
    assert_error(post(s, "/v1/completions", b'{"prompt": "' + b"a" * (9 * 2**20) + b'"}'), 413)
    assert_error(httpx.get(f"{s.base_url}/v1/nothing-here", timeout=PATIENCE), 404)
    with pytest.raises(openai.BadRequestError) as e:
        openai.OpenAI(base_url=f"{s.base_url}/v1", api_key="none").completions.create(
            model=s.model, prompt="x", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    assert post(s, "/v1/completions", {"prompt": "still serving", "max_tokens": 2}).status_code == 200
    assert s.wait_kv_free()["kvmem:kv_cache_allocated_bytes"] == 0


def test_api_key(tiny_model_dir):
    server = start_server(EngineConfig(model=str(tiny_model_dir), **TINY_ENGINE), api_key="s3cret")
    try:
        url = f"{server.base_url}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert_error(httpx.post(f"{url}/completions", json={"prompt": "x"}, timeout=PATIENCE), 401)
        ok = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert ok.completions.create(model=server.model, prompt="x", max_tokens=2).choices[0].text is not None
        for scheme in ("bearer", "BEARER"):  # the scheme is case-insensitive
            auth = {"Authorization": f"{scheme} s3cret"}
            assert httpx.get(f"{url}/models", headers=auth, timeout=PATIENCE).status_code == 200
        assert_error(httpx.get(f"{url}/models", headers={"Authorization": "Basic s3cret"}, timeout=PATIENCE), 401)
        # health and metrics stay open
        assert httpx.get(f"{server.base_url}/health", timeout=PATIENCE).status_code == 200
        assert httpx.get(f"{server.base_url}/metrics", timeout=PATIENCE).status_code == 200
    finally:
        server.stop()


def test_metrics_names_and_labels(tiny_server):
    post(tiny_server, "/v1/completions", {"prompt": PROMPTS[0] * 3, "max_tokens": 3})
    post(tiny_server, "/v1/completions", {"prompt": PROMPTS[0] * 3, "max_tokens": 3})  # a prefix hit
    text = httpx.get(f"{tiny_server.base_url}/metrics", timeout=PATIENCE).text
    for name in ("kvmem:num_requests_running", "kvmem:num_requests_waiting", "kvmem:kv_cache_usage_perc",
                 "kvmem:kv_cache_physical_bytes", "kvmem:kv_cache_live_bytes", "kvmem:kv_cache_waste_perc",
                 "kvmem:prefix_cache_queries_total", "kvmem:prefix_cache_hits_total", "kvmem:num_preemptions_total",
                 "kvmem:prompt_tokens_total", "kvmem:generation_tokens_total",
                 "kvmem:time_to_first_token_seconds_bucket", "kvmem:inter_token_latency_seconds_bucket",
                 "kvmem:e2e_request_latency_seconds_bucket"):
        assert f'{name}{{kv_cache="paged"' in text and f'model_name="{tiny_server.model}"' in text, name
    m = tiny_server.metrics()
    assert m["kvmem:prefix_cache_hits_total"] > 0
    assert m["kvmem:kv_cache_physical_bytes"] == 8 * 2**20


def test_virtual_kv_cache_behind_the_server(tiny_model_dir, reference):
    """`kvmem serve --kv-cache virtual`: same answers; /metrics shows physical pages mapped on demand
    and given back by the deferred-reclamation policy only when asked."""
    server = start_server(EngineConfig(model=str(tiny_model_dir), kv_cache="virtual", **TINY_ENGINE))
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)
        expected = reference.generate(PROMPTS, greedy(12), use_tqdm=False)
        got = client.completions.create(model=server.model, prompt=PROMPTS, max_tokens=12, temperature=0)
        assert [c.text for c in got.choices] == [o.outputs[0].text for o in expected]
        m = server.wait_kv_free()
        assert 'kv_cache="virtual"' in httpx.get(f"{server.base_url}/metrics", timeout=PATIENCE).text
        assert m["kvmem:kv_cache_allocated_bytes"] == 0
        assert 0 < m["kvmem:kv_cache_physical_bytes"] < m["kvmem:kv_cache_reserved_bytes"]
    finally:
        server.stop()


def test_an_event_stays_one_line_whatever_text_the_model_made():
    """U+0085, U+2028 and U+2029 are valid raw in JSON, but httpx's line splitting (the openai
    client's) breaks on them: a token containing one would cut its event in two."""
    from httpx._decoders import LineDecoder

    from kvmem.server.api_server import sse_data

    event = {"choices": [{"text": "a\u2028b\x85c\u2029d é 日本 🙂", "index": 0}]}
    lines = LineDecoder().decode(sse_data(event)) + LineDecoder().flush()
    data = [line for line in lines if line]
    assert len(data) == 1 and json.loads(data[0].removeprefix("data: ")) == event
