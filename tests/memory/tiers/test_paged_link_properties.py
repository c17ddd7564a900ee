"""paged + tiers without a model: KV written as a function of each token's whole prefix must read
back the same after any mix of evictions, host and disk round trips and restarts, with int8 scales
too; the pool's invariants hold, memory returns, loads overlap (a loading sequence waits)."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmem.memory.base import KVCacheSpec
from kvmem.memory.paged import PagedKVCacheManager
from kvmem.memory.tiers.payload import BlockFormat
from kvmem.memory.tiers.store import TierStore
from tests.memory.test_paged import FakeSeq
from tests.memory.tiers.conftest import make_fingerprint

BS = 4


def value(tokens: list[int]) -> float:
    """What a position's KV holds: depends on every token up to it, as real KV does."""
    return float(hash(tuple(tokens)) % 1000)


def write(mgr: PagedKVCacheManager, seq: FakeSeq, start: int, end: int) -> None:
    table = mgr.block_table(seq)
    for pos in range(start, end):
        v = value(seq.token_ids[:pos + 1])
        b, off = table[pos // BS], pos % BS
        mgr.kv[:, :, :, b, off] = torch.tensor(v).to(mgr.kv.dtype) if not mgr.spec.quantized else 1
        if mgr.kv_scales is not None:
            mgr.kv_scales[:, :, :, b, off] = v


def read(mgr: PagedKVCacheManager, seq: FakeSeq, pos: int) -> float:
    b, off = mgr.block_table(seq)[pos // BS], pos % BS
    if mgr.kv_scales is not None:
        return float(mgr.kv_scales[0, 1, 0, b, off])
    return float(mgr.kv[0, 1, 0, b, off, -1])


def make(spec, tmp, host_blocks: int, num_blocks: int = 6) -> PagedKVCacheManager:
    mgr = PagedKVCacheManager(spec, num_blocks=num_blocks, block_size=BS)
    nbytes = BlockFormat.of(spec, BS).nbytes
    mgr.attach_tiers(TierStore(make_fingerprint(block_size=BS), nbytes, host_bytes=host_blocks * nbytes,
                               disk_dir=str(tmp), disk_bytes=1 << 22))
    mgr.tiers.store.policy = type(mgr.tiers.store.policy)(min_host_tokens=BS, min_disk_tokens=BS)
    return mgr


def serve(mgr: PagedKVCacheManager, tokens: list[int]) -> int:
    """Admit, wait for loads, check what came from a cache, compute the rest, free. Returns the hit."""
    seq = FakeSeq(list(tokens))
    seq.num_computed_tokens = mgr.admit(seq)
    deadline = time.monotonic() + 60
    while mgr.is_loading(seq):
        assert time.monotonic() < deadline
        mgr.wait_for_loads(0.05)
    hit = seq.num_computed_tokens
    for pos in range(hit):
        assert read(mgr, seq, pos) == value(tokens[:pos + 1]), pos
    rest = seq.num_tokens - hit
    assert mgr.can_allocate(seq, rest)
    mgr.allocate(seq, rest)
    write(mgr, seq, hit, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    mgr.on_tokens_computed(seq)
    mgr.free(seq)
    mgr.pool.check_invariants()
    return hit


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 22, 23, 24],
           [9] * 17, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9]]
SPECS = {"float32": KVCacheSpec(2, 1, 3, torch.float32, torch.device("cpu")),
         "int8": KVCacheSpec(2, 1, 3, torch.float32, torch.device("cpu"), torch.int8)}


@pytest.mark.parametrize("kind", list(SPECS))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.lists(st.integers(0, len(PROMPTS) - 1), min_size=1, max_size=14),
       host_blocks=st.integers(1, 4), restart_at=st.integers(0, 14))
def test_kv_reads_back_after_tier_round_trips_and_restarts(tmp_path_factory, kind, order, host_blocks, restart_at):
    tmp = tmp_path_factory.mktemp("tiers")
    spec = SPECS[kind]
    mgr = make(spec, tmp, host_blocks)
    try:
        for i, p in enumerate(order):
            if i == restart_at:
                mgr.close()
                mgr = make(spec, tmp, host_blocks)
            serve(mgr, PROMPTS[p])
        stats = mgr.stats()
        assert stats.num_sequences == 0 and stats.bytes_allocated == 0
        assert mgr.pool.num_free == mgr.pool.num_blocks
    finally:
        mgr.close()


def test_a_repeated_prompt_after_eviction_is_served_from_the_tiers(tmp_path):
    mgr = make(SPECS["float32"], tmp_path, host_blocks=2)
    try:
        assert serve(mgr, PROMPTS[0]) == 0
        assert serve(mgr, PROMPTS[2]) == 0  # evicts prompt 0's blocks: 2 stay in host, the rest go to disk
        assert mgr.tiers.store.flush(timeout=30)
        assert serve(mgr, PROMPTS[0]) == 12  # 3 full blocks below the last token, from host and disk
        tiers = mgr.stats().extra["kv_offload"]
        assert tiers["loaded_tokens"]["host"] + tiers["loaded_tokens"]["disk"] > 0
    finally:
        mgr.close()


