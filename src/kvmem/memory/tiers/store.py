"""The tier store: a host-memory tier over a disk tier, the threads that move blocks, the counters.

Used by a KV-cache manager on the engine thread:
- `offload(key, gather)`: a full prefix block the budget evicts. Into the host tier (the engine
  thread copies the bytes now, before the block's memory is reused: `gather` fills the slot);
  what the host tier evicts to make room goes to the disk queue. Without a host tier the block's
  bytes are copied into a buffer and queued for disk directly.
- `locate(key)`: "host", "disk" or None, for a prefix lookup continuing past the device's match.
- `load_host(key, scatter)`: copy a host-tier block back (engine thread: a memcpy / H2D copy).
- `submit_disk_loads(keys)`: read blocks on the loader thread; the future gives their payloads in
  order up to the first that is missing or corrupt.
- `poll()`: what the writer thread finished (for KV events); `flush()`: wait for queued writes.

Disk writes run on one writer thread behind a bounded queue: when it is full a write is dropped
(counted in `disk.dropped`), never waited for, so a slow disk cannot stall a step. `close()`
writes what the host tier holds that the disk does not (so a restart finds it), then joins both
threads.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvmem.memory.block_pool import BlockHash
from kvmem.memory.tiers.disk import CorruptBlockFile, DiskTier
from kvmem.memory.tiers.fingerprint import KVFingerprint
from kvmem.memory.tiers.host import HostTier
from kvmem.memory.tiers.policy import LoadPolicy

logger = logging.getLogger(__name__)

# Per-block transfer times, seconds (memcpy of one block ~10 us .. a cold disk read ~10 ms).
TRANSFER_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
DEFAULT_WRITE_QUEUE_BLOCKS = 64


class TransferHistogram:
    """Counts of per-block transfer times in `TRANSFER_BUCKETS` (cumulative at read), thread-safe."""

    def __init__(self) -> None:
        self.counts = [0] * (len(TRANSFER_BUCKETS) + 1)
        self.sum = 0.0
        self.lock = threading.Lock()

    def observe(self, seconds: float, n: int = 1) -> None:
        """`n` blocks that took `seconds` together (each counted at the mean)."""
        if n <= 0:
            return
        each = seconds / n
        i = next((i for i, b in enumerate(TRANSFER_BUCKETS) if each <= b), len(TRANSFER_BUCKETS))
        with self.lock:
            self.counts[i] += n
            self.sum += seconds

    def snapshot(self) -> dict:
        with self.lock:
            return {"buckets": list(TRANSFER_BUCKETS), "counts": list(self.counts), "sum": self.sum}


@dataclass
class TierCounters:
    """One tier's counters (blocks and bytes since start)."""

    queries: int = 0  # blocks looked up in this tier (the device's match had ended)
    hits: int = 0  # of which found here and loaded back
    stored: int = 0  # blocks written into this tier
    stored_bytes: int = 0
    loaded_bytes: int = 0
    evicted: int = 0  # blocks this tier let go to make room
    dropped: int = 0  # writes not done: the queue was full (disk), every slot pinned by a load (host)
    corrupt: int = 0  # files that failed a check: deleted, recomputed (disk)
    errors: int = 0  # writes that failed (disk full, permissions): logged
    store_time: TransferHistogram = field(default_factory=TransferHistogram)
    load_time: TransferHistogram = field(default_factory=TransferHistogram)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if not isinstance(v, TransferHistogram)}
        d["store_seconds"] = self.store_time.snapshot()
        d["load_seconds"] = self.load_time.snapshot()
        return d


@dataclass(frozen=True)
class TierEvent:
    """What a tier did to a block, for KV events: "stored" or "removed" in `medium`."""

    kind: str
    keys: tuple[BlockHash, ...]
    medium: str


