"""/metrics: Prometheus metrics of the engine and of the requests the server handled.

Engine-side numbers (requests running and waiting, KV memory, prefix cache, preemptions, token
counters) are read at scrape time from the snapshot the engine thread publishes after every step,
so a scrape never waits for a step and never sees half-updated numbers. Latency histograms and the
per-request counts are observed by the request handlers, i.e. as a client connected to this server
experiences them.

Two families of names:
- `kvmem:*`, labelled `model_name` and `kv_cache` (the strategy), so several servers, one per
  strategy, can be compared on one dashboard; with the KV memory series only kvmem has.
- `vllm:*`, the series of vLLM's V1 engine that mean something here, with vLLM's names, types,
  labels (`model_name`, `engine="0"`) and histogram buckets, so vLLM's Grafana dashboards work on
  kvmem unmodified. Deprecated names that dashboards still query (`vllm:gpu_cache_usage_perc`,
  `vllm:gpu_prefix_cache_*`, `vllm:time_per_output_token_seconds`) are exported too.

Each value is read or observed once and both families are rendered from that one record at scrape
time (`_Histogram` keeps its counts in the union of both families' buckets), so a `kvmem:` series and
its `vllm:` twin never drift apart. Each app gets its own registry: tests start several servers in
one process.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from kvmem.engine.async_engine import AsyncLLMEngine
from kvmem.outputs import RequestOutput
from kvmem.server.tier_metrics import tier_families

# kvmem's buckets in seconds, spanning a fast GPU (milliseconds) and a 2-core CPU under load (tens of s).
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
# vLLM's (vllm/v1/metrics/loggers.py).
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)
VLLM_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                    480.0, 960.0, 1920.0, 7680.0)
VLLM_ENGINE = "0"  # vLLM's engine index: one engine core here


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class _Histogram:
    """One quantity's observations, counted once in the union of the bucket bounds of every family
    that exports it; `family` renders one family's cumulative buckets from those counts."""

    def __init__(self, *bound_sets: Sequence[float]) -> None:
        self.bounds = sorted({float(b) for bounds in bound_sets for b in bounds})
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)  # the first bound >= value: `le` is inclusive
        with self.lock:
            self.counts[i] += 1
            self.sum += value

    def family(self, name: str, doc: str, bounds: Sequence[float], labels: dict[str, str]) -> HistogramMetricFamily:
        with self.lock:
            counts, total = list(self.counts), self.sum
        cumulative, running, buckets = [], 0, []
        for c in counts:
            running += c
            cumulative.append(running)
        for b in bounds:
            buckets.append((floatToGoString(b), cumulative[self.bounds.index(float(b))]))
        buckets.append(("+Inf", cumulative[-1]))
        h = HistogramMetricFamily(name, doc, labels=list(labels))
        h.add_metric(list(labels.values()), buckets, total)
        return h


