"""The simulator: hybrid is never worse than either pure policy where activations pay, equals KV only
for GQA, and its times add up the way the pipeline says."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from kvmem.hybrid.cost_model import ModelShape, decode_attention_s, gemm_s
from kvmem.hybrid.profile import DEFAULT_PROFILE, HardwareProfile
from kvmem.hybrid.simulator import (
    SimulatorOptions,
    Workload,
    decode_contexts,
    max_batch_that_fits,
    plan_memory,
    simulate,
)

GiB = 2**30
OPT, LLAMA2, LLAMA3 = ModelShape.opt_30b(), ModelShape.llama2_7b(), ModelShape.llama3_8b()
OFFLOAD = SimulatorOptions(offload_weights=True)


def run_all(shape, workload, profile=DEFAULT_PROFILE, options=SimulatorOptions()):
    return {p: simulate(shape, profile, workload, p, options) for p in ("kv-only", "act-only", "hybrid")}


@pytest.mark.parametrize("shape", [OPT, LLAMA2], ids=lambda s: s.name)
@pytest.mark.parametrize("batch,prompt", [(64, 512), (128, 1024), (256, 1024), (256, 2048)])
def test_hybrid_beats_both_pure_policies_on_a_link_bound_profile(shape, batch, prompt):
    r = run_all(shape, Workload(batch, prompt, 64), options=OFFLOAD)
    tput = {k: v.output_tokens_per_s for k, v in r.items()}
    assert tput["hybrid"] >= tput["kv-only"] * (1 - 1e-9)
    assert tput["hybrid"] >= tput["act-only"] * (1 - 1e-9)
    if r["kv-only"].layout.device_tier_tokens_per_request < prompt // 2:  # mostly in the host tier: link-bound
        assert tput["hybrid"] > 1.3 * tput["kv-only"]
        assert r["hybrid"].layout.act_ratio > 0.5


def test_a_balanced_ratio_balances_the_layer():
    r = simulate(OPT, DEFAULT_PROFILE, Workload(256, 2048, 64), "hybrid")
    assert 0 < r.layout.act_ratio < 1 and r.layout.ratio_reason.startswith("balanced")
    assert r.layer.link_s == pytest.approx(r.layer.device_s, rel=0.05)
    d = json.loads(json.dumps(r.to_dict()))  # what an engine log or a report would keep
    assert d["layer"]["bound"] in ("link", "device") and d["layout"]["plan"]["num_act_blocks"] > 0
    kv = simulate(OPT, DEFAULT_PROFILE, Workload(256, 2048, 64), "kv-only")
    assert kv.layer.bound == "link" and kv.layer.link_s > 1.5 * r.layer.link_s


@pytest.mark.parametrize("batch,prompt", [(64, 512), (256, 2048), (512, 2048)])
def test_gqa_hybrid_is_kv_only(batch, prompt):
    r = run_all(LLAMA3, Workload(batch, prompt, 32), options=OFFLOAD)
    assert r["hybrid"].layout.act_ratio == 0.0 and "grouped-query" in r["hybrid"].layout.ratio_reason
    assert r["hybrid"].output_tokens_per_s == r["kv-only"].output_tokens_per_s
    if r["kv-only"].layout.device_tier_tokens_per_request < prompt:  # a host tier: activations only cost
        assert r["act-only"].output_tokens_per_s < r["kv-only"].output_tokens_per_s


def test_everything_on_the_device_is_the_sum_of_the_layers_compute():
    shape, w = LLAMA2, Workload(4, 100, 10)
    r = run_all(shape, w)
    layout = r["kv-only"].layout
    assert not layout.offload_weights and layout.device_tier_tokens_per_request == w.max_context
    expected = sum(shape.num_layers * (gemm_s(shape, DEFAULT_PROFILE, 4) + decode_attention_s(shape, DEFAULT_PROFILE, 4 * (c + 1)))
                   for c in decode_contexts(w))
    for policy in r.values():  # no host tier: the policies cannot differ
        assert policy.decode_s == pytest.approx(expected, rel=1e-12)
        assert policy.decode_link_busy_s == 0


def test_a_link_bound_decode_takes_its_transfers():
    r = simulate(OPT, DEFAULT_PROFILE, Workload(256, 1024, 16), "kv-only")
    # The link is the bottleneck: the decode lasts about as long as it is busy, never less.
    assert r.decode_link_busy_s <= r.decode_s <= r.decode_link_busy_s * 1.02
    assert r.decode_device_busy_s < 0.1 * r.decode_s


def test_mini_batch_balancing():
    w = Workload(256, 1024, 16)
    base = SimulatorOptions(min_minibatches=4)
    balanced = simulate(OPT, DEFAULT_PROFILE, w, "hybrid", replace(base, placement="per-request"))
    in_order = simulate(OPT, DEFAULT_PROFILE, w, "hybrid", replace(base, placement="per-request", minibatch_formation="in-order"))
    per_block = simulate(OPT, DEFAULT_PROFILE, w, "hybrid", base)
    assert balanced.layout.num_minibatches == 4
    assert in_order.minibatch_imbalance > 1.1 and balanced.minibatch_imbalance < 1.02
    assert in_order.output_tokens_per_s < balanced.output_tokens_per_s
    assert per_block.output_tokens_per_s >= balanced.output_tokens_per_s * (1 - 1e-3)


def test_activations_fit_larger_batches_in_the_same_host_memory():
    fits = {p: plan_memory(OPT, DEFAULT_PROFILE, Workload(256, 2048, 128), p).fits_host for p in ("kv-only", "hybrid")}
    assert fits == {"kv-only": False, "hybrid": True}
    kv = max_batch_that_fits(OPT, DEFAULT_PROFILE, 1024, 128, "kv-only")
    hybrid = max_batch_that_fits(OPT, DEFAULT_PROFILE, 1024, 128, "hybrid")
    act = max_batch_that_fits(OPT, DEFAULT_PROFILE, 1024, 128, "act-only")
    assert 0 < kv < hybrid <= act
    assert plan_memory(OPT, DEFAULT_PROFILE, Workload(kv, 1024, 128), "kv-only").fits_host
    assert not plan_memory(OPT, DEFAULT_PROFILE, Workload(kv + 1, 1024, 128), "kv-only").fits_host
    # GQA: activations are the bigger blocks.
    assert (max_batch_that_fits(LLAMA3, DEFAULT_PROFILE, 2048, 128, "act-only", OFFLOAD)
            < max_batch_that_fits(LLAMA3, DEFAULT_PROFILE, 2048, 128, "kv-only", OFFLOAD))


def test_weights_that_do_not_fit_are_refused_with_advice():
    with pytest.raises(ValueError, match="offload the weights"):
        simulate(OPT, DEFAULT_PROFILE, Workload(8, 128, 8), "kv-only", SimulatorOptions(offload_weights=False))
    assert plan_memory(OPT, DEFAULT_PROFILE, Workload(8, 128, 8), "kv-only").offload_weights  # auto
    assert not plan_memory(LLAMA2, DEFAULT_PROFILE, Workload(8, 128, 8), "kv-only").offload_weights


def test_step_stride_approximates_every_step():
    w = Workload(128, 1024, 128)
    full = simulate(OPT, DEFAULT_PROFILE, w, "hybrid")
    strided = simulate(OPT, DEFAULT_PROFILE, w, "hybrid", SimulatorOptions(step_stride=8))
    assert strided.decode_s == pytest.approx(full.decode_s, rel=0.02)


def test_a_compute_poor_device_recomputes_little():
    # A CPU-like "device": memcpy-speed link, GEMMs a thousand times slower than an A100's.
    cpu = HardwareProfile("cpu-like", 10e9, 10e9, 0.4e12, 20e9, 8 * GiB, 64 * GiB)
    r = run_all(LLAMA2, Workload(64, 1024, 16), cpu, OFFLOAD)
    assert r["hybrid"].layout.act_ratio < 0.2
    assert r["act-only"].output_tokens_per_s < r["kv-only"].output_tokens_per_s <= r["hybrid"].output_tokens_per_s * (1 + 1e-9)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="policy"):
        simulate(OPT, DEFAULT_PROFILE, Workload(8, 128, 8), "flexgen")
    with pytest.raises(ValueError, match="placement"):
        SimulatorOptions(placement="random")
    with pytest.raises(ValueError):
        Workload(0, 128, 8)
