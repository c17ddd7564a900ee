"""The prefix-cache tiers wired into `paged`: eviction writes back, lookup continues into the tiers.

- Write-back at eviction (not write-through at block completion): the pool calls `on_evict` just
  before a cached block's memory is reused (or dropped by `release_free_memory`), and the block's
  bytes are copied into the host tier then, on the engine thread: the copy must be done before the
  step that reuses the block writes into it, and only blocks that actually leave the budget are
  copied (write-through would copy every full block of every request, most of which are never
  evicted, doubling the memory traffic of prefill on a CPU where both "tiers" are RAM). The disk
  write of what the host tier lets go runs on the store's writer thread. The cost of write-back:
  what is still only on the device is lost if the process is killed; `close()` hands it down.
- Lookup: after the device's match ends, the hash chain continues into the host tier, then the disk.
  `LoadPolicy` decides how much of that run to load. Host blocks are copied into fresh budget
  blocks at once (a memcpy); disk blocks get their budget blocks now and are read on the loader
  thread while the request waits (`is_loading`), other requests computing meanwhile. Once read they
  are copied in on the engine thread and the request is scheduled; a block that is missing or fails
  its checks ends the run there, and the tokens from it on are recomputed.
- Loaded blocks re-enter the device prefix cache under their hash, as if computed here.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from kvmem.memory.block_pool import BlockHash, KVBlock, hash_block
from kvmem.memory.tiers.link import TierLink
from kvmem.memory.tiers.store import TierStore


@dataclass
class PendingLoad:
    """A sequence's disk blocks being read: `blocks[i]` gets `keys[i]`."""

    future: Future
    keys: list[BlockHash]
    blocks: list[KVBlock]


class PagedTierLink(TierLink):
    def __init__(self, manager, store: TierStore) -> None:
        super().__init__(manager, store, manager.block_size)
        manager.pool.on_evict = self._on_evict

    # --- eviction: write back ---------------------------------------------------------
    def _on_evict(self, block_id: int, key: BlockHash) -> None:
        m = self.manager
        self.store.offload(key, lambda out: self.format.gather_paged(m.kv, m.kv_scales, block_id, out))

    # --- lookup ------------------------------------------------------------------------
    def extend_prefix(self, seq, table: list[KVBlock], hashes: list[BlockHash], num_full: int) -> list[int]:
        """Continue `seq`'s prefix past the device's match (`table`, `hashes`) with tier blocks: host
        blocks loaded now, disk blocks scheduled for loading. Returns the positions of the blocks
        cached now (for BlockStored events)."""
        m, bs = self.manager, self.manager.block_size
        keys, where = [], []
        parent = hashes[-1] if hashes else None
        host_queries = disk_queries = 0
        for i in range(len(table), num_full):
            key = hash_block(parent, seq.token_ids[i * bs:(i + 1) * bs])
            tier = self.store.locate(key)
            host_queries += 1
            disk_queries += tier != "host"
            if tier is None or (tier == "host" and "disk" in where):  # host after disk: keep it simple, stop
                break
            if tier == "host":
                self.store.host.touch(key)  # most recent: the evictions this load may cause spare it
            keys.append(key)
            where.append(tier)
            parent = key
        self.store.count_queries(host_queries, disk_queries)
        take = min(self.store.policy.plan(where, bs), m.pool.num_free)
        host = self.store.host
        if host is not None:  # the allocations below write other blocks back: never over these
            host.pinned = {k for k, t in zip(keys[:take], where[:take]) if t == "host"}
        try:
            stored = self._load(seq, table, hashes, keys[:take], where[:take])
        finally:
            if host is not None:
                host.pinned = set()
        return stored

    def _load(self, seq, table: list[KVBlock], hashes: list[BlockHash], keys: list[BlockHash],
              where: list[str]) -> list[int]:
        m, bs = self.manager, self.manager.block_size
        stored: list[int] = []
        disk_keys, disk_blocks = [], []
        for key, tier in zip(keys, where):
            block = m.pool.allocate()  # may evict (and write back) another cached block
            if tier == "host" and not disk_keys:
                ok = self.store.load_host(key, lambda p, b=block.block_id: self.format.scatter_paged(
                    p, m.kv, m.kv_scales, b))
                if not ok:  # the allocation above pushed it out of the host tier: recompute from here
                    m.pool.release(block)
                    break
                self.loaded_tokens["host"] += bs
                if m.pool.cache(block, key):
                    stored.append(len(table))
                table.append(block)
                hashes.append(key)
            else:
                disk_keys.append(key)
                disk_blocks.append(block)
                table.append(block)  # filled when the read is done; hashes then
        if disk_keys:
            self.loading[seq.seq_id] = PendingLoad(self.store.submit_disk_loads(disk_keys), disk_keys, disk_blocks)
        return stored

    def _finish(self, seq, pending: PendingLoad) -> None:
        m, bs = self.manager, self.manager.block_size
        try:
            payloads = pending.future.result()
        except Exception:  # noqa: BLE001  a failed read recomputes, as a corrupt file does
            payloads = []
        table, hashes = m.tables[seq.seq_id], m.hashes[seq.seq_id]
        first = len(hashes)  # the first pending block's position
        stored: list[int] = []
        for key, block, payload in zip(pending.keys, pending.blocks, payloads):
            self.format.scatter_paged(payload, m.kv, m.kv_scales, block.block_id)
            if m.pool.cache(block, key):
                stored.append(len(hashes))
            hashes.append(key)
        n = len(payloads)
        self.store.count_disk_hits(n)
        self.loaded_tokens["disk"] += n * bs
        for block in reversed(table[first + n:]):  # not loaded: give back, recompute those tokens
            m.pool.release(block)
        del table[first + n:]
        seq.num_computed_tokens = len(table) * bs
        if stored and m.events is not None:
            m._emit_stored(seq, hashes, stored)

    def cancel(self, seq) -> None:
        """`seq` is freed while loading: forget the read (the loader only fills its own buffers)."""
        pending = self.loading.pop(seq.seq_id, None)
        if pending is not None:
            pending.future.cancel()

    # --- close -------------------------------------------------------------------------
    def close(self) -> None:
        """Hand what the device still caches down to the tiers (a restart finds it on disk), then close
        the store (its threads joined)."""
        for seq_id in list(self.loading):
            self.loading.pop(seq_id).future.cancel()
        self.store.begin_close()
        self.manager.pool.evict_cached()  # each cached block through _on_evict, oldest first
        self.manager.pool.on_evict = None
        self.store.close()
