"""Connection-level time limits that uvicorn does not have, and the uvicorn config that uses them.

uvicorn's `timeout_keep_alive` only closes a connection that sits idle *between* requests. A client
that connects and sends nothing, or sends half its headers and stalls (slowloris), or stops reading
a response it asked for, would hold its connection (and, for the last one, the response's task)
forever. `TimedH11Protocol` bounds each of these by `read_timeout` seconds:

- headers: a timer is armed when the connection opens and whenever bytes of a new request start to
  arrive, and cancelled once the request's headers are complete; if it fires first, the connection
  is closed (no response: HTTP has none for a request that was never received);
- body: bounded by the request handlers (`api_server.read_body`, a 408), which know when they read;
  a body nobody reads (the response went out first: a 415, a GET with a body) is under the same
  timer as headers, else a client dribbling it would keep the connection forever;
- writes: when the transport's buffer is full (the client reads nothing) a timer is armed, and
  cancelled when the client drains it; if it fires, the connection is dropped, which uvicorn
  reports to the app as a disconnect, so a stream in flight is aborted and its KV memory freed.

Only the h11 implementation is subclassed: httptools is not a dependency (uvicorn's "auto" picks h11
without it), and one implementation to reason about is enough.
"""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from kvmem.server.api_server import ServerSettings


class TimedH11Protocol(H11Protocol):
    read_timeout: float = 30.0  # set per server by `timed_h11_protocol`

    _read_timer: asyncio.TimerHandle | None = None
    _write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_timer()

    def data_received(self, data: bytes) -> None:
        if self._reading_unbounded():  # a request's headers (or a body nobody reads) arriving
            self._arm_read_timer()
        super().data_received(data)
        if not self._reading_unbounded():  # the headers are in: the handler bounds the body
            self._cancel("_read_timer")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._reading_unbounded():  # a body still arriving that nobody will read
            self._arm_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel("_read_timer")
        self._cancel("_write_timer")
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.read_timeout, self._on_write_stalled)

    def resume_writing(self) -> None:
        self._cancel("_write_timer")
        super().resume_writing()

    # --- timers ---------------------------------------------------------------------------------
    def _reading_unbounded(self) -> bool:
        """Whether the client is sending what no request handler is waiting for (with its own bound):
        a request's headers, or the rest of a body after the response went out."""
        their_state = self.conn.their_state
        return their_state is h11.IDLE or (their_state is h11.SEND_BODY and self.cycle is not None
                                           and self.cycle.response_complete)

    def _arm_read_timer(self) -> None:
        # Armed once, not re-armed per chunk: a client dribbling a byte a second must still be done
        # within the bound.
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self.read_timeout, self._on_read_timeout)

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)

    def _on_read_timeout(self) -> None:
        self._read_timer = None
        if self._reading_unbounded() and not self.transport.is_closing():
            self.logger.info("closing a connection that sent no complete request within %.0f s", self.read_timeout)
            self.transport.close()

    def _on_write_stalled(self) -> None:
        self._write_timer = None  # (resume_writing cancels it: writing is still paused)
        self.logger.info("dropping a connection that read nothing of its response for %.0f s", self.read_timeout)
        # abort, not close: close() would wait to flush a buffer the client never reads.
        self.transport.abort()


def timed_h11_protocol(read_timeout: float) -> type[TimedH11Protocol]:
    """The protocol class for one server (uvicorn instantiates it per connection)."""
    if not read_timeout > 0:
        raise ValueError(f"the request read timeout must be > 0 seconds, got {read_timeout}")
    return type("TimedH11Protocol", (TimedH11Protocol,), {"read_timeout": float(read_timeout)})


def uvicorn_config(app: FastAPI, settings: ServerSettings, **kwargs) -> uvicorn.Config:
    """uvicorn's config with the settings' connection time limits; `kwargs` go to `uvicorn.Config`."""
    return uvicorn.Config(app, http=timed_h11_protocol(settings.request_read_timeout),
                          timeout_keep_alive=settings.timeout_keep_alive, **kwargs)
