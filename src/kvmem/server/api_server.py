"""The OpenAI-compatible HTTP API over an `AsyncLLMEngine`.

    POST /v1/completions        POST /v1/chat/completions      (stream or not)
    POST /tokenize   POST /detokenize                           (vLLM's)
    GET  /v1/models   GET /health   GET /version   GET /metrics
    GET  /get_load   GET /get_server_info                       (what a router reads; see drain.py too)

Every request handler runs on the event loop: it validates the body (a 400 names the field),
tokenizes, and adds one engine request per prompt (per prompt, not per sample: `n` samples share
the prompt's KV). Streams are Server-Sent Events ending in `data: [DONE]`. A client that goes away
(mid-stream or while waiting for a non-streamed answer) aborts its requests, which gives their KV
memory back at the engine's next iteration.

Nothing a client sends may hold the event loop (every other client, /health included) or the
engine for long, so each cost is bounded before it is paid:
- the body: only a declared JSON body is read (415 otherwise: a browser page may POST text/plain to
  a local server without a CORS preflight), within `max_body_bytes` (413) and
  `request_read_timeout` seconds (408); a big body is parsed off the loop;
- the prompts: at most `max_prompts_per_request` per request, n x prompts at most
  max(MAX_N, that); a text prompt or conversation longer than `max_prompt_chars` (by default what
  max_model_len tokens could hold at MAX_CHARS_PER_TOKEN) is refused before tokenizing, and
  templates and tokenizers run on a worker thread;
- logprobs: at most MAX_LOGPROB_ENTRIES (token x alternative) per request;
- /health answers 503 when the engine thread died or a step has run for `health_step_timeout` s.
Connection-level limits (stalled headers, clients that read nothing) live in `connection.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from kvmem import __version__
from kvmem.engine.async_engine import AsyncLLMEngine, EngineStoppedError
from kvmem.outputs import CompletionOutput, Logprob, RequestOutput
from kvmem.sampling_params import SamplingParams
from kvmem.server.dashboard import dashboard_router
from kvmem.server.drain import Drain, DrainMiddleware
from kvmem.server.metrics import ServerMetrics
from kvmem.server.protocol import (MAX_N, UNSUPPORTED_FIELDS, ChatCompletionRequest, CompletionRequest,
                                   DetokenizeRequest, InvalidRequest, TokenizeRequest)
from kvmem.tools.choice import ToolPlan
from kvmem.tools.parsers import TOOL_PARSERS
from kvmem.tools.streaming import ToolCallStream, call_json, new_call_id

logger = logging.getLogger(__name__)

Body = TypeVar("Body", bound=BaseModel)

# The most characters one token of any tokenizer we serve could plausibly stand for (BPE tokens are
# a few characters; long runs of spaces or symbols reach a few dozen). A text longer than
# max_model_len times this cannot fit the context, so it is refused before paying to tokenize it.
MAX_CHARS_PER_TOKEN = 64
# Logprob entries (generated token x returned alternative) one request may ask for: each is a
# Python object (~300 bytes) kept until the request ends, so n=128 x 8,000 tokens x 21 would be
# gigabytes. 2^18 (~80 MB) still allows n=1 with 20 alternatives for 12,000 tokens.
MAX_LOGPROB_ENTRIES = 2**18
# Bodies larger than this are parsed on a worker thread (parsing 8 MiB of JSON takes ~1 s).
_PARSE_INLINE_BYTES = 64 * 2**10


@dataclass
class ServerSettings:
    served_model_name: str
    model_path: str = ""
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <api_key>"
    max_body_bytes: int = 8 * 2**20
    # Prompts in one request; n x prompts may be at most max(MAX_N, this). One request's sequences
    # then take at most half of the default max_num_seqs (256), so others are still scheduled.
    max_prompts_per_request: int = 128
    # A text prompt or conversation longer than this (characters) is refused before tokenizing;
    # None: max_model_len * MAX_CHARS_PER_TOKEN.
    max_prompt_chars: int | None = None
    # /health answers 503 when the step in progress has run longer than this (seconds); generous,
    # since a CPU step of a big batch can take seconds on a loaded machine.
    health_step_timeout: float = 120.0
    # Seconds a client gets to send a request's headers, then its body (408), and to start reading
    # a response it stopped reading; see connection.py.
    request_read_timeout: float = 30.0
    timeout_keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open (uvicorn's)
    # More names clients may send for the model (vLLM's several --served-model-name); responses name
    # `served_model_name`, /v1/models lists them all.
    extra_model_names: tuple[str, ...] = ()
    # CORS (Starlette's CORSMiddleware) when `allowed_origins` is not empty; none by default.
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    # Tool calling (vLLM's flags): the parser that finds calls in what the model wrote, and whether
    # tool_choice "auto" (the default when a request has tools) is served at all.
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompts_per_request", "max_prompt_chars", "health_step_timeout",
                     "request_read_timeout", "timeout_keep_alive"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_PARSERS)}, got {self.tool_call_parser!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser (--tool-call-parser)")

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.served_model_name, *self.extra_model_names)))

    def prompt_char_limit(self, max_model_len: int) -> int:
        return self.max_prompt_chars or max_model_len * MAX_CHARS_PER_TOKEN


@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]


def build_app(engine: AsyncLLMEngine, settings: ServerSettings) -> FastAPI:
    """The app; its lifespan starts the engine thread and stops it (aborting what is in flight)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="kvmem", version=__version__, lifespan=lifespan)
    strategy = engine.kv_cache_strategy
    metrics = ServerMetrics(engine, settings.served_model_name, strategy)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    drain = app.state.drain = Drain()  # set draining by the launcher on SIGTERM
    created = int(time.time())

    # --- errors: always OpenAI's body, never FastAPI's {"detail": ...} ----------------------------
    @app.exception_handler(InvalidRequest)
    async def invalid_request(_: Request, e: InvalidRequest) -> JSONResponse:
        return error_response(e.status_code, e.message, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error")
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    if settings.allowed_origins:  # outside the key check: a preflight carries no key, a 401 gets CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=list(settings.allowed_methods), allow_headers=list(settings.allowed_headers),
                           allow_credentials=settings.allow_credentials)
    app.add_middleware(DrainMiddleware, drain=drain)  # outermost: a draining server refuses before anything

    # --- plain endpoints -------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if drain.draining:
            return error_response(503, "the server is draining (shutting down)", code="draining")
        problem = engine_problem(engine, settings.health_step_timeout)
        if problem is not None:
            return error_response(503, problem, code="engine_unhealthy")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- what routers read from a worker (SGLang's and vLLM's routers: /get_load, /get_server_info) --
    @app.get("/get_load")
    async def get_load() -> dict:
        # `load` (an integer) is the field the routers parse; the rest says what it is made of.
        s = engine.snapshot
        return {"load": s.num_running + s.num_waiting, "num_running_reqs": s.num_running,
                "num_waiting_reqs": s.num_waiting, "kv_cache_usage": s.memory.usage, "http_requests_in_flight": drain.in_flight,
                "draining": drain.draining}

    @app.get("/get_server_info")
    async def get_server_info() -> dict:
        llm = engine.engine
        block_size = int(getattr(llm.manager, "block_size", None) or llm.config.block_size)
        return {"model_path": settings.model_path or settings.served_model_name,
                "served_model_name": settings.served_model_name, "version": __version__,
                "kv_cache": strategy, "kv_block_size": block_size, "block_size": block_size,
                "enable_prefix_caching": bool(llm.config.enable_prefix_caching),
                "max_model_len": engine.max_model_len, "draining": drain.draining}

    app.include_router(dashboard_router(engine))  # /dashboard and its event stream (server/dashboard.py)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": created, "owned_by": "kvmem",
            "root": settings.model_path or settings.served_model_name, "max_model_len": engine.max_model_len}
            for name in settings.model_names]}

    # --- completions -----------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request, CompletionRequest, settings)
        check_model(body.model, settings)
        params = body.sampling_params()
        check_engine_params(engine, params)
        await check_grammar(engine, body)
        raw_prompts = body.prompts()
        check_prompt_count(len(raw_prompts), params.n, settings)
        check_prompt_chars(raw_prompts, settings.prompt_char_limit(engine.max_model_len), engine.max_model_len)

        def tokenize() -> tuple[list[_Prompt], list[str]]:
            prompts = [check_prompt(engine, p, params, explicit_max_tokens=True) for p in raw_prompts]
            return prompts, [prompt_text(engine, p) if body.echo else "" for p in prompts]

        prompts, echo = await asyncio.to_thread(tokenize)  # off the loop: a long prompt takes seconds
        check_logprob_budget(engine, params, prompts, "logprobs")
        check_prompt_logprob_budget(params, prompts)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        header = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                  "model": settings.served_model_name}
        streams = [track(metrics, engine.generate(p.text, p.token_ids, params, f"{request_id}-{i}"), params.n)
                   for i, p in enumerate(prompts)]
        if body.streaming:
            return sse_response(stream_completion(header, streams, params, echo, body.include_usage))
        finals = await until_disconnected(request, gather_finals(streams))

        def respond() -> JSONResponse:
            choices = []
            for i, out in enumerate(finals):
                for c in out.outputs:
                    logprobs = completion_logprobs(c, params, 0, len(echo[i]))
                    if echo[i] and logprobs is not None:  # echo with logprobs: the prompt's come first
                        logprobs = echo_logprobs(engine, out, params, logprobs)
                    choices.append({"index": i * params.n + c.index, "text": echo[i] + c.text,
                                    "logprobs": logprobs,
                                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                                    "prompt_logprobs": prompt_logprobs_json(out)})
            return JSONResponse({**header, "choices": choices, "usage": usage(finals)})

        return await off_loop_if(params.logprobs is not None or params.prompt_logprobs is not None, respond)

    # --- chat completions ------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request, ChatCompletionRequest, settings)
        check_model(body.model, settings)
        tool_plan = body.plan_tools(settings.tool_call_parser, settings.enable_auto_tool_choice)
        params = body.sampling_params()
        check_engine_params(engine, params)
        await check_grammar(engine, body)
        char_limit = settings.prompt_char_limit(engine.max_model_len)
        check_conversation_size(body, engine.max_model_len, char_limit)
        explicit_max_tokens = body.max_tokens is not None or body.max_completion_tokens is not None
        # Off the loop: rendering a template and tokenizing a long conversation take seconds.
        prompt = await asyncio.to_thread(render_chat, engine, body, params, explicit_max_tokens, char_limit)
        check_logprob_budget(engine, params, [prompt], "top_logprobs" if body.top_logprobs else "logprobs")
        check_prompt_logprob_budget(params, [prompt])
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        header = {"id": request_id, "object": "chat.completion", "created": int(time.time()),
                  "model": settings.served_model_name}
        stream = track(metrics, engine.generate(prompt.text, prompt.token_ids, params, request_id), params.n)
        if body.streaming:
            return sse_response(stream_chat(header, stream, params, body.include_usage, tool_plan))
        (final,) = await until_disconnected(request, gather_finals([stream]))

        def respond() -> JSONResponse:
            choices = [{"index": c.index, **chat_message(c, tool_plan),
                        "logprobs": chat_logprobs(c, params, 0), "stop_reason": c.stop_reason} for c in final.outputs]
            return JSONResponse({**header, "choices": choices, "usage": usage([final]),
                                 "prompt_logprobs": prompt_logprobs_json(final)})

        return await off_loop_if(params.logprobs is not None or params.prompt_logprobs is not None, respond)

    # --- tokenizer (vLLM's routes: /tokenize and /detokenize, not under /v1) -----------------------
    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await read_body(request, TokenizeRequest, settings)
        check_model(body.model, settings)
        body.check()
        char_limit = settings.prompt_char_limit(engine.max_model_len)
        if body.prompt is not None and len(body.prompt) > char_limit:
            raise InvalidRequest(f"the prompt is {len(body.prompt)} characters, more than the {char_limit} that "
                                 "could fit in this model's context", "prompt")

        def run() -> dict:
            tokenizer = engine.tokenizer
            if body.prompt is not None:
                add_special = True if body.add_special_tokens is None else body.add_special_tokens
                tokens = tokenizer.encode(body.prompt, add_special_tokens=add_special)
            else:
                if sum(len(m.content) for m in body.messages if isinstance(m.content, str)) > char_limit:
                    raise InvalidRequest(f"the messages hold more than the {char_limit} characters that could fit "
                                         "in this model's context", "messages")
                try:
                    text = tokenizer.apply_chat_template(
                        body.conversation(), body.add_generation_prompt is not False,
                        **(body.chat_template_kwargs or {}))
                except ValueError as e:
                    raise InvalidRequest(str(e), "messages") from e
                except TypeError as e:
                    raise InvalidRequest(str(e), "chat_template_kwargs") from e
                tokens = tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
            strs = [tokenizer.id_to_token(t) or "" for t in tokens] if body.return_token_strs else None
            return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens,
                    "token_strs": strs}

        return JSONResponse(await asyncio.to_thread(run))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        body = await read_body(request, DetokenizeRequest, settings)
        check_model(body.model, settings)
        vocab = engine.engine.model_config.vocab_size
        for i, t in enumerate(body.tokens):
            if not 0 <= t < vocab:
                raise InvalidRequest(f"token id {t} is outside this model's vocabulary [0, {vocab})", f"tokens[{i}]")
        text = await asyncio.to_thread(engine.tokenizer.decode, body.tokens, False)
        return JSONResponse({"prompt": text})

    return app


