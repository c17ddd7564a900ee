"""/metrics families of the prefix-cache tiers (kvmem.memory.tiers), from `stats().extra["kv_offload"]`.

Every series has a `tier` label, "host" or "disk": blocks looked up (`queries`), loaded back
(`hits`), missed (`misses` = queries - hits: not there, or not worth loading), written, evicted,
dropped (a full write queue), corrupt files; bytes written and loaded; occupancy; and per-block
transfer-time histograms (`store` into the tier, `load` out of it).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

TIERS = ("host", "disk")
COUNTERS = (  # (series name, stats key, help)
    ("kvmem:kv_offload_queries", "queries", "Prefix blocks looked up in the tier (past the device's match)."),
    ("kvmem:kv_offload_hits", "hits", "Prefix blocks loaded back from the tier instead of recomputed."),
    ("kvmem:kv_offload_stored_blocks", "stored", "Blocks written into the tier."),
    ("kvmem:kv_offload_stored_bytes", "stored_bytes", "Bytes written into the tier."),
    ("kvmem:kv_offload_loaded_bytes", "loaded_bytes", "Bytes loaded back from the tier."),
    ("kvmem:kv_offload_evicted_blocks", "evicted", "Blocks the tier let go to make room (LRU)."),
    ("kvmem:kv_offload_dropped_blocks", "dropped", "Blocks not written: the disk queue was full, or every host "
                                                   "slot was being loaded."),
    ("kvmem:kv_offload_corrupt_blocks", "corrupt", "Block files that failed a check: deleted and recomputed."),
)
GAUGES = (
    ("kvmem:kv_offload_used_bytes", "used_bytes", "Bytes the tier holds."),
    ("kvmem:kv_offload_capacity_bytes", "capacity_bytes", "Bytes the tier may hold."),
    ("kvmem:kv_offload_blocks", "blocks", "Blocks the tier holds."),
)
HISTOGRAMS = (
    ("kvmem:kv_offload_store_seconds", "store_seconds", "Time to store one block into the tier."),
    ("kvmem:kv_offload_load_seconds", "load_seconds", "Time to load one block from the tier (disk: read + check)."),
)


def tier_families(offload: dict | None, labels: dict[str, str]) -> Iterable:
    """The tiers' families (nothing when no tier is configured)."""
    if not offload:
        return
    names, values = [*labels, "tier"], list(labels.values())
    tiers = [(t, offload[t]) for t in TIERS if t in offload]
    for name, key, doc in COUNTERS:
        c = CounterMetricFamily(name, doc, labels=names)
        for tier, s in tiers:
            c.add_metric([*values, tier], s[key])
        yield c
    misses = CounterMetricFamily("kvmem:kv_offload_misses", "Prefix blocks looked up in the tier and not loaded "
                                 "from it (absent, or not worth loading).", labels=names)
    for tier, s in tiers:
        misses.add_metric([*values, tier], s["queries"] - s["hits"])
    yield misses
    for name, key, doc in GAUGES:
        g = GaugeMetricFamily(name, doc, labels=names)
        for tier, s in tiers:
            g.add_metric([*values, tier], s[key])
        yield g
    for name, key, doc in HISTOGRAMS:
        h = HistogramMetricFamily(name, doc, labels=names)
        for tier, s in tiers:
            hist = s[key]
            running, buckets = 0, []
            for bound, count in zip(hist["buckets"], hist["counts"]):
                running += count
                buckets.append((floatToGoString(bound), running))
            buckets.append(("+Inf", running + hist["counts"][-1]))
            h.add_metric([*values, tier], buckets, hist["sum"])
        yield h
    tokens = CounterMetricFamily("kvmem:kv_offload_loaded_tokens", "Prompt tokens loaded from the tier instead "
                                 "of prefilled.", labels=names)
    for tier, _ in tiers:
        tokens.add_metric([*values, tier], offload.get("loaded_tokens", {}).get(tier, 0))
    yield tokens
