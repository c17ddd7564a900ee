"""static: the max-length reservation baseline (Orca / FasterTransformer style).

Every admitted sequence takes one contiguous slot of `max_model_len` tokens, whatever its actual
length: the memory the papers show going to waste. In the shared addressing this is a block of
`max_model_len` tokens, so the block table of a sequence is just `[slot]`.
There is no sharing: a forked sample recomputes its prompt in its own slot.
"""

from __future__ import annotations

import torch

from kvmem.memory.base import KVCacheManager, KVCacheSpec, MemoryStats, NoFreeMemory, SequenceView, StrategyOptions


class StaticKVCacheManager(KVCacheManager):
    name = "static"

    def __init__(self, spec: KVCacheSpec, num_slots: int, max_model_len: int) -> None:
        if num_slots < 1:
            raise ValueError(f"the KV budget holds no slot of max_model_len={max_model_len} tokens")
        self.spec = spec
        self.block_size = max_model_len
        shape = (spec.num_layers, 2, spec.num_kv_heads, num_slots, max_model_len, spec.head_dim)
        self.kv = torch.zeros(shape, dtype=spec.storage_dtype, device=spec.device)
        # int8: a scale per (token, KV head) beside each slot (kvmem.attention.kv_quant).
        self.kv_scales = torch.zeros(shape[:-1], dtype=torch.float32, device=spec.device) if spec.has_scales else None
        self.free_slots = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.slots: dict[int, int] = {}  # seq_id -> slot
        self.sequences: dict[int, SequenceView] = {}
        self.pending_copies: list[tuple[int, int]] = []

    @classmethod
    def from_budget(cls, spec: KVCacheSpec, budget_bytes: int, max_model_len: int,
                    options: StrategyOptions) -> StaticKVCacheManager:
        num_slots = budget_bytes // (max_model_len * spec.bytes_per_token)
        if num_slots == 0:  # the budget holds less than one full-length sequence: shorten it
            max_model_len = budget_bytes // spec.bytes_per_token
            num_slots = 1
        if max_model_len < 2:
            raise ValueError(f"kv_cache_memory ({budget_bytes} bytes) holds no sequence "
                             f"({spec.bytes_per_token} bytes per token)")
        return cls(spec, num_slots, max_model_len)

    @property
    def max_tokens_per_sequence(self) -> int:
        return self.block_size

    def layer_cache(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[layer_idx, 0], self.kv[layer_idx, 1]

    def layer_scales(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.kv_scales is None else (self.kv_scales[layer_idx, 0], self.kv_scales[layer_idx, 1])

    def block_table(self, seq: SequenceView) -> list[int]:
        return [self.slots[seq.seq_id]]

    def can_allocate(self, seq: SequenceView, num_new_tokens: int) -> bool:
        if seq.num_computed_tokens + num_new_tokens > self.block_size:
            return False
        return seq.seq_id in self.slots or bool(self.free_slots)

    def allocate(self, seq: SequenceView, num_new_tokens: int) -> None:
        if not self.can_allocate(seq, num_new_tokens):
            raise NoFreeMemory(f"no free slot for sequence {seq.seq_id}")
        if seq.seq_id not in self.slots:
            self.slots[seq.seq_id] = self.free_slots.pop()
            self.sequences[seq.seq_id] = seq

    def fork(self, parent: SequenceView, child: SequenceView) -> None:
        child.num_computed_tokens = 0  # no sharing: the child prefills its own slot

    def free(self, seq: SequenceView) -> None:
        slot = self.slots.pop(seq.seq_id, None)
        if slot is not None:
            self.free_slots.append(slot)
            del self.sequences[seq.seq_id]

    def memory_map(self) -> dict:
        """One entry per slot: its owner (None: free) and the tokens it holds out of `slot_tokens`
        reserved."""
        owner = {slot: sid for sid, slot in self.slots.items()}
        slots = [{"seq": owner.get(i), "live": self.sequences[owner[i]].num_computed_tokens if i in owner else 0}
                 for i in range(self.kv.shape[3])]
        return {"strategy": self.name, "kind": "slots", "slot_tokens": self.block_size,
                "slot_bytes": self.block_size * self.spec.bytes_per_token, "slots": slots,
                "counts": {"used": len(self.slots), "free": len(self.free_slots)}}

    def stats(self) -> MemoryStats:
        slot_bytes = self.block_size * self.spec.bytes_per_token
        total = self.kv.nbytes + (0 if self.kv_scales is None else self.kv_scales.nbytes)
        live = sum(s.num_computed_tokens for s in self.sequences.values())
        return MemoryStats(
            strategy=self.name,
            bytes_reserved=total,
            bytes_physical=total,
            bytes_allocated=len(self.slots) * slot_bytes,
            bytes_live=live * self.spec.bytes_per_token,
            bytes_cached=0,
            num_sequences=len(self.slots),
        )
