"""/dashboard: a live picture of the KV memory, for a person watching a server.

`GET /dashboard` serves a static page (src/kvmem/server/dashboard/: HTML, JS, CSS; no build step,
nothing fetched from elsewhere, so it works offline). The page reads `GET /dashboard/events`, a
server-sent-events stream of JSON states: the engine's latest `EngineSnapshot` numbers plus the
manager's `memory_map()` (per block / page / slot states and owners).

Cost: the engine thread takes a memory map only while at least one stream is open
(`AsyncLLMEngine.watch_memory_map`), at most every `MEMORY_MAP_INTERVAL` seconds. Each stream polls
the latest published map on the event loop and sends it when it changed, at most `EVENT_RATE`
times a second: a map that changed twice between polls is sent once (coalesced), and a slow page
only delays its own stream, never the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
from importlib import resources

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from kvmem.engine.async_engine import AsyncLLMEngine
from kvmem.engine.memory_picture import dashboard_state

EVENT_RATE = 10.0  # states per second, at most, per stream
KEEPALIVE = 5.0  # seconds between comments on an idle stream (notices a page that went away)
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


def _asset(name: str) -> str:
    return resources.files("kvmem.server").joinpath("dashboard", name).read_text(encoding="utf-8")


def dashboard_router(engine: AsyncLLMEngine) -> APIRouter:
    router = APIRouter()

    @router.get("/dashboard")
    async def page() -> Response:
        return Response(_asset("index.html"), media_type="text/html")

    @router.get("/dashboard/{name}")
    async def asset(name: str, request: Request) -> Response:
        if name == "events":
            return events(request)
        if name not in ASSETS:
            return Response("not found", status_code=404)
        return Response(_asset(name), media_type=ASSETS[name])

    encoded: list = [None, ""]  # the latest published map and its event, shared by every open page

    def encode(published: dict) -> str:
        if encoded[0] is not published:
            encoded[:] = [published, f"data: {json.dumps(dashboard_state(published), separators=(',', ':'))}\n\n"]
        return encoded[1]

    def events(request: Request) -> StreamingResponse:
        async def body():
            engine.watch_memory_map(True)
            try:
                sent, last = None, time.monotonic()
                yield "retry: 1000\n\n"
                while True:
                    published = engine.memory_map
                    if published is not None and published is not sent:
                        sent, last = published, time.monotonic()
                        yield encode(published)
                    elif time.monotonic() - last > KEEPALIVE:
                        last = time.monotonic()
                        yield ": keepalive\n\n"
                    if await request.is_disconnected():
                        return
                    await asyncio.sleep(1.0 / EVENT_RATE)
            finally:
                engine.watch_memory_map(False)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router


def replay_app(recording: str | Path) -> FastAPI:
    """The page alone, playing a recording (`kvmem bench memory --record FILE`): no engine, no model.
    `GET /` opens it; the recording is served at /dashboard/recording."""
    from kvmem.bench.memory_recording import read_recording

    path = Path(recording)
    read_recording(path)  # a clear error now, not a blank page later
    app = FastAPI(title="kvmem dashboard (replay)")

    @app.get("/")
    async def root() -> Response:
        return RedirectResponse("/dashboard?replay=/dashboard/recording")

    @app.get("/dashboard")
    async def page() -> Response:
        return Response(_asset("index.html"), media_type="text/html")

    @app.get("/dashboard/{name}")
    async def asset(name: str) -> Response:
        if name == "recording":
            return FileResponse(path, media_type="application/x-ndjson")
        if name not in ASSETS:
            return Response("not found", status_code=404)
        return Response(_asset(name), media_type=ASSETS[name])

    return app
