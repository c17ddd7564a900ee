"""`kvmem bench throughput`: the shared workloads, and `--compare` orchestrating peers."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from kvmem.bench.compare import CompareConfig, command, parse_peers, run_compare
from kvmem.bench.workloads import make_workload

REPO = Path(__file__).resolve().parents[2]
VOCAB = 49152


def test_workloads_are_seeded_and_shaped_as_documented():
    random = make_workload("random", VOCAB)
    assert len(random.prompts) == 64 and {len(p) for p in random.prompts} == {128} and set(random.output_lens) == {128}

    share = make_workload("sharegpt", VOCAB)
    ins = [len(p) for p in share.prompts]
    assert len(ins) == 256 and max(ins) <= 1024 and max(share.output_lens) <= 512
    assert 150 <= np.median(ins) <= 250 and 110 <= np.median(share.output_lens) <= 190
    assert share.prompts == make_workload("sharegpt", VOCAB).prompts  # seeded
    assert share.prompts != make_workload("sharegpt", VOCAB, seed=1).prompts

    prefix = make_workload("prefix", VOCAB)
    assert len(prefix.prompts) == 128 and {len(p) for p in prefix.prompts} == {544}
    assert len({tuple(p[:512]) for p in prefix.prompts}) == 1  # one shared system prompt
    assert len({tuple(p[512:]) for p in prefix.prompts}) == 128  # own tokens differ
    assert all(100 <= t < VOCAB - 100 for p in share.prompts for t in p)
    with pytest.raises(ValueError, match="workload"):
        make_workload("nope", VOCAB)


def test_peers_draw_the_same_workload():
    """benchmarks/peers/bench_common.py loads the workload module by path (kvmem is not installed in a
    peer's venv); it must give the very same ids."""
    peers = REPO / "benchmarks" / "peers"
    spec = importlib.util.spec_from_file_location("bench_common_under_test", peers / "bench_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    for name in ("random", "sharegpt", "prefix"):
        args = argparse.Namespace(workload=name, seed=3, num_prompts=None, input_len=16, output_len=8)
        theirs = common.load_workload(args, VOCAB)
        ours = make_workload(name, VOCAB, 3, None, 16, 8)
        assert (theirs.prompts, theirs.output_lens) == (ours.prompts, ours.output_lens)


def test_parse_peers_rejects_unknown_engines():
    assert parse_peers("vllm, transformers") == ("vllm", "transformers")
    with pytest.raises(ValueError, match="--compare"):
        parse_peers("vllm,llama.cpp")


def _fake_peers(tmp_path: Path, vllm_tok_s: float, hf_tok_s: float) -> Path:
    """Peer scripts with the real ones' command line that write a result without running an engine."""
    d = tmp_path / "peers"
    d.mkdir()
    writer = ("import json, sys\n"
              "a = sys.argv[1:]\n"
              "path = a[a.index('--json') + 1]\n"
              "assert a[a.index('--workload') + 1] == 'random' and '--model' in a\n"
              "json.dump({{'output_tokens_per_s': {}}}, open(path, 'w'))\n")
    (d / "fake_vllm.py").write_text(writer.format(vllm_tok_s))
    (d / "run_vllm.sh").write_text(f'exec "{sys.executable}" "$(dirname "$0")/fake_vllm.py" "$@"\n')
    (d / "transformers_throughput.py").write_text(writer.format(hf_tok_s))
    return d


def test_compare_runs_every_engine_each_round_and_reports_ratios(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    cfg = CompareConfig("random", "bfloat16", "paged", 0.25, 0, 2, tmp_path / "out", hf, ("vllm", "transformers"),
                        num_prompts=2, input_len=8, output_len=4, peers_dir=_fake_peers(tmp_path, 1000.0, 10.0))
    assert command("kvmem", cfg, tmp_path / "x.json")[1:4] == ["-m", "kvmem.cli", "bench"]
    result = run_compare(cfg)
    kvmem = result.runs["kvmem"]
    assert len(kvmem) == 2 and all(v > 0 for v in kvmem)  # the real kvmem ran, twice
    assert result.runs["vllm"] == [1000.0, 1000.0] and result.runs["transformers"] == [10.0, 10.0]
    assert result.kvmem_ratio_per_round["vllm"] == pytest.approx([v / 1000.0 for v in kvmem])
    assert result.kvmem_ratio_median["transformers"] == pytest.approx(np.median(kvmem) / 10.0)
    summary = json.loads((tmp_path / "out" / "compare_random_bfloat16.json").read_text())
    assert summary["median_output_tokens_per_s"]["vllm"] == 1000.0
    assert (tmp_path / "out" / "compare_random_bfloat16.png").stat().st_size > 0
    kvmem_run = json.loads((tmp_path / "out" / "kvmem_random_bfloat16_r1.json").read_text())
    assert kvmem_run["output_tokens"] == 2 * 4 and kvmem_run["workload"] == "random"


def test_compare_says_how_to_get_the_hf_export(tmp_path):
    cfg = CompareConfig("random", "bfloat16", "paged", 1.0, 0, 1, tmp_path / "out", tmp_path / "missing",
                        ("vllm",), peers_dir=_fake_peers(tmp_path, 1.0, 1.0))
    with pytest.raises(FileNotFoundError, match="export_hf.py"):
        run_compare(cfg)


def test_a_run_that_shared_the_machine_is_run_again(tmp_path):
    """The first vLLM run reports another process on 0.9 cores; the compare reruns it and keeps the clean one."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    peers = _fake_peers(tmp_path, 1.0, 1.0)
    (peers / "fake_vllm.py").write_text(
        "import json, sys, pathlib\n"
        "a = sys.argv[1:]\n"
        "count = pathlib.Path(__file__).with_name('calls')\n"
        "n = int(count.read_text()) if count.exists() else 0\n"
        "count.write_text(str(n + 1))\n"
        "json.dump({'output_tokens_per_s': 100.0 + n, 'cpu_contention': {'other_cores': 0.9 if n == 0 else 0.0}},"
        " open(a[a.index('--json') + 1], 'w'))\n")
    cfg = CompareConfig("random", "bfloat16", "paged", 0.25, 0, 1, tmp_path / "out", hf, ("vllm",),
                        num_prompts=2, input_len=8, output_len=4, peers_dir=peers)
    result = run_compare(cfg)
    assert (peers / "calls").read_text() == "2"
    assert result.runs["vllm"] == [101.0]


def test_structured_output_ratio_spreads_constrained_requests_evenly():
    from kvmem.bench.throughput import constrained_indices

    assert constrained_indices(8, 0.0) == []
    assert constrained_indices(8, 1.0) == list(range(8))
    assert constrained_indices(8, 0.5) == [0, 2, 4, 6]
    assert len(constrained_indices(7, 0.5)) in (3, 4)
    with pytest.raises(ValueError, match="structured_output_ratio must be in"):
        constrained_indices(8, 1.5)


def test_throughput_with_half_the_requests_under_a_schema(tmp_path):
    from kvmem.bench.throughput import run_throughput
    from tests.oracle import make_tiny_model

    model = make_tiny_model(tmp_path / "llama", "llama-mha")
    result = run_throughput("random", num_prompts=4, input_len=16, output_len=24, warmup=False,
                            structured_output_ratio=0.5, model=str(model), dtype="float32", kv_cache_memory="4MiB")
    # Constrained requests still generate exactly their output length (the schema never completes).
    assert result.output_tokens == 4 * 24
    assert result.settings["num_structured_requests"] == 2 and result.settings["structured_output_ratio"] == 0.5


def test_llamacpp_peer_reads_the_gguf_with_kvmems_thread_count(tmp_path):
    assert parse_peers("llamacpp") == ("llamacpp",)
    gguf = tmp_path / "m.Q8_0.gguf"
    cfg = CompareConfig("random", "bfloat16", "paged", 1.0, 0, 1, tmp_path / "out", tmp_path / "no-hf-export",
                        ("llamacpp",), quantization="gguf", num_threads=2, gguf=gguf)
    theirs = command("llamacpp", cfg, tmp_path / "l.json")
    assert theirs[1].endswith("run_llamacpp.sh")
    assert theirs[theirs.index("--model") + 1] == str(gguf) and theirs[theirs.index("--threads") + 1] == "2"
    ours = command("kvmem", cfg, tmp_path / "k.json")
    assert ours[ours.index("--quantization") + 1] == "gguf" and ours[ours.index("--num-threads") + 1] == "2"
    assert ours[ours.index("--model") + 1] == str(gguf)
    from kvmem.bench.compare import check_peers

    check_peers(cfg)  # llama.cpp alone needs no Hugging Face export
