"""virtual: vAttention's KV cache (arXiv 2405.04437) — contiguous in virtual memory, physical
pages mapped on demand.

Every sequence owns a *slot*: for each (layer, K/V, kv head) a contiguous `[max_len, head_dim]`
range of one big virtual reservation. Nothing is physically backed until the manager maps it, a
chunk at a time, as the sequence grows; attention then reads `cache[head, slot, :len]` in place with
ordinary non-paged kernels (no block table, no gather) and never past `len`. (A decode batch whose
lengths do not line up in a few runs of consecutive slots gathers whole chunks instead, as paged
gathers blocks: see `AttentionMetadata.decode_runs`.)

The strategy in modules, one concept each:
- `virtual_layout`: where each (layer, K/V, head, slot, token) lives and the page arithmetic
  (`VirtualLayout` on CPU, `megacache.MegacacheLayout` on CUDA, both a `SlotLayout`); a sequence of
  n tokens holds ceil(n / page_tokens) chunks, mapped in every region at once;
- `vmm_backend`: the contract of the memory underneath (`VirtualMemoryBackend`, `SharedPages`),
  implemented by `vmm_cpu` (mmap / madvise / memfd) and `vmm_cuda` (CUDA driver VMM);
- `mapping_worker`: the background mapping thread and the rules that keep a late map or unmap
  harmless;
- `shared_chunks`: physical sharing of prompt chunks between running sequences;
- here, `VirtualKVCacheManager`: slots, the physical budget, what is mapped when.

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
  pages (`shared_chunks`). Only computed, full chunks are shared, so nobody ever writes a shared
  page.

The CPU backend (`vmm_cpu.CpuVirtualMemory`) maps with madvise(MADV_POPULATE_WRITE) and returns
pages with madvise(MADV_DONTNEED); `kernel_resident_bytes()` asks the kernel (mincore, smaps) what
is really backed, which the tests hold against the manager's own count.

The CUDA backend (`vmm_cuda.CudaVirtualMemory`, used when the spec's device is CUDA) maps driver
pages (cuMemCreate / cuMemMap through cuda-bindings, 2 MiB each) from a pool of pre-created
handles. Three things differ from CPU; the manager sees them only through the backend's members:
- the layout (chosen once, in `_open_backend`): 2 MiB pages in every (layer, K/V, head) region
  would waste hundreds of MiB per sequence, so on CUDA a slot is token-major across all layers
  (`megacache.MegacacheLayout`, one region); everything here works in its chunks as in the CPU
  layout's;
- an unmapped page faults (`faults_on_unmapped`): allocate() maps a miss at once and waits for the
  slot's look-ahead maps still queued on the worker before returning (`Mapper.map_for_step`,
  `wait_for_step`), and `readable_tokens` counts only what it waited for;
- unmaps are booked at once and done by the backend after a CUDA event recorded on the current
  stream has passed (a step's kernels may still read the pages): `settle()`, and idle handles go
  back on `trim_pool()`.
Sharing maps one physical handle at two addresses (nothing copied), and `kernel_resident_bytes()` is
the backend's record of the driver's mappings. This backend has been exercised only against a fake
driver (tests/memory/test_vmm_cuda.py), not yet on a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvmem.memory.base import (
    KVCacheManager, KVCacheSpec, MemoryStats, NoFreeMemory, SequenceView, StrategyOptions, cdiv,
)
from kvmem.memory.events import ChunksShared, ChunksUnshared, EventSink, PagesMapped, PagesUnmapped, medium_of
from kvmem.memory.prefix_holdings import PrefixHoldings
from kvmem.memory.mapping_worker import Mapper
from kvmem.memory.shared_chunks import SharedChunk, SharedChunkPool
from kvmem.memory.virtual_layout import SlotLayout, VirtualLayout
from kvmem.memory.vmm_backend import SharedPages, VirtualMemoryBackend

if TYPE_CHECKING:
    from kvmem.config import EngineConfig
    from kvmem.models.config import ModelConfig

__all__ = ["VirtualKVCacheManager", "VirtualLayout", "VirtualOptions"]


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


@dataclass
class Slot:
    index: int
    mapped_chunks: int = 0  # chunks [0, mapped_chunks) are backed, privately or from the pool
    # Chunks its running sequence has asked for (up to its latest step's tokens). Mapped chunks past
    # these are kept pages (deferred reclamation, look-ahead): idle, and reclaimable under pressure.
    needed_chunks: int = 0
    cached_tokens: list[int] | None = None  # a free slot: the tokens whose KV it still holds
    shared: dict[int, SharedChunk] = field(default_factory=dict)  # chunk position -> pool chunk

    @property
    def private_chunks(self) -> int:
        return self.mapped_chunks - len(self.shared)

    @property
    def excess_chunks(self) -> int:
        return max(self.mapped_chunks - self.needed_chunks, 0)


def _chunk_set_bytes(layout: SlotLayout) -> int:
    """One chunk in every region, and (int8 caches) the chunk's tokens' scales."""
    return layout.chunk_bytes * layout.num_regions + layout.page_tokens * layout.spec.scale_bytes_per_token


def _budget_chunks(layout: SlotLayout, physical_budget_bytes: int) -> int:
    """Chunk sets (one chunk in every region) the physical budget holds; at least one."""
    chunk_set_bytes = _chunk_set_bytes(layout)
    max_chunks = physical_budget_bytes // chunk_set_bytes
    if max_chunks < 1:
        raise ValueError(f"kv_cache_memory ({physical_budget_bytes} bytes) holds less than one mapping chunk "
                         f"({layout.page_tokens} tokens = {chunk_set_bytes} bytes)")
    return max_chunks


def _open_backend(spec: KVCacheSpec, num_slots: int, max_model_len: int, physical_budget_bytes: int,
                  options: VirtualOptions, cuda_driver) -> tuple[SlotLayout, VirtualMemoryBackend]:
    """The layout and the reservation for the spec's device: Linux virtual memory in the head-major
    layout on CPU, CUDA driver VMM in the megacache layout on a GPU (module docstring). The only
    place the manager asks which device it runs on. A reservation the system refuses is a
    VirtualMemoryError / CudaVmmError, both ValueErrors."""
    if spec.device.type == "cuda":
        if spec.has_scales:
            raise ValueError("kv_cache_dtype='int8' with kv_cache='virtual' runs on CPU only (its per-token scales "
                             "live in CPU virtual memory); use kv_cache_dtype='fp8' on CUDA")
        from kvmem.memory import vmm_cuda
        from kvmem.memory.megacache import MegacacheLayout

        driver = cuda_driver if cuda_driver is not None else vmm_cuda.open_driver(spec.device)
        page_size = vmm_cuda.page_size_for(driver, options.page_size)  # CudaVmmError if not a granule multiple
        layout = MegacacheLayout.build(spec, num_slots, max_model_len, page_size)
        max_pages = _budget_chunks(layout, physical_budget_bytes) * (layout.chunk_bytes // page_size)
        return layout, vmm_cuda.CudaVirtualMemory(layout.total_bytes, driver, page_size, max_pages=max_pages)
    if spec.device.type == "cpu":
        from kvmem.memory import vmm_cpu

        page_size = vmm_cpu.PAGE_SIZE
        if options.page_size not in (None, page_size):
            raise ValueError(f"page_size is the kernel's on CPU ({page_size} bytes); it is a choice only on CUDA")
        layout = VirtualLayout.build(spec, num_slots, max_model_len, page_size)
        _budget_chunks(layout, physical_budget_bytes)  # a clear error before anything is reserved
        return layout, vmm_cpu.CpuVirtualMemory(layout.total_bytes)
    raise ValueError(f"kv_cache='virtual' runs on cpu or cuda, not {spec.device}")


class _SlotScales:
    """int8's scales per (token, KV head) for the virtual cache (CPU): one more reservation, each slot
    a contiguous range of `max_len` rows of `[layers, 2, kv_heads]` float32 (token-major, so a
    sequence of n tokens touches ceil(n * row / 4 KiB) pages, not a page per layer and head). The
    kernel backs a page on first write; pages past a slot's cut are released with it. Views per
    layer are `[kv_heads, slots, max_len]`, the addressing of the KV views."""

    def __init__(self, memory, tensor: torch.Tensor, row_bytes: int, max_len: int) -> None:
        self.memory, self.tensor, self.row_bytes, self.max_len = memory, tensor, row_bytes, max_len

    @classmethod
    def open(cls, spec: KVCacheSpec, num_slots: int, max_len: int) -> _SlotScales:
        from kvmem.memory import vmm_cpu

        L, H = spec.num_layers, spec.num_kv_heads
        row = 2 * L * H  # floats per token
        memory = vmm_cpu.CpuVirtualMemory(num_slots * max_len * row * 4)
        tensor = memory.tensor(torch.float32, (L, 2, H, num_slots, max_len), (2 * H, H, 1, max_len * row, row))
        return cls(memory, tensor, row * 4, max_len)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensor[layer_idx, 0], self.tensor[layer_idx, 1]

    def release(self, slot: int, first_token: int) -> None:
        """Give back the whole pages of `slot`'s rows from `first_token` on."""
        page = self.memory.page_size
        start = slot * self.max_len * self.row_bytes + first_token * self.row_bytes
        end = (slot + 1) * self.max_len * self.row_bytes
        start, end = -(-start // page) * page, end // page * page
        if end > start:
            self.memory.release(start, end - start)

    def close(self) -> None:
        self.tensor = None
        self.memory.close()


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
        self.layout, self.memory = _open_backend(spec, num_slots, max_model_len, physical_budget_bytes,
                                                 self.options, cuda_driver)
        self.block_size = self.layout.max_len
        self.chunk_tokens = self.layout.page_tokens
        self.chunk_set_bytes = _chunk_set_bytes(self.layout)  # one chunk in every region (+ int8 scales)
        self.max_chunks = _budget_chunks(self.layout, physical_budget_bytes)
        self.chunk_pages = self.layout.chunk_bytes // self.memory.page_size
        self.kv = self.memory.tensor(spec.storage_dtype, self.layout.shape, self.layout.strides)
        self.scales = _SlotScales.open(spec, num_slots, self.layout.max_len) if spec.has_scales else None
        self.mapper = Mapper(self.memory, self.layout, self.options.background_mapping)
        self.slots = [Slot(i) for i in range(num_slots)]
        # Free slots, least recently freed first: trimmed in that order under memory pressure.
        self.free_slots: OrderedDict[int, Slot] = OrderedDict((s.index, s) for s in self.slots)
        self.owned: dict[int, Slot] = {}  # seq_id -> slot
        self.sequences: dict[int, SequenceView] = {}
        self.mapped_chunks = 0  # physical chunk sets: private ones of every slot + distinct shared ones
        # Sharing between running sequences: one pool chunk index per budget chunk.
        self.sharing = SharedChunkPool(self.memory, self.layout, self.mapper.offsets, self.max_chunks, self.slots)
        # The prefixes the slots hold, reported as vLLM's block events (a chunk is a block).
        self.holdings = PrefixHoldings(num_slots, self.chunk_tokens, medium_of(spec.device))
        self.pending_copies: list[tuple[int, int]] = []
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.tiers = None  # VirtualTierLink: the prefix-cache tiers below the budget (attach_tiers)

    @property
    def pool(self) -> SharedPages | None:
        """The backend's pool of shared pages (vmm_cpu.SharedPagePool / vmm_cuda.CudaSharedPages),
        made on first use."""
        return self.sharing.pages

    @property
    def shared_by_key(self) -> dict:
        """Chunks shared between running slots, by hash-chain key."""
        return self.sharing.by_key

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

    def layer_scales(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.scales is None else self.scales.layer(layer_idx)

    def block_table(self, seq: SequenceView) -> list[int]:
        return [self.owned[seq.seq_id].index]

    @property
    def prefix_id_tokens(self) -> int:
        return self.chunk_tokens

    def shared_prefix_ids(self, seq: SequenceView) -> list[int]:
        """Per chunk of the sequence's tokens: the shared pool chunk's index where the slot maps one
        (the same physical pages as every other slot mapping it), else an id of the slot's own
        chunk (negative, so it never equals a pool index)."""
        slot = self.owned[seq.seq_id]
        per_slot = self.layout.max_len // self.chunk_tokens
        n = min(slot.mapped_chunks, -(-seq.num_tokens // self.chunk_tokens))
        shared = slot.shared
        return [shared[p].index if p in shared else -1 - slot.index * per_slot - p for p in range(n)]

    def readable_tokens(self, seq: SequenceView) -> int:
        """The slot's mapped chunks (on CPU a map still queued on the worker reads as zeros). On
        CUDA only the chunks allocate() waited for: look-ahead maps may still be queued, and an
        unmapped page faults."""
        slot = self.owned[seq.seq_id]
        # A real difference, stated once: a queued map reads as zeros on CPU, faults on CUDA.
        chunks = min(slot.needed_chunks, slot.mapped_chunks) if self.memory.faults_on_unmapped else slot.mapped_chunks
        return chunks * self.layout.page_tokens

    # --- admission ----------------------------------------------------------------------
    def admit(self, seq: SequenceView, reuse_prefix: bool = True) -> int:
        """Take a free slot and return how many of `seq`'s leading tokens are already in it.

        The tokens come either from the slot's own leftovers (the free slot holding the longest
        prefix of `seq`) or from chunks shared with running sequences (mapped into the best-fitting
        free slot), whichever covers more. With no free slot (every one held by a running
        sequence) it takes none, and can_allocate() says no."""
        assert seq.seq_id not in self.owned, "admit() on a sequence that already holds a slot"
        if not self.free_slots:
            return 0
        reuse = self.enable_prefix_caching and reuse_prefix
        slot, hit = self._pick_slot(seq) if reuse else (self._best_fit(seq), 0)
        # int8: no physical sharing between running slots (a slot's scales are its own, not in the
        # shared pages); a free slot's own leftovers, scales included, are still reused.
        sources = self.sharing.find(seq) if reuse and self.scales is None else []
        if len(sources) * self.layout.page_tokens > hit and self.sharing.may_share():
            slot = self._best_fit(seq)
            self._map_shared_prefix(slot, sources, seq)
            hit = len(sources) * self.layout.page_tokens
        else:
            if self.tiers is not None:  # its cached tokens from the match on are about to be overwritten
                self.tiers.write_back(slot, hit)
                slot.cached_tokens = None  # handed down: the cut below has nothing more to write back
            # Never write into a shared chunk: from the first one the sequence would write into
            # (its tokens there are not all cached), the slot is cut and those tokens recomputed.
            cut = self._first_shared_past(slot, hit)
            self._cut(slot, cut)
            hit = min(hit, cut * self.layout.page_tokens)
        self.holdings.truncate(slot.index, hit // self.layout.page_tokens)  # the rest is overwritten
        del self.free_slots[slot.index]
        slot.cached_tokens = None
        slot.needed_chunks = cdiv(hit, self.layout.page_tokens)
        self.mapper.settle(slot.index)  # its old pages' queued unmaps land before it is written
        self.owned[seq.seq_id] = slot
        self.sequences[seq.seq_id] = seq
        self.sharing.start(seq.seq_id)
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += hit
        if self.tiers is not None and reuse:
            hit = self.tiers.extend_prefix(seq, slot, hit)  # the chain goes on in the tiers
            self.tiers.emit_events()
        return hit

    # --- prefix-cache tiers (kvmem.memory.tiers) ----------------------------------------
    def attach_tiers(self, store) -> None:
        from kvmem.memory.tiers.virtual_link import VirtualTierLink

        if not self.enable_prefix_caching:
            raise ValueError("kv_offload_memory / kv_offload_dir keep prefix-cache blocks: they need "
                             "enable_prefix_caching")
        self.tiers = VirtualTierLink(self, store, self.options.block_size)

    def _pick_slot(self, seq: SequenceView) -> tuple[Slot, int]:
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

    def _best_fit(self, seq: SequenceView) -> Slot:
        """The free slot with the fewest mapped chunks that still cover the sequence, else the one
        with the most (deferred reclamation: reuse mapped pages rather than map new ones)."""
        need = cdiv(seq.num_tokens, self.layout.page_tokens)
        fitting = [s for s in self.free_slots.values() if s.mapped_chunks >= need]
        if fitting:
            return min(fitting, key=lambda s: s.mapped_chunks)
        return max(self.free_slots.values(), key=lambda s: s.mapped_chunks)

    # --- sharing between running sequences ------------------------------------------------
    def _map_shared_prefix(self, slot: Slot, sources: list, seq: SequenceView) -> None:
        """Make chunks [0, len(sources)) of the free `slot` the pool's, promoting private donors
        first; whatever the slot held before is dropped (it was another sequence's)."""
        self.mapper.drain()  # no background map may race with the remapping below
        if self.events is not None:  # a running slot's private chunk turned shared, in place
            medium = medium_of(self.spec.device)
            for key, source in sources:
                if not isinstance(source, SharedChunk):
                    self.events.emit(ChunksShared(source[0].index, [key], medium, promoted=True))
        chunks = self.sharing.acquire(sources)  # held before the cut, which may drop the slot's old hold
        self._cut(slot, 0)
        self.sharing.map_into(slot, chunks)
        pt = self.layout.page_tokens
        self.holdings.extend(slot.index, [c.key for c in chunks], lambda i: seq.token_ids[i * pt:(i + 1) * pt])
        if self.events is not None and chunks:
            self.events.emit(ChunksShared(slot.index, [c.key for c in chunks], medium_of(self.spec.device)))

    def _first_shared_past(self, slot: Slot, hit: int) -> int:
        """The first chunk position a sequence reusing `slot` with `hit` cached tokens would write
        into while it is shared (its tokens there are not all cached); mapped_chunks if none."""
        pt = self.layout.page_tokens
        past = [p for p in slot.shared if (p + 1) * pt > hit]
        return min(past) if past else slot.mapped_chunks

    def _cut(self, slot: Slot, position: int) -> None:
        """Unmap `slot` from chunk `position` on: shared chunks are dropped, private pages given back."""
        if self.tiers is not None and slot.cached_tokens and slot.index in self.free_slots:
            self.tiers.write_back(slot, position * self.layout.page_tokens)  # a free slot's prefix: keep it
        self.holdings.truncate(slot.index, position)
        if position >= slot.mapped_chunks:
            return
        private = sum(1 for p in range(position, slot.mapped_chunks) if p not in slot.shared)
        gone = []  # keys of shared chunks no slot maps any more
        for p in [p for p in slot.shared if p >= position]:
            key = slot.shared[p].key
            if self.sharing.unshare(slot, p):  # its last holder: the pool's pages went back
                self.mapped_chunks -= 1
                gone.append(key)
        if self.events is not None:
            medium = medium_of(self.spec.device)
            if private:
                self.events.emit(PagesUnmapped(slot.index, private, medium))
            if gone:
                self.events.emit(ChunksUnshared(gone, medium))
        # Release [position, mapped) at once: ranges of dropped shared chunks are already fresh
        # anonymous memory (on CUDA: already unmapped or retired), so releasing them again costs nothing.
        self.mapper.unmap_soon(slot.index, position, slot.mapped_chunks - position)
        if self.scales is not None:
            self.scales.release(slot.index, position * self.layout.page_tokens)
        self.mapped_chunks -= private
        slot.mapped_chunks = position

    def on_tokens_computed(self, seq: SequenceView) -> None:
        """Register the sequence's newly completed full chunks, so that others can share them."""
        if self.enable_prefix_caching:
            if self.tiers is not None:
                self.tiers.emit_events()  # what the tiers' threads did since
            slot = self.owned[seq.seq_id]
            self.sharing.on_tokens_computed(seq, slot)
            pt = self.layout.page_tokens
            self.holdings.extend(slot.index, self.sharing.chunk_keys[seq.seq_id],
                                 lambda i: seq.token_ids[i * pt:(i + 1) * pt])

    def set_event_sink(self, sink: EventSink | None) -> None:
        self.events = self.holdings.events = sink

    # --- growth -------------------------------------------------------------------------
    def _chunks_needed(self, seq: SequenceView, num_new_tokens: int) -> tuple[Slot | None, int]:
        slot = self.owned.get(seq.seq_id)
        need = cdiv(seq.num_computed_tokens + num_new_tokens, self.layout.page_tokens)
        return slot, need - (slot.mapped_chunks if slot else 0)

    def _reclaimable(self, keep: Slot | None = None) -> int:
        """Chunks that trimming free slots would give back: their private chunks, and the shared
        chunks that only free slots hold."""
        private = 0
        free_holds: dict[int, tuple[SharedChunk, int]] = {}  # id -> (chunk, free slots holding it)
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
            # Queued with background mapping on CPU (the step's first write faults it in), mapped
            # now where an unmapped page faults: Mapper.map_for_step.
            self._grow(slot, need, for_step=True)
        # Where unmapped pages fault, chunks this step uses that earlier steps' look-ahead queued
        # must have landed before it runs. This step's look-ahead, queued below, is not waited
        # for; readable_tokens() does not count it.
        self.mapper.wait_for_step(slot.index)
        # Look ahead: the whole rest of a known prompt (eager) plus a few tokens, mapped in the
        # background while this step computes. Only into free room: unmapping something for a
        # guess would cost the step (and, under pressure, churn against the next miss).
        ahead = self.options.lookahead_tokens
        if self.options.eager_mapping:
            ahead += max(seq.num_tokens - end, 0)
        target = min(cdiv(end + ahead, self.layout.page_tokens), self.layout.max_len // self.layout.page_tokens)
        target = min(target, slot.mapped_chunks + self.max_chunks - self.mapped_chunks)
        if target > slot.mapped_chunks:
            self._grow(slot, target, for_step=False)

    def _grow(self, slot: Slot, chunks: int, for_step: bool) -> None:
        """Map `slot` up to `chunks`: for the coming step (a miss), or ahead of need (look-ahead)."""
        first, count = slot.mapped_chunks, chunks - slot.mapped_chunks
        slot.mapped_chunks = chunks
        self.mapped_chunks += count
        if self.events is not None:
            self.events.emit(PagesMapped(slot.index, count, medium_of(self.spec.device)))
        (self.mapper.map_for_step if for_step else self.mapper.map_soon)(slot.index, first, count)

    def _make_room(self, chunks: int, keep: Slot | None) -> None:
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

    def _trim(self, slot: Slot) -> None:
        self._cut(slot, 0)
        slot.cached_tokens = None

    def free(self, seq: SequenceView) -> None:
        valid = self.tiers.cancel(seq) if self.tiers is not None else None  # freed while its blocks load
        slot = self.owned.pop(seq.seq_id, None)
        self.sequences.pop(seq.seq_id, None)
        self.sharing.forget(seq.seq_id, slot)  # a free slot may be overwritten: not a donor any more
        if slot is None:
            return
        slot.needed_chunks = 0
        computed = seq.num_computed_tokens if valid is None else min(valid, seq.num_computed_tokens)
        slot.cached_tokens = list(seq.token_ids[:computed]) if self.enable_prefix_caching and computed else None
        self.holdings.truncate(slot.index, computed // self.layout.page_tokens if slot.cached_tokens else 0)
        self.free_slots[slot.index] = slot  # most recently freed: trimmed last
        if not self.options.deferred_reclamation:
            self._trim(slot)

    def fork(self, parent: SequenceView, child: SequenceView) -> None:
        # The child waits for a slot of its own; at admission it shares the parent's full prompt
        # chunks (when prefix caching is on) and computes only the rest.
        child.num_computed_tokens = 0

    # --- accounting ---------------------------------------------------------------------
    def memory_map(self) -> dict:
        """One row per slot, one character per chunk (page set) of it: "." unmapped, "m" mapped for
        its running sequence, "s" mapped from the shared pool, "c" a free slot's leftover holding a
        reusable prefix, "r" mapped but idle (a running slot's look-ahead past what its sequence
        asked for, a free slot's tail past its prefix): kept by deferred reclamation, unmapped first
        under pressure. Each slot's owner (None: free) and tokens; the reserved address space beside
        the physical bytes."""
        per_slot = self.layout.max_len // self.chunk_tokens
        owner = {slot.index: sid for sid, slot in self.owned.items()}
        rows = []
        for slot in self.slots:
            sid = owner.get(slot.index)
            if sid is not None:
                live_chunks = slot.needed_chunks
            else:
                live_chunks = cdiv(len(slot.cached_tokens), self.chunk_tokens) if slot.cached_tokens else 0
            row = ["s" if i in slot.shared else ("m" if sid is not None else "c") if i < live_chunks else "r"
                   for i in range(slot.mapped_chunks)] + ["."] * (per_slot - slot.mapped_chunks)
            rows.append({"seq": sid, "pages": "".join(row),
                         "live": self.sequences[sid].num_computed_tokens if sid is not None else 0,
                         "cached": slot.cached_tokens is not None and sid is None})
        codes = "".join(r["pages"] for r in rows)
        return {"strategy": self.name, "kind": "slots_pages", "chunk_tokens": self.chunk_tokens,
                "chunk_bytes": self.chunk_set_bytes, "slots": rows,
                "reserved_bytes": self.layout.total_bytes, "physical_bytes": self.mapped_chunks * self.chunk_set_bytes,
                "counts": {"mapped": self.mapped_chunks, "budget": self.max_chunks, "shared": len(self.shared_by_key),
                           "cached": codes.count("c"), "idle": codes.count("r")},
                **({} if self.tiers is None else {"tiers": self.tiers.occupancy()})}

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
        extra.update(self.memory.extra_stats())  # CUDA: device memory held beyond the mapped pages
        if self.tiers is not None:
            extra["kv_offload"] = self.tiers.stats()
        return MemoryStats(
            strategy=self.name,
            bytes_reserved=self.layout.total_bytes + (0 if self.scales is None else self.scales.memory.size),
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
        """Physical KV bytes as the kernel (or the CUDA driver) reports them, once every queued map
        has run, a shared page once: what the manager's `bytes_physical` must agree with. On CPU
        mincore, or with a shared pool smaps `Anonymous` + the pool's st_blocks; on CUDA the
        distinct handles the driver has mapped, once retired pages are unmapped
        (`VirtualMemoryBackend.physical_bytes`)."""
        self.mapper.drain()
        scales = 0 if self.scales is None else self.scales.memory.resident_bytes()
        return self.memory.physical_bytes(self.pool) + scales

    def close(self) -> None:
        """Stop the mapping worker and unmap the reservation (tensors still viewing it read zeros on
        CPU; on CUDA they must not be read at all: their pages are unmapped)."""
        if self.tiers is not None:
            tiers, self.tiers = self.tiers, None
            self.mapper.drain()
            tiers.close()  # what the free slots still cache goes down to the tiers first
        self.mapper.close()
        # Our own view first: with no live view left, the reservation is unmapped at once rather
        # than only emptied (see CpuVirtualMemory.close). Idempotent: a second close finds nothing.
        self.kv = None
        self.memory.close()
        self.sharing.close()
        if self.scales is not None:
            self.scales.close()

    def release_free_memory(self) -> int:
        """Unmap every idle page: free slots' (deferred reclamation's keep, cached prefixes) and
        running slots' mapped past what their sequences asked for (look-ahead)."""
        before = self.mapped_chunks
        handing_down = self.tiers.store.waiting_writes() if self.tiers is not None else contextlib.nullcontext()
        with self.holdings.coalesced(), handing_down:  # each block written back first, none dropped
            for slot in list(self.free_slots.values()):
                if slot.mapped_chunks:
                    self._trim(slot)
            for slot in list(self.owned.values()):
                if slot.excess_chunks:
                    self._cut(slot, slot.needed_chunks)
        self.memory.trim_pool()  # CUDA: unmapped pages went to the idle handle pool; give it to the device
        return (before - self.mapped_chunks) * self.chunk_set_bytes
