"""virtual: vAttention's KV cache (arXiv 2405.04437) — contiguous in virtual memory, physical
pages mapped on demand.

Every sequence owns a *slot*: for each (layer, K/V, kv head) a contiguous `[max_len, head_dim]`
range of one big virtual reservation. Nothing is physically backed until the manager maps it, a
page at a time, as the sequence grows; attention then reads `cache[head, slot, :len]` in place with
ordinary non-paged kernels (no block table, no gather) and never past `len`. (A decode batch whose
lengths do not line up in a few runs of consecutive slots gathers whole chunks instead, as paged
gathers blocks: see `AttentionMetadata.decode_runs`.)

Layout and waste arithmetic. The reservation is one tensor `[layers, 2, kv_heads, slots, max_len,
head_dim]`, so a layer's K cache is `[kv_heads, slots, max_len, head_dim]` — the shared addressing
of `base.py` with one block of `max_len` tokens per slot, as in `static`. Head-major, so that a page
holds a whole number of one head's tokens: with `token_bytes = head_dim * dtype size`, a *chunk* of
`page_tokens = PAGE / gcd(PAGE, token_bytes)` tokens fills whole pages (SmolLM2, head_dim 64:
32 tokens per 4 KiB page in bf16, 16 in fp32). The token-major `[slots, len, kv_heads, head_dim]`
would put 10.7 SmolLM2 tokens in a page. Memory is mapped in chunks, in all `layers * 2 * kv_heads`
regions at once, so a sequence of n tokens holds ceil(n / page_tokens) chunks: at most
`page_tokens - 1` tokens of waste per sequence (on average half that), like a paged block of
`page_tokens` tokens.

vAttention's three optimizations, each switchable (`VirtualOptions`) for measurement:
1. background mapping: the chunks a sequence will need in the next few steps are mapped by a
   worker thread while the model computes, so growing costs the step nothing;
2. deferred reclamation: a finished sequence's slot keeps its pages; a new sequence takes the free
   slot whose mapped pages fit it best; pages go back only under memory pressure (free slots least
   recently freed first, then the idle tails of running slots: pages mapped past what their
   sequences have asked for, which count as cached, not allocated) or on `release_free_memory()`;
3. eager mapping: a prompt's whole known length (plus the look-ahead) is mapped at admission.

Prefix sharing (beyond the paper, which has none), two ways:
- a free slot still holds the KV of the tokens its last sequence computed; a new (or preempted and
  resumed) sequence whose tokens start the same way takes that slot and skips those tokens;
- sequences running at the same time that share whole chunks of prompt share their *physical*
  pages: the donor's chunk is copied once into a memfd (`vmm_cpu.SharedPagePool`) and mapped back
  in place, then mapped into the other slot too (MAP_SHARED | MAP_FIXED). Only computed, full
  chunks are shared, so nobody ever writes a shared page; the first divergent chunk is private.
  Chunks are found by the same hash chain as paged's blocks (hash of parent hash + tokens). The pool
  is laid out region-major with the same chunk index in every region, so a run of shared chunks is
  one mapping per region, and sharing stops before the process nears the kernel's limit of mappings
  (vm.max_map_count): every (slot, region) with shared chunks costs about two.

The CPU backend (`vmm_cpu.CpuVirtualMemory`) maps with madvise(MADV_POPULATE_WRITE) and returns
pages with madvise(MADV_DONTNEED); `kernel_resident_bytes()` asks the kernel (mincore) what is
really backed, which the tests hold against the manager's own count.

The CUDA backend (`vmm_cuda.CudaVirtualMemory`, used when the spec's device is CUDA) maps driver
pages (cuMemCreate / cuMemMap through cuda-bindings, 2 MiB each) from a pool of pre-created
handles. Three things differ from CPU, and the manager minds them (`device_faults`):
- the layout: 2 MiB pages in every (layer, K/V, head) region would waste hundreds of MiB per
  sequence, so on CUDA a slot is token-major across all layers (`megacache.MegacacheLayout`, one
  region, the layer caches strided views of the same logical shape; its docstring has the waste
  arithmetic); everything here works in its chunks as in the CPU layout's;
- an unmapped page faults: allocate() maps a miss at once and waits for the slot's look-ahead
  maps still queued on the worker before returning, and `readable_tokens` counts only what it
  waited for;
- unmaps are booked at once and done by the backend after a CUDA event recorded on the current
  stream has passed (a step's kernels may still read the pages).
Sharing maps one physical handle at two addresses (`vmm_cuda.map_shared`, nothing copied), and
`kernel_resident_bytes()` is the backend's record of the driver's mappings. This backend has been
exercised only against a fake driver (tests/memory/test_vmm_cuda.py), not yet on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvmem.memory.base import (
    KVCacheManager, KVCacheSpec, MemoryStats, NoFreeMemory, SequenceView, StrategyOptions, cdiv,
)
from kvmem.memory.block_pool import BlockHash, hash_block

if TYPE_CHECKING:
    from kvmem.config import EngineConfig
    from kvmem.models.config import ModelConfig


def _max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530  # Linux's default


@dataclass(frozen=True)
class VirtualOptions(StrategyOptions):
    """vAttention's optimizations, each of which can be turned off to measure what it buys (and the
    options every strategy takes: `max_num_seqs` is the number of slots)."""

    background_mapping: bool = True
    deferred_reclamation: bool = True
    eager_mapping: bool = True
    lookahead_tokens: int = 8  # map this far past what the current step needs
    # CUDA only: the physical page size, a multiple of the device's allocation granularity
    # (None: the granularity, 2 MiB on current GPUs). On CPU the page is the kernel's.
    page_size: int | None = None


@dataclass(frozen=True)
class VirtualLayout:
    """Where each (layer, K/V, head, slot, token) lives in the reservation, and the page arithmetic."""

    spec: KVCacheSpec
    num_slots: int
    max_len: int  # tokens per slot, a whole number of chunks
    page_size: int

    @classmethod
    def build(cls, spec: KVCacheSpec, num_slots: int, max_model_len: int, page_size: int) -> VirtualLayout:
        token_bytes = spec.head_dim * spec.dtype.itemsize
        page_tokens = page_size // math.gcd(page_size, token_bytes)
        return cls(spec, num_slots, cdiv(max_model_len, page_tokens) * page_tokens, page_size)

    @property
    def token_bytes(self) -> int:
        """One token of one head in one region."""
        return self.spec.head_dim * self.spec.dtype.itemsize

    @property
    def page_tokens(self) -> int:
        """Tokens per mapping chunk: the fewest that fill whole pages."""
        return self.page_size // math.gcd(self.page_size, self.token_bytes)

    @property
    def chunk_bytes(self) -> int:
        return self.page_tokens * self.token_bytes

    @property
    def num_regions(self) -> int:
        """(layer, K/V, kv head) triples: each holds one contiguous range per slot."""
        return self.spec.num_layers * 2 * self.spec.num_kv_heads

    @property
    def slot_bytes(self) -> int:
        return self.max_len * self.token_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_regions * self.num_slots * self.slot_bytes

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.spec
        return (s.num_layers, 2, s.num_kv_heads, self.num_slots, self.max_len, s.head_dim)

    def slot_offsets(self, slot: int) -> np.ndarray:
        """Byte offset of `slot`'s range in every region."""
        return np.arange(self.num_regions, dtype=np.int64) * (self.num_slots * self.slot_bytes) \
            + slot * self.slot_bytes


