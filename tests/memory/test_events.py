"""Event production without any transport: a manager given an in-memory sink reports what its prefix
cache holds, exactly enough to rebuild the cache from the events alone."""

from __future__ import annotations

import random

import torch

from kvmem.memory.base import KVCacheSpec
from kvmem.memory.block_pool import hash_block
from kvmem.memory.events import AllBlocksCleared, BlockRemoved, BlockStored, EventSink, medium_of
from kvmem.memory.paged import PagedKVCacheManager
from tests.memory.test_paged import FakeSeq

SPEC = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))


def rebuild(events, cached: set, medium: str = "CPU") -> None:
    """Apply events to a set of cached hashes, as a router would."""
    for e in events:
        if isinstance(e, BlockStored):
            assert e.medium == medium
            assert len(e.token_ids) == len(e.block_hashes) * e.block_size
            assert not cached & set(e.block_hashes), "stored twice without a removal"
            cached.update(e.block_hashes)
        elif isinstance(e, BlockRemoved):
            assert set(e.block_hashes) <= cached, "removed what was never stored"
            cached.difference_update(e.block_hashes)
        elif isinstance(e, AllBlocksCleared):
            cached.clear()


def run(mgr: PagedKVCacheManager, seq: FakeSeq) -> bool:
    """Admit, prefill and free `seq`; False when it does not fit now."""
    mgr.admit(seq)
    n = seq.num_tokens - seq.num_computed_tokens
    if not mgr.can_allocate(seq, n):
        mgr.free(seq)
        return False
    mgr.allocate(seq, n)
    seq.num_computed_tokens += n
    mgr.on_tokens_computed(seq)
    return True


def test_no_sink_no_events():
    mgr = PagedKVCacheManager(SPEC, num_blocks=8, block_size=4)
    assert mgr.events is None and mgr.pool.events is None
    assert run(mgr, FakeSeq(list(range(10))))


def test_stored_carries_hash_chain_tokens_and_medium():
    mgr = PagedKVCacheManager(SPEC, num_blocks=8, block_size=4)
    sink = EventSink()
    mgr.set_event_sink(sink)
    tokens = list(range(10, 20))  # 2 full blocks + 2 tokens
    assert run(mgr, FakeSeq(tokens))
    (stored,) = sink.drain()
    h0 = hash_block(None, tokens[:4])
    h1 = hash_block(h0, tokens[4:8])
    assert stored == BlockStored([h0, h1], None, tokens[:8], 4, "CPU")
    # A second sequence with the same prefix hits it and stores only its own new block.
    more = tokens[:8] + [7, 7, 7, 7, 1]
    assert run(mgr, FakeSeq(more))
    (stored,) = sink.drain()
    assert stored == BlockStored([hash_block(h1, [7, 7, 7, 7])], h1, [7, 7, 7, 7], 4, "CPU")
    assert medium_of("cuda:0") == "GPU" and medium_of(torch.device("cpu")) == "CPU"


def test_random_workload_events_rebuild_the_prefix_cache():
    rng = random.Random(0)
    mgr = PagedKVCacheManager(SPEC, num_blocks=10, block_size=4)
    sink = EventSink()
    mgr.set_event_sink(sink)
    prefixes = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9], [5] * 12, []]
    cached: set = set()
    live: list[FakeSeq] = []
    for step in range(400):
        if live and (rng.random() < 0.5 or len(live) > 2):
            mgr.free(live.pop(rng.randrange(len(live))))
        else:
            seq = FakeSeq(rng.choice(prefixes) + [rng.randrange(3) for _ in range(rng.randrange(1, 12))])
            if run(mgr, seq):
                live.append(seq)
        if step % 97 == 96:
            mgr.release_free_memory()
        rebuild(sink.drain(), cached)
        assert cached == set(mgr.pool.cached_blocks), step
        mgr.pool.check_invariants()
    for seq in live:
        mgr.free(seq)
    mgr.release_free_memory()
    events = sink.drain()
    assert events == [AllBlocksCleared("CPU")]
    rebuild(events, cached)
    assert cached == set() == set(mgr.pool.cached_blocks)


