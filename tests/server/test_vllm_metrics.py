"""The `vllm:` series on /metrics: vLLM's names, types, labels and buckets, and the same numbers as
their `kvmem:` twins (one record rendered twice, never two bookkeepings)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvmem.server.metrics import (VLLM_E2E_BUCKETS, VLLM_ITL_BUCKETS, VLLM_TTFT_BUCKETS, _Histogram,
                                  build_1_2_5_buckets)

PATIENCE = 120.0
PROMPT = "Paged attention keeps the KV cache in blocks. " * 4

VLLM_TYPES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_waiting_by_reason": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:gpu_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:gpu_prefix_cache_queries": "counter",
    "vllm:gpu_prefix_cache_hits": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:prompt_tokens_cached": "counter",
    "vllm:prompt_tokens_by_source": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:request_prefill_kv_computed_tokens": "histogram",
    "vllm:cache_config_info": "gauge",
}


def scrape(server) -> dict:
    text = httpx.get(f"{server.base_url}/metrics", timeout=PATIENCE).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict, sample_name: str, **labels: str) -> float:
    family = families[sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")]
    found = [s.value for s in family.samples
             if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (sample_name, labels, found)
    return found[0]


def run_requests(server) -> None:
    for max_tokens in (4, 6):  # the second reuses the first's prompt: a prefix-cache hit
        r = httpx.post(f"{server.base_url}/v1/completions", timeout=PATIENCE,
                       json={"model": server.model, "prompt": PROMPT, "max_tokens": max_tokens})
        assert r.status_code == 200, r.text
    r = httpx.post(f"{server.base_url}/v1/completions", timeout=PATIENCE,
                   json={"model": server.model, "prompt": ["Hello", "Memory is the bottleneck"], "max_tokens": 3,
                         "n": 2, "temperature": 1.0})
    assert r.status_code == 200, r.text
    server.wait_kv_free()


def test_vllm_series_have_vllm_types_labels_and_buckets(tiny_server):
    run_requests(tiny_server)
    families = scrape(tiny_server)
    for name, kind in VLLM_TYPES.items():
        assert name in families, name
        assert families[name].type == kind, (name, families[name].type)
        for s in families[name].samples:
            assert s.labels.get("engine") == "0", (name, s.labels)
            if name != "vllm:cache_config_info":
                assert s.labels.get("model_name") == tiny_server.model, (name, s.labels)
                assert "kv_cache" not in s.labels, (name, s.labels)

    def bounds(name: str) -> list[float]:
        return [float(s.labels["le"]) for s in families[name].samples if s.name == f"{name}_bucket"]

    assert bounds("vllm:time_to_first_token_seconds") == [*VLLM_TTFT_BUCKETS, float("inf")]
    assert bounds("vllm:inter_token_latency_seconds") == [*VLLM_ITL_BUCKETS, float("inf")]
    assert bounds("vllm:time_per_output_token_seconds") == [*VLLM_ITL_BUCKETS, float("inf")]
    assert bounds("vllm:e2e_request_latency_seconds") == [*VLLM_E2E_BUCKETS, float("inf")]
    tokens = build_1_2_5_buckets(tiny_server.engine.max_model_len)
    assert bounds("vllm:request_prompt_tokens") == [*tokens, float("inf")]
    assert tokens[:4] == (1, 2, 5, 10) and tokens[-1] <= tiny_server.engine.max_model_len

    (info,) = families["vllm:cache_config_info"].samples
    assert info.value == 1
    assert info.labels["block_size"] == str(tiny_server.engine.engine.config.block_size)
    assert info.labels["enable_prefix_caching"] == "True" and info.labels["cache_dtype"] == "auto"
    assert int(info.labels["num_gpu_blocks"]) > 0


def test_vllm_series_agree_with_kvmem_series(tiny_server):
    run_requests(tiny_server)
    f = scrape(tiny_server)
    kv = {"kv_cache": "paged"}
    for kvmem_name, vllm_names in {
        "kvmem:num_requests_running": ["vllm:num_requests_running"],
        "kvmem:num_requests_waiting": ["vllm:num_requests_waiting"],
        "kvmem:kv_cache_usage_perc": ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
        "kvmem:prefix_cache_queries_total": ["vllm:prefix_cache_queries_total",
                                             "vllm:gpu_prefix_cache_queries_total"],
        "kvmem:prefix_cache_hits_total": ["vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"],
        "kvmem:num_preemptions_total": ["vllm:num_preemptions_total"],
        "kvmem:prompt_tokens_total": ["vllm:prompt_tokens_total"],
        "kvmem:prompt_tokens_cached_total": ["vllm:prompt_tokens_cached_total"],
        "kvmem:generation_tokens_total": ["vllm:generation_tokens_total"],
        "kvmem:time_to_first_token_seconds_count": ["vllm:time_to_first_token_seconds_count"],
        "kvmem:time_to_first_token_seconds_sum": ["vllm:time_to_first_token_seconds_sum"],
        "kvmem:inter_token_latency_seconds_count": ["vllm:inter_token_latency_seconds_count",
                                                    "vllm:time_per_output_token_seconds_count"],
        "kvmem:inter_token_latency_seconds_sum": ["vllm:inter_token_latency_seconds_sum",
                                                  "vllm:time_per_output_token_seconds_sum"],
        "kvmem:e2e_request_latency_seconds_count": ["vllm:e2e_request_latency_seconds_count"],
        "kvmem:e2e_request_latency_seconds_sum": ["vllm:e2e_request_latency_seconds_sum"],
        "kvmem:request_prompt_tokens_sum": ["vllm:request_prompt_tokens_sum"],
        "kvmem:request_generation_tokens_sum": ["vllm:request_generation_tokens_sum"],
    }.items():
        expected = value(f, kvmem_name, **kv)
        for name in vllm_names:
            assert value(f, name, engine="0") == expected, (name, kvmem_name)
    reasons = {s.labels["finished_reason"]: s.value for s in f["kvmem:request_success"].samples
               if s.name == "kvmem:request_success_total"}
    assert reasons and sum(reasons.values()) >= 6  # 2 requests + 2 prompts x n=2
    for reason, n in reasons.items():
        assert value(f, "vllm:request_success_total", finished_reason=reason) == n
    # What the samples add up to: every sample finished, every token generated counted once.
    assert value(f, "vllm:request_generation_tokens_count") == sum(reasons.values())
    assert value(f, "vllm:request_generation_tokens_sum") == value(f, "vllm:generation_tokens_total")
    # Prompt tokens by source add up to the engine's count; the repeated prompt was a cache hit.
    cached = value(f, "vllm:prompt_tokens_by_source_total", source="local_cache_hit")
    computed = value(f, "vllm:prompt_tokens_by_source_total", source="local_compute")
    assert cached == value(f, "vllm:prompt_tokens_cached_total") > 0
    assert cached + computed == value(f, "vllm:prompt_tokens_total")
    assert cached <= value(f, "vllm:prefix_cache_hits_total") <= value(f, "vllm:prefix_cache_queries_total")
    assert value(f, "vllm:num_requests_waiting_by_reason", reason="capacity") == value(f, "vllm:num_requests_waiting")


def test_one_record_renders_consistent_buckets_in_every_family():
    h = _Histogram((0.1, 1.0), (0.5, 1.0, 2.0))
    for v in (0.05, 0.1, 0.3, 0.5, 1.0, 1.5, 3.0):
        h.observe(v)
    a = h.family("a", "", (0.1, 1.0), {"x": "1"})
    b = h.family("b", "", (0.5, 1.0, 2.0), {"x": "1"})
    buckets = lambda fam: {s.labels["le"]: s.value for s in fam.samples if s.name.endswith("_bucket")}  # noqa: E731
    assert buckets(a) == {"0.1": 2, "1.0": 5, "+Inf": 7}  # `le` is inclusive
    assert buckets(b) == {"0.5": 4, "1.0": 5, "2.0": 6, "+Inf": 7}
    for fam in (a, b):
        sums = {s.name: s.value for s in fam.samples}
        assert sums[f"{fam.name}_count"] == 7 and abs(sums[f"{fam.name}_sum"] - 6.45) < 1e-9