class _Mapper:
    """Maps and unmaps chunks of slots, on the caller's thread or on a background worker.

    Jobs run in order. A map (populate) may land late: on CPU a page the model writes before the
    worker got to it is faulted in by the kernel, so a late map costs time, never correctness.
    An unmap (MADV_DONTNEED) zeroes pages, so it must never land after someone wrote there: a
    slot with unmaps still queued is `settle`d (waited for) before it can be written again — the
    manager does that in admit() and allocate().

    On a backend whose unmapped pages fault (`device_faults`: CUDA) both rules change. A map must
    have landed before the step that uses the page: the manager waits for the slot's queued maps
    (`wait_slot`) in allocate(). An unmap is booked on the caller's thread at once (after the
    slot's queued maps, which it must not overtake); the backend itself defers the driver call
    until the device is done with the page, so nothing is queued here that could land late.
    """

    def __init__(self, memory, layout: VirtualLayout, background: bool, device_faults: bool = False) -> None:
        self.memory = memory
        self.layout = layout
        self.device_faults = device_faults
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

    def unmap_soon(self, slot: int, first_chunk: int, num_chunks: int) -> None:
        """Give the pages back, on the worker if there is one (after the slot's queued maps)."""
        if self._jobs is None or self.device_faults:
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


@dataclass
class _SharedChunk:
    """One chunk's pages in every region, in the shared pool at chunk index `index`."""

    index: int
    key: BlockHash
    refs: int = 0  # slots that map it


