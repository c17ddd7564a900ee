"""virtual: vAttention's KV cache (arXiv 2405.04437) — contiguous in virtual memory, physical
pages mapped on demand.

Every sequence owns a *slot*: for each (layer, K/V, kv head) a contiguous `[max_len, head_dim]`
range of one big virtual reservation. Nothing is physically backed until the manager maps it, a
page at a time, as the sequence grows; attention then reads `cache[head, slot, :len]` in place with
ordinary non-paged kernels (no block table, no gather).

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
   slot whose mapped pages fit it best; pages go back only under memory pressure or on
   `release_free_memory()`;
3. eager mapping: a prompt's whole known length (plus the look-ahead) is mapped at admission.

Prefix reuse (beyond the paper): a free slot still holds the KV of the tokens its last sequence
computed. A new (or preempted and resumed) sequence whose tokens start the same way takes that slot
and skips those tokens — a prefix cache made of whole slots, found by longest common prefix.

The CPU backend (`vmm_cpu.CpuVirtualMemory`) maps with madvise(MADV_POPULATE_WRITE) and returns
pages with madvise(MADV_DONTNEED); `kernel_resident_bytes()` asks the kernel (mincore) what is
really backed, which the tests hold against the manager's own count.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvmem.memory.base import KVCacheManager, KVCacheSpec, MemoryStats, NoFreeMemory

if TYPE_CHECKING:
    from kvmem.engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class VirtualOptions:
    """vAttention's optimizations, each of which can be turned off to measure what it buys."""

    background_mapping: bool = True
    deferred_reclamation: bool = True
    eager_mapping: bool = True
    lookahead_tokens: int = 8  # map this far past what the current step needs


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

    The worker only ever *maps* (populate). Unmapping zeroes pages, so it must not race with a
    later owner's writes: it always runs on the caller's thread, after the worker has drained.
    On CPU a page that the model writes before the worker got to it is simply faulted in by the
    kernel, so a late background map costs time, never correctness.
    """

    def __init__(self, memory, layout: VirtualLayout, background: bool) -> None:
        self.memory = memory
        self.layout = layout
        self.offsets = [layout.slot_offsets(s) for s in range(layout.num_slots)]
        self.critical_seconds = 0.0  # mapping time spent inside allocate(), i.e. on the step's path
        self.background_seconds = 0.0
        self.num_map_calls = 0
        self._jobs: queue.SimpleQueue | None = None
        if background:
            self._jobs = queue.SimpleQueue()
            self._idle = threading.Condition()
            self._pending = 0
            threading.Thread(target=self._work, name="kvmem-vmm-mapper", daemon=True).start()

    def _populate(self, slot: int, first_chunk: int, num_chunks: int) -> float:
        start = time.perf_counter()
        chunk = self.layout.chunk_bytes
        self.memory.populate_many(self.offsets[slot] + first_chunk * chunk, num_chunks * chunk)
        self.num_map_calls += 1
        return time.perf_counter() - start

    def map_now(self, slot: int, first_chunk: int, num_chunks: int) -> None:
        self.critical_seconds += self._populate(slot, first_chunk, num_chunks)

    def map_soon(self, slot: int, first_chunk: int, num_chunks: int) -> None:
        if self._jobs is None:
            self.map_now(slot, first_chunk, num_chunks)
            return
        with self._idle:
            self._pending += 1
        self._jobs.put((slot, first_chunk, num_chunks))

    def unmap(self, slot: int, first_chunk: int, num_chunks: int) -> None:
        self.drain()
        chunk = self.layout.chunk_bytes
        self.memory.release_many(self.offsets[slot] + first_chunk * chunk, num_chunks * chunk)

    def drain(self) -> None:
        """Wait until every queued map is done."""
        if self._jobs is None:
            return
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)

    def _work(self) -> None:
        while True:
            slot, first, num = self._jobs.get()
            try:
                self.background_seconds += self._populate(slot, first, num)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()


@dataclass
class _Slot:
    index: int
    mapped_chunks: int = 0
    cached_tokens: list[int] | None = None  # a free slot: the tokens whose KV it still holds


class VirtualKVCacheManager(KVCacheManager):
    name = "virtual"
    contiguous_slots = True  # attention reads cache[:, slot, :len] in place, never past len

    def __init__(self, spec: KVCacheSpec, num_slots: int, max_model_len: int, physical_budget_bytes: int,
                 options: VirtualOptions | None = None, enable_prefix_caching: bool = True) -> None:
        if spec.device.type != "cpu":
            raise ValueError("kv_cache='virtual' on CUDA needs the driver VMM backend, which is not built yet; "
                             "use kv_cache='paged' on CUDA")
        from kvmem.memory.vmm_cpu import PAGE_SIZE, CpuVirtualMemory

        self.spec = spec
        self.options = options or VirtualOptions()
        self.enable_prefix_caching = enable_prefix_caching
        self.layout = VirtualLayout.build(spec, num_slots, max_model_len, PAGE_SIZE)
        self.block_size = self.layout.max_len
        self.chunk_set_bytes = self.layout.chunk_bytes * self.layout.num_regions  # one chunk in every region
        self.max_chunks = physical_budget_bytes // self.chunk_set_bytes
        if self.max_chunks < 1:
            raise ValueError(f"kv_cache_memory ({physical_budget_bytes} bytes) holds less than one mapping chunk "
                             f"({self.layout.page_tokens} tokens = {self.chunk_set_bytes} bytes)")
        self.memory = CpuVirtualMemory(self.layout.total_bytes)  # VirtualMemoryError (a ValueError) if refused
        self.kv = self.memory.tensor(spec.dtype, self.layout.shape)
        self.mapper = _Mapper(self.memory, self.layout, self.options.background_mapping)
        self.slots = [_Slot(i) for i in range(num_slots)]
        # Free slots, least recently freed first: trimmed in that order under memory pressure.
        self.free_slots: OrderedDict[int, _Slot] = OrderedDict((s.index, s) for s in self.slots)
        self.owned: dict[int, _Slot] = {}  # seq_id -> slot
        self.sequences: dict[int, Sequence] = {}
        self.mapped_chunks = 0  # over all slots, free ones included
        self.pending_copies: list[tuple[int, int]] = []
        self.prefix_queries = 0
        self.prefix_hits = 0

    # --- addressing ---------------------------------------------------------------------
    @property
    def max_tokens_per_sequence(self) -> int:
        return min(self.layout.max_len, self.max_chunks * self.layout.page_tokens)

    def layer_cache(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[layer_idx, 0], self.kv[layer_idx, 1]

    def block_table(self, seq: Sequence) -> list[int]:
        return [self.owned[seq.seq_id].index]

    # --- admission ----------------------------------------------------------------------
    def admit(self, seq: Sequence) -> int:
        """Take a free slot: the one holding the longest prefix of `seq`'s tokens, else the one
        whose mapped pages best fit the prompt. Returns the tokens found cached. With no free slot
        (every one held by a running sequence) it takes none, and can_allocate() says no."""
        assert seq.seq_id not in self.owned, "admit() on a sequence that already holds a slot"
        if not self.free_slots:
            return 0
        slot, hit = self._pick_slot(seq)
        del self.free_slots[slot.index]
        slot.cached_tokens = None
        self.owned[seq.seq_id] = slot
        self.sequences[seq.seq_id] = seq
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += hit
        return hit

    def _pick_slot(self, seq: Sequence) -> tuple[_Slot, int]:
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
        need = cdiv(seq.num_tokens, self.layout.page_tokens)
        fitting = [s for s in self.free_slots.values() if s.mapped_chunks >= need]
        if fitting:
            return min(fitting, key=lambda s: s.mapped_chunks), 0
        return max(self.free_slots.values(), key=lambda s: s.mapped_chunks), 0

    # --- growth -------------------------------------------------------------------------
    def _chunks_needed(self, seq: Sequence, num_new_tokens: int) -> tuple[_Slot | None, int]:
        slot = self.owned.get(seq.seq_id)
        need = cdiv(seq.num_computed_tokens + num_new_tokens, self.layout.page_tokens)
        return slot, need - (slot.mapped_chunks if slot else 0)

    def _reclaimable(self, keep: _Slot | None = None) -> int:
        return sum(s.mapped_chunks for s in self.free_slots.values() if s is not keep)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        slot, missing = self._chunks_needed(seq, num_new_tokens)
        if seq.num_computed_tokens + num_new_tokens > self.layout.max_len:
            return False
        if slot is None and not self.free_slots:
            return False
        if slot is None:  # it will take the best-fitting free slot; count that slot's pages as its own
            return missing <= self.max_chunks - self.mapped_chunks + self._reclaimable()
        return missing <= self.max_chunks - self.mapped_chunks + self._reclaimable(keep=slot)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        if not self.can_allocate(seq, num_new_tokens):
            raise NoFreeMemory(f"no room for {num_new_tokens} tokens of sequence {seq.seq_id}")
        if seq.seq_id not in self.owned:
            self.admit(seq)  # a caller that skipped admit(): take a slot, ignore any cached prefix
        slot = self.owned[seq.seq_id]
        self.sequences[seq.seq_id] = seq
        end = seq.num_computed_tokens + num_new_tokens
        need = cdiv(end, self.layout.page_tokens)
        if need > slot.mapped_chunks:  # a miss: this step writes pages not mapped yet
            self._make_room(need - slot.mapped_chunks, keep=slot)
            self._grow(slot, need, now=True)
        # Look ahead: the whole rest of a known prompt (eager) plus a few tokens, mapped in the
        # background while this step computes. Only with free room: never trims for a guess.
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

    def _make_room(self, chunks: int, keep: _Slot) -> None:
        """Trim free slots, least recently freed first, until `chunks` more fit the budget."""
        for slot in list(self.free_slots.values()):
            if self.mapped_chunks + chunks <= self.max_chunks:
                return
            if slot is not keep and slot.mapped_chunks:
                self._trim(slot)

    def _trim(self, slot: _Slot) -> None:
        self.mapper.unmap(slot.index, 0, slot.mapped_chunks)
        self.mapped_chunks -= slot.mapped_chunks
        slot.mapped_chunks = 0
        slot.cached_tokens = None

    def free(self, seq: Sequence) -> None:
        slot = self.owned.pop(seq.seq_id, None)
        self.sequences.pop(seq.seq_id, None)
        if slot is None:
            return
        computed = seq.num_computed_tokens
        slot.cached_tokens = list(seq.token_ids[:computed]) if self.enable_prefix_caching and computed else None
        self.free_slots[slot.index] = slot  # most recently freed: trimmed last
        if not self.options.deferred_reclamation:
            self._trim(slot)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        child.num_computed_tokens = 0  # a slot is private: the child computes its prompt in its own

    # --- accounting ---------------------------------------------------------------------
    def stats(self) -> MemoryStats:
        per_chunk = self.chunk_set_bytes
        allocated = sum(s.mapped_chunks for s in self.owned.values())
        cached = sum(s.mapped_chunks for s in self.free_slots.values())
        live = sum(s.num_computed_tokens for s in self.sequences.values())
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
            extra={"page_tokens": self.layout.page_tokens, "map_calls": self.mapper.num_map_calls,
                   "map_seconds_critical": self.mapper.critical_seconds,
                   "map_seconds_background": self.mapper.background_seconds},
        )

    def kernel_resident_bytes(self) -> int:
        """Physical bytes under the reservation as the kernel reports them (mincore), once every
        queued map has run: what the manager's `bytes_physical` must agree with."""
        self.mapper.drain()
        return self.memory.resident_bytes()

    def release_free_memory(self) -> int:
        """Unmap every free slot's pages (deferred reclamation's keep, and cached prefixes)."""
        released = 0
        for slot in self.free_slots.values():
            if slot.mapped_chunks:
                released += slot.mapped_chunks * self.chunk_set_bytes
                self._trim(slot)
        return released
