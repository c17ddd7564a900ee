"""paged: PagedAttention's KV cache (vLLM, SOSP'23) with vLLM v1's prefix caching.

KV lives in fixed blocks of `block_size` tokens taken from a `BlockPool`; each sequence has a block
table. A full block is registered in the prefix cache under hash(parent hash, its token ids), so a
later sequence with the same prefix takes the block instead of recomputing it. Forked sequences
(n > 1) share every block; the partial last block is copied when one of them first writes to it.
"""

from __future__ import annotations

import torch

from kvmem.memory.base import (
    KVCacheManager, KVCacheSpec, MemoryStats, NoFreeMemory, SequenceView, StrategyOptions, cdiv,
)
from kvmem.memory.block_pool import BlockHash, BlockPool, KVBlock, hash_block
from kvmem.memory.events import BlockStored, EventSink, medium_of


class PagedKVCacheManager(KVCacheManager):
    name = "paged"

    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int = 16,
                 enable_prefix_caching: bool = True) -> None:
        self.spec = spec
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.pool.medium = medium_of(spec.device)
        # zeros, not empty: every page is touched now, so physical memory = reserved, as on a GPU.
        shape = (spec.num_layers, 2, spec.num_kv_heads, num_blocks, block_size, spec.head_dim)
        self.kv = torch.zeros(shape, dtype=spec.storage_dtype, device=spec.device)
        # int8: a scale per (token, KV head), in the blocks' addressing (kvmem.attention.kv_quant).
        self.kv_scales = torch.zeros(shape[:-1], dtype=torch.float32, device=spec.device) if spec.has_scales else None
        self.tables: dict[int, list[KVBlock]] = {}
        self.sequences: dict[int, SequenceView] = {}  # holders of the tables, for live-token accounting
        self.hashes: dict[int, list[BlockHash]] = {}  # hashes of each sequence's full, computed blocks
        self.pending_copies: list[tuple[int, int]] = []
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.tiers = None  # PagedTierLink: the prefix-cache tiers below the budget (attach_tiers)

    @classmethod
    def from_budget(cls, spec: KVCacheSpec, budget_bytes: int, max_model_len: int,
                    options: StrategyOptions) -> PagedKVCacheManager:
        num_blocks = budget_bytes // (options.block_size * spec.bytes_per_token)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory ({budget_bytes} bytes) holds no KV block of {options.block_size} "
                             f"tokens ({options.block_size * spec.bytes_per_token} bytes)")
        return cls(spec, num_blocks, options.block_size, options.enable_prefix_caching)

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.spec.bytes_per_token

    @property
    def max_tokens_per_sequence(self) -> int:
        return self.pool.num_blocks * self.block_size

    def layer_cache(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[layer_idx, 0], self.kv[layer_idx, 1]

    def layer_scales(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.kv_scales is None else (self.kv_scales[layer_idx, 0], self.kv_scales[layer_idx, 1])

    @property
    def nbytes(self) -> int:
        """The KV tensor and its scales."""
        return self.kv.nbytes + (0 if self.kv_scales is None else self.kv_scales.nbytes)

    def block_table(self, seq: SequenceView) -> list[int]:
        return [b.block_id for b in self.tables.get(seq.seq_id, ())]

    @property
    def prefix_id_tokens(self) -> int:
        return self.block_size

    def shared_prefix_ids(self, seq: SequenceView) -> list[int]:
        """The block table: a block id is its memory (prefix caching shares blocks between sequences)."""
        return self.block_table(seq)

    # --- prefix cache -------------------------------------------------------------------
    def admit(self, seq: SequenceView, reuse_prefix: bool = True) -> int:
        assert seq.seq_id not in self.tables, "admit() on a sequence that already holds blocks"
        table: list[KVBlock] = []
        hashes: list[BlockHash] = []
        if self.enable_prefix_caching and reuse_prefix:
            # At least the last token must be computed to produce logits, so only blocks that
            # lie entirely within the first num_tokens - 1 tokens can be hits.
            num_full = (seq.num_tokens - 1) // self.block_size
            parent = None
            for i in range(num_full):
                h = hash_block(parent, seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
                block = self.pool.lookup(h)
                if block is None:
                    break
                self.pool.touch(block)
                table.append(block)
                hashes.append(h)
                parent = h
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += len(table) * self.block_size
        self.tables[seq.seq_id] = table
        self.hashes[seq.seq_id] = hashes
        self.sequences[seq.seq_id] = seq
        if self.tiers is not None and self.enable_prefix_caching and reuse_prefix:
            stored = self.tiers.extend_prefix(seq, table, hashes, num_full)  # the chain goes on in the tiers
            if self.events is not None and stored:
                self._emit_stored(seq, hashes, stored)
            self.tiers.emit_events()
        return len(table) * self.block_size

    # --- prefix-cache tiers (kvmem.memory.tiers) ----------------------------------------
    def attach_tiers(self, store) -> None:
        from kvmem.memory.tiers.paged_link import PagedTierLink

        if not self.enable_prefix_caching:
            raise ValueError("kv_offload_memory / kv_offload_dir keep prefix-cache blocks: they need "
                             "enable_prefix_caching")
        self.tiers = PagedTierLink(self, store)

    def set_event_sink(self, sink: EventSink | None) -> None:
        self.events = self.pool.events = sink  # stored here, evicted in the pool

    def on_tokens_computed(self, seq: SequenceView) -> None:
        if not self.enable_prefix_caching:
            return
        if self.tiers is not None:
            self.tiers.emit_events()  # what the tiers' threads did since
        table, hashes = self.tables[seq.seq_id], self.hashes[seq.seq_id]
        num_full = seq.num_computed_tokens // self.block_size
        stored: list[int] = []  # positions of the blocks cached now
        for i in range(len(hashes), num_full):
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            h = hash_block(hashes[-1] if hashes else None, tokens)
            if self.pool.cache(table[i], h):
                stored.append(i)
            hashes.append(h)
        if self.events is not None and stored:
            self._emit_stored(seq, hashes, stored)

    def _emit_stored(self, seq: SequenceView, hashes: list[BlockHash], positions: list[int]) -> None:
        """One BlockStored per run of consecutive blocks (a block whose content another one already
        caches stays uncached and breaks the run)."""
        bs = self.block_size
        start = 0
        for k in range(1, len(positions) + 1):
            if k == len(positions) or positions[k] != positions[k - 1] + 1:
                first, last = positions[start], positions[k - 1]
                self.events.emit(BlockStored(
                    block_hashes=hashes[first:last + 1], parent_block_hash=hashes[first - 1] if first else None,
                    token_ids=list(seq.token_ids[first * bs:(last + 1) * bs]), block_size=bs,
                    medium=self.pool.medium))
                start = k

    # --- growth -------------------------------------------------------------------------
    def _needs_copy_on_write(self, seq: SequenceView, table: list[KVBlock]) -> bool:
        """The next write lands in a partial last block that another sequence also holds."""
        return bool(table) and seq.num_computed_tokens % self.block_size != 0 \
            and seq.num_computed_tokens < len(table) * self.block_size and table[-1].ref_count > 1

    def _blocks_needed(self, seq: SequenceView, num_new_tokens: int) -> int:
        table = self.tables.get(seq.seq_id, [])
        need = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size) - len(table)
        return max(need, 0) + self._needs_copy_on_write(seq, table)

    def can_allocate(self, seq: SequenceView, num_new_tokens: int) -> bool:
        return self._blocks_needed(seq, num_new_tokens) <= self.pool.num_free

    def allocate(self, seq: SequenceView, num_new_tokens: int) -> None:
        if not self.can_allocate(seq, num_new_tokens):
            raise NoFreeMemory(f"no room for {num_new_tokens} tokens of sequence {seq.seq_id}")
        table = self.tables.setdefault(seq.seq_id, [])
        self.hashes.setdefault(seq.seq_id, [])
        self.sequences[seq.seq_id] = seq
        if self._needs_copy_on_write(seq, table):
            shared = table[-1]
            private = self.pool.allocate()
            self.pending_copies.append((shared.block_id, private.block_id))
            self.pool.release(shared)
            table[-1] = private
        while len(table) * self.block_size < seq.num_computed_tokens + num_new_tokens:
            table.append(self.pool.allocate())

    def fork(self, parent: SequenceView, child: SequenceView) -> None:
        table = list(self.tables[parent.seq_id])
        for block in table:
            self.pool.touch(block)
        self.tables[child.seq_id] = table
        self.hashes[child.seq_id] = list(self.hashes[parent.seq_id])
        self.sequences[child.seq_id] = child

    def free(self, seq: SequenceView) -> None:
        if self.tiers is not None:
            self.tiers.cancel(seq)  # freed while its blocks were being read: drop the read
        # Last block first: when these blocks are cached, the tail of a prefix is evicted before
        # its head, which keeps shorter shared prefixes (system prompts) alive longest.
        for block in reversed(self.tables.pop(seq.seq_id, [])):
            self.pool.release(block)
        self.hashes.pop(seq.seq_id, None)
        self.sequences.pop(seq.seq_id, None)

    # --- accounting ---------------------------------------------------------------------
    def stats(self) -> MemoryStats:
        # A block shared by several sequences counts once, filled as far as its fullest holder.
        filled: dict[int, int] = {}
        for seq_id, table in self.tables.items():
            computed = self.sequences[seq_id].num_computed_tokens
            for i, block in enumerate(table):
                n = min(self.block_size, max(computed - i * self.block_size, 0))
                filled[block.block_id] = max(filled.get(block.block_id, 0), n)
        total = self.nbytes
        return MemoryStats(
            strategy=self.name,
            bytes_reserved=total,
            bytes_physical=total,
            bytes_allocated=len(filled) * self.block_bytes,
            bytes_live=sum(filled.values()) * self.spec.bytes_per_token,
            bytes_cached=self.pool.num_free_cached * self.block_bytes,
            num_sequences=len(self.tables),
            prefix_cache_queries=self.prefix_queries,
            prefix_cache_hits=self.prefix_hits,
            extra={} if self.tiers is None else {"kv_offload": self.tiers.stats()},
        )

    def memory_map(self) -> dict:
        """Every block's state as one character of `states`: "." free, "u" in use by one sequence,
        "s" shared by several, "c" cached (free but holding a reusable prefix, evictable); `owners`:
        each sequence's block ids in table order."""
        states = "".join("." if b.ref_count == 0 and b.block_hash is None else "c" if b.ref_count == 0
                         else "u" if b.ref_count == 1 else "s" for b in self.pool.blocks)
        return {"strategy": self.name, "kind": "blocks", "block_size": self.block_size,
                "block_bytes": self.block_bytes, "states": states,
                "counts": {k: states.count(c) for k, c in (("free", "."), ("used", "u"), ("shared", "s"),
                                                          ("cached", "c"))},
                "owners": {str(sid): [b.block_id for b in t] for sid, t in self.tables.items()},
                "tokens": {str(sid): s.num_computed_tokens for sid, s in self.sequences.items()},
                **({} if self.tiers is None else {"tiers": self.tiers.occupancy()})}

    def release_free_memory(self) -> int:
        # The pool is one preallocated tensor, so nothing goes back to the OS; dropping cached
        # prefixes turns their blocks into plain free blocks. Report those bytes.
        if self.tiers is None:
            return self.pool.evict_cached() * self.block_bytes
        with self.tiers.store.waiting_writes():  # each one written back first, none dropped
            released = self.pool.evict_cached() * self.block_bytes
        self.tiers.emit_events()
        return released

    def close(self) -> None:
        if self.tiers is not None:
            tiers, self.tiers = self.tiers, None
            tiers.close()  # what the device still caches goes down to the tiers first
