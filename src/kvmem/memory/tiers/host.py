"""The host-memory tier: a preallocated buffer of block-sized slots, least recently used first out.

One uint8 tensor `[num_slots, block_nbytes]` taken at start (pinned on CUDA, so device<->host copies
run at full link speed), so the tier's memory is fixed and counted once: it never grows with
traffic. `slots` maps a block hash to its slot in LRU order (oldest first). Used on the engine
thread only (the writer thread never touches it: what it writes to disk is a copy).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from kvmem.memory.block_pool import BlockHash


class HostTier:
    medium = "CPU"  # vLLM's name of host memory in KV events (its CPU offloading connector's)

    def __init__(self, capacity_bytes: int, block_nbytes: int, pin: bool = False) -> None:
        num_slots = capacity_bytes // block_nbytes
        if num_slots < 1:
            raise ValueError(f"kv_offload_memory ({capacity_bytes} bytes) holds no KV block ({block_nbytes} bytes)")
        self.block_nbytes = block_nbytes
        self.buffer = torch.zeros((num_slots, block_nbytes), dtype=torch.uint8, pin_memory=pin)
        self.slots: OrderedDict[BlockHash, int] = OrderedDict()
        self.free_slots: list[int] = list(range(num_slots - 1, -1, -1))
        # Keys being loaded back right now: a store that must make room while they are (the load's own
        # allocations write back other blocks) never evicts them.
        self.pinned: set[BlockHash] = set()

    @property
    def num_slots(self) -> int:
        return self.buffer.shape[0]

    @property
    def capacity_bytes(self) -> int:
        return self.buffer.nbytes

    @property
    def used_bytes(self) -> int:
        return len(self.slots) * self.block_nbytes

    def __contains__(self, key: BlockHash) -> bool:
        return key in self.slots

    def touch(self, key: BlockHash) -> bool:
        """Mark `key` most recently used; False when it is not here."""
        if key not in self.slots:
            return False
        self.slots.move_to_end(key)
        return True

    def get(self, key: BlockHash) -> torch.Tensor | None:
        """The slot holding `key` (a view: valid until the next `reserve`), made most recent."""
        slot = self.slots.get(key)
        if slot is None:
            return None
        self.slots.move_to_end(key)
        return self.buffer[slot]

    def reserve(self, key: BlockHash) -> tuple[torch.Tensor, tuple[BlockHash, torch.Tensor] | None] | None:
        """A slot for `key` (which must not be here), and the (key, bytes) it evicted to make room, if
        any: those bytes are a copy, since the slot is about to be overwritten. None when every slot
        is pinned (the block is then not kept here)."""
        assert key not in self.slots
        evicted = None
        if self.free_slots:
            slot = self.free_slots.pop()
        else:
            old_key = next((k for k in self.slots if k not in self.pinned), None)
            if old_key is None:
                return None
            slot = self.slots.pop(old_key)
            evicted = (old_key, self.buffer[slot].clone())
        self.slots[key] = slot
        return self.buffer[slot], evicted

    def discard(self, key: BlockHash) -> None:
        slot = self.slots.pop(key, None)
        if slot is not None:
            self.free_slots.append(slot)

    def clear(self) -> list[BlockHash]:
        keys = list(self.slots)
        for key in keys:
            self.discard(key)
        return keys
