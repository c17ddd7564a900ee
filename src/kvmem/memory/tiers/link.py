"""What every strategy's tier link shares: the sequences waiting for disk reads, the tokens loaded
per tier, the tiers' KV events, stats and occupancy. The strategy-specific parts (where a block's
bytes live, when they are written back, how a hit is placed) are in paged_link.py and
virtual_link.py."""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import wait as wait_futures

from kvmem.memory.events import BlockRemoved, BlockStored
from kvmem.memory.tiers.payload import BlockFormat
from kvmem.memory.tiers.store import TierStore


class TierLink:
    def __init__(self, manager, store: TierStore, block_size: int) -> None:
        self.manager = manager
        self.store = store
        self.block_size = block_size
        self.format = BlockFormat.of(manager.spec, block_size)
        if store.block_nbytes != self.format.nbytes:
            raise ValueError(f"tier store blocks are {store.block_nbytes} bytes, {manager.name}'s {self.format.nbytes}")
        self.loading: dict = {}  # seq_id -> the strategy's pending load (a `.future` of payloads)
        self.loaded_tokens = {"host": 0, "disk": 0}

    def is_loading(self, seq) -> bool:
        """Whether `seq` still waits for disk blocks; finishes its load when the read is done."""
        pending = self.loading.get(seq.seq_id)
        if pending is None:
            return False
        if not pending.future.done():
            return True
        del self.loading[seq.seq_id]
        self._finish(seq, pending)
        return False

    def _finish(self, seq, pending) -> None:
        """Place the blocks a finished read brought back (the strategy's part)."""
        raise NotImplementedError

    def has_pending_loads(self) -> bool:
        return bool(self.loading)

    def wait_for_loads(self, timeout: float) -> None:
        if self.loading:
            wait_futures([p.future for p in self.loading.values()], timeout=timeout, return_when=FIRST_COMPLETED)

    def emit_events(self) -> None:
        """Hand the tiers' stored/removed blocks to the manager's event sink (vLLM's events, with the
        tier as `medium`)."""
        events = self.store.drain_events()
        sink = self.manager.events
        if sink is None:
            return
        for e in events:
            if e.kind == "stored":
                sink.emit(BlockStored(block_hashes=list(e.keys), parent_block_hash=None, token_ids=[],
                                      block_size=self.block_size, medium=e.medium))
            else:
                sink.emit(BlockRemoved(list(e.keys), e.medium))

    def stats(self) -> dict:
        return {**self.store.stats(), "loaded_tokens": dict(self.loaded_tokens),
                "loading_sequences": len(self.loading)}

    def occupancy(self) -> dict:
        """Per tier: used and capacity bytes, blocks, hits (for /dashboard)."""
        stats = self.store.stats()
        return {t: {k: stats[t][k] for k in ("used_bytes", "capacity_bytes", "blocks", "hits")}
                for t in ("host", "disk") if t in stats}
