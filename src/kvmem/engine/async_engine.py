"""The async engine: one background thread steps the `LLMEngine`; asyncio code adds requests and
receives each request's outputs as they are produced.

Why a thread and not an asyncio task: a model step is seconds of blocking torch work on a CPU, and
the event loop must keep accepting connections, streaming tokens and noticing disconnects while it
runs. torch releases the GIL inside its kernels, so the loop stays responsive.

Build the engine *in* its thread (pass a factory): the OpenMP runtime gives every OS thread that
runs parallel torch ops its own team of worker threads, and when the main thread has a team (from
loading the model) and the engine thread another, the two fight over the cores. Measured on the
2-core CPU machine: a bf16 decode step of SmolLM2 took 20 ms when built and run in one thread, and
34 ms when built in the main thread and stepped in another.

Threading rule: only the engine thread touches the `LLMEngine` (scheduler, manager, requests).
Other threads talk to it through a command inbox (add, abort), and receive `RequestOutput`s, which
the engine builds as snapshots, through a per-request stream on their event loop. The tokenizer and
the prompt checks are read-only and are used from the caller's thread (the server calls them from a
worker thread, so a long tokenization never blocks its event loop), so bad input is refused before
it reaches the engine.

A consumer that falls behind (a slow client) never makes outputs pile up: every output carries the
request's whole state (token ids, text, logprobs) plus the text new since the previous one, so an
output not yet taken is merged into the next (as vLLM v1's output collector does). Without that, a
client reading nothing of an n=128 stream made the queue hold one growing snapshot per step:
memory quadratic in the output length.

Liveness: `step_elapsed()` says how long the step in progress has been running, so a health check
can tell an engine that makes progress from one stuck inside a step.

Logs (what a person running a server reads; `kvmem serve` turns them on): with `log_requests`, one
info line per finished request (`request_log_line`); with `log_stats`, every `stats_interval`
seconds while there is work, one line of running/waiting sequences, KV usage, prefix-cache hit
rate, throughput and preemptions over the interval (`StatsLogger`, from the published snapshots),
and one more after the engine goes idle, covering the end of the burst.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from kvmem.engine.llm_engine import LLMEngine
from kvmem.engine.memory_picture import memory_picture
from kvmem.memory.base import MemoryStats
from kvmem.outputs import RequestOutput
from kvmem.sampling_params import SamplingParams
from kvmem.structured_outputs.params import StructuredOutputsParams

logger = logging.getLogger(__name__)


MEMORY_MAP_INTERVAL = 0.1  # seconds: /dashboard's memory map is taken at most 10 times a second
_WATCH_LOCK = threading.Lock()


class EngineStoppedError(RuntimeError):
    """The engine is shutting down (or its step failed) and will not finish this request."""


@dataclass(frozen=True)
class EngineSnapshot:
    """What the engine looked like after its latest step; published whole so readers on other
    threads (e.g. /metrics) never see half-updated numbers."""

    time: float
    memory: MemoryStats
    num_requests: int
    num_running: int  # sequences scheduled to run
    num_waiting: int  # sequences queued (new or preempted)
    num_preemptions: int
    num_prompt_tokens: int
    num_generation_tokens: int
    num_steps: int


class StatsLogger:
    """The periodic stats line, from two `EngineSnapshot`s: the one of the previous line (the base)
    and the latest. A line is due `interval` seconds after the base, and written only if something
    happened in between (steps ran, or sequences are running or waiting)."""

    def __init__(self, interval: float = 10.0) -> None:
        if not interval >= 0:
            raise ValueError(f"stats interval must be >= 0 seconds, got {interval}")
        self.interval = interval
        self.base: EngineSnapshot | None = None

    def observe(self, snap: EngineSnapshot) -> str | None:
        """Log (and return) the line when one is due at `snap`; else None."""
        if self.base is None:
            self.base = snap
            return None
        if snap.time - self.base.time < self.interval:
            return None
        line = format_stats(self.base, snap) if _active(self.base, snap) else None
        self.base = snap
        if line is not None:
            logger.info("%s", line)
        return line

    def due_in(self, snap: EngineSnapshot) -> float | None:
        """Seconds until a line is due, when one has something to say; None when nothing happened
        since the base (an idle engine then sleeps until the next request)."""
        if self.base is None or not _active(self.base, snap):
            return None
        return max(0.0, self.base.time + self.interval - snap.time)


def _active(base: EngineSnapshot, snap: EngineSnapshot) -> bool:
    return snap.num_steps != base.num_steps or snap.num_running > 0 or snap.num_waiting > 0


def format_stats(base: EngineSnapshot, snap: EngineSnapshot) -> str:
    """vLLM's periodic line, over the interval from `base` to `snap`."""
    dt = max(snap.time - base.time, 1e-9)
    queries = snap.memory.prefix_cache_queries - base.memory.prefix_cache_queries
    hits = snap.memory.prefix_cache_hits - base.memory.prefix_cache_hits
    preempted = snap.num_preemptions - base.num_preemptions
    return (f"Avg prompt throughput: {(snap.num_prompt_tokens - base.num_prompt_tokens) / dt:.1f} tokens/s, "
            f"Avg generation throughput: {(snap.num_generation_tokens - base.num_generation_tokens) / dt:.1f} "
            f"tokens/s, Running: {snap.num_running} seqs, Waiting: {snap.num_waiting} seqs, "
            f"KV cache usage: {100 * snap.memory.usage:.1f}%, "
            f"Prefix cache hit rate: {100 * hits / queries if queries else 0.0:.1f}%, "
            f"Preemptions: {preempted} ({snap.num_preemptions} in all)")


