"""KV-cache events in vLLM's format, published over ZMQ for the routers that read vLLM's.

The managers produce `kvmem.memory.events` once; the engine drains them at the end of each step
and hands them here. The events vLLM's consumers know (BlockStored, BlockRemoved, AllBlocksCleared)
become one msgpack-encoded `KVEventBatch` per step, with the layout of vLLM 0.32
(vllm/distributed/kv_events.py): the batch an array `[ts, events, data_parallel_rank]`, each event a
map tagged `"type": class name`, fields left at their defaults omitted. (vLLM up to 0.11 sent each
event as a tagged array; vLLM's router 0.1.17 refuses those: "KV event must be a tagged map".)
kvmem's own events (virtual's pages, hybrid's tier moves) are not sent.

Block hashes go out as vLLM sends them by default: unsigned 64-bit ints, the last 8 bytes of kvmem's
sha256 block hash read big-endian (`external_block_hash`); `medium` is "GPU" or "CPU".

`ZmqEventPublisher` is vLLM's: a PUB socket bound at `endpoint` sends multipart
[topic, sequence number (8 bytes, big-endian), payload]; an optional ROUTER at `replay_endpoint`
answers a client's 8-byte start sequence number with every buffered (seq, payload) from there on,
then seq -1 with an empty payload. The sockets live on a background thread fed by a bounded queue:
`publish` never blocks the engine's step; when the queue is full the batch is dropped and counted.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Any

import msgspec

from kvmem.memory import events as ev

log = logging.getLogger(__name__)


# --- vLLM's wire format (vllm/distributed/kv_events.py) -------------------------------------------
class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the events a KV cache reports."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    # vLLM's optional fields, omitted from the wire at these defaults (kvmem has no LoRA, multimodal
    # keys, cache salt, KV-cache groups or sessions to report).
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


def external_block_hash(block_hash: bytes) -> int:
    """The hash a consumer sees: the last 8 bytes of the sha256 digest as an unsigned int (vLLM's
    VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES form)."""
    return int.from_bytes(block_hash[-8:], "big")


def to_vllm_events(events: list) -> list[BlockStored | BlockRemoved | AllBlocksCleared]:
    """kvmem's events as vLLM's structs; kvmem-only kinds are left out."""
    out: list[BlockStored | BlockRemoved | AllBlocksCleared] = []
    for e in events:
        if isinstance(e, ev.BlockStored):
            parent = None if e.parent_block_hash is None else external_block_hash(e.parent_block_hash)
            out.append(BlockStored([external_block_hash(h) for h in e.block_hashes], parent, list(e.token_ids),
                                   e.block_size, e.lora_id, e.medium, None))
        elif isinstance(e, ev.BlockRemoved):
            out.append(BlockRemoved([external_block_hash(h) for h in e.block_hashes], e.medium))
        elif isinstance(e, ev.AllBlocksCleared):
            out.append(AllBlocksCleared())
    return out


# --- configuration: vLLM's --kv-events-config ---------------------------------------------------
@dataclass
class KVEventsConfig:
    enable_kv_cache_events: bool = False
    publisher: str | None = None  # "zmq" | "null"; None: zmq when enabled
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # the PUB socket's send high-water mark
    max_queue_size: int = 100_000  # batches waiting for the publisher thread; more are dropped
    topic: str = ""

    @classmethod
    def parse(cls, value: str | dict | KVEventsConfig | None) -> KVEventsConfig | None:
        """vLLM's JSON (or its dict) -> a config; None where nothing is given. Raises ValueError on an
        unknown field or a bad value, naming it."""
        if value is None or isinstance(value, KVEventsConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"kv_events_config must be JSON (e.g. '{{\"enable_kv_cache_events\": true}}'): {e}") \
                    from e
        if not isinstance(value, dict):
            raise ValueError(f"kv_events_config must be a JSON object or a dict, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"kv_events_config has unknown field(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(known))}")
        config = cls(**value)
        if config.publisher is None:
            config.publisher = "zmq" if config.enable_kv_cache_events else "null"
        if config.publisher not in ("zmq", "null"):
            raise ValueError(f"kv_events_config publisher must be zmq or null, got {config.publisher!r}")
        for name in ("buffer_steps", "hwm", "max_queue_size"):
            v = getattr(config, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"kv_events_config {name} must be a positive integer, got {v!r}")
        if not isinstance(config.endpoint, str) or not isinstance(config.topic, str):
            raise ValueError("kv_events_config endpoint and topic must be strings")
        return config

    @property
    def enabled(self) -> bool:
        return self.enable_kv_cache_events and self.publisher != "null"


# --- publishers --------------------------------------------------------------------------------
class NullEventPublisher:
    dropped = 0

    def publish(self, batch: KVEventBatch) -> None:
        pass

    def close(self) -> None:
        pass


class ZmqEventPublisher:
    END_SEQ = (-1).to_bytes(8, "big", signed=True)

    def __init__(self, config: KVEventsConfig) -> None:
        import zmq

        self.config = config
        self.topic = config.topic.encode()
        self.dropped = 0  # batches dropped because the queue was full
        self._queue: queue.Queue[KVEventBatch] = queue.Queue(maxsize=config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._seq = 0
        self._encoder = msgspec.msgpack.Encoder()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._ctx = zmq.Context()
        self._thread = threading.Thread(target=self._run, name="kvmem-kv-events", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._ctx.term()
            raise ValueError(f"kv_events_config: cannot bind {config.endpoint}"
                             f"{' / ' + config.replay_endpoint if config.replay_endpoint else ''}: {self._error}")

    def publish(self, batch: KVEventBatch) -> None:
        """Queue a batch for the thread; never blocks (a full queue drops it, counted in `dropped`)."""
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("KV-event queue full (%d batches): %d batches dropped", self.config.max_queue_size,
                            self.dropped)

    def close(self) -> None:
        """Send what is queued, then stop the thread and close the sockets. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._ctx.term()

    # --- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        import zmq

        pub = replay = None
        try:
            pub = self._ctx.socket(zmq.PUB)
            pub.set_hwm(self.config.hwm)
            pub.setsockopt(zmq.LINGER, 1000)
            pub.bind(self.config.endpoint)
            if self.config.replay_endpoint:
                replay = self._ctx.socket(zmq.ROUTER)
                replay.setsockopt(zmq.LINGER, 1000)
                replay.bind(self.config.replay_endpoint)
        except zmq.ZMQError as e:
            self._error = e
            for s in (pub, replay):
                if s is not None:
                    s.close(linger=0)
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                if replay is not None:
                    self._serve_replay(replay)
                try:
                    batch = self._queue.get(timeout=0.05)
                except queue.Empty:
                    if self._stop.is_set():
                        break
                    continue
                payload = self._encoder.encode(batch)
                seq_bytes = self._seq.to_bytes(8, "big")
                self._buffer.append((self._seq, payload))
                self._seq += 1
                pub.send_multipart((self.topic, seq_bytes, payload), copy=False)
        except Exception:  # the engine must not die of its events: log and stop publishing
            log.exception("KV-event publisher stopped")
        finally:
            pub.close()
            if replay is not None:
                replay.close()

    def _serve_replay(self, replay) -> None:
        import zmq

        while replay.poll(0, zmq.POLLIN):
            frames = replay.recv_multipart()
            if len(frames) < 2:
                continue
            client, start = frames[0], frames[-1]
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            replay.send_multipart((client, b"", self.END_SEQ, b""))


def make_publisher(config: KVEventsConfig | None) -> ZmqEventPublisher | NullEventPublisher | None:
    """The publisher `config` asks for; None when events are off (the managers then produce none)."""
    if config is None or not config.enabled:
        return None
    return ZmqEventPublisher(config)


class KVEventStream:
    """The engine's end of the stream: the sink its manager writes to, drained into one batch per step."""

    def __init__(self, publisher: ZmqEventPublisher | NullEventPublisher) -> None:
        self.sink = ev.EventSink()
        self.publisher = publisher

    def flush(self) -> None:
        events = to_vllm_events(self.sink.drain())
        if events:
            self.publisher.publish(KVEventBatch(ts=time.time(), events=events))

    def close(self) -> None:
        self.flush()
        self.publisher.close()
