"""Which cached prefixes a slot-based strategy holds, as vLLM's block events.

`paged` has one block per hash, so its pool reports `BlockStored` / `BlockRemoved` as blocks are
cached and evicted. `virtual` has no such table: a prefix is reusable wherever a slot still holds its
tokens, in a running slot (computed full chunks, the donors of sharing) or in a free slot's leftovers
(deferred reclamation), and the same prefix may sit in several slots at once. A router only needs to
know whether *this replica* can serve the prefix, so each full chunk is reported once, by its
hash-chain key (the same key as paged's blocks, with the chunk as the block): stored when the first
slot comes to hold it, removed when the last one lets it go.

`PrefixHoldings` keeps, per slot, the keys of the full chunks it holds in prefix order, and a count of
holders per key. The manager tells it when a slot's holding grows (`extend`) or is cut back
(`truncate`); it emits the events on the 0 <-> 1 transitions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from kvmem.memory.block_pool import BlockHash
from kvmem.memory.events import AllBlocksCleared, BlockRemoved, BlockStored, EventSink


class PrefixHoldings:
    def __init__(self, num_slots: int, chunk_tokens: int, medium: str) -> None:
        self.chunk_tokens = chunk_tokens
        self.medium = medium
        self.keys: list[list[BlockHash]] = [[] for _ in range(num_slots)]  # per slot, prefix order
        self.holders: Counter[BlockHash] = Counter()
        self.events: EventSink | None = None

    def held(self) -> set[BlockHash]:
        """Every key some slot holds: what a consumer of the events should have rebuilt."""
        return set(self.holders)

    def extend(self, slot: int, keys: Sequence[BlockHash], tokens: Callable[[int], list[int]]) -> None:
        """`slot` now holds `keys` as its chunks [0, len(keys)); those past what it held are new.
        `tokens(i)`: chunk i's token ids (only asked for chunks reported as stored)."""
        mine = self.keys[slot]
        start = len(mine)
        if len(keys) <= start:
            return
        new = list(keys[start:])
        mine.extend(new)
        stored = set()
        for key in new:
            self.holders[key] += 1
            if self.holders[key] == 1:
                stored.add(key)
        if self.events is None or not stored:
            return
        # One event per run of consecutive newly stored chunks (vLLM: a run of one sequence's blocks,
        # the parent hash of its first).
        run_start = None
        for i in range(start, len(mine) + 1):
            fresh = i < len(mine) and mine[i] in stored
            if fresh and run_start is None:
                run_start = i
            elif not fresh and run_start is not None:
                ids = [t for j in range(run_start, i) for t in tokens(j)]
                self.events.emit(BlockStored(mine[run_start:i], mine[run_start - 1] if run_start else None,
                                             ids, self.chunk_tokens, self.medium))
                run_start = None

    def truncate(self, slot: int, num_chunks: int) -> None:
        """`slot` holds only its chunks [0, num_chunks) from now on."""
        mine = self.keys[slot]
        if len(mine) <= num_chunks:
            return
        removed = []
        for key in mine[num_chunks:]:
            self.holders[key] -= 1
            if self.holders[key] == 0:
                del self.holders[key]
                removed.append(key)
        del mine[num_chunks:]
        if self.events is not None and removed:
            self.events.emit(BlockRemoved(removed, self.medium))

    @contextmanager
    def coalesced(self) -> Iterator[None]:
        """Removals inside the block are reported as one event at its end: `AllBlocksCleared` when
        nothing is held any more (as paged's pool reports release_free_memory), else one
        `BlockRemoved`."""
        events, self.events = self.events, None
        before = set(self.holders)
        try:
            yield
        finally:
            self.events = events
        gone = [key for key in before if key not in self.holders]
        if events is not None and gone:
            events.emit(BlockRemoved(gone, self.medium) if self.holders else AllBlocksCleared(self.medium))
