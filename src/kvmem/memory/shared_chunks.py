"""shared_chunks: running sequences of `virtual` that share whole chunks of prompt share their
*physical* pages (beyond vAttention, which has no prefix sharing).

The donor's chunk is turned into a shared one in place (`copy_to_shared`: on CPU copied once into a
memfd and mapped back, on CUDA the pool adopts the driver page), then shown in the other slot too
(`map_shared`). Only computed, full chunks are shared, so nobody ever writes a shared page; the
first divergent chunk is private. Chunks are found by the same hash chain as paged's blocks (hash
of parent hash + tokens). The pool is laid out region-major with the same chunk index in every
region, so a run of shared chunks is one mapping per region; on CPU sharing stops before the
process nears the kernel's limit of mappings (vm.max_map_count): every (slot, region) with shared
chunks costs about two.

`SharedChunkPool` keeps the bookkeeping (which chunks are shared, by whom, which running slots'
private chunks could be); the manager decides when to share and counts physical chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kvmem.memory.base import NoFreeMemory, SequenceView
from kvmem.memory.block_pool import BlockHash, hash_block
from kvmem.memory.virtual_layout import SlotLayout
from kvmem.memory.vmm_backend import SharedPages, VirtualMemoryBackend

if TYPE_CHECKING:
    from kvmem.memory.virtual import Slot


@dataclass
class SharedChunk:
    """One chunk's pages in every region, in the shared pool at chunk index `index`."""

    index: int
    key: BlockHash
    refs: int = 0  # slots that map it


# Where a chunk's tokens can be found: a chunk already shared, or a running slot's private chunk
# (slot, chunk position) that can be promoted.
ChunkSource = SharedChunk | tuple["Slot", int]


