"""Graceful drain: what a replica behind a router does when it is asked to stop (SIGTERM).

A rolling restart must lose no request. A replica that simply closed its socket would cut the
requests it is serving, and a router that has not yet seen it go unhealthy would keep sending new
ones into a refused connection. Draining instead:

1. `/health` answers 503, so the router (and Kubernetes' readiness probe) takes it out of rotation;
2. new work (any POST) gets a 503 with OpenAI's error body, which routers retry on another replica
   (vLLM's and SGLang's routers retry 503 by default);
3. requests already in flight run to the end; the server exits when none is left, or when the drain
   timeout has passed (then the launcher's shutdown grace and abort apply as before).

`Drain` counts the requests in flight at the ASGI level (a streamed response counts until its last
chunk is sent), so it sees every route the same way, without each handler knowing about it.
"""

from __future__ import annotations

import json
import time


class Drain:
    """Whether this server is draining, and how many POST requests are in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.started_at: float | None = None  # time.monotonic() when the drain began

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def start(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()

    def done(self, timeout: float) -> bool:
        """The drain is over: nothing in flight, or `timeout` seconds have passed since it began."""
        return self.started_at is not None and (self.in_flight == 0
                                                or time.monotonic() - self.started_at >= timeout)


_REFUSAL = json.dumps({"error": {"message": "this server is shutting down and takes no new requests; retry on "
                                            "another replica", "type": "service_unavailable", "param": None,
                                 "code": 503}}).encode()


class DrainMiddleware:
    """Plain ASGI (no re-piping of streamed chunks): counts POST requests while they run and, once
    draining, answers new ones 503 (with "Connection: close", so a keep-alive client reconnects
    elsewhere) without running them."""

    def __init__(self, app, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                    (b"connection", b"close"), (b"content-length", str(len(_REFUSAL)).encode())]})
            await send({"type": "http.response.body", "body": _REFUSAL})
            return
        self.drain.in_flight += 1  # one event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1