class TierStore:
    def __init__(self, fingerprint: KVFingerprint, block_nbytes: int, host_bytes: int = 0,
                 disk_dir: str | None = None, disk_bytes: int = 0, pin_host: bool = False,
                 policy: LoadPolicy | None = None, write_queue_blocks: int = DEFAULT_WRITE_QUEUE_BLOCKS) -> None:
        self.fingerprint = fingerprint
        self.block_nbytes = block_nbytes
        self.policy = policy or LoadPolicy()
        self.host = HostTier(host_bytes, block_nbytes, pin=pin_host) if host_bytes else None
        self.disk = DiskTier(disk_dir, disk_bytes, fingerprint, block_nbytes) if disk_dir else None
        if self.host is None and self.disk is None:
            raise ValueError("a tier store needs kv_offload_memory or kv_offload_dir")
        self.host_counters = TierCounters()
        self.disk_counters = TierCounters()
        self.events: deque[TierEvent] = deque()  # appended by any thread, drained by the engine's
        self.closed = False
        self.closing = False  # set by begin_close(): writes wait for queue room instead of dropping
        self._writes: queue.Queue | None = None
        self._writer: threading.Thread | None = None
        self._loader: ThreadPoolExecutor | None = None
        if self.disk is not None:
            self._writes = queue.Queue(maxsize=write_queue_blocks)
            self._writer = threading.Thread(target=self._write_loop, name="kvmem-tier-writer", daemon=True)
            self._writer.start()
            self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmem-tier-loader")

    # --- storing ------------------------------------------------------------------------
    def offload(self, key: BlockHash, gather: Callable[[torch.Tensor], None]) -> None:
        """Keep an evicted block (see the module's doc). `gather(out)` copies its bytes into `out`, a
        uint8 tensor of `block_nbytes`, on the calling thread."""
        if self.closed:
            return
        if self.host is not None:
            if self.host.touch(key):
                return
            start = time.perf_counter()
            reserved = self.host.reserve(key)
            if reserved is None:  # every slot is being loaded back now: straight to disk instead
                self.host_counters.dropped += 1
                if self.disk is not None and key not in self.disk:
                    data = torch.empty(self.block_nbytes, dtype=torch.uint8)
                    gather(data)
                    self._queue_disk_write(key, data)
                return
            slot, evicted = reserved
            gather(slot)
            self.host_counters.store_time.observe(time.perf_counter() - start)
            self.host_counters.stored += 1
            self.host_counters.stored_bytes += self.block_nbytes
            self.events.append(TierEvent("stored", (key,), HostTier.medium))
            if evicted is not None:
                old_key, data = evicted
                self.host_counters.evicted += 1
                self.events.append(TierEvent("removed", (old_key,), HostTier.medium))
                self._queue_disk_write(old_key, data)
            return
        if key in self.disk:
            self.disk.touch(key)
            return
        data = torch.empty(self.block_nbytes, dtype=torch.uint8)
        gather(data)
        self._queue_disk_write(key, data)

    def _queue_disk_write(self, key: BlockHash, data: torch.Tensor, block: bool = False) -> None:
        if self.disk is None:
            return
        if self.disk.touch(key):
            return
        try:  # closing: wait for room (what the engine held goes to disk); running: never wait
            self._writes.put((key, data), block=block or self.closing)
        except queue.Full:
            self.disk_counters.dropped += 1

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            try:
                if item is None:
                    return
                key, data = item
                evicted_before = self.disk.num_evicted
                start = time.perf_counter()
                try:
                    wrote = self.disk.write(key, data)
                except OSError as e:
                    self.disk_counters.errors += 1
                    logger.warning("kv offload: could not write a block to %s: %s", self.disk.directory, e)
                    continue
                if wrote:
                    self.disk_counters.store_time.observe(time.perf_counter() - start)
                    self.disk_counters.stored += 1
                    self.disk_counters.stored_bytes += self.block_nbytes
                    self.events.append(TierEvent("stored", (key,), DiskTier.medium))
                gone = self.disk.num_evicted - evicted_before
                if gone:
                    self.disk_counters.evicted += gone
            finally:
                self._writes.task_done()

    # --- finding and loading ------------------------------------------------------------
    def locate(self, key: BlockHash) -> str | None:
        if self.host is not None and key in self.host:
            return "host"
        if self.disk is not None and key in self.disk:
            return "disk"
        return None

    def count_queries(self, host: int, disk: int) -> None:
        """Blocks looked up past the device's match: `host` reached the host tier, `disk` the disk."""
        self.host_counters.queries += host if self.host is not None else 0
        self.disk_counters.queries += disk if self.disk is not None else 0

    def load_host(self, key: BlockHash, scatter: Callable[[torch.Tensor], None]) -> bool:
        """Copy a host-tier block back through `scatter(payload)`; False when it is gone."""
        payload = self.host.get(key) if self.host is not None else None
        if payload is None:
            return False
        start = time.perf_counter()
        scatter(payload)
        self.host_counters.load_time.observe(time.perf_counter() - start)
        self.host_counters.hits += 1
        self.host_counters.loaded_bytes += self.block_nbytes
        return True

    def submit_disk_loads(self, keys: list[BlockHash]) -> Future:
        """Read `keys` in order on the loader thread; the future's result is the payloads read, up to
        (not including) the first block that is gone or fails a check."""
        return self._loader.submit(self._read_blocks, list(keys))

    def _read_blocks(self, keys: list[BlockHash]) -> list[torch.Tensor]:
        out = []
        for key in keys:
            start = time.perf_counter()
            try:
                payload = self.disk.read(key)
            except KeyError:
                break
            except CorruptBlockFile as e:
                self.disk_counters.corrupt += 1
                self.events.append(TierEvent("removed", (key,), DiskTier.medium))
                logger.warning("kv offload: %s: %s; deleted, the prefix is recomputed", self.disk.path(key).name, e)
                break
            except OSError as e:
                self.disk_counters.errors += 1
                logger.warning("kv offload: could not read %s: %s", self.disk.path(key).name, e)
                break
            self.disk_counters.load_time.observe(time.perf_counter() - start)
            out.append(payload)
        return out

    def count_disk_hits(self, n: int) -> None:
        self.disk_counters.hits += n
        self.disk_counters.loaded_bytes += n * self.block_nbytes

    # --- engine-thread housekeeping -----------------------------------------------------
    def drain_events(self) -> list[TierEvent]:
        out = []
        while self.events:
            out.append(self.events.popleft())
        return out

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued disk write is done; False on timeout."""
        if self._writes is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._writes.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def stats(self) -> dict:
        """Per-tier occupancy and counters (LLM.stats().extra["kv_offload"], /metrics)."""
        out: dict = {"block_bytes": self.block_nbytes, "fingerprint": self.fingerprint.hex[:16],
                     "min_load_tokens": {"host": self.policy.min_host_tokens, "disk": self.policy.min_disk_tokens}}
        if self.host is not None:
            out["host"] = {"capacity_bytes": self.host.capacity_bytes, "used_bytes": self.host.used_bytes,
                           "blocks": len(self.host.slots), **self.host_counters.as_dict()}
        if self.disk is not None:
            with self.disk.lock:
                used, blocks = self.disk.used_bytes, len(self.disk.files)
            out["disk"] = {"capacity_bytes": self.disk.capacity_bytes, "used_bytes": used, "blocks": blocks,
                           "directory": str(self.disk.directory), "indexed_at_start": self.disk.num_indexed,
                           "write_queue": self._writes.qsize(), **self.disk_counters.as_dict()}
        return out

    @contextlib.contextmanager
    def waiting_writes(self):
        """Within: disk writes wait for queue room instead of being dropped (an explicit hand-down, such
        as release_free_memory, off the step's path)."""
        before, self.closing = self.closing, True
        try:
            yield
        finally:
            self.closing = before

    def begin_close(self) -> None:
        """From now on disk writes wait for room: the manager is handing over what it still caches."""
        self.closing = True

    def close(self) -> None:
        """Write the host tier's blocks the disk lacks (a restart then finds them), finish the queued
        writes, join the threads. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.disk is None:
            return
        if self.host is not None:
            for key, slot in list(self.host.slots.items()):
                self._queue_disk_write(key, self.host.buffer[slot].clone(), block=True)
        self._writes.put(None)
        self._writer.join()
        self._loader.shutdown(wait=True, cancel_futures=True)


def build_tier_store(config, weights_fingerprint_hex: str, model_config, spec, block_size: int) -> TierStore:
    """The tier store an engine's `kv_offload_*` settings ask for (`spec`: its KVCacheSpec)."""
    from kvmem.memory.tiers.fingerprint import kv_fingerprint
    from kvmem.memory.tiers.payload import LAYOUT, BlockFormat

    host_bytes, disk_bytes = config.kv_offload_bytes()
    fingerprint = kv_fingerprint(weights_fingerprint_hex, model_config, spec, block_size, LAYOUT)
    return TierStore(fingerprint, BlockFormat.of(spec, block_size).nbytes, host_bytes=host_bytes,
                     disk_dir=config.kv_offload_dir, disk_bytes=disk_bytes,
                     pin_host=spec.device.type == "cuda")
