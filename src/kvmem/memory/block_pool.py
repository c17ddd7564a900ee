"""A pool of fixed-size KV blocks with reference counts and a prefix cache (vLLM v1's block_pool).

Blocks are identified by integer ids; the pool knows nothing about tensors. Free blocks wait in
one queue in eviction order: blocks that hold no cached prefix sit at the front (used first), freed
blocks that hold a cached prefix go to the back, so cached prefixes are evicted least recently
used first. A free cached block can be revived by a prefix hit until it is handed out again.

Invariants (checked by `check_invariants`, exercised by property tests):
- a block is either free (ref_count 0, in the free queue) or held (ref_count > 0, not in it);
- `cached_blocks[h].block_hash == h` and a hash maps to exactly one block.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmem.memory.events import EventSink

BlockHash = bytes


def hash_block(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Hash of a full block: chains the parent's hash, so equal hashes mean equal whole prefixes.

    sha256 rather than Python's hash(): collisions would silently serve another prompt's KV.
    """
    h = hashlib.sha256(parent_hash or b"kvmem-root")
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.digest()


@dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached_blocks: dict[BlockHash, KVBlock] = {}
        # Where evictions are reported (kvmem.memory.events); the manager sets both.
        self.events: EventSink | None = None
        self.medium = "CPU"
        # Called with (block_id, its hash) just before a cached block's prefix is dropped while its bytes
        # are still intact (the prefix-cache tiers copy it out: kvmem.memory.tiers); None: nobody.
        self.on_evict: Callable[[int, BlockHash], None] | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (including evictable cached ones)."""
        return len(self.free_queue)

    @property
    def num_free_cached(self) -> int:
        return sum(1 for i in self.free_queue if self.blocks[i].block_hash is not None)

    def allocate(self) -> KVBlock:
        """Take the first free block; evicts its cached prefix, if any."""
        if not self.free_queue:
            raise RuntimeError("block pool exhausted (the caller must check num_free first)")
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if self.on_evict is not None and block.block_hash is not None:
            self.on_evict(block_id, block.block_hash)
        self._uncache(block)
        block.ref_count = 1
        return block

    def touch(self, block: KVBlock) -> None:
        """Add a holder to a block (a prefix hit or a fork); revives a free cached block."""
        if block.ref_count == 0:
            del self.free_queue[block.block_id]
        block.ref_count += 1

    def release(self, block: KVBlock) -> None:
        """Drop one holder; the last one returns the block to the free queue."""
        if block.ref_count <= 0:
            raise RuntimeError(f"block {block.block_id} released more often than held")
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block.block_id] = None
            if block.block_hash is None:
                self.free_queue.move_to_end(block.block_id, last=False)

    def lookup(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached_blocks.get(block_hash)

    def cache(self, block: KVBlock, block_hash: BlockHash) -> bool:
        """Register a held, full block under its hash; returns whether it was. A block with equal
        content already cached wins; this one then simply stays uncached."""
        if block.block_hash is not None or block_hash in self.cached_blocks:
            return False
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block
        return True

    def evict_cached(self) -> int:
        """Forget every cached prefix in free blocks; returns how many blocks that affected. Reported
        as one AllBlocksCleared when nothing cached is left, else as one BlockRemoved of them."""
        events, self.events = self.events, None  # one event for all of them, below
        removed: list[BlockHash] = []
        try:
            for block_id in list(self.free_queue):
                block = self.blocks[block_id]
                if block.block_hash is not None:
                    removed.append(block.block_hash)
                    if self.on_evict is not None:
                        self.on_evict(block_id, block.block_hash)
                    self._uncache(block)
                    self.free_queue.move_to_end(block_id, last=False)
        finally:
            self.events = events
        if events is not None and removed:
            from kvmem.memory.events import AllBlocksCleared, BlockRemoved

            events.emit(BlockRemoved(removed, self.medium) if self.cached_blocks else AllBlocksCleared(self.medium))
        return len(removed)

    def _uncache(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self.cached_blocks[block.block_hash]
            if self.events is not None:
                from kvmem.memory.events import BlockRemoved

                self.events.emit(BlockRemoved([block.block_hash], self.medium))
            block.block_hash = None

    def check_invariants(self) -> None:
        for block in self.blocks:
            in_free = block.block_id in self.free_queue
            assert block.ref_count >= 0, block
            assert in_free == (block.ref_count == 0), block
            if block.block_hash is not None:
                assert self.cached_blocks[block.block_hash] is block, block
        assert len(self.cached_blocks) == sum(b.block_hash is not None for b in self.blocks)