class _Counts:
    """Counters keyed by a string (a finish reason, a prompt-token source), under one lock."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.lock = threading.Lock()

    def inc(self, key: str, amount: float = 1) -> None:
        with self.lock:
            self.values[key] = self.values.get(key, 0) + amount

    def get(self, key: str) -> float:
        with self.lock:
            return self.values.get(key, 0)

    def items(self) -> list[tuple[str, float]]:
        with self.lock:
            return sorted(self.values.items())


class ServerMetrics:
    def __init__(self, engine: AsyncLLMEngine, model_name: str, kv_cache: str) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name, "kv_cache": kv_cache}
        self.vllm_labels = {"model_name": model_name, "engine": VLLM_ENGINE}
        max_len = max(1, int(getattr(engine, "max_model_len", 0) or 0))
        self.token_buckets = build_1_2_5_buckets(max_len)
        self.ttft = _Histogram(_TTFT_BUCKETS, VLLM_TTFT_BUCKETS)
        self.itl = _Histogram(_ITL_BUCKETS, VLLM_ITL_BUCKETS)
        self.e2e = _Histogram(_E2E_BUCKETS, VLLM_E2E_BUCKETS)
        self.request_prompt_tokens = _Histogram(self.token_buckets)
        self.request_generation_tokens = _Histogram(self.token_buckets)
        self.request_computed_tokens = _Histogram(self.token_buckets)  # prompt tokens prefill computed
        self.finished = _Counts()  # by finish reason
        self.prompt_tokens = _Counts()  # "cached" / "computed", per sample, as the engine counts prompts
        self.registry.register(_Collector(self))

    def tracker(self, num_samples: int) -> RequestTracker:
        return RequestTracker(self, num_samples)


class _Collector:
    """Renders both families at scrape time: engine numbers from one `AsyncLLMEngine.snapshot`,
    request numbers from `ServerMetrics`' records."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterable:
        m = self.m
        s = m.engine.snapshot
        mem = s.memory
        kv, vl = m.labels, m.vllm_labels

        def gauge(name: str, doc: str, value: float, labels: dict[str, str]) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=list(labels))
            g.add_metric(list(labels.values()), value)
            return g

        def counter(name: str, doc: str, value: float, labels: dict[str, str]) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=list(labels))
            c.add_metric(list(labels.values()), value)
            return c

        # --- kvmem: -------------------------------------------------------------------------------
        yield gauge("kvmem:num_requests_running", "Sequences scheduled in the engine's running set.",
                    s.num_running, kv)
        yield gauge("kvmem:num_requests_waiting", "Sequences waiting for admission (new or preempted).",
                    s.num_waiting, kv)
        yield gauge("kvmem:kv_cache_usage_perc", "Fraction of physical KV memory assigned to sequences (0-1).",
                    mem.usage, kv)
        yield gauge("kvmem:kv_cache_reserved_bytes", "KV capacity set aside (address space for virtual).",
                    mem.bytes_reserved, kv)
        yield gauge("kvmem:kv_cache_physical_bytes", "KV memory backed by RAM or device memory.",
                    mem.bytes_physical, kv)
        yield gauge("kvmem:kv_cache_allocated_bytes", "Physical KV memory assigned to resident sequences.",
                    mem.bytes_allocated, kv)
        yield gauge("kvmem:kv_cache_live_bytes", "KV memory holding tokens that sequences have written.",
                    mem.bytes_live, kv)
        yield gauge("kvmem:kv_cache_cached_bytes", "Free KV memory still holding reusable cached prefixes.",
                    mem.bytes_cached, kv)
        yield gauge("kvmem:kv_cache_waste_perc",
                    "Fragmentation: share of allocated KV memory holding no token, 1 - live/allocated (0-1).",
                    mem.waste, kv)
        yield gauge("kvmem:kv_cache_resident_sequences", "Sequences holding KV memory.", mem.num_sequences, kv)
        yield counter("kvmem:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      mem.prefix_cache_queries, kv)
        yield counter("kvmem:prefix_cache_hits", "Prompt tokens found in the prefix cache.", mem.prefix_cache_hits, kv)
        yield counter("kvmem:num_preemptions", "Sequences preempted for lack of KV memory.", s.num_preemptions, kv)
        yield counter("kvmem:prompt_tokens", "Prompt tokens computed.", s.num_prompt_tokens, kv)
        yield counter("kvmem:prompt_tokens_cached", "Prompt tokens served from the prefix cache, per sample.",
                      m.prompt_tokens.get("cached"), kv)
        yield counter("kvmem:generation_tokens", "Tokens generated.", s.num_generation_tokens, kv)
        yield counter("kvmem:engine_steps", "Engine steps run.", s.num_steps, kv)
        yield self._finished("kvmem:request_success", "Requests ended, by finish reason.", kv)
        yield m.ttft.family("kvmem:time_to_first_token_seconds", "Time to first token, from request receipt.",
                            _TTFT_BUCKETS, kv)
        yield m.itl.family("kvmem:inter_token_latency_seconds", "Time between successive outputs of a request.",
                           _ITL_BUCKETS, kv)
        yield m.e2e.family("kvmem:e2e_request_latency_seconds", "Request latency, receipt to last token.",
                           _E2E_BUCKETS, kv)
        yield m.request_prompt_tokens.family("kvmem:request_prompt_tokens", "Prompt tokens of each finished sample.",
                                             m.token_buckets, kv)
        yield m.request_generation_tokens.family("kvmem:request_generation_tokens",
                                                 "Tokens generated by each finished sample.", m.token_buckets, kv)
        yield from tier_families(mem.extra.get("kv_offload"), kv)  # prefix-cache tiers, when configured

        # --- vllm: (the same records) ------------------------------------------------------------
        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", s.num_running, vl)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.num_waiting, vl)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting_by_reason",
                                    "Requests waiting, by reason (capacity: KV or batch room; deferred: none here).",
                                    labels=[*vl, "reason"])
        waiting.add_metric([*vl.values(), "capacity"], s.num_waiting)
        waiting.add_metric([*vl.values(), "deferred"], 0)
        yield waiting
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", mem.usage, vl)
        yield gauge("vllm:gpu_cache_usage_perc",
                    "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
                    mem.usage, vl)
        for prefix in ("vllm:", "vllm:gpu_"):
            yield counter(f"{prefix}prefix_cache_queries",
                          "Prefix cache queries, in terms of number of queried tokens.", mem.prefix_cache_queries, vl)
            yield counter(f"{prefix}prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                          mem.prefix_cache_hits, vl)
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                      s.num_preemptions, vl)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", s.num_prompt_tokens, vl)
        yield counter("vllm:prompt_tokens_cached", "Number of cached prompt tokens (local prefix cache).",
                      m.prompt_tokens.get("cached"), vl)
        by_source = CounterMetricFamily("vllm:prompt_tokens_by_source", "Prompt tokens by where their KV came from.",
                                        labels=[*vl, "source"])
        by_source.add_metric([*vl.values(), "local_compute"], m.prompt_tokens.get("computed"))
        by_source.add_metric([*vl.values(), "local_cache_hit"], m.prompt_tokens.get("cached"))
        by_source.add_metric([*vl.values(), "external_kv_transfer"], 0)
        yield by_source
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", s.num_generation_tokens, vl)
        yield self._finished("vllm:request_success", "Count of successfully processed requests.", vl)
        yield m.ttft.family("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                            VLLM_TTFT_BUCKETS, vl)
        yield m.itl.family("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                           VLLM_ITL_BUCKETS, vl)
        yield m.itl.family("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.",
                           VLLM_ITL_BUCKETS, vl)
        yield m.e2e.family("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                           VLLM_E2E_BUCKETS, vl)
        yield m.request_prompt_tokens.family("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                             m.token_buckets, vl)
        yield m.request_generation_tokens.family("vllm:request_generation_tokens",
                                                 "Number of generation tokens processed.", m.token_buckets, vl)
        yield m.request_computed_tokens.family("vllm:request_prefill_kv_computed_tokens",
                                               "Prompt tokens prefill computed (not served from a cache), per request.",
                                               m.token_buckets, vl)
        info = self._cache_config()
        if info is not None:
            g = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                  labels=list(info))
            g.add_metric(list(info.values()), 1)
            yield g

    def _finished(self, name: str, doc: str, labels: dict[str, str]) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=[*labels, "finished_reason"])
        for reason, value in self.m.finished.items():
            c.add_metric([*labels.values(), reason], value)
        return c

    def _cache_config(self) -> dict[str, str] | None:
        """vLLM's cache config labels: num_gpu_blocks is the KV budget in blocks of block_size tokens
        (for a strategy without blocks, the same budget counted in block_size-token units)."""
        llm = getattr(self.m.engine, "engine", None)
        config = getattr(llm, "config", None)
        manager = getattr(llm, "manager", None)
        if config is None or manager is None:
            return None
        mem = self.m.engine.snapshot.memory
        block_size = int(getattr(manager, "block_size", None) or config.block_size)
        bytes_per_token = manager.spec.bytes_per_token
        tokens = (mem.bytes_capacity or mem.bytes_reserved) // bytes_per_token if bytes_per_token else 0
        return {"block_size": str(block_size), "cache_dtype": str(config.kv_cache_dtype),
                "enable_prefix_caching": str(bool(config.enable_prefix_caching)),
                "num_gpu_blocks": str(tokens // block_size), "num_cpu_blocks": "None",
                "kv_cache": self.m.labels["kv_cache"], "engine": VLLM_ENGINE}


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
            if self.last is None:
                self.m.ttft.observe(now - self.start)
                # The engine counts each sample's prompt at its first token; so do these.
                prompt, cached = len(out.prompt_token_ids), min(out.num_cached_tokens, len(out.prompt_token_ids))
                self.m.prompt_tokens.inc("cached", cached * self.num_samples)
                self.m.prompt_tokens.inc("computed", (prompt - cached) * self.num_samples)
            else:
                self.m.itl.observe(now - self.last)
            self.last, self.num_tokens = now, num_tokens
        if out.finished and not self.done:
            self.done = True
            self.m.e2e.observe(now - self.start)
            prompt = len(out.prompt_token_ids)
            for c in out.outputs:
                self.m.finished.inc(c.finish_reason or "abort")
                self.m.request_prompt_tokens.observe(prompt)
                self.m.request_generation_tokens.observe(len(c.token_ids))
                self.m.request_computed_tokens.observe(prompt - min(out.num_cached_tokens, prompt))

    def on_close(self) -> None:
        """The consumer went away before the last output (a disconnect): the request was aborted."""
        if not self.done:
            self.done = True
            self.m.finished.inc("abort", self.num_samples)
