"""`kvmem bench hybrid`: the command runs with the default, a file and a measured profile, writes the
JSON and the plot, and the report's numbers are the simulator's."""

from __future__ import annotations

import json

import pytest

from kvmem.bench.hybrid import HybridBenchConfig, run_hybrid_benchmark, summarize
from kvmem.cli import main
from kvmem.hybrid import profile as hw
from kvmem.hybrid.cost_model import ModelShape
from kvmem.hybrid.profile import DEFAULT_PROFILE
from kvmem.hybrid.simulator import SimulatorOptions, Workload, simulate

SMALL = ["--models", "opt-30b,llama3-8b", "--batches", "64,256", "--prompts", "1024", "--output-len", "16",
         "--skip-capacity"]


def test_cli_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "hybrid", *SMALL, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "KV-only" in printed and "paper: 2.19x" in printed and "simulator" in printed
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert report["profile"]["name"] == DEFAULT_PROFILE.name and report["what"].startswith("simulator predictions")
    assert [(r["model"], r["batch_size"]) for r in report["rows"]] == [
        ("OPT-30B", 64), ("OPT-30B", 256), ("Llama-3-8B", 64), ("Llama-3-8B", 256)]
    row = report["rows"][1]
    expected = simulate(ModelShape.opt_30b(), DEFAULT_PROFILE, Workload(256, 1024, 16), "hybrid",
                        SimulatorOptions(offload_weights=True))
    assert row["policies"]["hybrid"]["output_tokens_per_s"] == pytest.approx(expected.output_tokens_per_s, rel=1e-12)
    assert row["hybrid_over_kv_only"] > 1.3
    s = report["summary"]
    assert s["gqa_hybrid_equals_kv_only"] is True and s["hybrid_never_below_kv_or_act_mha"] is True
    assert s["paper_speedup_over_flexgen"] == 2.19
    assert report["ablation"]["cases"]  # the mini-batch ablation ran


def test_cli_with_a_profile_file_and_a_measured_profile(tmp_path):
    slow_link = hw.HardwareProfile("slow-link", 5e9, 5e9, 250e12, 1.3e12, 40 * 2**30, 512 * 2**30)
    path = hw.save(slow_link, tmp_path / "p.json")
    assert hw.load(path) == slow_link
    out = tmp_path / "file.json"
    assert main(["bench", "hybrid", *SMALL, "--skip-ablation", "--profile", str(path), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["profile"]["name"] == "slow-link"

    measured = tmp_path / "measured.json"
    saved = tmp_path / "saved-profile.json"
    assert main(["bench", "hybrid", *SMALL, "--skip-ablation", "--measure", "--save-profile", str(saved),
                 "--json", str(measured)]) == 0
    prof = hw.load(saved)
    assert prof.name == "measured-cpu" and prof.host_to_device_bytes_per_s > 1e8 and prof.device_matmul_flops_per_s > 1e9
    assert json.loads(measured.read_text())["profile"]["source"].startswith("measured on CPU")


def test_cli_errors_are_reported(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**DEFAULT_PROFILE.to_dict(), "pcie_gen": 4}))
    assert main(["bench", "hybrid", *SMALL, "--profile", str(bad), "--json", str(tmp_path / "x.json")]) == 2
    assert "unknown profile fields ['pcie_gen']" in capsys.readouterr().err
    assert main(["bench", "hybrid", *SMALL, "--profile", str(tmp_path / "missing.json")]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "hybrid", "--models", "gpt-5"])


def test_summary_compares_only_multi_head_rows_with_the_paper():
    cfg = HybridBenchConfig(models=("llama2-7b", "llama3-8b"), batches=(256,), prompts=(2048,), output_len=8,
                            capacity=False, ablation=False)
    report = run_hybrid_benchmark(DEFAULT_PROFILE, cfg)
    s = summarize(report["rows"])
    mha = s["hybrid_over_kv_only_mha_all"]
    assert mha["rows"] == 1 and mha["mean"] == report["rows"][0]["hybrid_over_kv_only"] > 1.5