# Outside /v1 but behind the API key, as in vLLM.
KEYED_PATHS = ("/tokenize", "/detokenize")


class ApiKeyMiddleware:
    """401 for /v1/* without "Authorization: Bearer <key>"; /health, /version and /metrics stay open.
    Plain ASGI rather than an `@app.middleware("http")` function, which would re-pipe every streamed
    chunk through an extra task."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.key_digest = hashlib.sha256(api_key.encode()).digest()

    def authorized(self, header: bytes) -> bool:
        # The scheme is case-insensitive (RFC 9110). The key is compared in constant time, and as a
        # hash so that not even its length leaks through timing (compare_digest's time depends on it).
        scheme, _, token = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(hashlib.sha256(token.strip()).digest(),
                                                                    self.key_digest)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and (scope["path"].startswith("/v1") or scope["path"] in KEYED_PATHS):
            if not self.authorized(dict(scope["headers"]).get(b"authorization", b"")):
                response = error_response(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                          code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- request parsing and checks -------------------------------------------------------------------
def error_response(status: int, message: str, param: str | None = None, code: str | int | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "invalid_request_error", 503: "service_unavailable"}.get(status, "server_error" if status >= 500
                                                                          else "invalid_request_error")
    # After a 408 or 413 the rest of the body may still be on its way (slowly, or gigabytes of it):
    # close the connection rather than read it to reach the next request.
    headers = {"Connection": "close"} if status in (408, 413) else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code or status}},
                        status_code=status, headers=headers)


def engine_problem(engine: AsyncLLMEngine, step_timeout: float) -> str | None:
    """Why the engine cannot serve (for /health), or None when it makes progress."""
    if not engine.is_running:
        return "the engine is not running"
    elapsed = engine.step_elapsed()
    if elapsed is not None and elapsed > step_timeout:
        return f"the engine's current step has been running for {elapsed:.0f} s (bound: {step_timeout:g} s)"
    return None


def is_json_media_type(content_type: str | None) -> bool:
    """application/json (any parameters, e.g. charset) or a structured-syntax type application/*+json."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_body(request: Request, model: type[Body], settings: ServerSettings) -> Body:
    """The JSON body, validated against `model`. Refuses a body not declared JSON (415), over
    `max_body_bytes` (413, without reading it whole) or slower than `request_read_timeout` (408)."""
    if not is_json_media_type(request.headers.get("content-type")):
        # Browsers send text/plain, form and multipart bodies cross-origin without a CORS preflight:
        # accepting them would let any web page start generations on a local server.
        raise InvalidRequest("the body must be JSON, sent with 'Content-Type: application/json'",
                             status_code=415, code="unsupported_media_type")
    max_bytes = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise InvalidRequest(f"request body is {declared} bytes, over the limit of {max_bytes}", status_code=413)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(settings.request_read_timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise InvalidRequest(f"request body is over the limit of {max_bytes} bytes", status_code=413)
                chunks.append(chunk)
    except TimeoutError as e:
        raise InvalidRequest(f"the request body did not arrive within {settings.request_read_timeout:g} s",
                             status_code=408, code="request_timeout") from e
    except ClientDisconnect as e:  # nobody to answer; not an internal error
        raise InvalidRequest("client disconnected while sending the body", status_code=499) from e
    raw = b"".join(chunks)
    if len(raw) <= _PARSE_INLINE_BYTES:
        return parse_body(model, raw)
    return await asyncio.to_thread(parse_body, model, raw)


def parse_body(model: type[Body], raw: bytes) -> Body:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise InvalidRequest(f"the body is not valid JSON: {first['msg']}") from e
        param = error_param(first["loc"])
        if first["type"] == "extra_forbidden":
            name = str(first["loc"][-1])
            why = ("is not supported by this server" if name in UNSUPPORTED_FIELDS
                   else "is not a parameter this endpoint knows")
            raise InvalidRequest(f"{param}: {name!r} {why}; kvmem refuses what it would otherwise ignore",
                                 param, code="unsupported_parameter") from e
        raise InvalidRequest(f"{param or 'body'}: {first['msg']}", param or None) from e


def error_param(loc: tuple) -> str:
    """A validation error's location as OpenAI writes it: messages[0].role."""
    param = ""
    for p in loc:
        if isinstance(p, int):
            param += f"[{p}]"
        # A union's error location names the member type tried ('str', 'list[int]'): drop those.
        elif not any(ch in p for ch in "[]") and p not in ("str", "int", "float", "bool"):
            param += f".{p}" if param else p
    return param


def check_model(name: str | None, settings: ServerSettings) -> None:
    if name is not None and name not in settings.model_names:
        raise InvalidRequest(f"The model `{name}` does not exist; this server serves "
                             + ", ".join(f"`{n}`" for n in settings.model_names), "model", status_code=404,
                             code="model_not_found")


def check_prompt_count(num_prompts: int, n: int, settings: ServerSettings) -> None:
    limit = settings.max_prompts_per_request
    if num_prompts > limit:
        raise InvalidRequest(f"a request may hold at most {limit} prompts, got {num_prompts}; "
                             "send them in several requests", "prompt")
    max_sequences = max(MAX_N, limit)
    if n * num_prompts > max_sequences:
        raise InvalidRequest(f"n x prompts must be at most {max_sequences}, got {n} x {num_prompts}", "n")


def check_conversation_size(body: ChatCompletionRequest, max_model_len: int, char_limit: int) -> None:
    """Cheap bounds before a template renders the messages: each renders to at least one token, and
    their text is at most `char_limit` characters."""
    if len(body.messages) >= max_model_len:
        raise InvalidRequest(f"{len(body.messages)} messages cannot fit in this model's context of "
                             f"{max_model_len} tokens", "messages")
    chars = 0
    for m in body.messages:
        if isinstance(m.content, str):
            chars += len(m.content)
        elif m.content is not None:
            chars += sum(len(part["text"]) for part in m.content if isinstance(part.get("text"), str))
    if chars > char_limit:
        raise InvalidRequest(f"the messages hold {chars} characters, more than the {char_limit} that could fit "
                             "in this model's context", "messages")


def render_chat(engine: AsyncLLMEngine, body: ChatCompletionRequest, params: SamplingParams,
                explicit_max_tokens: bool, char_limit: int) -> _Prompt:
    """The conversation through the chat template, tokenized and checked (on a worker thread)."""
    tools = {"tools": body.template_tools()} if body.tools else {}  # as transformers passes them
    try:
        text = engine.tokenizer.apply_chat_template(body.conversation(), body.add_generation_prompt is not False,
                                                    **tools, **(body.chat_template_kwargs or {}))
    except ValueError as e:
        raise InvalidRequest(str(e), "messages") from e
    except TypeError as e:  # chat_template_kwargs naming a parameter twice
        raise InvalidRequest(str(e), "chat_template_kwargs") from e
    if len(text) > char_limit:  # a template may add a lot to the messages (chat_template_kwargs)
        raise InvalidRequest(f"the rendered conversation is {len(text)} characters, more than the {char_limit} "
                             "that could fit in this model's context", "messages")
    # The template wrote any BOS itself.
    prompt_ids = engine.tokenizer.encode(text, add_special_tokens=False)
    return check_prompt(engine, {"prompt": text, "prompt_token_ids": prompt_ids}, params, explicit_max_tokens)


def check_prompt_chars(prompts: list[str | list[int]], char_limit: int, max_model_len: int) -> None:
    """Every text prompt's length, before any is tokenized."""
    for p in prompts:
        if isinstance(p, str) and len(p) > char_limit:
            raise InvalidRequest(f"a prompt is {len(p)} characters, more than the {char_limit} that could fit in "
                                 f"this model's context of {max_model_len} tokens", "prompt")


def check_prompt(engine: AsyncLLMEngine, prompt: Any, params: SamplingParams, explicit_max_tokens: bool) -> _Prompt:
    """Tokenize (a text prompt) and check one prompt; slow for long text, so called off the loop."""
    param = "prompt" if not isinstance(prompt, dict) else "messages"
    try:
        text, token_ids = engine.check_prompt(prompt)
    except ValueError as e:
        raise InvalidRequest(str(e), param) from e
    if explicit_max_tokens and params.max_tokens is not None \
            and len(token_ids) + params.max_tokens > engine.max_model_len:
        raise InvalidRequest(f"This model's maximum context length is {engine.max_model_len} tokens. However, you "
                             f"requested {len(token_ids) + params.max_tokens} tokens ({len(token_ids)} in the "
                             f"prompt, {params.max_tokens} for the completion). Reduce the prompt or max_tokens.",
                             "max_tokens")
    return _Prompt(text, token_ids)


def prompt_text(engine: AsyncLLMEngine, prompt: _Prompt) -> str:
    return prompt.text if prompt.text is not None else engine.tokenizer.decode(prompt.token_ids)


def check_engine_params(engine: AsyncLLMEngine, params: SamplingParams) -> None:
    """What only the engine can check (logit_bias ids against the vocabulary, prompt logprobs with
    this runner); its messages start with the parameter's name."""
    try:
        engine.engine.check_params(params)
    except ValueError as e:
        raise InvalidRequest(str(e), str(e).split(" ", 1)[0]) from e


async def check_grammar(engine: AsyncLLMEngine, body: CompletionRequest | ChatCompletionRequest) -> None:
    """Structured outputs: the grammar compiles (cached; the engine reuses it), or a 400 names the
    request field that asked for it."""
    grammar = body.requested_grammar()
    if grammar is None:
        return
    try:
        await engine.compile_grammar(grammar.params)
    except ValueError as e:
        raise InvalidRequest(grammar.rename(str(e)), grammar.field) from e


def check_prompt_logprob_budget(params: SamplingParams, prompts: list[_Prompt]) -> None:
    if params.prompt_logprobs is None:
        return
    entries = sum(len(p.token_ids) for p in prompts) * (params.prompt_logprobs + 1)
    if entries > MAX_LOGPROB_ENTRIES:
        raise InvalidRequest(f"this request could return {entries} prompt logprobs (prompt tokens x (alternatives "
                             f"+ 1)); at most {MAX_LOGPROB_ENTRIES}: lower prompt_logprobs or shorten the prompts",
                             "prompt_logprobs")


def check_logprob_budget(engine: AsyncLLMEngine, params: SamplingParams, prompts: list[_Prompt], param: str) -> None:
    if params.logprobs is None:
        return
    entries = 0
    for p in prompts:
        room = engine.max_model_len - len(p.token_ids)
        entries += params.n * min(params.max_tokens or room, room) * (params.logprobs + 1)
    if entries > MAX_LOGPROB_ENTRIES:
        raise InvalidRequest(f"this request could return {entries} logprobs (n x max_tokens x (alternatives + 1), "
                             f"over its prompts); at most {MAX_LOGPROB_ENTRIES}: lower n, max_tokens or the "
                             "number of alternatives", param)


# --- running requests -----------------------------------------------------------------------------
R = TypeVar("R")


async def off_loop_if(slow: bool, build: Callable[[], R]) -> R:
    """`build()`, on a worker thread when `slow`: a response with up to MAX_LOGPROB_ENTRIES logprobs
    takes a noticeable time to build and serialize, which would stall every other client."""
    return await asyncio.to_thread(build) if slow else build()


async def track(metrics: ServerMetrics, stream: AsyncIterator[RequestOutput],
                num_samples: int) -> AsyncIterator[RequestOutput]:
    """Pass outputs through, timing them for /metrics; closing this closes (aborts) the request."""
    tracker = metrics.tracker(num_samples)
    try:
        async for out in stream:
            tracker.on_output(out)
            yield out
    finally:
        tracker.on_close()
        await stream.aclose()


async def gather_finals(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    async def last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
        out = None
        try:
            async for out in stream:
                pass
        finally:
            await stream.aclose()  # on cancellation too: that aborts the request
        assert out is not None and out.finished
        return out

    tasks = [asyncio.ensure_future(last(s)) for s in streams]
    try:
        finals = await asyncio.gather(*tasks)
    except EngineStoppedError as e:
        raise InvalidRequest(str(e), status_code=503) from e
    finally:
        for t in tasks:
            t.cancel()
    for out in finals:
        if "error" in out.metrics:
            raise InvalidRequest(out.metrics["error"], "prompt")
    return finals


T = TypeVar("T")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it (aborting its requests) if the client disconnects first."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work_task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work_task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not work_task.done():
        work_task.cancel()
        logger.info("client disconnected; request aborted")
        raise InvalidRequest("client disconnected", status_code=499)
    return work_task.result()


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with the request's position."""
    pending: dict[asyncio.Future, int] = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    out = fut.result()
                except StopAsyncIteration:
                    continue
                yield i, out
                pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for fut in pending:
            fut.cancel()
        # Let the cancellations land before closing: a generator inside anext() cannot be closed.
        await asyncio.gather(*pending, return_exceptions=True)
        for s in streams:
            await s.aclose()


# --- streaming ------------------------------------------------------------------------------------
# Characters that JSON may carry raw but that httpx (and so the openai client) treats as line breaks
# when it splits an event stream into lines: a generated token containing one would cut its event.
_LINE_BREAKS_IN_JSON = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_data(event: dict) -> str:
    """One Server-Sent Event: compact UTF-8 JSON on a single line, whatever text the model made."""
    return f"data: {json.dumps(event, ensure_ascii=False, separators=(',', ':')).translate(_LINE_BREAKS_IN_JSON)}\n\n"


def sse_response(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield sse_data(event)
        except (InvalidRequest, EngineStoppedError) as e:
            status = getattr(e, "status_code", 503)
            error = {"message": str(e), "type": "invalid_request_error" if status < 500 else "server_error",
                     "param": getattr(e, "param", None), "code": status}
            yield f"data: {json.dumps({'error': error})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _StreamState:
    """Per choice: how many tokens were sent (for logprobs) and how much text (for text_offset)."""

    def __init__(self) -> None:
        self.tokens_sent: dict[int, int] = {}
        self.chars_sent: dict[int, int] = {}
        self.prompt_logprobs_sent: set[int] = set()

    def unsent(self, index: int, c: CompletionOutput, params: SamplingParams) -> int | None:
        """Tokens of choice `index` already sent, or None when this output has nothing to send:
        no text (held back, a possible stop string), no finish, and no logprobs asked for."""
        sent = self.tokens_sent.get(index, 0)
        new_tokens = len(c.token_ids) > sent
        if c.text_delta or c.finish_reason or (new_tokens and params.logprobs is not None):
            return sent
        return None


def _check_error(out: RequestOutput) -> None:
    if "error" in out.metrics:
        raise InvalidRequest(out.metrics["error"], "prompt")


async def stream_completion(header: dict, streams: list[AsyncIterator[RequestOutput]],
                            params: SamplingParams, echo: list[str], include_usage: bool) -> AsyncIterator[dict]:
    extra = {"usage": None} if include_usage else {}
    state = _StreamState()
    for i, text in enumerate(echo):
        if text:
            choices = [{"index": i * params.n + k, "text": text, "logprobs": None, "finish_reason": None}
                       for k in range(params.n)]
            yield {**header, "choices": choices, **extra}
    finals: dict[int, RequestOutput] = {}
    async for i, out in merge(streams):
        _check_error(out)
        choices = []
        for c in out.outputs:
            index = i * params.n + c.index
            sent = state.unsent(index, c, params)
            if sent is None:
                continue
            offset = state.chars_sent.get(index, len(echo[i]))
            choice = {"index": index, "text": c.text_delta, "logprobs": completion_logprobs(c, params, sent, offset),
                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if out.prompt_logprobs is not None and index not in state.prompt_logprobs_sent:
                choice["prompt_logprobs"] = prompt_logprobs_json(out)  # once per choice, in its first chunk
                state.prompt_logprobs_sent.add(index)
            choices.append(choice)
            state.tokens_sent[index] = len(c.token_ids)
            state.chars_sent[index] = offset + len(c.text_delta)
        if choices:
            yield {**header, "choices": choices, **extra}
        if out.finished:
            finals[i] = out
    if include_usage:
        yield {**header, "choices": [], "usage": usage([finals[i] for i in sorted(finals)])}


def chat_message(c: CompletionOutput, plan: ToolPlan | None) -> dict:
    """A finished choice's message and finish_reason; with tools, the calls the plan's parser finds."""
    if plan is None:
        return {"message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
    parsed = plan.parser.finish(c.text)
    calls = [call_json(call, new_call_id()) for call in parsed.calls[:plan.max_calls]]
    message: dict = {"role": "assistant", "content": parsed.content or None}
    if calls:
        message["tool_calls"] = calls
    finish = plan.finish_reason_on_calls if calls and c.finish_reason == "stop" else c.finish_reason
    return {"message": message, "finish_reason": finish or c.finish_reason}


async def stream_chat(header: dict, stream: AsyncIterator[RequestOutput], params: SamplingParams,
                      include_usage: bool, tool_plan: ToolPlan | None = None) -> AsyncIterator[dict]:
    header = {**header, "object": "chat.completion.chunk"}
    tool_streams = {k: ToolCallStream(tool_plan.parser, tool_plan.max_calls) for k in range(params.n)} \
        if tool_plan is not None else {}
    texts = dict.fromkeys(range(params.n), "")
    extra = {"usage": None} if include_usage else {}
    yield {**header, "choices": [{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None} for k in range(params.n)], **extra}
    state = _StreamState()
    final = None
    async for _, out in merge([stream]):
        _check_error(out)
        choices = []
        for c in out.outputs:
            sent = state.unsent(c.index, c, params)
            if sent is None:
                continue
            finish_reason = c.finish_reason
            if tool_plan is None:
                delta = {"content": c.text_delta} if c.text_delta else {}
            else:  # content and tool-call pieces, from the text so far (kvmem.tools.streaming)
                texts[c.index] += c.text_delta
                tools = tool_streams[c.index]
                delta = tools.update(texts[c.index], final=c.finish_reason is not None)
                if tools.num_calls and finish_reason == "stop":
                    finish_reason = tool_plan.finish_reason_on_calls or finish_reason
                if not delta and not finish_reason and params.logprobs is None:
                    continue  # held back (a possible call's start): nothing to send yet
            choice = {"index": c.index, "delta": delta,
                      "logprobs": chat_logprobs(c, params, sent), "finish_reason": finish_reason,
                      "stop_reason": c.stop_reason}
            if out.prompt_logprobs is not None and c.index not in state.prompt_logprobs_sent:
                choice["prompt_logprobs"] = prompt_logprobs_json(out)  # once per choice, in its first chunk
                state.prompt_logprobs_sent.add(c.index)
            choices.append(choice)
            state.tokens_sent[c.index] = len(c.token_ids)
        if choices:
            yield {**header, "choices": choices, **extra}
        if out.finished:
            final = out
    if include_usage and final is not None:
        yield {**header, "choices": [], "usage": usage([final])}


# --- response pieces ------------------------------------------------------------------------------
def usage(finals: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def echo_logprobs(engine: AsyncLLMEngine, out: RequestOutput, params: SamplingParams, generated: dict) -> dict:
    """vLLM's echo with logprobs: the prompt tokens (from the prompt logprobs; the first has none)
    before the generated ones, in the legacy completions shape."""
    tokens, token_logprobs, tops, offsets, offset = [], [], [], [], 0
    for position, token_id in enumerate(out.prompt_token_ids):
        entry = out.prompt_logprobs[position] if out.prompt_logprobs is not None else None
        if entry is None:
            text, logprob, top = engine.tokenizer.decode([token_id], False), None, None
        else:
            text, logprob = _token_text(entry[token_id], token_id), entry[token_id].logprob
            top = {_token_text(lp, t): lp.logprob for t, lp in entry.items()
                   if lp.rank is not None and lp.rank <= params.logprobs} or None
        tokens.append(text)
        token_logprobs.append(logprob)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens + generated["tokens"], "token_logprobs": token_logprobs + generated["token_logprobs"],
            "top_logprobs": tops + generated["top_logprobs"], "text_offset": offsets + generated["text_offset"]}


def prompt_logprobs_json(out: RequestOutput) -> list[dict | None] | None:
    """vLLM's shape: per prompt token None (the first) or {token_id: {logprob, rank, decoded_token}}."""
    if out.prompt_logprobs is None:
        return None
    return [None if entry is None else
            {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
             for t, lp in entry.items()} for entry in out.prompt_logprobs]


def _token_text(lp: Logprob, token_id: int) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"<{token_id}>"


def completion_logprobs(c: CompletionOutput, params: SamplingParams, start: int, text_offset: int) -> dict | None:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset, for tokens
    [start:] of the completion."""
    if params.logprobs is None or c.logprobs is None:
        return None
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, per_token in zip(c.token_ids[start:], c.logprobs[start:]):
        chosen = per_token[token_id]
        text = _token_text(chosen, token_id)
        tokens.append(text)
        token_logprobs.append(chosen.logprob)
        tops.append({_token_text(lp, t): lp.logprob for t, lp in per_token.items()
                     if lp.rank is not None and lp.rank <= params.logprobs} or None)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(c: CompletionOutput, params: SamplingParams, start: int) -> dict | None:
    """The chat shape: per token {token, logprob, bytes, top_logprobs: [...]}, best first."""
    if params.logprobs is None or c.logprobs is None:
        return None
    content = []
    for token_id, per_token in zip(c.token_ids[start:], c.logprobs[start:]):
        chosen = per_token[token_id]
        ranked = sorted(((t, lp) for t, lp in per_token.items() if lp.rank is not None and lp.rank <= params.logprobs),
                        key=lambda item: item[1].rank)
        content.append({"token": _token_text(chosen, token_id), "logprob": chosen.logprob,
                        "bytes": list(_token_text(chosen, token_id).encode()),
                        "top_logprobs": [{"token": _token_text(lp, t), "logprob": lp.logprob,
                                          "bytes": list(_token_text(lp, t).encode())} for t, lp in ranked]})
    return {"content": content}

