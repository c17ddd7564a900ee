"""The prefix-cache tiers wired into `virtual`: a free slot's cached prefix goes down to the tiers
when its pages are about to be reused or unmapped; a new sequence's prefix continues past the
slot's match into the tiers, loaded into the slot's own pages.

Virtual keeps prefixes per slot, not per block: a finished sequence's tokens stay in its slot
(`Slot.cached_tokens`) until the slot is trimmed (`_cut` from position 0, under memory pressure or
by `release_free_memory`) or taken by a sequence sharing only part of them (its tokens from the
match on are overwritten). Those are the write-back points. What is written is the tiers' own unit,
blocks of `block_size` tokens keyed by the same hash chain as paged's, in the same payload layout
(payload.py): the virtual cache `[layers, 2, kv_heads, slots, max_len, head_dim]` holds a block of
a slot as one strided view, so a block written by virtual is read by paged and the other way round
(same fingerprint).

Lookup, at admission: after the slot's match (its leftovers, or chunks shared with running
sequences), the chain continues into the host tier, then the disk. The pages under the loaded
tokens are mapped first, within the budget (trimming other free slots, which writes their prefixes
back: the host blocks about to be loaded are pinned meanwhile), then host blocks are copied in at
once and disk blocks read on the loader thread while the sequence waits (`is_loading`) and others
compute; its `num_computed_tokens` counts them and is corrected if a read comes back short.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch

from kvmem.memory.base import cdiv
from kvmem.memory.block_pool import BlockHash, hash_block
from kvmem.memory.tiers.link import TierLink


@dataclass
class PendingLoad:
    """A sequence's disk blocks being read: block `first_block + i` gets `keys[i]`."""

    future: Future
    first_block: int
    keys: list[BlockHash]
    base_tokens: int  # tokens valid in the slot without this read (the match before the tiers)


def chain(tokens, num_blocks: int, block_size: int) -> list[BlockHash]:
    """The hash chain of the first `num_blocks` full blocks of `tokens` (paged's keys)."""
    keys: list[BlockHash] = []
    for i in range(num_blocks):
        keys.append(hash_block(keys[-1] if keys else None, tokens[i * block_size:(i + 1) * block_size]))
    return keys


class VirtualTierLink(TierLink):
    # --- a block of a slot ------------------------------------------------------------
    def _views(self, slot_index: int, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        m, t = self.manager, block * self.block_size
        kv = m.kv[:, :, :, slot_index, t:t + self.block_size]
        scales = None if m.scales is None else m.scales.tensor[:, :, :, slot_index, t:t + self.block_size]
        return kv, scales

    def _gather(self, slot_index: int, block: int, out: torch.Tensor) -> None:
        self.format.gather(*self._views(slot_index, block), out)

    def _scatter(self, slot_index: int, block: int, payload: torch.Tensor) -> None:
        self.format.scatter(payload, *self._views(slot_index, block))

    # --- eviction: write back ---------------------------------------------------------
    def write_back(self, slot, first_token: int) -> None:
        """A free `slot` is about to lose its cached tokens from `first_token` on: the full blocks
        among them (the block holding `first_token` included) go to the tiers."""
        tokens = slot.cached_tokens
        if not tokens:
            return
        mapped = slot.mapped_chunks * self.manager.layout.page_tokens
        n = min(len(tokens), mapped) // self.block_size
        first = first_token // self.block_size
        if first >= n:
            return
        keys = chain(tokens, n, self.block_size)
        for b in range(first, n):
            self.store.offload(keys[b], lambda out, b=b: self._gather(slot.index, b, out))

    # --- lookup ------------------------------------------------------------------------
    def extend_prefix(self, seq, slot, hit: int) -> int:
        """`seq` was admitted into `slot` with `hit` tokens already there: continue with tier blocks
        (host loaded now, disk scheduled). Returns the tokens `seq` starts from."""
        m, bs = self.manager, self.block_size
        num_full = (seq.num_tokens - 1) // bs  # the last token must be computed
        first = hit // bs
        if first >= num_full:
            return hit
        keys = chain(seq.token_ids, num_full, bs)
        where: list[str] = []
        host_queries = disk_queries = 0
        for b in range(first, num_full):
            tier = self.store.locate(keys[b])
            host_queries += 1
            disk_queries += tier != "host"
            if tier is None or (tier == "host" and "disk" in where):  # host after disk: stop, as paged does
                break
            where.append(tier)
        self.store.count_queries(host_queries, disk_queries)
        take = self.store.policy.plan(where, bs)
        pt = m.layout.page_tokens
        while take:  # only as many as the budget can map pages for
            missing = cdiv((first + take) * bs, pt) - slot.mapped_chunks
            if missing <= 0 or missing <= m.max_chunks - m.mapped_chunks + m._reclaimable(keep=slot):
                break
            take -= 1
        if not take:
            return hit
        host = self.store.host
        if host is not None:  # trimming other slots below writes their blocks back: never over these
            host.pinned = {keys[first + i] for i in range(take) if where[i] == "host"}
        try:
            need = cdiv((first + take) * bs, pt)
            slot.needed_chunks = max(slot.needed_chunks, need)  # not an idle tail another sequence may cut
            if need > slot.mapped_chunks:
                m._make_room(need - slot.mapped_chunks, keep=slot)
                m._grow(slot, need, for_step=True)
                m.mapper.wait_for_step(slot.index)
            loaded = 0
            for i in range(take):
                if where[i] != "host":
                    break
                if not self.store.load_host(keys[first + i], lambda p, b=first + i: self._scatter(slot.index, b, p)):
                    take = i  # pushed out of the host tier meanwhile: recompute from here
                    break
                loaded += 1
        finally:
            if host is not None:
                host.pinned = set()
        self.loaded_tokens["host"] += loaded * bs
        start = max(hit, (first + loaded) * bs) if loaded else hit
        if loaded < take:  # the rest of the run is on disk
            disk_keys = keys[first + loaded:first + take]
            self.loading[seq.seq_id] = PendingLoad(self.store.submit_disk_loads(disk_keys), first + loaded,
                                                   disk_keys, start)
            return (first + take) * bs
        return start

    def _finish(self, seq, pending: PendingLoad) -> None:
        try:
            payloads = pending.future.result()
        except Exception:  # noqa: BLE001  a failed read recomputes, as a corrupt file does
            payloads = []
        slot = self.manager.owned[seq.seq_id]
        for i, payload in enumerate(payloads):
            self._scatter(slot.index, pending.first_block + i, payload)
        n = len(payloads)
        self.store.count_disk_hits(n)
        self.loaded_tokens["disk"] += n * self.block_size
        seq.num_computed_tokens = max(pending.base_tokens, (pending.first_block + n) * self.block_size)

    def cancel(self, seq) -> int | None:
        """`seq` is freed while loading: forget the read; the tokens valid in its slot, None if it was
        not loading."""
        pending = self.loading.pop(seq.seq_id, None)
        if pending is None:
            return None
        pending.future.cancel()  # the loader fills only its own buffers: nothing to undo in the slot
        return pending.base_tokens

    # --- close -------------------------------------------------------------------------
    def close(self) -> None:
        """Hand the free slots' cached prefixes down to the tiers (a restart finds them on disk), then
        close the store (its threads joined)."""
        for seq_id in list(self.loading):
            self.loading.pop(seq_id).future.cancel()
        self.store.begin_close()
        for slot in list(self.manager.free_slots.values()):  # least recently freed first
            self.write_back(slot, 0)
        self.store.close()
