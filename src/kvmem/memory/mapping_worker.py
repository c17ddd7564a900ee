"""mapping_worker: vAttention's background mapping for `virtual` — chunks of slots are mapped (and
unmapped) on a worker thread while the model computes, so that growing a sequence costs the step
nothing.

`Mapper` owns the order of map and unmap jobs and the rules that keep a late job harmless; the
manager says what to map, the backend (`vmm_backend.VirtualMemoryBackend`) does it.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref

from kvmem.memory.virtual_layout import SlotLayout
from kvmem.memory.vmm_backend import VirtualMemoryBackend


class Mapper:
    """Maps and unmaps chunks of slots, on the caller's thread or on a background worker.

    Jobs run in order. A map (populate) may land late: on CPU a page the model writes before the
    worker got to it is faulted in by the kernel, so a late map costs time, never correctness.
    An unmap (MADV_DONTNEED) zeroes pages, so it must never land after someone wrote there: a
    slot with unmaps still queued is `settle`d (waited for) before it can be written again — the
    manager does that in admit() and allocate().

    On a backend whose unmapped pages fault (`faults_on_unmapped`: CUDA) both rules change. A map
    must have landed before the step that uses the page: a miss is mapped at once
    (`map_for_step`), and the slot's queued look-ahead is waited for (`wait_for_step`). An unmap is
    booked on the caller's thread at once (after the slot's queued maps, which it must not
    overtake); the backend itself defers the driver call until the device is done with the page,
    so nothing is queued here that could land late.

    `close()` waits for the queued jobs and joins the thread: a closed manager leaves none behind.
    """

    def __init__(self, memory: VirtualMemoryBackend, layout: SlotLayout, background: bool) -> None:
        self.memory = memory
        self.layout = layout
        self.faults_on_unmapped = memory.faults_on_unmapped
        self.offsets = [layout.slot_offsets(s) for s in range(layout.num_slots)]
        self.critical_seconds = 0.0  # mapping time spent inside the manager's calls, on the step's path
        self.background_seconds = 0.0
        self.critical_calls = 0
        self.background_calls = 0
        self._jobs: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self._worker_error: BaseException | None = None  # a failed job, raised by the next wait
        if background:
            self._jobs = queue.SimpleQueue()
            self._idle = threading.Condition()
            self._pending = 0
            self._pending_by_slot = [0] * layout.num_slots
            self._unmaps_by_slot = [0] * layout.num_slots
            # The worker holds only a weak reference: a dropped manager ends it (and frees the
            # reservation) instead of being kept alive by its own thread.
            self._thread = threading.Thread(target=_map_worker, args=(weakref.ref(self), self._jobs),
                                            name="kvmem-vmm-mapper", daemon=True)
            self._thread.start()

    def _populate(self, slot: int, first_chunk: int, num_chunks: int) -> float:
        start = time.perf_counter()
        chunk = self.layout.chunk_bytes
        self.memory.populate_many(self.offsets[slot] + first_chunk * chunk, num_chunks * chunk)
        return time.perf_counter() - start

    def map_now(self, slot: int, first_chunk: int, num_chunks: int) -> None:
        self.critical_seconds += self._populate(slot, first_chunk, num_chunks)
        self.critical_calls += 1

    def map_soon(self, slot: int, first_chunk: int, num_chunks: int) -> None:
        if self._jobs is None:
            self.map_now(slot, first_chunk, num_chunks)
            return
        self._enqueue(False, slot, first_chunk, num_chunks)

    def map_for_step(self, slot: int, first_chunk: int, num_chunks: int) -> None:
        """Map chunks the coming step writes (a miss). With background mapping even a miss is
        queued where that is safe: on CPU the step's first write to a page the worker has not
        reached yet is a page fault, which maps it (correct, not overlapped). Where an unmapped
        page faults that write would be an illegal address: the miss is mapped now."""
        if self.faults_on_unmapped:
            self.map_now(slot, first_chunk, num_chunks)
        else:
            self.map_soon(slot, first_chunk, num_chunks)

    def wait_for_step(self, slot: int) -> None:
        """Where an unmapped page faults, wait for the slot's queued maps (earlier steps'
        look-ahead; usually long since landed: they had a whole step to map). On CPU nothing:
        a map that lands late is a page fault meanwhile."""
        if self.faults_on_unmapped:
            self.wait_slot(slot)

    def unmap_soon(self, slot: int, first_chunk: int, num_chunks: int) -> None:
        """Give the pages back, on the worker if there is one (after the slot's queued maps)."""
        if self._jobs is None or self.faults_on_unmapped:
            self.wait_slot(slot)  # CUDA: a queued map of these chunks must not land after the unmap
            start = time.perf_counter()
            self._release(slot, first_chunk, num_chunks)
            self.critical_seconds += time.perf_counter() - start
            return
        self._enqueue(True, slot, first_chunk, num_chunks)

    def _enqueue(self, unmap: bool, slot: int, first_chunk: int, num_chunks: int) -> None:
        with self._idle:
            self._pending += 1
            self._pending_by_slot[slot] += 1
            self._unmaps_by_slot[slot] += unmap
        self._jobs.put((unmap, slot, first_chunk, num_chunks))

    def _release(self, slot: int, first_chunk: int, num_chunks: int) -> None:
        chunk = self.layout.chunk_bytes
        self.memory.release_many(self.offsets[slot] + first_chunk * chunk, num_chunks * chunk)

    def settle(self, slot: int) -> None:
        """Wait until no unmap of `slot` is queued: after this, writes to it are safe."""
        if self._jobs is None or not self._unmaps_by_slot[slot]:
            return
        start = time.perf_counter()
        with self._idle:
            self._idle.wait_for(lambda: self._unmaps_by_slot[slot] == 0)
        self.critical_seconds += time.perf_counter() - start
        self._raise_worker_error()

    def wait_slot(self, slot: int) -> None:
        """Wait until no job of `slot` is queued: its maps have landed (needed before a step uses
        the pages where unmapped memory faults)."""
        if self._jobs is None or not self._pending_by_slot[slot]:
            self._raise_worker_error()
            return
        start = time.perf_counter()
        with self._idle:
            self._idle.wait_for(lambda: self._pending_by_slot[slot] == 0)
        self.critical_seconds += time.perf_counter() - start
        self._raise_worker_error()

    def drain(self) -> None:
        """Wait until every queued job is done."""
        if self._jobs is None:
            return
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)
        self._raise_worker_error()

    def _raise_worker_error(self) -> None:
        if self._worker_error is not None:
            raise RuntimeError(f"a background map or unmap failed: {self._worker_error}") from self._worker_error

    def close(self) -> None:
        if self._jobs is not None:
            with self._idle:  # a failed job was raised by the manager's waits already
                self._idle.wait_for(lambda: self._pending == 0)
            self._jobs.put(None)
            self._jobs = None
        if self._thread is not None:  # a closed manager leaves no thread behind
            self._thread.join()
            self._thread = None

    def _run_job(self, job: tuple[bool, int, int, int]) -> None:
        unmap, slot, first, num = job
        try:
            if unmap:
                start = time.perf_counter()
                self._release(slot, first, num)
                self.background_seconds += time.perf_counter() - start
            else:
                self.background_seconds += self._populate(slot, first, num)
                self.background_calls += 1
        except BaseException as e:  # kept for the manager's next wait: a dead worker would hang it
            self._worker_error = self._worker_error or e
        finally:
            with self._idle:
                self._pending -= 1
                self._pending_by_slot[slot] -= 1
                self._unmaps_by_slot[slot] -= unmap
                self._idle.notify_all()


def _map_worker(mapper_ref: weakref.ref, jobs: queue.SimpleQueue) -> None:
    while True:
        try:
            job = jobs.get(timeout=1.0)
        except queue.Empty:
            if mapper_ref() is None:
                return
            continue
        if job is None:
            return
        mapper = mapper_ref()
        if mapper is None:
            return
        mapper._run_job(job)
        del mapper
