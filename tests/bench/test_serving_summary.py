"""benchmarks/serving_summary.py (issue 20's server comparison tables), loaded by path: the result
files it pairs, and the TPOT / throughput it recomputes where a server reports no token counts."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def summary():
    spec = importlib.util.spec_from_file_location("serving_summary_under_test", REPO / "benchmarks" / "serving_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(**overrides):
    base = {"duration": 2.0, "completed": 2, "failed": 0, "output_throughput": 50.0, "mean_tpot_ms": 30.0,
            "mean_ttft_ms": 100.0, "median_ttft_ms": 100.0, "p99_ttft_ms": 120.0,
            "latencies": [1.1, 0.6, 9.0], "ttfts": [0.1, 0.1, 0.0], "errors": ["", "", "Bad Request"]}
    return {**base, **overrides}


def test_with_output_len_recomputes_from_the_successful_requests(summary):
    fixed = summary.with_output_len(result(), 11)
    # (1.1 - 0.1) / 10 and (0.6 - 0.1) / 10 seconds per token; the failed request is left out.
    assert fixed["mean_tpot_ms"] == pytest.approx((100.0 + 50.0) / 2)
    assert fixed["output_throughput"] == pytest.approx(11 * 2 / 2.0)
    assert fixed["p99_ttft_ms"] == 120.0  # what the client measured itself stays


def test_load_pairs_engines_by_dataset_and_round(summary, tmp_path):
    for name in ("kvmem_r1.json", "llamacpp_r1.json", "kvmem_random_r2.json", "vllm_random_r2.json",
                 "kvmem_prefix_r1.json", "kvmem_server_r1.log", "notes.json"):
        (tmp_path / name).write_text(json.dumps(result()))
    runs = summary.load(tmp_path)
    assert set(runs) == {"", "random", "prefix"}
    assert set(runs[""]) == {"kvmem", "llamacpp"} and set(runs[""]["kvmem"]) == {1}
    assert set(runs["random"]) == {"kvmem", "vllm"} and set(runs["random"]["vllm"]) == {2}
    assert summary.load(tmp_path, 11)["random"]["kvmem"][2]["mean_tpot_ms"] == pytest.approx(75.0)


def test_table_prints_per_round_ratios(summary, capsys):
    engines = {"kvmem": {1: result(mean_tpot_ms=5.0), 2: result(mean_tpot_ms=6.0)},
               "llamacpp": {1: result(mean_tpot_ms=10.0), 2: result(mean_tpot_ms=8.0)}}
    summary.table("t", engines)
    out = capsys.readouterr().out
    # decode tok/s ratio = peer TPOT / kvmem TPOT: 2.00 and 1.33, median 1.67
    assert "| decode tok/s (1000/TPOT) | 2.00 | 1.33 | **1.67** (1.33-2.00) | > 1 |" in out