def request_log_line(out: RequestOutput, now: float | None = None) -> str:
    """One finished request: id, prompt/output/cached tokens, time to first token, total time (from
    its arrival in the engine), finish reason(s)."""
    now = time.monotonic() if now is None else now
    arrival, first = out.metrics.get("arrival_time"), out.metrics.get("first_token_time")
    ttft = f"{first - arrival:.3f} s" if arrival is not None and first is not None else "-"
    total = f"{now - arrival:.3f} s" if arrival is not None else "-"
    reasons = ",".join(dict.fromkeys(c.finish_reason or "-" for c in out.outputs)) or "-"
    return (f"Finished request {out.request_id}: prompt {len(out.prompt_token_ids)} tokens "
            f"({out.num_cached_tokens} cached), output {sum(len(c.token_ids) for c in out.outputs)} tokens, "
            f"TTFT {ttft}, total {total}, finish_reason {reasons}")


@dataclass
class _Stream:
    """Where one request's outputs go, fed from the engine thread through `loop` and read on it:
    outputs (an unread one merged into the next, see the module's doc) and at most one error."""

    loop: asyncio.AbstractEventLoop
    items: deque[RequestOutput | BaseException] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, item: RequestOutput | BaseException) -> None:
        """On `loop`'s thread."""
        if isinstance(item, RequestOutput) and self.items and isinstance(self.items[-1], RequestOutput):
            self.items[-1] = _merge_outputs(self.items[-1], item)
        else:
            self.items.append(item)
        self.ready.set()

    async def take(self) -> RequestOutput | BaseException:
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        return self.items.popleft()