def test_a_loading_sequence_waits_and_a_freed_one_drops_its_read(tmp_path):
    mgr = make(SPECS["float32"], tmp_path, host_blocks=1)
    store = mgr.tiers.store
    try:
        serve(mgr, PROMPTS[0])
        serve(mgr, PROMPTS[2])
        assert store.flush(timeout=30)
        gate = __import__("threading").Event()
        real = store._read_blocks
        store._read_blocks = lambda keys: (gate.wait(60), real(keys))[1]
        seq = FakeSeq(list(PROMPTS[0]))
        seq.num_computed_tokens = mgr.admit(seq)
        assert mgr.is_loading(seq) and mgr.has_pending_loads()
        mgr.free(seq)  # aborted while loading: its blocks go back, the read is forgotten
        assert not mgr.has_pending_loads()
        gate.set()
        mgr.pool.check_invariants()
        assert mgr.pool.num_free == mgr.pool.num_blocks
        store._read_blocks = real
        assert serve(mgr, PROMPTS[0]) == 12
    finally:
        mgr.close()


def test_kv_events_carry_the_tier_as_medium(tmp_path):
    from kvmem.memory.events import BlockRemoved, BlockStored, EventSink

    mgr = make(SPECS["float32"], tmp_path, host_blocks=1)
    sink = EventSink()
    mgr.set_event_sink(sink)
    try:
        serve(mgr, PROMPTS[0])
        serve(mgr, PROMPTS[2])  # evicts prompt 0's blocks: stored in CPU, the host tier's LRU moved to disk
        assert mgr.tiers.store.flush(timeout=30)
        serve(mgr, PROMPTS[0])  # drains the tiers' events, loads from host and disk back to the device
        events = sink.drain()
        stored = {e.medium for e in events if isinstance(e, BlockStored)}
        removed = {e.medium for e in events if isinstance(e, BlockRemoved)}
        assert {"CPU", "STORAGE"} <= stored and "CPU" in removed
        keys = {h for e in events if isinstance(e, BlockStored) and e.medium == "STORAGE" for h in e.block_hashes}
        assert keys and all(len(k) == 32 for k in keys)
    finally:
        mgr.close()


def test_memory_map_shows_the_tiers_occupancy(tmp_path):
    mgr = make(SPECS["float32"], tmp_path, host_blocks=2)
    try:
        serve(mgr, PROMPTS[0])
        serve(mgr, PROMPTS[2])
        tiers = mgr.memory_map()["tiers"]
        block = mgr.tiers.store.block_nbytes
        assert tiers["host"] == {"used_bytes": 2 * block, "capacity_bytes": 2 * block, "blocks": 2, "hits": 0}
        assert set(tiers["disk"]) == {"used_bytes", "capacity_bytes", "blocks", "hits"}
    finally:
        mgr.close()


def test_the_scheduler_runs_others_while_a_sequence_loads(tmp_path):
    import threading

    from kvmem.engine.scheduler import Scheduler
    from kvmem.engine.sequence import Sequence
    from kvmem.sampling_params import SamplingParams

    mgr = make(SPECS["float32"], tmp_path, host_blocks=1, num_blocks=10)
    store = mgr.tiers.store
    try:
        serve(mgr, PROMPTS[0])
        mgr.release_free_memory()  # prompt 0's blocks: host (1) and disk
        assert store.flush(timeout=30)
        gate = threading.Event()
        real = store._read_blocks
        store._read_blocks = lambda keys: (gate.wait(60), real(keys))[1]
        scheduler = Scheduler(mgr, max_num_seqs=4, max_num_batched_tokens=64)

        def seq(tokens, i):
            return Sequence(f"r{i}", 0, list(tokens), len(tokens), SamplingParams(), 4, None, seq_id=1000 + i)

        loading, other = seq(PROMPTS[0], 0), seq(PROMPTS[3], 1)
        scheduler.add(loading)
        scheduler.add(other)
        out = scheduler.schedule()
        assert [s.seq for s in out.scheduled] == [other]  # the loading one waits, keeping its place
        assert list(scheduler.waiting) == [loading] and mgr.is_loading(loading)
        gate.set()
        deadline = time.monotonic() + 60
        while mgr.is_loading(loading):
            assert time.monotonic() < deadline
            mgr.wait_for_loads(0.05)
        out = scheduler.schedule()
        scheduled = {s.seq.seq_id: s.num_new_tokens for s in out.scheduled}
        assert scheduled[loading.seq_id] == len(PROMPTS[0]) - 12  # 12 tokens came from the tiers
        assert loading.num_cached_tokens == 12
        for s in (loading, other):
            scheduler.remove(s)
        mgr.pool.check_invariants()
    finally:
        mgr.close()
