"""/metrics families of the prefix-cache tiers, rendered from a real tier store's stats."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvmem.memory.tiers.store import TierStore
from kvmem.server.tier_metrics import tier_families
from tests.memory.tiers.conftest import make_fingerprint

BLOCK = 40


def scrape(stats: dict | None) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()

    class Collector:
        def collect(self):
            yield from tier_families(stats, {"model_name": "m", "kv_cache": "paged"})

    registry.register(Collector())
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if "le" not in s.labels:
                out[(s.name, s.labels["tier"])] = s.value
            elif s.labels["le"] == "+Inf":
                out[(s.name + "{+Inf}", s.labels["tier"])] = s.value
    return out


def test_per_tier_counters_and_histograms(tmp_path):
    store = TierStore(make_fingerprint(), BLOCK, host_bytes=2 * BLOCK, disk_dir=str(tmp_path), disk_bytes=1 << 20)
    try:
        for k in range(5):
            store.offload(bytes([k]) * 32, lambda out, k=k: out.fill_(k))
        assert store.flush(timeout=30)
        store.count_queries(host=4, disk=2)
        assert store.load_host(bytes([4]) * 32, lambda p: None)
        got = scrape({**store.stats(), "loaded_tokens": {"host": 16, "disk": 0}})
    finally:
        store.close()
    assert got[("kvmem:kv_offload_stored_blocks_total", "host")] == 5
    assert got[("kvmem:kv_offload_stored_blocks_total", "disk")] == 3
    assert got[("kvmem:kv_offload_stored_bytes_total", "disk")] == 3 * BLOCK
    assert got[("kvmem:kv_offload_evicted_blocks_total", "host")] == 3
    assert got[("kvmem:kv_offload_hits_total", "host")] == 1
    assert got[("kvmem:kv_offload_misses_total", "host")] == 3
    assert got[("kvmem:kv_offload_queries_total", "disk")] == 2
    assert got[("kvmem:kv_offload_used_bytes", "host")] == 2 * BLOCK
    assert got[("kvmem:kv_offload_capacity_bytes", "disk")] == 1 << 20
    assert got[("kvmem:kv_offload_store_seconds_bucket{+Inf}", "host")] == 5
    assert got[("kvmem:kv_offload_store_seconds_count", "disk")] == 3
    assert got[("kvmem:kv_offload_load_seconds_count", "host")] == 1
    assert got[("kvmem:kv_offload_loaded_tokens_total", "host")] == 16


def test_no_tiers_no_series():
    assert scrape(None) == {}