def _merge_outputs(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """`newer` as if `older` had never been delivered: its state is cumulative already, only the
    text deltas add up."""
    deltas = {c.index: c.text_delta for c in older.outputs}
    return replace(newer, outputs=[replace(c, text_delta=deltas.get(c.index, "") + c.text_delta)
                                   for c in newer.outputs])


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], log_requests: bool = False,
                 log_stats: bool = False, stats_interval: float = 10.0) -> None:
        """`engine`: a built engine, or (better, see above) a function that builds one, which
        `start()` then calls on the engine thread. `log_requests`, `log_stats`: the info lines of
        the module's doc, stats every `stats_interval` seconds."""
        self.log_requests = log_requests
        self._stats = StatsLogger(stats_interval) if log_stats else None
        self._factory = None if isinstance(engine, LLMEngine) else engine
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._stopping = False
        self._abandoned = False  # the engine thread died: see _abandon
        self._thread: threading.Thread | None = None
        self._step_started: float | None = None  # time.monotonic() when the step in progress began
        # /dashboard: while watchers > 0, the engine thread publishes `memory_map` with its snapshots,
        # at most every MEMORY_MAP_INTERVAL seconds (no cost otherwise).
        self.memory_map_watchers = 0
        self.memory_map: dict | None = None
        self._memory_map_time = 0.0
        if isinstance(engine, LLMEngine):
            self._adopt(engine)

    def _adopt(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.kv_cache_strategy = engine.kv_cache_strategy
        self.snapshot = self._take_snapshot()

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (building the engine there first, if given a factory); returns
        once the engine is ready, or raises what building it raised."""
        if self._thread is not None:
            return
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._main, args=(ready, failure), name="kvmem-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is in flight (its streams end with finish_reason "abort"), end the thread
        and close the engine (on that thread); waits up to `timeout` seconds for it."""
        if self._thread is None:
            return
        self.abort_all()
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():  # a step that does not return; the thread is a daemon
            logger.warning("the engine thread did not end within %.0f s (a step has been running for %.0f s); "
                           "leaving it behind", timeout, self.step_elapsed() or 0.0)
        self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def step_elapsed(self) -> float | None:
        """Seconds the step in progress has been running; None between steps (idle or not started)."""
        started = self._step_started
        return None if started is None else time.monotonic() - started

    def watch_memory_map(self, on: bool) -> None:
        """A dashboard opens (on) or closes (off); the engine thread is woken to publish a map now."""
        with _WATCH_LOCK:
            self.memory_map_watchers += 1 if on else -1
        self._wake.set()

    # --- the asyncio side ---------------------------------------------------------------
    def check_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """Tokenize and validate a prompt on the caller's thread; raises ValueError if bad."""
        text, token_ids = self.engine.tokenize_prompt(prompt)
        self.engine.check_prompt(token_ids)
        return text, token_ids

    async def compile_grammar(self, structured_outputs: StructuredOutputsParams) -> None:
        """Compile a request's grammar (cached) before the request is added, so that a spec that does
        not compile is refused up front; raises ValueError naming the parameter. The compiler is
        thread-safe and runs on its own thread: neither the loop nor the engine waits on it."""
        await asyncio.wrap_future(self.engine.grammars.submit(structured_outputs))

    async def generate(self, prompt_text: str | None, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as steps produce them; the last one has `finished` set.
        Leaving the loop early (a client that went away, a cancelled task) aborts the request, so
        its KV memory is given back at the engine's next iteration."""
        if self._stopping or not self.is_running:
            raise EngineStoppedError("the engine is not running")
        stream = _Stream(asyncio.get_running_loop())
        prompt = {"prompt": prompt_text, "prompt_token_ids": prompt_token_ids}
        self._submit(lambda: self._add(request_id, prompt, params, stream))
        finished = False
        try:
            while True:
                item = await stream.take()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._submit(lambda: self._abort(request_id))

    def abort_all(self) -> None:
        self._submit(lambda: [self._abort(r) for r in list(self._streams)])

    def _submit(self, command: Callable[[], None]) -> None:
        self._inbox.put(command)
        self._wake.set()

    # --- the engine thread --------------------------------------------------------------
    def _main(self, ready: threading.Event, failure: list[BaseException]) -> None:
        if self._factory is not None:
            try:
                self._adopt(self._factory())
                self._factory = None
            except BaseException as e:  # handed to start()'s caller
                failure.append(e)
                ready.set()
                return
        ready.set()
        try:
            self._run()
        except BaseException:  # a bug outside the step (which has its own handler): the thread ends
            logger.exception("the engine thread failed; failing %d requests", len(self._streams))
            self._abandon()

    def _abandon(self) -> None:
        """After the loop died: nobody may wait forever on a stream. Without touching the engine
        (it may be what failed), end every stream, and answer the commands still in the inbox
        (`_add` refuses once `_stopping` is set, `_abort` does nothing once `_abandoned` is)."""
        self._stopping = self._abandoned = True
        error = EngineStoppedError("the engine thread failed")
        for stream in self._streams.values():
            self._put(stream, error)
        self._streams.clear()
        self._drain_inbox()

    def _run(self) -> None:
        while True:
            self._drain_inbox()
            if self._stopping:
                break
            if not self.engine.has_unfinished_requests():
                self.snapshot = self._take_snapshot()
                self._publish_memory_map(force=True)
                timeout = None
                if self._stats is not None:
                    self._stats.observe(self.snapshot)
                    due = self._stats.due_in(self.snapshot)
                    timeout = None if due is None else due + 0.01  # the line on the burst's end
                self._wake.wait(timeout)
                self._wake.clear()  # before draining: a command put after this wakes us again
                continue
            self._step_started = time.monotonic()
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug or an out-of-memory: fail what is in flight, keep serving
                logger.exception("engine step failed; aborting %d requests", len(self._streams))
                self._fail_all(EngineStoppedError(f"engine step failed: {e}"))
                continue
            finally:
                self._step_started = None
            self._deliver(outputs)
            self.snapshot = self._take_snapshot()
            self._publish_memory_map()
            if self._stats is not None:
                self._stats.observe(self.snapshot)
        self._fail_all(EngineStoppedError("the engine stopped"))
        self.snapshot = self._take_snapshot()
        # Threads joined, mappings released, on the thread that owns the engine (see the threading rule).
        try:
            self.engine.close()
        except Exception:
            logger.exception("closing the engine failed")

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            command()

    def _add(self, request_id: str, prompt: dict, params: SamplingParams, stream: _Stream) -> None:
        if self._stopping:
            self._put(stream, EngineStoppedError("the engine is shutting down"))
            return
        try:
            self.engine.add_request(prompt, params, request_id=request_id)
        except ValueError as e:
            self._put(stream, e)
            return
        self._streams[request_id] = stream

    def _abort(self, request_id: str) -> None:
        if self._abandoned:
            return
        output = self.engine.abort_request(request_id)
        stream = self._streams.pop(request_id, None)
        if output is not None and stream is not None:
            self._log_finished(output)
            self._put(stream, output)

    def _log_finished(self, out: RequestOutput) -> None:
        if self.log_requests and logger.isEnabledFor(logging.INFO):
            logger.info("%s", request_log_line(out))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        # One wake-up per event loop per step, not one per request.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, object]]] = {}
        for out in outputs:
            stream = self._streams.pop(out.request_id) if out.finished else self._streams.get(out.request_id)
            if out.finished:
                self._log_finished(out)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            _call_soon(loop, _put_all, items)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)  # gives the memory back
        for stream in self._streams.values():
            self._put(stream, error)
        self._streams.clear()

    @staticmethod
    def _put(stream: _Stream, item: object) -> None:
        _call_soon(stream.loop, _put_all, [(stream, item)])

    def _publish_memory_map(self, force: bool = False) -> None:
        """On the engine thread, after a snapshot: the manager's `memory_map()` plus which request
        each sequence belongs to, published whole (as the snapshot is) for /dashboard."""
        if self.memory_map_watchers <= 0:
            return
        now = time.monotonic()
        if not force and now - self._memory_map_time < MEMORY_MAP_INTERVAL:
            return
        self._memory_map_time = now
        try:
            seqs = [s for r in self.engine.requests.values() for s in r.seqs]
            self.memory_map = {"snapshot": self.snapshot, "map": memory_picture(self.engine.manager, seqs)}
        except Exception:  # never let a picture break serving
            logger.exception("memory_map() failed")

    def _take_snapshot(self) -> EngineSnapshot:
        e = self.engine
        load = e.load()
        return EngineSnapshot(
            time=time.time(), memory=e.stats(), num_requests=load.num_requests, num_running=load.num_running,
            num_waiting=load.num_waiting, num_preemptions=load.num_preemptions,
            num_prompt_tokens=e.counters.num_prompt_tokens,
            num_generation_tokens=e.counters.num_generation_tokens, num_steps=e.counters.num_steps)


def _put_all(items: list[tuple[_Stream, object]]) -> None:
    for stream, item in items:
        stream.offer(item)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args: object) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that loop is closed: nobody is listening any more
        pass