def test_release_with_held_blocks_reports_only_the_free_ones():
    mgr = PagedKVCacheManager(SPEC, num_blocks=8, block_size=4)
    sink = EventSink()
    mgr.set_event_sink(sink)
    held, gone = FakeSeq([1] * 9), FakeSeq([2] * 9)
    assert run(mgr, held) and run(mgr, gone)
    mgr.free(gone)
    sink.drain()
    mgr.release_free_memory()
    (removed,) = sink.drain()
    h = hash_block(None, [2] * 4)
    assert isinstance(removed, BlockRemoved) and removed.medium == "CPU"
    assert sorted(removed.block_hashes) == sorted([h, hash_block(h, [2] * 4)])
    assert set(mgr.pool.cached_blocks) == {hash_block(None, [1] * 4), hash_block(hash_block(None, [1] * 4), [1] * 4)}


# --- virtual: pages mapped and unmapped, chunks shared -----------------------------------------
def physical_chunks(events, state: dict) -> int:
    """Physical chunk sets from events alone: private (per slot) + distinct shared keys."""
    from kvmem.memory.events import ChunksShared, ChunksUnshared, PagesMapped, PagesUnmapped

    private, shared = state.setdefault("private", {}), state.setdefault("shared", set())
    for e in events:
        if isinstance(e, PagesMapped):
            private[e.slot] = private.get(e.slot, 0) + e.num_chunks
        elif isinstance(e, PagesUnmapped):
            private[e.slot] -= e.num_chunks
            assert private[e.slot] >= 0
        elif isinstance(e, ChunksShared):
            if e.promoted:
                private[e.slot] -= len(e.keys)
            shared.update(e.keys)
        elif isinstance(e, ChunksUnshared):
            assert set(e.keys) <= shared
            shared.difference_update(e.keys)
        elif not isinstance(e, (BlockStored, BlockRemoved, AllBlocksCleared)):  # its prefixes: the next test
            raise AssertionError(f"virtual reports no {type(e).__name__}")
    return sum(private.values()) + len(shared)


def virtual_step(m, rng: random.Random, live: list, prompt) -> None:
    """One step of a random workload on virtual `m`: free one of `live` (at most 3 run), or admit a new
    sequence of `prompt()` (with its prefix hit, as the scheduler does) and prefill it; it is freed
    again when it does not fit."""
    from tests.memory.test_virtual import make_seq

    if live and (rng.random() < 0.4 or len(live) == 3):
        m.free(live.pop(rng.randrange(len(live))))
        return
    seq = make_seq(prompt())
    seq.num_computed_tokens = m.admit(seq)
    n = seq.num_tokens - seq.num_computed_tokens
    if not m.can_allocate(seq, n):
        m.free(seq)
        return
    m.allocate(seq, n)
    seq.num_computed_tokens += n
    m.on_tokens_computed(seq)
    live.append(seq)


def test_virtual_events_count_its_physical_chunks():
    import sys

    if not sys.platform.startswith("linux"):
        import pytest

        pytest.skip("the CPU backend is Linux's mmap")
    from tests.memory.test_virtual import make_manager

    rng = random.Random(1)
    m = make_manager(num_slots=4, max_len=512, budget_chunks=16, lookahead_tokens=8)
    sink = EventSink()
    m.set_event_sink(sink)
    state: dict = {}
    prefix = list(range(1, 201))  # 3 full chunks of 64 tokens
    live = []
    try:
        for step in range(60):
            virtual_step(m, rng, live, lambda: (prefix if rng.random() < 0.7 else [])
                         + [rng.randrange(500, 900) for _ in range(rng.randrange(1, 90))])
            if step % 20 == 19:
                m.release_free_memory()
            assert physical_chunks(sink.drain(), state) == m.mapped_chunks, step
        assert state["shared"], "the workload shared nothing"
        for seq in live:
            m.free(seq)
        m.release_free_memory()
        assert physical_chunks(sink.drain(), state) == m.mapped_chunks == 0
    finally:
        m.close()