class SharedChunkPool:
    """The chunks shared between running slots, and the running slots' computed full chunks that
    could be (`private_by_key`). A slot's shared chunks are in its `shared` dict (position ->
    chunk); `refs` counts the slots that map a chunk."""

    def __init__(self, memory: VirtualMemoryBackend, layout: SlotLayout, slot_offsets: Sequence[np.ndarray],
                 num_chunks: int, slots: Sequence[Slot]) -> None:
        self.memory = memory
        self.layout = layout
        self.slot_offsets = slot_offsets  # the mapper's: byte offset of each slot in every region
        self.slots = slots
        self.chunk_pages = layout.chunk_bytes // memory.page_size
        self.pages: SharedPages | None = None  # the backend's pool, made on first use
        self.num_chunks = num_chunks  # chunk indices in the pool, laid out region-major
        self.by_key: dict[BlockHash, SharedChunk] = {}
        self.free_chunks = bytearray(b"\x01") * num_chunks
        self.private_by_key: dict[BlockHash, tuple[Slot, int]] = {}  # computed full chunks of running slots
        self.chunk_keys: dict[int, list[BlockHash]] = {}  # seq_id -> keys of its computed full chunks
        limit = memory.mapping_limit()
        self.max_sharing_slots = len(slots) if limit is None else limit // (3 * layout.num_regions)

    # --- finding ----------------------------------------------------------------------------
    def find(self, seq: SequenceView) -> list[tuple[BlockHash, ChunkSource]]:
        """For each leading full chunk of `seq`'s tokens (the last token excluded), its key and an
        existing shared chunk or a running slot's private chunk with the same tokens; stops at the
        first chunk found nowhere."""
        pt = self.layout.page_tokens
        found: list = []
        parent = None
        for i in range((seq.num_tokens - 1) // pt):
            key = hash_block(parent, seq.token_ids[i * pt:(i + 1) * pt])
            source = self.by_key.get(key) or self.private_by_key.get(key)
            if source is None:
                break
            found.append((key, source))
            parent = key
        return found

    def may_share(self) -> bool:
        """Whether one more slot may map shared chunks without nearing the mapping limit."""
        return sum(1 for s in self.slots if s.shared) < self.max_sharing_slots

    # --- the sequences' computed chunks -----------------------------------------------------
    def start(self, seq_id: int) -> None:
        self.chunk_keys[seq_id] = []

    def on_tokens_computed(self, seq: SequenceView, slot: Slot) -> None:
        """Register the sequence's newly completed full chunks, so that others can share them."""
        keys = self.chunk_keys[seq.seq_id]
        pt = self.layout.page_tokens
        for i in range(len(keys), seq.num_computed_tokens // pt):
            key = hash_block(keys[-1] if keys else None, seq.token_ids[i * pt:(i + 1) * pt])
            keys.append(key)
            if i not in slot.shared and key not in self.by_key:
                self.private_by_key.setdefault(key, (slot, i))

    def forget(self, seq_id: int, slot: Slot | None) -> None:
        """The sequence left `slot`: its private chunks are no donors any more (a free slot may be
        overwritten)."""
        for key in self.chunk_keys.pop(seq_id, []):
            if self.private_by_key.get(key, (None,))[0] is slot:
                del self.private_by_key[key]

    # --- sharing ----------------------------------------------------------------------------
    def acquire(self, sources: list[tuple[BlockHash, ChunkSource]]) -> list[SharedChunk]:
        """The shared chunks for `sources`, promoting private donors first, each held once more
        (by the slot about to map them)."""
        chunks = [source if isinstance(source, SharedChunk) else self.promote(key, *source)
                  for key, source in sources]
        for chunk in chunks:
            chunk.refs += 1
        return chunks

    def map_into(self, slot: Slot, chunks: list[SharedChunk]) -> None:
        """Show `chunks` as chunks [0, len(chunks)) of `slot`, which holds nothing mapped (cut)."""
        for position, chunk in enumerate(chunks):
            for offset, page in zip(self._chunk_offsets(slot, position), self._pool_pages(chunk)):
                self.memory.map_shared(offset, self.pages, page, self.chunk_pages)
            slot.shared[position] = chunk
        slot.mapped_chunks = len(chunks)

    def promote(self, key: BlockHash, donor: Slot, position: int) -> SharedChunk:
        """Turn a running slot's private chunk into a shared one, in place: copy its pages into the
        pool and map the pool pages where they were. What the donor reads does not change. (On CUDA
        nothing is copied: the pool adopts the physical pages already mapped there.)"""
        if self.pages is None:
            self.pages = self.memory.shared_pool(self.layout.num_regions * self.num_chunks * self.chunk_pages)
        index = self.free_chunks.find(1)
        if index < 0:  # cannot happen while the pool has one chunk index per budget chunk
            raise NoFreeMemory("shared chunk pool full")
        self.free_chunks[index] = 0
        chunk = SharedChunk(index, key, refs=1)
        for offset, page in zip(self._chunk_offsets(donor, position), self._pool_pages(chunk)):
            self.pages.alloc_at(page, self.chunk_pages)
            self.memory.copy_to_shared(offset, self.pages, page, self.chunk_pages)
        del self.private_by_key[key]
        self.by_key[key] = chunk
        donor.shared[position] = chunk  # its private pages were replaced by the pool's: count moves
        return chunk

    def unshare(self, slot: Slot, position: int) -> bool:
        """Drop `slot`'s mapping of a shared chunk (the range reads zero again); the last holder's
        drop gives the pool pages back, and returns True: one physical chunk fewer."""
        chunk = slot.shared.pop(position)
        for offset in self._chunk_offsets(slot, position):
            self.memory.unmap_shared(offset, self.chunk_pages)
        chunk.refs -= 1
        if chunk.refs:
            return False
        for page in self._pool_pages(chunk):
            self.pages.free_run(page, self.chunk_pages)
        self.free_chunks[chunk.index] = 1
        del self.by_key[chunk.key]
        return True

    def close(self) -> None:
        if self.pages is not None:
            self.pages.close()

    def _chunk_offsets(self, slot: Slot, position: int) -> list[int]:
        return (self.slot_offsets[slot.index] + position * self.layout.chunk_bytes).tolist()

    def _pool_pages(self, chunk: SharedChunk) -> range:
        """First pool page of the chunk in each region: region-major, so that consecutive chunk
        indices are consecutive pages of one region (one mapping for a run of shared chunks)."""
        per_region = self.num_chunks * self.chunk_pages
        return range(chunk.index * self.chunk_pages, self.layout.num_regions * per_region, per_region)
