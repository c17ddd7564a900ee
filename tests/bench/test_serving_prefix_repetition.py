"""`kvmem bench serve --dataset-name prefix_repetition` (vLLM's multi-tenant shape) and `--metrics-url`
(the servers' own prefix-cache counters)."""

from __future__ import annotations

import collections

import pytest

from kvmem.bench import server_metrics
from tests.bench.test_serving import bench, fake, fake_tokens  # noqa: F401  (fake: the fixture)
from tests.server.conftest import tiny_model_dir, tiny_server  # noqa: F401  (fixtures)


def test_prefixes_repeat_evenly_with_own_suffixes_and_exact_lengths(fake, tmp_path):  # noqa: F811
    fake.state.bos, fake.state.first_token_delay = True, 0.005
    rc, r = bench(fake, tmp_path, "--dataset-name", "prefix_repetition", "--num-prompts", "10",
                  "--prefix-repetition-num-prefixes", "3", "--prefix-repetition-prefix-len", "40",
                  "--prefix-repetition-suffix-len", "6", "--prefix-repetition-output-len", "3",
                  "--num-warmups", "0", "--seed", "2", "--max-concurrency", "1")
    assert rc == 0 and r["completed"] == 10
    prompts = [b["prompt"] for b in fake.state.bodies]
    assert all(b["max_tokens"] == 3 for b in fake.state.bodies)
    prefixes = collections.Counter(" ".join(p.split()[:40 - 1]) for p in prompts)  # 40 tokens = BOS + 39 words
    assert sorted(prefixes.values()) == [3, 3, 4]  # 10 requests over 3 prefixes
    assert len(set(prompts)) == 10  # every request its own suffix
    assert r["request_prompt_tokens"] == [len(fake_tokens(fake.state, p)) for p in prompts]
    assert r["settings"]["num_prefixes"] == 3 and r["settings"]["prefix_len"] == 40
    # Seeded: the same prompts again, in the same order.
    fake.state.bodies.clear()
    bench(fake, tmp_path, "--dataset-name", "prefix_repetition", "--num-prompts", "10", "--request-rate", "1000",
          "--prefix-repetition-num-prefixes", "3", "--prefix-repetition-prefix-len", "40",
          "--prefix-repetition-suffix-len", "6", "--prefix-repetition-output-len", "3", "--num-warmups", "0",
          "--seed", "2", "--max-concurrency", "1")
    assert [b["prompt"] for b in fake.state.bodies] == prompts


def test_bad_prefix_repetition_sizes_are_errors(fake, tmp_path, capsys):  # noqa: F811
    with pytest.raises(ValueError, match="--prefix-repetition"):
        bench(fake, tmp_path, "--dataset-name", "prefix_repetition", "--prefix-repetition-num-prefixes", "0",
              "--num-warmups", "0")


def test_counters_parsed_and_reported_over_servers():
    text = ('# TYPE vllm:prefix_cache_hits counter\nvllm:prefix_cache_hits_total{model_name="m"} 30.0\n'
            'vllm:prefix_cache_queries_total{model_name="m"} 100.0\nvllm:gpu_prefix_cache_hits_total 99.0\n'
            'vllm:request_success_total{finished_reason="length"} 4.0\n'
            'vllm:request_success_total{finished_reason="stop"} 1.0\n')
    assert server_metrics.parse_counters(text) == {"vllm:prefix_cache_queries": 100.0,
                                                    "vllm:prefix_cache_hits": 30.0, "vllm:request_success": 5.0}
    zero = dict.fromkeys(server_metrics.COUNTERS, 0.0)
    after = {"a": {"vllm:prefix_cache_queries": 100.0, "vllm:prefix_cache_hits": 30.0, "vllm:request_success": 5.0},
             "b": {"vllm:prefix_cache_queries": 100.0, "vllm:prefix_cache_hits": 70.0, "vllm:request_success": 7.0}}
    r = server_metrics.report({"a": zero, "b": zero}, after)
    assert r["prefix_cache_hit_rate"] == 0.5 and r["requests_per_server"] == [5.0, 7.0]
    assert server_metrics.report({"a": zero}, {"a": zero})["prefix_cache_hit_rate"] is None


def test_metrics_url_reads_a_kvmem_servers_prefix_hits(tiny_server, tmp_path):  # noqa: F811
    tiny_server.url = tiny_server.base_url  # what bench() reads
    rc, r = bench(tiny_server, tmp_path, "--dataset-name", "prefix_repetition", "--num-prompts", "12",
                  "--prefix-repetition-num-prefixes", "2", "--prefix-repetition-prefix-len", "80",
                  "--prefix-repetition-suffix-len", "8", "--prefix-repetition-output-len", "2",
                  "--metrics-url", tiny_server.base_url, "--max-concurrency", "1",
                  "--input-len", "8", "--output-len", "2")  # the warm-up's size
    assert rc == 0 and r["completed"] == 12
    m = r["server_metrics"]
    assert m["requests_per_server"] == [12.0]  # the warm-up request is before the first reading
    # 12 prompts over 2 prefixes of 80 tokens: 10 of them find their prefix's 4 full blocks cached.
    assert m["prefix_cache_hits"] >= 10 * 64 and 0 < m["prefix_cache_hit_rate"] < 1
