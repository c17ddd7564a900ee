"""The OpenAI-compatible HTTP API over an `AsyncLLMEngine`.

    POST /v1/completions        POST /v1/chat/completions      (stream or not)
    GET  /v1/models   GET /health   GET /version   GET /metrics

Every request handler runs on the event loop: it validates the body (a 400 names the field),
tokenizes, and adds one engine request per prompt (per prompt, not per sample: `n` samples share
the prompt's KV). Streams are Server-Sent Events ending in `data: [DONE]`. A client that goes away
(mid-stream or while waiting for a non-streamed answer) aborts its requests, which gives their KV
memory back at the engine's next iteration.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvmem import __version__
from kvmem.engine.async_engine import AsyncLLMEngine, EngineStoppedError
from kvmem.outputs import CompletionOutput, Logprob, RequestOutput
from kvmem.sampling_params import SamplingParams
from kvmem.server.metrics import ServerMetrics
from kvmem.server.protocol import ChatCompletionRequest, CompletionRequest, InvalidRequest

logger = logging.getLogger(__name__)

Body = TypeVar("Body", bound=BaseModel)


@dataclass
class ServerSettings:
    served_model_name: str
    model_path: str = ""
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <api_key>"
    max_body_bytes: int = 8 * 2**20


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
    strategy = engine.engine.manager.name
    metrics = ServerMetrics(engine, settings.served_model_name, strategy)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
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

    # --- plain endpoints -------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": settings.served_model_name, "object": "model", "created": created, "owned_by": "kvmem",
            "root": settings.model_path or settings.served_model_name, "max_model_len": engine.max_model_len}]}

    # --- completions -----------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request, CompletionRequest, settings.max_body_bytes)
        check_model(body.model, settings)
        params = body.sampling_params()
        prompts = [check_prompt(engine, p, params, explicit_max_tokens=True) for p in body.prompts()]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        header = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                  "model": settings.served_model_name}
        streams = [track(metrics, engine.generate(p.text, p.token_ids, params, f"{request_id}-{i}"), params.n)
                   for i, p in enumerate(prompts)]
        echo = [prompt_text(engine, p) if body.echo else "" for p in prompts]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse_response(stream_completion(header, streams, params, echo, include_usage))
        finals = await until_disconnected(request, gather_finals(streams))
        choices = []
        for i, out in enumerate(finals):
            for c in out.outputs:
                choices.append({"index": i * params.n + c.index, "text": echo[i] + c.text,
                                "logprobs": completion_logprobs(c, params, 0, len(echo[i])),
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return JSONResponse({**header, "choices": choices, "usage": usage(finals)})

    # --- chat completions ------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request, ChatCompletionRequest, settings.max_body_bytes)
        check_model(body.model, settings)
        params = body.sampling_params()
        try:
            text = engine.tokenizer.apply_chat_template(body.conversation(), body.add_generation_prompt,
                                                        **(body.chat_template_kwargs or {}))
        except ValueError as e:
            raise InvalidRequest(str(e), "messages") from e
        except TypeError as e:  # chat_template_kwargs naming a parameter twice
            raise InvalidRequest(str(e), "chat_template_kwargs") from e
        # The template wrote any BOS itself.
        prompt_ids = engine.tokenizer.encode(text, add_special_tokens=False)
        prompt = check_prompt(engine, {"prompt": text, "prompt_token_ids": prompt_ids}, params,
                              explicit_max_tokens=body.max_tokens is not None or body.max_completion_tokens is not None)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        header = {"id": request_id, "object": "chat.completion", "created": int(time.time()),
                  "model": settings.served_model_name}
        stream = track(metrics, engine.generate(prompt.text, prompt.token_ids, params, request_id), params.n)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse_response(stream_chat(header, stream, params, include_usage))
        (final,) = await until_disconnected(request, gather_finals([stream]))
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c, params, 0), "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason} for c in final.outputs]
        return JSONResponse({**header, "choices": choices, "usage": usage([final])})

    return app


class ApiKeyMiddleware:
    """401 for /v1/* without "Authorization: Bearer <key>"; /health, /version and /metrics stay open.
    Plain ASGI rather than an `@app.middleware("http")` function, which would re-pipe every streamed
    chunk through an extra task."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if auth != self.expected:
                response = error_response(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                          code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- request parsing and checks -------------------------------------------------------------------
def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "invalid_request_error", 503: "service_unavailable"}.get(status, "server_error" if status >= 500
                                                                          else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code or status}},
                        status_code=status)


async def read_body(request: Request, model: type[Body], max_bytes: int) -> Body:
    """The JSON body, validated against `model`; refuses bodies over `max_bytes` with a 413 without
    reading them whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise InvalidRequest(f"request body is {declared} bytes, over the limit of {max_bytes}", status_code=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise InvalidRequest(f"request body is over the limit of {max_bytes} bytes", status_code=413)
        chunks.append(chunk)
    try:
        return model.model_validate_json(b"".join(chunks))
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise InvalidRequest(f"the body is not valid JSON: {first['msg']}") from e
        loc = [str(p) for p in first["loc"]]
        # A union's error location names the member type tried ('str', 'list[int]'): drop those.
        param = ".".join(p for p in loc if not any(ch in p for ch in "[]") and p not in ("str", "int"))
        raise InvalidRequest(f"{param or 'body'}: {first['msg']}", param or None) from e


def check_model(name: str | None, settings: ServerSettings) -> None:
    if name is not None and name != settings.served_model_name:
        raise InvalidRequest(f"The model `{name}` does not exist; this server serves "
                             f"`{settings.served_model_name}`", "model", status_code=404, code="model_not_found")


def check_prompt(engine: AsyncLLMEngine, prompt: Any, params: SamplingParams, explicit_max_tokens: bool) -> _Prompt:
    try:
        text, token_ids = engine.check_prompt(prompt)
    except ValueError as e:
        raise InvalidRequest(str(e), "prompt" if not isinstance(prompt, dict) else "messages") from e
    if explicit_max_tokens and params.max_tokens is not None \
            and len(token_ids) + params.max_tokens > engine.max_model_len:
        raise InvalidRequest(f"This model's maximum context length is {engine.max_model_len} tokens. However, you "
                             f"requested {len(token_ids) + params.max_tokens} tokens ({len(token_ids)} in the "
                             f"prompt, {params.max_tokens} for the completion). Reduce the prompt or max_tokens.",
                             "max_tokens")
    return _Prompt(text, token_ids)


def prompt_text(engine: AsyncLLMEngine, prompt: _Prompt) -> str:
    return prompt.text if prompt.text is not None else engine.tokenizer.decode(prompt.token_ids)


# --- running requests -----------------------------------------------------------------------------
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
            choices.append({"index": index, "text": c.text_delta,
                            "logprobs": completion_logprobs(c, params, sent, offset),
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            state.tokens_sent[index] = len(c.token_ids)
            state.chars_sent[index] = offset + len(c.text_delta)
        if choices:
            yield {**header, "choices": choices, **extra}
        if out.finished:
            finals[i] = out
    if include_usage:
        yield {**header, "choices": [], "usage": usage([finals[i] for i in sorted(finals)])}


async def stream_chat(header: dict, stream: AsyncIterator[RequestOutput], params: SamplingParams,
                      include_usage: bool) -> AsyncIterator[dict]:
    header = {**header, "object": "chat.completion.chunk"}
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
            choices.append({"index": c.index, "delta": {"content": c.text_delta} if c.text_delta else {},
                            "logprobs": chat_logprobs(c, params, sent), "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason})
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

