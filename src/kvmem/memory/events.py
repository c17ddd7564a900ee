"""What happens to KV memory, as events: produced once by the managers, read by every consumer.

A manager holds `events`, an `EventSink` or None. With None (the default) producing an event costs
one `if`; with a sink, the manager (and its `BlockPool`) append plain dataclasses as things happen,
and the consumer drains them (the engine does once per step and hands the batch to the KV-event
publisher, `kvmem.engine.kv_events`).

Events vLLM's consumers (cache-aware routers) understand, with vLLM's meaning:
- `BlockStored`: full prefix blocks registered in the prefix cache (a run of consecutive blocks of
  one sequence: their hashes, the parent hash of the first, their token ids);
- `BlockRemoved`: blocks whose cached prefix is gone (evicted, reused, dropped);
- `AllBlocksCleared`: the prefix cache of `medium` is empty (release_free_memory with nothing held).

Who reports them: paged's block pool (and hybrid's device tier, which is a paged manager); virtual
through `PrefixHoldings`, a chunk being the block (the prefixes its running slots and free slots'
leftovers hold, each chunk once however many slots hold it).

kvmem's own (not sent in vLLM's format): `PagesMapped` / `PagesUnmapped` (virtual: physical chunks
mapped into and out of a slot), `ChunksShared` / `ChunksUnshared` (virtual: chunks shared between
running slots, by hash-chain key), `TierMoved` (hybrid: blocks moved between tiers, KV or activations).

Hashes are kvmem's `BlockHash` (sha256 digests, bytes); the publisher converts them to vLLM's
external form (see `kvmem.engine.kv_events.external_block_hash`). `medium` is the tier: "GPU" for
CUDA memory and "CPU" for host memory, as vLLM names them (`medium_of`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvmem.memory.block_pool import BlockHash


def medium_of(device: torch.device | str) -> str:
    """vLLM's name of the tier a device's memory is: "GPU" (CUDA) or the device type upper-cased."""
    kind = torch.device(device).type
    return "GPU" if kind == "cuda" else kind.upper()


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]  # all the blocks' tokens, in order
    block_size: int
    medium: str
    lora_id: int | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list[BlockHash]
    medium: str


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    medium: str


@dataclass(frozen=True, slots=True)
class PagesMapped:
    """virtual: `num_chunks` physical chunks mapped into `slot` (private pages)."""

    slot: int
    num_chunks: int
    medium: str


@dataclass(frozen=True, slots=True)
class PagesUnmapped:
    """virtual: `num_chunks` private chunks unmapped from `slot` (their pages go back to the pool)."""

    slot: int
    num_chunks: int
    medium: str


@dataclass(frozen=True, slots=True)
class ChunksShared:
    """virtual: chunks (hash-chain keys) shared between running slots, now mapped into `slot`.
    `promoted`: they were `slot`'s own private chunks, turned shared in place (one private chunk
    fewer each, the same pages); else they are mapped into `slot` from the shared pool.

    Physical chunks, rebuilt from events: the private chunks (mapped - unmapped - promoted) plus the
    distinct shared keys (shared - unshared)."""

    slot: int
    keys: list[BlockHash]
    medium: str
    promoted: bool = False


@dataclass(frozen=True, slots=True)
class ChunksUnshared:
    """virtual: shared chunks no slot maps any more (their pages are freed)."""

    keys: list[BlockHash]
    medium: str


@dataclass(frozen=True, slots=True)
class TierMoved:
    """hybrid: `num_blocks` blocks of a sequence moved from tier `src` to tier `dst` ("" as `src`: newly
    taken in `dst`); `kind` "kv" (KV blocks) or "act" (activation blocks, KV recomputed from them)."""

    seq_id: int
    num_blocks: int
    src: str
    dst: str
    kind: str = "kv"


KVEvent = (BlockStored | BlockRemoved | AllBlocksCleared | PagesMapped | PagesUnmapped | ChunksShared
           | ChunksUnshared | TierMoved)
VLLM_EVENT_TYPES = (BlockStored, BlockRemoved, AllBlocksCleared)


@dataclass
class EventSink:
    """Collects a manager's events until the consumer drains them (single-threaded: the engine's)."""

    events: list = field(default_factory=list)

    def emit(self, event: KVEvent) -> None:
        self.events.append(event)

    def drain(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events
