"""/metrics: Prometheus metrics of the engine and of the requests the server handled.

Engine-side numbers (requests running and waiting, KV memory, prefix cache, preemptions, token
counters) are read at scrape time from the snapshot the engine thread publishes after every step,
so a scrape never waits for a step and never sees half-updated numbers. Latency histograms are
observed by the request handlers, i.e. as a client connected to this server experiences them.

Every metric carries the labels `model_name` and `kv_cache` (the strategy), so several servers,
one per strategy, can be compared on one dashboard. Each app gets its own registry: tests start
several servers in one process.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvmem.engine.async_engine import AsyncLLMEngine
from kvmem.outputs import RequestOutput

# Buckets in seconds, spanning a fast GPU (milliseconds) and a 2-core CPU under load (tens of s).
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)


class _EngineCollector:
    """Reads `AsyncLLMEngine.snapshot` whenever Prometheus scrapes."""

    def __init__(self, engine: AsyncLLMEngine, labels: dict[str, str]) -> None:
        self.engine = engine
        self.labels = labels

    def collect(self):
        s = self.engine.snapshot
        m = s.memory
        names, values = list(self.labels), list(self.labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            return c

        yield gauge("kvmem:num_requests_running", "Sequences scheduled in the engine's running set.", s.num_running)
        yield gauge("kvmem:num_requests_waiting", "Sequences waiting for admission (new or preempted).",
                    s.num_waiting)
        yield gauge("kvmem:kv_cache_usage_perc", "Fraction of physical KV memory assigned to sequences (0-1).",
                    m.usage)
        yield gauge("kvmem:kv_cache_reserved_bytes", "KV capacity set aside (address space for virtual).",
                    m.bytes_reserved)
        yield gauge("kvmem:kv_cache_physical_bytes", "KV memory backed by RAM or device memory.", m.bytes_physical)
        yield gauge("kvmem:kv_cache_allocated_bytes", "Physical KV memory assigned to resident sequences.",
                    m.bytes_allocated)
        yield gauge("kvmem:kv_cache_live_bytes", "KV memory holding tokens that sequences have written.",
                    m.bytes_live)
        yield gauge("kvmem:kv_cache_cached_bytes", "Free KV memory still holding reusable cached prefixes.",
                    m.bytes_cached)
        yield gauge("kvmem:kv_cache_waste_perc",
                    "Fragmentation: share of allocated KV memory holding no token, 1 - live/allocated (0-1).",
                    m.waste)
        yield gauge("kvmem:kv_cache_resident_sequences", "Sequences holding KV memory.", m.num_sequences)
        yield counter("kvmem:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      m.prefix_cache_queries)
        yield counter("kvmem:prefix_cache_hits", "Prompt tokens found in the prefix cache.", m.prefix_cache_hits)
        yield counter("kvmem:num_preemptions", "Sequences preempted for lack of KV memory.", s.num_preemptions)
        yield counter("kvmem:prompt_tokens", "Prompt tokens computed.", s.num_prompt_tokens)
        yield counter("kvmem:generation_tokens", "Tokens generated.", s.num_generation_tokens)
        yield counter("kvmem:engine_steps", "Engine steps run.", s.num_steps)


class ServerMetrics:
    def __init__(self, engine: AsyncLLMEngine, model_name: str, kv_cache: str) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name, "kv_cache": kv_cache}
        self.registry.register(_EngineCollector(engine, self.labels))
        names = list(self.labels)
        self.ttft = Histogram("kvmem:time_to_first_token_seconds", "Time to first token, from request receipt.",
                              names, buckets=_TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("kvmem:inter_token_latency_seconds", "Time between successive outputs of a request.",
                             names, buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("kvmem:e2e_request_latency_seconds", "Request latency, receipt to last token.",
                             names, buckets=_E2E_BUCKETS, registry=self.registry)
        self.finished = Counter("kvmem:request_success", "Requests ended, by finish reason.",
                                names + ["finished_reason"], registry=self.registry)

    def tracker(self, num_samples: int) -> RequestTracker:
        return RequestTracker(self, num_samples)


class RequestTracker:
    """Times one engine request as its outputs arrive."""

    def __init__(self, metrics: ServerMetrics, num_samples: int) -> None:
        self.m = metrics
        self.num_samples = num_samples
        self.start = time.monotonic()
        self.last: float | None = None
        self.num_tokens = 0
        self.done = False

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        if num_tokens > self.num_tokens:
            labels = self.m.labels
            if self.last is None:
                self.m.ttft.labels(**labels).observe(now - self.start)
            else:
                self.m.itl.labels(**labels).observe(now - self.last)
            self.last, self.num_tokens = now, num_tokens
        if out.finished and not self.done:
            self.done = True
            self.m.e2e.labels(**self.m.labels).observe(now - self.start)
            for c in out.outputs:
                self.m.finished.labels(**self.m.labels, finished_reason=c.finish_reason or "abort").inc()

    def on_close(self) -> None:
        """The consumer went away before the last output (a disconnect): the request was aborted."""
        if not self.done:
            self.done = True
            self.m.finished.labels(**self.m.labels, finished_reason="abort").inc(self.num_samples)