# --- hybrid: the device tier's prefix cache, and blocks taken in the host tier -------------------
def test_hybrid_reports_its_device_tier_and_host_blocks():
    from kvmem.memory.events import TierMoved
    from tests.memory.test_hybrid import Seq, make_manager

    m = make_manager(0.5, host_blocks=12, device_blocks=4)
    m.device_tier.enable_prefix_caching = True
    sink = EventSink()
    m.set_event_sink(sink)
    assert m.device_tier.events is sink and m.device_tier.pool.events is sink
    small = Seq(9)  # fits the device tier: 2 full blocks stored there
    m.admit(small)
    m.allocate(small, 9)
    small.num_computed_tokens = 9
    m.on_tokens_computed(small)
    (stored,) = sink.drain()
    assert isinstance(stored, BlockStored) and len(stored.block_hashes) == 2 and stored.medium == "CPU"
    big = Seq(30)  # 8 blocks: more than the device tier holds, so they are taken in the host tier
    m.admit(big)
    m.allocate(big, 30)
    moved = sink.drain()
    assert moved and all(isinstance(e, TierMoved) and e.dst == "CPU" and e.seq_id == big.seq_id for e in moved)
    assert sum(e.num_blocks for e in moved) == len(m.host_tables[big.seq_id]) == 8
    assert {e.kind for e in moved} <= {"kv", "act"}


def virtual_held_prefixes(m) -> set:
    """The full chunks whose tokens some slot of `m` still holds and could hand to a new sequence,
    from the slots' own state: a running slot's computed chunks, a free slot's cached leftovers."""
    pt = m.layout.page_tokens
    owner = {slot.index: m.sequences[sid] for sid, slot in m.owned.items()}
    keys = set()
    for slot in m.slots:
        seq = owner.get(slot.index)
        tokens = seq.token_ids[:seq.num_computed_tokens] if seq is not None else slot.cached_tokens or []
        parent = None
        for i in range(min(len(tokens) // pt, slot.mapped_chunks)):
            parent = hash_block(parent, tokens[i * pt:(i + 1) * pt])
            keys.add(parent)
    return keys


def test_virtual_block_events_rebuild_the_prefixes_its_slots_hold():
    """virtual reports its reusable prefixes as vLLM's block events (a chunk is a block): a router
    rebuilding from them knows exactly which chunks some slot still holds, each once however many
    slots hold it, through reuse of leftovers, sharing, trims, preemption-like frees and release."""
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("the CPU backend is Linux's mmap")
    from tests.memory.test_virtual import make_manager

    rng = random.Random(7)
    m = make_manager(num_slots=4, max_len=512, budget_chunks=14, lookahead_tokens=8)
    sink = EventSink()
    m.set_event_sink(sink)
    cached: set = set()
    prefixes = [list(range(1, 201)), list(range(300, 380)), []]
    live, removed = [], 0
    try:
        for step in range(120):
            virtual_step(m, rng, live, lambda: rng.choice(prefixes)
                         + [rng.randrange(500, 900) for _ in range(rng.randrange(1, 90))])
            if step % 30 == 29:
                m.release_free_memory()
            events = [e for e in sink.drain() if isinstance(e, (BlockStored, BlockRemoved, AllBlocksCleared))]
            removed += sum(len(e.block_hashes) for e in events if isinstance(e, BlockRemoved))
            rebuild(events, cached)
            assert cached == virtual_held_prefixes(m) == m.holdings.held(), step
            assert all(e.block_size == m.chunk_tokens for e in events if isinstance(e, BlockStored))
        assert removed, "the workload evicted nothing"
        for seq in live:
            m.free(seq)
        m.release_free_memory()
        rebuild([e for e in sink.drain() if isinstance(e, (BlockStored, BlockRemoved, AllBlocksCleared))], cached)
        assert cached == set() == virtual_held_prefixes(m)
    finally:
        m.close()