@dataclass
class _Slot:
    index: int
    mapped_chunks: int = 0  # chunks [0, mapped_chunks) are backed, privately or from the pool
    # Chunks its running sequence has asked for (up to its latest step's tokens). Mapped chunks past
    # these are kept pages (deferred reclamation, look-ahead): idle, and reclaimable under pressure.
    needed_chunks: int = 0
    cached_tokens: list[int] | None = None  # a free slot: the tokens whose KV it still holds
    shared: dict[int, _SharedChunk] = field(default_factory=dict)  # chunk position -> pool chunk

    @property
    def private_chunks(self) -> int:
        return self.mapped_chunks - len(self.shared)

    @property
    def excess_chunks(self) -> int:
        return max(self.mapped_chunks - self.needed_chunks, 0)


class VirtualKVCacheManager(KVCacheManager):
    name = "virtual"
    contiguous_slots = True  # attention reads cache[:, slot, :len] in place, never past len

    def __init__(self, spec: KVCacheSpec, num_slots: int, max_model_len: int, physical_budget_bytes: int,
                 options: VirtualOptions | None = None, enable_prefix_caching: bool = True,
                 cuda_driver=None) -> None:
        """`cuda_driver`: a `cuda_driver.VmmDriver` to use on CUDA instead of the real driver (tests
        inject a fake one)."""
        self.spec = spec
        self.options = options or VirtualOptions()
        self.enable_prefix_caching = enable_prefix_caching
        # The backend: Linux virtual memory on CPU, CUDA driver VMM on a GPU (module docstring).
        self.device_faults = spec.device.type == "cuda"  # an unmapped page faults instead of being mapped
        if spec.device.type == "cuda":
            from kvmem.memory import vmm_cuda as vmm
            from kvmem.memory.megacache import MegacacheLayout

            driver = cuda_driver if cuda_driver is not None else vmm.open_driver(spec.device)
            page_size = vmm.page_size_for(driver, self.options.page_size)  # CudaVmmError if not a granule multiple
            self.layout = MegacacheLayout.build(spec, num_slots, max_model_len, page_size)
        elif spec.device.type == "cpu":
            from kvmem.memory import vmm_cpu as vmm

            page_size = vmm.PAGE_SIZE
            if self.options.page_size not in (None, page_size):
                raise ValueError(f"page_size is the kernel's on CPU ({page_size} bytes); it is a choice only on CUDA")
            self.layout = VirtualLayout.build(spec, num_slots, max_model_len, page_size)
        else:
            raise ValueError(f"kv_cache='virtual' runs on cpu or cuda, not {spec.device}")
        self._vmm = vmm  # the backend module: its map_shared / unmap_shared / copy_to_shared
        self.block_size = self.layout.max_len
        self.chunk_tokens = self.layout.page_tokens
        self.chunk_set_bytes = self.layout.chunk_bytes * self.layout.num_regions  # one chunk in every region
        self.max_chunks = physical_budget_bytes // self.chunk_set_bytes
        if self.max_chunks < 1:
            raise ValueError(f"kv_cache_memory ({physical_budget_bytes} bytes) holds less than one mapping chunk "
                             f"({self.layout.page_tokens} tokens = {self.chunk_set_bytes} bytes)")
        self.chunk_pages = self.layout.chunk_bytes // page_size
        # A reservation the system refuses is a VirtualMemoryError / CudaVmmError, both ValueErrors.
        if self.device_faults:
            self.memory = vmm.CudaVirtualMemory(self.layout.total_bytes, driver, page_size,
                                                max_pages=self.max_chunks * self.chunk_pages)
            self.kv = self.memory.tensor(spec.dtype, self.layout.shape, self.layout.strides)
        else:
            self.memory = vmm.CpuVirtualMemory(self.layout.total_bytes)
            self.kv = self.memory.tensor(spec.dtype, self.layout.shape)
        self.mapper = _Mapper(self.memory, self.layout, self.options.background_mapping, self.device_faults)
        self.slots = [_Slot(i) for i in range(num_slots)]
        # Free slots, least recently freed first: trimmed in that order under memory pressure.
        self.free_slots: OrderedDict[int, _Slot] = OrderedDict((s.index, s) for s in self.slots)
        self.owned: dict[int, _Slot] = {}  # seq_id -> slot
        self.sequences: dict[int, SequenceView] = {}
        self.mapped_chunks = 0  # physical chunk sets: private ones of every slot + distinct shared ones
        # Sharing between running sequences (see the module docstring).
        self.pool = None  # vmm_cpu.SharedPagePool / vmm_cuda.CudaSharedPages, made on first use
        self.pool_chunks = self.max_chunks  # chunk indices in the pool, laid out region-major
        self.shared_by_key: dict[BlockHash, _SharedChunk] = {}
        self.free_pool_chunks = bytearray(b"\x01") * self.pool_chunks
        self.private_by_key: dict[BlockHash, tuple[_Slot, int]] = {}  # computed full chunks of running slots
        self.chunk_keys: dict[int, list[BlockHash]] = {}  # seq_id -> keys of its computed full chunks
        # Leave half the mapping limit to the rest of the process (torch, libraries, the allocator).
        # CUDA mappings are the driver's, not the process's VMAs: no such limit is known there.
        self.max_sharing_slots = num_slots if self.device_faults else \
            (_max_map_count() // 2) // (3 * self.layout.num_regions)
        self.pending_copies: list[tuple[int, int]] = []
        self.prefix_queries = 0
        self.prefix_hits = 0

    # --- construction -------------------------------------------------------------------
    @classmethod
    def resolve_options(cls, config: EngineConfig, model_config: ModelConfig, spec: KVCacheSpec,
                        max_model_len: int) -> VirtualOptions:
        return VirtualOptions(**VirtualOptions.common_from_config(config),
                              background_mapping=config.background_mapping,
                              deferred_reclamation=config.deferred_reclamation, eager_mapping=config.eager_mapping,
                              lookahead_tokens=config.mapping_lookahead)

    @classmethod
    def from_budget(cls, spec: KVCacheSpec, budget_bytes: int, max_model_len: int,
                    options: StrategyOptions) -> VirtualKVCacheManager:
        # One slot per sequence that may run at once; the budget bounds physical pages, not slots.
        if not isinstance(options, VirtualOptions):  # the common options alone: vAttention's defaults
            options = VirtualOptions(**dataclasses.asdict(options))
        return cls(spec, options.max_num_seqs, max_model_len, budget_bytes, options, options.enable_prefix_caching)

    # --- addressing ---------------------------------------------------------------------
    @property
    def max_tokens_per_sequence(self) -> int:
        return min(self.layout.max_len, self.max_chunks * self.layout.page_tokens)

    def layer_cache(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[layer_idx, 0], self.kv[layer_idx, 1]

    def block_table(self, seq: SequenceView) -> list[int]:
        return [self.owned[seq.seq_id].index]

    def readable_tokens(self, seq: SequenceView) -> int:
        """The slot's mapped chunks (on CPU a map still queued on the worker reads as zeros). On
        CUDA only the chunks allocate() waited for: look-ahead maps may still be queued, and an
        unmapped page faults."""
        slot = self.owned[seq.seq_id]
        chunks = min(slot.needed_chunks, slot.mapped_chunks) if self.device_faults else slot.mapped_chunks
        return chunks * self.layout.page_tokens

    # --- admission ----------------------------------------------------------------------
    def admit(self, seq: SequenceView) -> int:
        """Take a free slot and return how many of `seq`'s leading tokens are already in it.

        The tokens come either from the slot's own leftovers (the free slot holding the longest
        prefix of `seq`) or from chunks shared with running sequences (mapped into the best-fitting
        free slot), whichever covers more. With no free slot (every one held by a running
        sequence) it takes none, and can_allocate() says no."""
        assert seq.seq_id not in self.owned, "admit() on a sequence that already holds a slot"
        if not self.free_slots:
            return 0
        slot, hit = self._pick_slot(seq)
        sources = self._shareable_chunks(seq) if self.enable_prefix_caching else []
        if len(sources) * self.layout.page_tokens > hit and self._sharing_slots() < self.max_sharing_slots:
            slot = self._best_fit(seq)
            self._map_shared_prefix(slot, sources)
            hit = len(sources) * self.layout.page_tokens
        else:
            # Never write into a shared chunk: from the first one the sequence would write into
            # (its tokens there are not all cached), the slot is cut and those tokens recomputed.
            cut = self._first_shared_past(slot, hit)
            self._cut(slot, cut)
            hit = min(hit, cut * self.layout.page_tokens)
        del self.free_slots[slot.index]
        slot.cached_tokens = None
        slot.needed_chunks = cdiv(hit, self.layout.page_tokens)
        self.mapper.settle(slot.index)  # its old pages' queued unmaps land before it is written
        self.owned[seq.seq_id] = slot
        self.sequences[seq.seq_id] = seq
        self.chunk_keys[seq.seq_id] = []
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += hit
        return hit

    def _pick_slot(self, seq: SequenceView) -> tuple[_Slot, int]:
        """The free slot holding the longest prefix of `seq` (and its length), else the best fit."""
        if self.enable_prefix_caching:
            best, best_hit = None, 0
            tokens = np.asarray(seq.token_ids[: seq.num_tokens - 1])  # the last token must be computed
            for slot in self.free_slots.values():
                cached = slot.cached_tokens
                if not cached or cached[0] != seq.token_ids[0]:
                    continue
                n = min(len(cached), len(tokens))
                differ = np.flatnonzero(np.asarray(cached[:n]) != tokens[:n])
                hit = int(differ[0]) if len(differ) else n
                if hit > best_hit:
                    best, best_hit = slot, hit
            if best is not None:
                return best, best_hit
        return self._best_fit(seq), 0

    def _best_fit(self, seq: SequenceView) -> _Slot:
        """The free slot with the fewest mapped chunks that still cover the sequence, else the one
        with the most (deferred reclamation: reuse mapped pages rather than map new ones)."""
        need = cdiv(seq.num_tokens, self.layout.page_tokens)
        fitting = [s for s in self.free_slots.values() if s.mapped_chunks >= need]
        if fitting:
            return min(fitting, key=lambda s: s.mapped_chunks)
        return max(self.free_slots.values(), key=lambda s: s.mapped_chunks)

    # --- sharing between running sequences ------------------------------------------------
    def _shareable_chunks(self, seq: SequenceView) -> list[tuple[BlockHash, _SharedChunk | tuple[_Slot, int]]]:
        """For each leading full chunk of `seq`'s tokens (the last token excluded), its key and an
        existing shared chunk or a running slot's private chunk with the same tokens; stops at the
        first chunk found nowhere."""
        pt = self.layout.page_tokens
        found: list = []
        parent = None
        for i in range((seq.num_tokens - 1) // pt):
            key = hash_block(parent, seq.token_ids[i * pt:(i + 1) * pt])
            source = self.shared_by_key.get(key) or self.private_by_key.get(key)
            if source is None:
                break
            found.append((key, source))
            parent = key
        return found

    def _sharing_slots(self) -> int:
        return sum(1 for s in self.slots if s.shared)

    def _map_shared_prefix(self, slot: _Slot, sources: list) -> None:
        """Make chunks [0, len(sources)) of the free `slot` the pool's, promoting private donors
        first; whatever the slot held before is dropped (it was another sequence's)."""
        self.mapper.drain()  # no background map may race with the remapping below
        chunks = [source if isinstance(source, _SharedChunk) else self._promote(key, *source)
                  for key, source in sources]
        for chunk in chunks:
            chunk.refs += 1  # held before the cut below, which may drop the slot's old hold on it
        self._cut(slot, 0)
        for position, chunk in enumerate(chunks):
            for offset, page in zip(self._chunk_offsets(slot, position), self._pool_pages(chunk)):
                self._vmm.map_shared(self.memory, offset, self.pool, page, self.chunk_pages)
            slot.shared[position] = chunk
        slot.mapped_chunks = len(chunks)

    def _promote(self, key: BlockHash, donor: _Slot, position: int) -> _SharedChunk:
        """Turn a running slot's private chunk into a shared one, in place: copy its pages into the
        pool and map the pool pages where they were. What the donor reads does not change. (On CUDA
        nothing is copied: the pool adopts the physical pages already mapped there.)"""
        if self.pool is None:
            num_pages = self.layout.num_regions * self.pool_chunks * self.chunk_pages
            self.pool = self._vmm.CudaSharedPages(self.memory, num_pages) if self.device_faults \
                else self._vmm.SharedPagePool(num_pages)
        index = self.free_pool_chunks.find(1)
        if index < 0:  # cannot happen while the pool has one chunk index per budget chunk
            raise NoFreeMemory("shared chunk pool full")
        self.free_pool_chunks[index] = 0
        chunk = _SharedChunk(index, key, refs=1)
        for offset, page in zip(self._chunk_offsets(donor, position), self._pool_pages(chunk)):
            self.pool.alloc_at(page, self.chunk_pages)
            self._vmm.copy_to_shared(self.memory, offset, self.pool, page, self.chunk_pages)
        del self.private_by_key[key]
        self.shared_by_key[key] = chunk
        donor.shared[position] = chunk  # its private pages were replaced by the pool's: count moves
        return chunk

    def _unshare(self, slot: _Slot, position: int) -> None:
        """Drop `slot`'s mapping of a shared chunk (the range reads zero again); the last holder's
        drop gives the pool pages back."""
        chunk = slot.shared.pop(position)
        for offset in self._chunk_offsets(slot, position):
            self._vmm.unmap_shared(self.memory, offset, self.chunk_pages)
        chunk.refs -= 1
        if chunk.refs == 0:
            for page in self._pool_pages(chunk):
                self.pool.free_run(page, self.chunk_pages)
            self.free_pool_chunks[chunk.index] = 1
            del self.shared_by_key[chunk.key]
            self.mapped_chunks -= 1

    def _chunk_offsets(self, slot: _Slot, position: int) -> list[int]:
        return (self.mapper.offsets[slot.index] + position * self.layout.chunk_bytes).tolist()

    def _pool_pages(self, chunk: _SharedChunk) -> range:
        """First pool page of the chunk in each region: region-major, so that consecutive chunk
        indices are consecutive pages of one region (one mapping for a run of shared chunks)."""
        per_region = self.pool_chunks * self.chunk_pages
        return range(chunk.index * self.chunk_pages, self.layout.num_regions * per_region, per_region)

    def _first_shared_past(self, slot: _Slot, hit: int) -> int:
        """The first chunk position a sequence reusing `slot` with `hit` cached tokens would write
        into while it is shared (its tokens there are not all cached); mapped_chunks if none."""
        pt = self.layout.page_tokens
        past = [p for p in slot.shared if (p + 1) * pt > hit]
        return min(past) if past else slot.mapped_chunks

    def _cut(self, slot: _Slot, position: int) -> None:
        """Unmap `slot` from chunk `position` on: shared chunks are dropped, private pages given back."""
        if position >= slot.mapped_chunks:
            return
        private = sum(1 for p in range(position, slot.mapped_chunks) if p not in slot.shared)
        for p in [p for p in slot.shared if p >= position]:
            self._unshare(slot, p)  # counts the chunks it frees itself
        # Release [position, mapped) at once: ranges of dropped shared chunks are already fresh
        # anonymous memory (on CUDA: already unmapped or retired), so releasing them again costs nothing.
        self.mapper.unmap_soon(slot.index, position, slot.mapped_chunks - position)
        self.mapped_chunks -= private
        slot.mapped_chunks = position

    def on_tokens_computed(self, seq: SequenceView) -> None:
        """Register the sequence's newly completed full chunks, so that others can share them."""
        if not self.enable_prefix_caching:
            return
        slot, keys = self.owned[seq.seq_id], self.chunk_keys[seq.seq_id]
        pt = self.layout.page_tokens
        for i in range(len(keys), seq.num_computed_tokens // pt):
            key = hash_block(keys[-1] if keys else None, seq.token_ids[i * pt:(i + 1) * pt])
            keys.append(key)
            if i not in slot.shared and key not in self.shared_by_key:
                self.private_by_key.setdefault(key, (slot, i))

    # --- growth -------------------------------------------------------------------------
    def _chunks_needed(self, seq: SequenceView, num_new_tokens: int) -> tuple[_Slot | None, int]:
        slot = self.owned.get(seq.seq_id)
        need = cdiv(seq.num_computed_tokens + num_new_tokens, self.layout.page_tokens)
        return slot, need - (slot.mapped_chunks if slot else 0)

    def _reclaimable(self, keep: _Slot | None = None) -> int:
        """Chunks that trimming free slots would give back: their private chunks, and the shared
        chunks that only free slots hold."""
        private = 0
        free_holds: dict[int, tuple[_SharedChunk, int]] = {}  # id -> (chunk, free slots holding it)
        for slot in self.free_slots.values():
            if slot is keep:
                continue
            private += slot.private_chunks
            for chunk in slot.shared.values():
                free_holds[id(chunk)] = (chunk, free_holds.get(id(chunk), (chunk, 0))[1] + 1)
        excess = sum(s.excess_chunks for s in self.owned.values() if s is not keep)
        return private + excess + sum(1 for chunk, holders in free_holds.values() if holders == chunk.refs)

    def can_allocate(self, seq: SequenceView, num_new_tokens: int) -> bool:
        slot, missing = self._chunks_needed(seq, num_new_tokens)
        if seq.num_computed_tokens + num_new_tokens > self.layout.max_len:
            return False
        if slot is None and not self.free_slots:
            return False
        room = self.max_chunks - self.mapped_chunks
        if missing <= room:  # the common case, without counting what trimming would give back
            return True
        # A sequence without a slot will take the best-fitting free one: its pages count as room.
        return missing <= room + self._reclaimable(keep=slot)

    def allocate(self, seq: SequenceView, num_new_tokens: int) -> None:
        if not self.can_allocate(seq, num_new_tokens):
            raise NoFreeMemory(f"no room for {num_new_tokens} tokens of sequence {seq.seq_id}")
        if seq.seq_id not in self.owned:
            self.admit(seq)  # a caller that skipped admit(): take a slot, ignore any cached prefix
        slot = self.owned[seq.seq_id]
        self.sequences[seq.seq_id] = seq
        self.mapper.settle(slot.index)  # e.g. its idle tail, cut for another sequence, then needed again
        end = seq.num_computed_tokens + num_new_tokens
        need = cdiv(end, self.layout.page_tokens)
        slot.needed_chunks = max(slot.needed_chunks, need)
        if need > slot.mapped_chunks:  # a miss: this step writes pages not mapped yet
            self._make_room(need - slot.mapped_chunks, keep=slot)
            # With background mapping even a miss is queued: on CPU the step's first write to a page
            # the worker has not reached yet is a page fault, which maps it (correct, not overlapped).
            # On CUDA that write would be an illegal address: a miss is mapped now.
            self._grow(slot, need, now=not self.options.background_mapping or self.device_faults)
        if self.device_faults:
            # Chunks this step uses that earlier steps' look-ahead queued must have landed before it
            # runs (usually long since: they had a whole step to map). This step's look-ahead,
            # queued below, is not waited for; readable_tokens() does not count it.
            self.mapper.wait_slot(slot.index)
        # Look ahead: the whole rest of a known prompt (eager) plus a few tokens, mapped in the
        # background while this step computes. Only into free room: unmapping something for a
        # guess would cost the step (and, under pressure, churn against the next miss).
        ahead = self.options.lookahead_tokens
        if self.options.eager_mapping:
            ahead += max(seq.num_tokens - end, 0)
        target = min(cdiv(end + ahead, self.layout.page_tokens), self.layout.max_len // self.layout.page_tokens)
        target = min(target, slot.mapped_chunks + self.max_chunks - self.mapped_chunks)
        if target > slot.mapped_chunks:
            self._grow(slot, target, now=False)

    def _grow(self, slot: _Slot, chunks: int, now: bool) -> None:
        first, count = slot.mapped_chunks, chunks - slot.mapped_chunks
        slot.mapped_chunks = chunks
        self.mapped_chunks += count
        (self.mapper.map_now if now else self.mapper.map_soon)(slot.index, first, count)

    def _make_room(self, chunks: int, keep: _Slot | None) -> None:
        """Trim free slots, least recently freed first, then the idle tails of running slots (pages
        past what their sequences asked for), until `chunks` more fit the budget."""
        for slot in list(self.free_slots.values()):
            if self.mapped_chunks + chunks <= self.max_chunks:
                return
            if slot is not keep and slot.mapped_chunks:
                self._trim(slot)
        for slot in list(self.owned.values()):
            if self.mapped_chunks + chunks <= self.max_chunks:
                return
            if slot is not keep and slot.excess_chunks:
                self._cut(slot, slot.needed_chunks)

    def _trim(self, slot: _Slot) -> None:
        self._cut(slot, 0)
        slot.cached_tokens = None

    def free(self, seq: SequenceView) -> None:
        slot = self.owned.pop(seq.seq_id, None)
        self.sequences.pop(seq.seq_id, None)
        for key in self.chunk_keys.pop(seq.seq_id, []):
            if self.private_by_key.get(key, (None,))[0] is slot:
                del self.private_by_key[key]  # a free slot may be overwritten: not a donor any more
        if slot is None:
            return
        slot.needed_chunks = 0
        computed = seq.num_computed_tokens
        slot.cached_tokens = list(seq.token_ids[:computed]) if self.enable_prefix_caching and computed else None
        self.free_slots[slot.index] = slot  # most recently freed: trimmed last
        if not self.options.deferred_reclamation:
            self._trim(slot)

    def fork(self, parent: SequenceView, child: SequenceView) -> None:
        # The child waits for a slot of its own; at admission it shares the parent's full prompt
        # chunks (when prefix caching is on) and computes only the rest.
        child.num_computed_tokens = 0

    # --- accounting ---------------------------------------------------------------------
    def stats(self) -> MemoryStats:
        per_chunk = self.chunk_set_bytes
        # A shared chunk is one physical chunk however many slots map it.
        held_shared = {id(c) for s in self.owned.values() for c in s.shared.values()}
        # Allocated: what running sequences asked for; their slots' idle tails count as cached.
        allocated = sum(min(s.mapped_chunks, s.needed_chunks) - len(s.shared) for s in self.owned.values()) \
            + len(held_shared)
        cached = self.mapped_chunks - allocated
        # Live tokens, a shared chunk's once: every sequence's computed tokens outside its shared
        # chunks, plus the (full) shared chunks the running sequences hold.
        pt = self.layout.page_tokens
        live = len(held_shared) * pt + sum(
            seq.num_computed_tokens - pt * len(self.owned[seq.seq_id].shared) for seq in self.sequences.values())
        extra = {"page_tokens": self.layout.page_tokens,
                 "map_calls": self.mapper.critical_calls + self.mapper.background_calls,
                 "map_calls_background": self.mapper.background_calls,
                 "shared_chunks": len(self.shared_by_key),
                 "map_seconds_critical": self.mapper.critical_seconds,
                 "map_seconds_background": self.mapper.background_seconds}
        if self.device_faults:  # device memory held beyond the mapped pages: the idle handle pool
            extra.update(page_size=self.memory.page_size, device_pool_idle_bytes=self.memory.idle_bytes(),
                         device_handles_bytes=self.memory.created_bytes())
        return MemoryStats(
            strategy=self.name,
            bytes_reserved=self.layout.total_bytes,
            bytes_physical=self.mapped_chunks * per_chunk,
            bytes_allocated=allocated * per_chunk,
            bytes_live=live * self.spec.bytes_per_token,
            bytes_cached=cached * per_chunk,
            num_sequences=len(self.owned),
            prefix_cache_queries=self.prefix_queries,
            prefix_cache_hits=self.prefix_hits,
            bytes_capacity=self.max_chunks * per_chunk,
            extra=extra,
        )

    def kernel_resident_bytes(self) -> int:
        """Physical KV bytes as the kernel reports them, once every queued map has run: what the
        manager's `bytes_physical` must agree with. Without sharing: mincore's resident pages of the
        reservation. With a shared pool, mincore would count a shared page once per place it is
        mapped, so: the reservation's private pages (smaps `Anonymous`) + the pool's (st_blocks)."""
        self.mapper.drain()
        if self.device_faults:
            # CUDA: the distinct physical handles the driver has mapped (or a shared pool holds), by
            # the backend's record of driver calls, once retired pages are unmapped. A shared handle
            # counts once. cuMemGetInfo agrees in tests on a GPU (`memory.device_used_bytes()`), but
            # counts the idle handle pool and every other allocation of the process too.
            self.memory.settle()
            return self.memory.resident_bytes()
        if self.pool is None:
            return self.memory.resident_bytes()
        return self.memory.smaps_anonymous_bytes() + self.pool.allocated_bytes()

    def close(self) -> None:
        """Stop the mapping worker and unmap the reservation (tensors still viewing it read zeros on
        CPU; on CUDA they must not be read at all: their pages are unmapped)."""
        self.mapper.close()
        # Our own view first: with no live view left, the reservation is unmapped at once rather
        # than only emptied (see CpuVirtualMemory.close). Idempotent: a second close finds nothing.
        self.kv = None
        self.memory.close()
        if self.pool is not None:
            self.pool.close()

    def release_free_memory(self) -> int:
        """Unmap every idle page: free slots' (deferred reclamation's keep, cached prefixes) and
        running slots' mapped past what their sequences asked for (look-ahead)."""
        before = self.mapped_chunks
        for slot in list(self.free_slots.values()):
            if slot.mapped_chunks:
                self._trim(slot)
        for slot in list(self.owned.values()):
            if slot.excess_chunks:
                self._cut(slot, slot.needed_chunks)
        if self.device_faults:  # unmapped pages go back to the handle pool; give the pool to the device
            self.memory.trim_pool()
        return (before - self.mapped_chunks) * self.chunk_set_bytes
