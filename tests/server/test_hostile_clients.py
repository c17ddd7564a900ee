"""What a load and fuzz test threw at the server (issue 12): bodies that are not JSON, unknown roles,
hostile parameter sets, huge prompts and prompt lists, a stuck engine, connections that stall or
go away. Every refusal is an OpenAI error body; after each, the server answers the next request and
holds no KV memory. No outcome depends on the machine's speed: slow work is simulated with events,
and waits are bounded generously (a machine at 4x load passes).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from unittest import mock

import httpx
import pytest
import uvicorn
from starlette.requests import ClientDisconnect

from kvmem.config import EngineConfig
from kvmem.server import api_server
from kvmem.server.api_server import ApiKeyMiddleware, ServerSettings, read_body
from kvmem.server.connection import timed_h11_protocol
from kvmem.server.protocol import CompletionRequest, MAX_STOP_STRINGS
from tests.server.conftest import TINY_ENGINE, start_server

READ_TIMEOUT = 1.0  # the server's request read timeout here; waits for its effects are 20x that
PATIENCE = 120.0  # how long a test waits for something that takes CPU


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    s = start_server(EngineConfig(model=str(tiny_model_dir), **TINY_ENGINE), max_prompts_per_request=8,
                     request_read_timeout=READ_TIMEOUT, health_step_timeout=0.5)
    yield s
    s.stop()


def post(server, path: str, body, content_type: str | None = "application/json", **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": content_type} if content_type is not None else {}
    return httpx.post(f"{server.base_url}{path}", content=content, headers=headers, timeout=PATIENCE, **kw)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_still_serving(server) -> None:
    """The next request is answered, and then nothing runs and no KV memory is held."""
    ok = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"], ok.text
    m = server.wait_kv_free()
    assert m["kvmem:num_requests_running"] == 0 and m["kvmem:num_requests_waiting"] == 0
    assert m["kvmem:kv_cache_allocated_bytes"] == 0 and m["kvmem:kv_cache_live_bytes"] == 0


def address(server) -> tuple[str, int]:
    host, port = server.base_url.removeprefix("http://").split(":")
    return host, int(port)


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Read until the server closes the connection (True) or `timeout` passes (False)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        pass
    return True


# --- 1. only JSON bodies ---------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "text/json", "application/jsonx"])
def test_a_body_not_declared_json_is_415_and_runs_nothing(server, content_type):
    steps = server.metrics()["kvmem:engine_steps_total"]
    body = {"prompt": "Hello", "max_tokens": 2}
    assert_error(post(server, "/v1/completions", body, content_type), 415)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert_error(post(server, "/v1/chat/completions", chat, content_type), 415)
    assert server.metrics()["kvmem:engine_steps_total"] == steps  # nothing was generated
    assert_still_serving(server)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON",
                                          "application/vnd.api+json"])
def test_json_content_types_are_accepted(server, content_type):
    response = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2}, content_type)
    assert response.status_code == 200, response.text


# --- 2. chat roles ---------------------------------------------------------------------------------
@pytest.mark.parametrize("role, index", [("wizard", 1), ("Tool", 0), ("function", 1), ("", 0), ("USER", 0)])
def test_an_unknown_role_is_400_naming_it(server, role, index):
    messages = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "there"}]
    messages[index]["role"] = role
    error = assert_error(post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2}), 400,
                         f"messages[{index}].role")
    assert error["code"] == "invalid_value"
    assert_still_serving(server)


def test_developer_role_is_accepted(server):
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2}).status_code == 200


def test_a_validation_error_names_the_field_as_openai_does(server):
    body = {"messages": [{"role": "user", "content": "Hi"}, {"content": "no role"}]}
    assert_error(post(server, "/v1/chat/completions", body), 400, "messages[1].role")


# --- 3. the API key --------------------------------------------------------------------------------
def test_api_key_scheme_is_case_insensitive_and_compared_in_constant_time():
    middleware = ApiKeyMiddleware(app=None, api_key="s3cret")
    with mock.patch.object(api_server.hmac, "compare_digest", wraps=api_server.hmac.compare_digest) as compare:
        for header in (b"Bearer s3cret", b"bearer s3cret", b"BEARER s3cret", b"Bearer  s3cret "):
            assert middleware.authorized(header), header
        for header in (b"Bearer s3cre", b"Bearer s3cret2", b"Basic s3cret", b"s3cret", b"Bearer", b""):
            assert not middleware.authorized(header), header
    assert compare.call_count == 7  # every key behind a Bearer scheme went through compare_digest


# --- 4. a tiny temperature is greedy ---------------------------------------------------------------
def test_a_tiny_temperature_answers_as_greedy(server):
    body = {"prompt": "The quick brown fox", "max_tokens": 8, "ignore_eos": True}
    greedy = post(server, "/v1/completions", {**body, "temperature": 0}).json()["choices"][0]["text"]
    for t in (1e-40, 1e-30, 1e-6):
        got = post(server, "/v1/completions", {**body, "temperature": t, "n": 2}).json()["choices"]
        assert [c["text"] for c in got] == [greedy, greedy], t


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "repetition_penalty", "min_p"])
def test_non_finite_floats_are_400(server, field, value):
    body = b'{"prompt": "Hi", "max_tokens": 2, "%s": %s}' % (field.encode(), value)
    assert_error(post(server, "/v1/completions", body), 400, field)


# --- 5. long prompts: bounded, and tokenized off the event loop -------------------------------------
def test_a_prompt_too_long_for_any_tokenization_is_400_before_tokenizing(server, monkeypatch):
    limit = server.settings.prompt_char_limit(server.engine.max_model_len)
    assert limit == server.engine.max_model_len * api_server.MAX_CHARS_PER_TOKEN
    calls = []
    real_encode = server.engine.tokenizer.encode
    monkeypatch.setattr(server.engine.tokenizer, "encode", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    assert_error(post(server, "/v1/completions", {"prompt": "a" * (limit + 1)}), 400, "prompt")
    assert_error(post(server, "/v1/completions", {"prompt": ["Hi", "b " * limit]}), 400, "prompt")
    chat = {"messages": [{"role": "user", "content": "c" * (limit // 2 + 1)},
                         {"role": "user", "content": [{"type": "text", "text": "d" * (limit // 2 + 1)}]}]}
    assert_error(post(server, "/v1/chat/completions", chat), 400, "messages")
    many = {"messages": [{"role": "user", "content": ""}] * server.engine.max_model_len}
    assert_error(post(server, "/v1/chat/completions", many), 400, "messages")
    assert calls == []  # refused before the tokenizer ran
    monkeypatch.undo()
    assert_still_serving(server)


def test_max_prompt_chars_setting():
    assert ServerSettings("m", max_prompt_chars=1000).prompt_char_limit(4096) == 1000
    assert ServerSettings("m").prompt_char_limit(4096) == 4096 * api_server.MAX_CHARS_PER_TOKEN
    with pytest.raises(ValueError, match="max_prompt_chars"):
        ServerSettings("m", max_prompt_chars=0)


MARKER = "SLOW-TOKENIZE"


@pytest.fixture
def slow_tokenizer(server, monkeypatch):
    """The tokenizer blocks on any text holding MARKER until `release` is set: a 7 MB prompt's
    seconds of tokenizing, without depending on how fast this machine tokenizes."""
    entered, release = threading.Event(), threading.Event()
    real_encode = server.engine.tokenizer.encode

    def encode(text, *args, **kwargs):
        if MARKER in text:
            entered.set()
            release.wait(PATIENCE)
        return real_encode(text, *args, **kwargs)

    monkeypatch.setattr(server.engine.tokenizer, "encode", encode)
    yield entered, release
    release.set()


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": f"{MARKER} hello", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"{MARKER} hello"}], "max_tokens": 2}),
])
def test_health_answers_while_a_prompt_is_tokenized(server, slow_tokenizer, path, body):
    entered, release = slow_tokenizer
    result: dict[str, httpx.Response] = {}
    big = threading.Thread(target=lambda: result.setdefault("r", post(server, path, body)))
    big.start()
    try:
        assert entered.wait(PATIENCE)
        # Tokenizing on the event loop would hold this until `release` (and time out).
        health = httpx.get(f"{server.base_url}/health", timeout=PATIENCE / 2)
        assert health.status_code == 200
        assert big.is_alive()  # answered while the big request was still tokenizing
        assert post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200
    finally:
        release.set()
        big.join(PATIENCE)
    assert result["r"].status_code == 200, result["r"].text
    assert_still_serving(server)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_while_its_prompt_is_tokenized_leaves_nothing_running(server, slow_tokenizer, stream):
    entered, release = slow_tokenizer
    body = json.dumps({"prompt": f"{MARKER} hello", "max_tokens": 400, "ignore_eos": True, "n": 4,
                       "stream": stream}).encode()
    with socket.create_connection(address(server)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert entered.wait(PATIENCE)
    release.set()
    assert_still_serving(server)


# --- 6. prompts per request ------------------------------------------------------------------------
def test_prompts_per_request_are_capped(server):
    assert_error(post(server, "/v1/completions", {"prompt": ["Hi"] * 9, "max_tokens": 2}), 400, "prompt")
    assert_error(post(server, "/v1/completions", {"prompt": [[5, 6]] * 9, "max_tokens": 2}), 400, "prompt")
    # n x prompts: at most max(MAX_N=128, max_prompts_per_request) sequences per request.
    assert_error(post(server, "/v1/completions", {"prompt": ["Hi"] * 8, "n": 17, "max_tokens": 2}), 400, "n")
    ok = post(server, "/v1/completions", {"prompt": ["Hi"] * 8, "n": 16, "max_tokens": 1})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 128
    steps = server.metrics()["kvmem:engine_steps_total"]
    # The load test's request: 20,000 prompts in 180 KB held the engine for 18 s; now refused at once.
    assert_error(post(server, "/v1/completions", {"prompt": ["a b c"] * 20_000, "max_tokens": 1}), 400, "prompt")
    assert server.metrics()["kvmem:engine_steps_total"] == steps
    assert_still_serving(server)


# --- 7. /health reflects an engine that makes progress ---------------------------------------------
def test_health_is_503_while_a_step_is_stuck(server, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real_step = server.engine.engine.step

    def stuck_step():
        entered.set()
        release.wait(PATIENCE)
        return real_step()

    monkeypatch.setattr(server.engine.engine, "step", stuck_step)
    result: dict[str, httpx.Response] = {}
    request = threading.Thread(target=lambda: result.setdefault(
        "r", post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})))
    request.start()
    try:
        assert entered.wait(PATIENCE)
        deadline = time.monotonic() + PATIENCE  # the bound is 0.5 s; wait for it to pass
        while (health := httpx.get(f"{server.base_url}/health", timeout=PATIENCE)).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        error = assert_error(health, 503)
        assert "step" in error["message"] and error["type"] == "service_unavailable"
    finally:
        release.set()
        request.join(PATIENCE)
    monkeypatch.undo()
    assert result["r"].status_code == 200
    assert httpx.get(f"{server.base_url}/health", timeout=PATIENCE).status_code == 200
    assert_still_serving(server)


# --- 8. connections that stall ---------------------------------------------------------------------
def test_a_connection_that_stalls_mid_headers_is_closed(server):
    with socket.create_connection(address(server)) as stalled, socket.create_connection(address(server)) as idle:
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        # Meanwhile others are served.
        assert httpx.get(f"{server.base_url}/health", timeout=PATIENCE).status_code == 200
        assert closed_by_peer(stalled, 20 * READ_TIMEOUT)
        assert closed_by_peer(idle, 20 * READ_TIMEOUT)  # connected, never sent a byte
    assert_still_serving(server)


def dribble_until_closed(sock: socket.socket, data: bytes) -> None:
    """Send `data` a byte at a time (a byte each 0.2 s or faster) until the server closes."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + 20 * READ_TIMEOUT
    for byte in data:
        assert time.monotonic() < deadline, "the connection was never closed"
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(4096) == b"":
                return  # closed by the server
        except (TimeoutError, socket.timeout):
            continue  # nothing to read: the server is still reading
        except (BrokenPipeError, ConnectionResetError):
            return
    pytest.fail("sent everything without being closed")


