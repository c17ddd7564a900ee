"""The tier store: blocks go host -> disk and come back intact; a full write queue drops instead of
blocking; close() hands the host tier down to disk and joins its threads; tier events."""

from __future__ import annotations

import threading

import torch

from kvmem.memory.tiers.store import TierStore
from tests.memory.tiers.conftest import make_fingerprint

BLOCK = 48


def payload(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (BLOCK,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def key(k: int) -> bytes:
    return k.to_bytes(4, "big") * 8


def filler(seed: int):
    return lambda out: out.copy_(payload(seed))


def tier_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kvmem-tier")]


def test_blocks_flow_host_then_disk_and_load_back(tmp_path):
    store = TierStore(make_fingerprint(), BLOCK, host_bytes=3 * BLOCK, disk_dir=str(tmp_path), disk_bytes=1 << 20)
    try:
        for k in range(10):
            store.offload(key(k), filler(k))
        assert store.flush(timeout=30)
        assert [store.locate(key(k)) for k in range(10)] == ["disk"] * 7 + ["host"] * 3
        for k in (7, 8, 9):
            out = torch.empty(BLOCK, dtype=torch.uint8)
            assert store.load_host(key(k), out.copy_) and torch.equal(out, payload(k))
        got = store.submit_disk_loads([key(k) for k in range(7)] + [key(99)] + [key(0)]).result(timeout=30)
        assert len(got) == 7 and all(torch.equal(g, payload(k)) for k, g in enumerate(got))  # stops at the miss
        stats = store.stats()
        assert stats["host"]["stored"] == 10 and stats["host"]["evicted"] == 7 and stats["host"]["hits"] == 3
        assert stats["disk"]["stored"] == 7 and stats["disk"]["used_bytes"] <= stats["disk"]["capacity_bytes"]
        kinds = [(e.kind, e.medium) for e in store.drain_events()]
        assert kinds.count(("stored", "CPU")) == 10 and kinds.count(("removed", "CPU")) == 7
        assert kinds.count(("stored", "STORAGE")) == 7
    finally:
        store.close()
    assert tier_threads() == []


def test_close_hands_the_host_tier_down_to_disk(tmp_path):
    store = TierStore(make_fingerprint(), BLOCK, host_bytes=4 * BLOCK, disk_dir=str(tmp_path), disk_bytes=1 << 20)
    for k in range(3):
        store.offload(key(k), filler(k))
    store.close()
    store.close()  # idempotent
    again = TierStore(make_fingerprint(), BLOCK, disk_dir=str(tmp_path), disk_bytes=1 << 20)
    try:
        assert [again.locate(key(k)) for k in range(3)] == ["disk"] * 3
        got = again.submit_disk_loads([key(k) for k in range(3)]).result(timeout=30)
        assert all(torch.equal(g, payload(k)) for k, g in enumerate(got))
    finally:
        again.close()


def test_a_full_write_queue_drops_and_never_blocks(tmp_path):
    store = TierStore(make_fingerprint(), BLOCK, disk_dir=str(tmp_path), disk_bytes=1 << 20, write_queue_blocks=2)
    release = threading.Event()
    real_write = store.disk.write

    def slow_write(k, data):
        release.wait(timeout=60)
        return real_write(k, data)

    store.disk.write = slow_write
    try:
        for k in range(8):  # the writer holds one, the queue two: the rest are dropped at once
            store.offload(key(k), filler(k))
        assert store.disk_counters.dropped >= 5
    finally:
        release.set()
        store.close()
    assert tier_threads() == []
    assert store.disk_counters.stored == 8 - store.disk_counters.dropped


def test_host_only_store_has_no_threads():
    store = TierStore(make_fingerprint(), BLOCK, host_bytes=2 * BLOCK)
    assert tier_threads() == []
    store.offload(key(1), filler(1))
    store.offload(key(2), filler(2))
    store.offload(key(3), filler(3))  # evicts 1: no disk, dropped
    assert store.locate(key(1)) is None and store.locate(key(3)) == "host"
    store.close()
