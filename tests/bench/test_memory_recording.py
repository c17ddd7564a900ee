"""`kvmem bench memory --record FILE`: a recording /dashboard can play, whose frames say what the
managers held at those steps, bounded in size whatever the run's length."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from kvmem.bench.memory import MemoryBenchConfig, add_memory_args, cmd_bench_memory, run_memory_benchmark
from kvmem.bench.memory_recording import FORMAT, read_recording
from kvmem.bench.memory_sim import SimConfig
from kvmem.bench.memory_stream import StreamConfig

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the virtual strategy is Linux's mmap")

MiB = 2**20
STREAM = StreamConfig(num_requests=40, prompt_median=60, output_median=30, max_prompt=200, max_output=64, seed=5)
SIM = SimConfig(budget_bytes=24 * MiB, max_model_len=256, max_num_seqs=32, max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "events.jsonl"
    cfg = MemoryBenchConfig(stream=STREAM, sim=SIM, run_latency=False, run_attention=False, progress=False,
                            record=str(path), record_frames=8)
    report, _ = run_memory_benchmark(cfg)
    return path, report


def test_frames_of_every_strategy_evenly_spaced_and_bounded(recording):
    path, report = recording
    header, frames = read_recording(path)
    assert header["format"] == FORMAT and header["settings"]["strategies"] == ["static", "paged", "virtual"]
    for label in ("static", "paged", "virtual"):
        steps = [f["step"] for f in frames if f["label"] == label]
        assert 8 <= len(steps) < 16, (label, len(steps))  # halved whenever it reached 2 x 8
        gaps = {b - a for a, b in zip(steps, steps[1:])}
        assert len(gaps) == 1, gaps  # evenly spaced
        assert steps[0] == 0 and steps[-1] < report["strategies"][label]["steps"]
    # Frames of one strategy come together, in the order the strategies ran.
    labels = [f["label"] for f in frames]
    assert labels == sorted(labels, key=["static", "paged", "virtual"].index)


def test_each_frame_is_the_state_a_live_page_gets_and_agrees_with_itself(recording):
    path, _ = recording
    _, frames = read_recording(path)
    for f in frames:
        m, s = f["map"], f["stats"]
        assert s["strategy"] == f["label"] == m["strategy"]
        assert set(m["requests"]) == set(m["details"])
        assert f["num_running"] + f["num_waiting"] == len(m["requests"])
        if m["kind"] == "blocks":  # paged: the map's blocks and the numbers say the same
            c = m["counts"]
            assert (c["used"] + c["shared"]) * m["block_bytes"] == s["bytes_allocated"]
            assert c["cached"] * m["block_bytes"] == s["bytes_cached"]
            assert {str(k) for k in m["owners"]} <= set(m["requests"])
        elif m["kind"] == "slots_pages":  # virtual: mapped chunks drawn = the physical bytes
            mapped = sum(len(r["pages"]) - r["pages"].count(".") for r in m["slots"])
            distinct_shared = m["counts"]["shared"]
            shared_cells = sum(r["pages"].count("s") for r in m["slots"])
            assert mapped - shared_cells + distinct_shared == m["counts"]["mapped"]
            assert m["physical_bytes"] == s["bytes_physical"] and m["reserved_bytes"] == s["bytes_reserved"]
        else:
            assert m["kind"] == "slots"
            assert m["counts"]["used"] * m["slot_bytes"] == s["bytes_allocated"]
    assert any(f["num_preemptions"] for f in frames if f["label"] == "paged") or any(
        f["num_waiting"] for f in frames), "the budget never bound: the picture would show nothing"
    assert max(f["num_generation_tokens"] for f in frames) > 0


def test_the_command_records_and_refuses_a_non_recording(tmp_path):
    p = argparse.ArgumentParser()
    add_memory_args(p)
    rec = tmp_path / "run.jsonl"
    args = p.parse_args(["--num-requests", "10", "--budget", "32MiB", "--max-model-len", "256", "--skip-attention",
                         "--skip-latency", "--no-progress", "--strategies", "paged", "--json", str(tmp_path / "o.json"),
                         "--record", str(rec), "--record-frames", "4"])
    assert cmd_bench_memory(args) == 0
    header, frames = read_recording(rec)
    assert {f["label"] for f in frames} == {"paged"} and frames
    json.dumps(header, allow_nan=False)  # a browser's JSON.parse reads it (no Infinity)
    (tmp_path / "other.jsonl").write_text('{"hello": 1}\n')
    with pytest.raises(ValueError, match="not a kvmem memory recording"):
        read_recording(tmp_path / "other.jsonl")
