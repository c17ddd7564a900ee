"""`kvmem bench memory` on a small stream: every strategy finishes it, the strategies that allocate on
demand fit more requests than static, the numbers are well formed, the kernel agrees with the
virtual manager, and the decode attention microbenchmark gives the same output both ways."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from kvmem.bench.memory import MemoryBenchConfig, add_memory_args, cmd_bench_memory, run_memory_benchmark
from kvmem.bench.memory_attention import AttentionConfig, attention_case
from kvmem.bench.memory_sim import SimConfig
from kvmem.bench.memory_stream import StreamConfig, make_stream
from kvmem.bench.report_json import write_json

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the virtual strategy is Linux's mmap")

MiB = 2**20
SMALL_STREAM = StreamConfig(num_requests=60, prompt_median=40, output_median=30, max_prompt=128, max_output=64, seed=3)
SMALL_SIM = SimConfig(budget_bytes=64 * MiB, max_model_len=256, max_num_seqs=64, max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def small_run():
    cfg = MemoryBenchConfig(stream=SMALL_STREAM, sim=SMALL_SIM,
                            attention=AttentionConfig(batch=4, contexts=(64,), warmup=1, repeats=2),
                            progress=False, kernel_check_every=20)
    return run_memory_benchmark(cfg)


def test_the_stream_is_seeded_clipped_and_fits_max_model_len():
    a, b = make_stream(SMALL_STREAM, 256), make_stream(SMALL_STREAM, 256)
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    for r in a:
        assert 4 <= len(r.prompt_token_ids) <= 128 and 1 <= r.output_len <= 64
        assert len(r.prompt_token_ids) + r.output_len <= 256 and r.arrival_step == 0
    poisson = make_stream(StreamConfig(num_requests=200, request_rate=2.0), 2048)
    steps = [r.arrival_step for r in poisson]
    assert steps == sorted(steps) and 60 < steps[-1] < 150  # about 100 steps for 200 requests at 2/step


def test_every_strategy_finishes_every_request(small_run):
    report, traces = small_run
    assert set(report["strategies"]) == {"static", "paged", "virtual", "virtual-no-bg"}
    for name, r in report["strategies"].items():
        assert r["num_finished"] == r["num_requests"] == 60, name
        assert r["steps"] == len(traces[name].running)
        assert traces[name].waiting[-1] == 0


def test_paged_and_virtual_fit_more_requests_than_static(small_run):
    s = small_run[0]["strategies"]
    assert s["paged"]["peak_running"] > s["static"]["peak_running"]
    assert s["virtual"]["peak_running"] > s["static"]["peak_running"]
    assert s["paged"]["steps"] < s["static"]["steps"]


def test_waste_numbers_are_fractions(small_run):
    for name, r in small_run[0]["strategies"].items():
        for key in ("waste_vs_allocated", "waste_vs_physical", "mean_step_waste_vs_allocated",
                    "waste_vs_allocated_saturated", "waste_vs_physical_saturated"):
            if r[key] is not None:
                assert 0.0 <= r[key] <= 1.0, (name, key, r[key])
        # live never exceeds what is held, which never exceeds what is backed
        assert r["peak_bytes_live"] <= r["peak_bytes_allocated"] <= r["peak_bytes_physical"] <= r["capacity_bytes"]


def test_the_kernel_agrees_with_the_virtual_manager(small_run):
    for name in ("virtual", "virtual-no-bg"):
        k = small_run[0]["strategies"][name]["kernel_check"]
        assert k["match"] and len(k["checks"]) >= 2
        assert k["end_kernel_resident_bytes"] == k["end_manager_bytes_physical"]


def test_background_mapping_changes_timing_not_memory(small_run):
    s = small_run[0]["strategies"]
    for key in ("steps", "preemptions", "peak_running", "waste_vs_allocated"):
        assert s["virtual"][key] == s["virtual-no-bg"][key]
    lat = small_run[0]["latency"]
    assert lat["fraction_hidden"] is None or lat["fraction_hidden"] <= 1.0


def test_the_json_has_the_documented_keys(small_run, tmp_path):
    path = write_json(small_run[0], tmp_path / "m.json")
    data = json.loads(path.read_text())
    assert {"benchmark", "settings", "machine", "stream", "strategies", "latency", "attention", "targets",
            "traces"} <= set(data)
    assert {"platform", "torch", "nproc", "date"} <= set(data["machine"])
    for r in data["strategies"].values():
        assert {"steps", "preemptions", "peak_running", "mean_running", "waste_vs_allocated", "waste_vs_physical",
                "schedule_latency"} <= set(r)
    assert {"mean_ms", "p50_ms", "p99_ms"} <= set(data["strategies"]["virtual"]["map_latency_critical"])
    assert {"with_background", "without_background", "fraction_hidden"} <= set(data["latency"])
    case = data["attention"]["cases"][0]
    assert {"paged_ms_median", "virtual_ms_median", "speedup_median", "per_step_paged_ms", "outputs_match"} <= set(case)
    assert {"paged_waste_le_4pct", "virtual_waste_le_4pct", "paged_concurrency_ge_3x_static"} <= set(data["targets"])


@pytest.mark.parametrize("ragged", [False, True])
def test_decode_attention_agrees_between_virtual_and_paged(ragged):
    case = attention_case(AttentionConfig(batch=3, contexts=(80,), warmup=0, repeats=1), 80, ragged)
    assert case.outputs_match and case.max_abs_diff < 2e-2
    assert case.max_abs_diff_vs_reference < 5e-2
    assert case.paged_ms_median > 0 and case.virtual_ms_median > 0


def test_the_command_writes_json_and_png(tmp_path):
    p = argparse.ArgumentParser()
    add_memory_args(p)
    args = p.parse_args(["--num-requests", "12", "--budget", "64MiB", "--max-model-len", "512", "--skip-attention",
                         "--skip-latency", "--no-progress", "--json", str(tmp_path / "out.json")])
    assert cmd_bench_memory(args) == 0
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["attention"] is None and data["latency"] is None
    assert (tmp_path / "out.png").stat().st_size > 10_000