def test_headers_dribbled_a_byte_at_a_time_are_still_bounded(server):
    with socket.create_connection(address(server)) as sock:
        dribble_until_closed(sock, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 10_000)


def test_a_body_nobody_reads_dribbled_after_the_response_is_bounded(server):
    with socket.create_connection(address(server)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n")
        sock.settimeout(PATIENCE)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # answered without reading the body
        dribble_until_closed(sock, b"b" * 10_000)


def test_a_body_that_stalls_is_408_and_the_connection_closed(server):
    with socket.create_connection(address(server)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        sock.settimeout(20 * READ_TIMEOUT)
        response = b""
        while chunk := sock.recv(4096):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), response
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and error["message"]
    assert_still_serving(server)


def test_a_client_that_stops_reading_is_dropped():
    """When the transport's buffer is full (the client reads nothing) for read_timeout seconds, the
    connection is aborted: uvicorn then tells the app the client left, which aborts its stream."""

    async def run() -> tuple[bool, bool]:
        config = uvicorn.Config(app=lambda scope, receive, send: None, log_level="warning")
        config.load()
        protocol_class = timed_h11_protocol(0.05)

        def connect() -> tuple[object, mock.Mock]:
            transport = mock.Mock()
            transport.is_closing.return_value = False
            transport.get_extra_info.return_value = None
            protocol = protocol_class(config=config, server_state=uvicorn.server.ServerState(), app_state={},
                                      _loop=asyncio.get_running_loop())
            protocol.connection_made(transport)
            return protocol, transport

        reader, reader_transport = connect()
        reader.pause_writing()
        reader.resume_writing()  # the client read: no timer left
        stalled, stalled_transport = connect()
        stalled.pause_writing()
        deadline = time.monotonic() + PATIENCE
        while not stalled_transport.abort.called and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        for protocol in (reader, stalled):
            protocol.connection_lost(None)
        return stalled_transport.abort.called, reader_transport.abort.called

    stalled_aborted, reader_aborted = asyncio.run(run())
    assert stalled_aborted and not reader_aborted


def test_a_client_gone_while_sending_its_body_is_not_an_internal_error():
    class Gone:
        headers = {"content-type": "application/json"}

        async def stream(self):
            yield b'{"prompt": '
            raise ClientDisconnect()

    with pytest.raises(api_server.InvalidRequest) as e:
        asyncio.run(read_body(Gone(), CompletionRequest, ServerSettings("m")))
    assert e.value.status_code == 499


# --- 11. hostile parameter sets -------------------------------------------------------------------
@pytest.mark.parametrize("body, param", [
    ({"prompt": "Hi", "n": 10**6}, "n"),
    ({"prompt": "Hi", "n": -1}, "n"),
    ({"prompt": "Hi", "max_tokens": 10**30}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": -5}, "max_tokens"),
    ({"prompt": "Hi", "logprobs": 10**6}, "logprobs"),
    ({"prompt": "Hi", "top_k": -(10**20)}, "top_k"),
    ({"prompt": "Hi", "min_tokens": 10**20}, "min_tokens"),
    ({"prompt": "Hi", "stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ({"prompt": "Hi", "stop": ["y" * 10_000]}, "stop"),
    ({"prompt": "Hi", "stop_token_ids": list(range(100_000))}, "stop_token_ids"),
    ({"prompt": "Hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt": [[1, 2]] * 8, "n": 128, "max_tokens": 500, "logprobs": 20}, "n"),
    ({"prompt": "Hi", "n": 128, "max_tokens": 500, "logprobs": 20}, "logprobs"),
])
def test_hostile_completion_parameters_are_400(server, body, param):
    assert_error(post(server, "/v1/completions", body), 400, param)
    assert_still_serving(server)


def test_hostile_chat_parameters_are_400(server):
    messages = [{"role": "user", "content": "Hi"}]
    assert_error(post(server, "/v1/chat/completions", {"messages": messages, "logprobs": True, "top_logprobs": 20,
                                                       "n": 128}), 400, "top_logprobs")
    assert_error(post(server, "/v1/chat/completions", {"messages": messages, "top_logprobs": 10**9,
                                                       "logprobs": True}), 400, "top_logprobs")
    assert_error(post(server, "/v1/chat/completions", {"messages": messages, "max_completion_tokens": 10**30}), 400,
                 "max_tokens")
    assert_still_serving(server)


@pytest.mark.parametrize("extra", [
    {"seed": 2**200}, {"seed": -(2**70)}, {"top_k": 10**20}, {"temperature": 1e300}, {"repetition_penalty": 1e-300},
    {"repetition_penalty": 1e300}, {"min_p": 1.0}, {"top_p": 1e-300}, {"presence_penalty": -2, "frequency_penalty": 2},
    {"max_tokens": 1, "min_tokens": 1, "stop": ["a"] * MAX_STOP_STRINGS},
])
def test_extreme_but_valid_parameters_generate(server, extra):
    body = {"prompt": "The quick brown fox", "max_tokens": 4, "n": 2, **extra}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2
    assert_still_serving(server)


def test_deeply_nested_json_is_400(server):
    deep = b'{"prompt": "Hi", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_error(post(server, "/v1/completions", deep), 400)
    deep_kwargs = b'{"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"a": ' + \
        b'{"b": ' * 5_000 + b"1" + b"}" * 5_000 + b"}}"
    assert_error(post(server, "/v1/chat/completions", deep_kwargs), 400)
    assert_still_serving(server)
