"""The cost model: sizes of the paper's models, the GQA condition, and the balanced ratio's equation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmem.hybrid.cost_model import (
    ModelShape,
    act_ratio_for_steps,
    balanced_act_ratio,
    layer_stream_times,
)
from kvmem.hybrid.profile import DEFAULT_PROFILE, HardwareProfile
from kvmem.models.config import ModelConfig

GiB = 2**30
# Hugging Face parameter counts minus the RMSNorm weights (2 per layer + the final one), which the
# cost model leaves out (they are vectors, not matrices).
LLAMA2_7B_PARAMS = 6_738_415_616 - (2 * 32 + 1) * 4096
LLAMA3_8B_PARAMS = 8_030_261_248 - (2 * 32 + 1) * 4096


def profile(link: float = 25e9, flops: float = 250e12) -> HardwareProfile:
    return HardwareProfile("test", link, link, flops, 1.3e12, 40 * GiB, 512 * GiB)


def test_parameter_counts_match_the_published_models():
    assert ModelShape.llama2_7b().weight_bytes_total == 2 * LLAMA2_7B_PARAMS
    assert ModelShape.llama3_8b().weight_bytes_total == 2 * LLAMA3_8B_PARAMS
    opt = ModelShape.opt_30b()
    # OPT-30B: ~30.0e9 parameters (biases, layer norms and the 2k position table left out here).
    assert 29.5e9 < opt.weight_bytes_total / 2 < 30.1e9


def test_per_token_costs():
    opt = ModelShape.opt_30b()
    assert opt.kv_bytes_per_token_per_layer == 2 * 7168 * 2  # K and V, bf16
    assert opt.act_bytes_per_token_per_layer == 7168 * 2
    assert opt.recompute_flops_per_token_per_layer == 2 * 7168 * 2 * 7168
    l3 = ModelShape.llama3_8b()
    assert l3.kv_bytes_per_token_per_layer == 2 * 8 * 128 * 2
    assert l3.act_bytes_per_token_per_layer == 2 * l3.kv_bytes_per_token_per_layer  # GQA: the activation is bigger


def test_from_model_config():
    cfg = ModelConfig.from_hf_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
                                    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                                    "num_key_value_heads": 32}, name="Llama-2-7B")
    assert ModelShape.from_model_config(cfg) == ModelShape.llama2_7b()


@pytest.mark.parametrize("shape,pays", [
    (ModelShape.opt_30b(), True), (ModelShape.llama2_7b(), True), (ModelShape.llama3_8b(), False),
    (ModelShape("SmolLM2-135M", 30, 576, 9, 3, 64, 1536, 49152, tie_word_embeddings=True), False),
])
def test_activations_pay_only_for_multi_head_models(shape, pays):
    assert shape.activations_pay_off is pays
    d = balanced_act_ratio(shape, DEFAULT_PROFILE, host_tokens_per_layer=100_000)
    if pays:
        assert d.act_ratio > 0
    else:
        assert d.act_ratio == 0.0 and "grouped-query" in d.reason and "KV only" in d.reason
        assert d.link_s == d.link_s_kv_only  # KV only: nothing changed


def test_the_balanced_ratio_makes_transfer_and_recompute_finish_together():
    shape = ModelShape.opt_30b()
    p = profile()
    # W = C = 0: the per-token closed form  r* = (s_kv/BW) / ((s_kv - s_act)/BW + f/F).
    s_kv, s_act, f = (shape.kv_bytes_per_token_per_layer, shape.act_bytes_per_token_per_layer,
                      shape.recompute_flops_per_token_per_layer)
    expected = (s_kv / 25e9) / ((s_kv - s_act) / 25e9 + f / 250e12)
    d = balanced_act_ratio(shape, p, 10_000)
    assert d.act_ratio == pytest.approx(expected, rel=1e-12)
    assert 0.5 < d.act_ratio < 1.0 and d.reason.startswith("balanced")
    assert d.link_s == pytest.approx(d.device_s, rel=1e-12)
    # With streamed weights and layer compute, still equal at the ratio, and shorter than KV only.
    d = balanced_act_ratio(shape, p, 400_000, layer_compute_s=2e-3, streamed_weight_bytes_per_layer=shape.weight_bytes_per_layer)
    assert 0 < d.act_ratio < 1
    assert d.link_s == pytest.approx(d.device_s, rel=1e-12)
    assert d.layer_s < d.layer_s_kv_only == d.link_s_kv_only


def test_the_ratio_clamps_and_says_why():
    shape = ModelShape.llama2_7b()
    # A device so fast that recompute is free: still link-bound at all activations -> 1.
    d = balanced_act_ratio(shape, profile(flops=1e18), 100_000)
    assert d.act_ratio == 1.0 and "link-bound" in d.reason
    # The device already busier than the link at KV only -> 0.
    d = balanced_act_ratio(shape, profile(), 1_000, layer_compute_s=1.0)
    assert d.act_ratio == 0.0 and "device-bound" in d.reason
    d = balanced_act_ratio(shape, profile(), 0)
    assert d.act_ratio == 0.0 and "no host-tier tokens" in d.reason


sizes = st.integers(min_value=0, max_value=2_000_000)
rates = st.floats(min_value=1e8, max_value=1e16)


@settings(max_examples=200, deadline=None)
@given(n=sizes, link=rates, flops=rates, compute=st.floats(min_value=0, max_value=1.0),
       weights=st.booleans(), r=st.floats(min_value=0, max_value=1))
def test_the_ratio_minimises_the_layer_time(n, link, flops, compute, weights, r):
    shape = ModelShape.opt_30b()
    p = profile(link, flops)
    w = shape.weight_bytes_per_layer if weights else 0
    d = balanced_act_ratio(shape, p, n, compute, w)
    assert 0.0 <= d.act_ratio <= 1.0
    other = max(layer_stream_times(shape, p, n, r, compute, w))
    assert d.layer_s <= other * (1 + 1e-9) + 1e-15


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(st.tuples(sizes, st.floats(min_value=0, max_value=0.05)), min_size=1, max_size=12),
       r=st.floats(min_value=0, max_value=1))
def test_one_ratio_for_many_steps_minimises_the_summed_layer_time(steps, r):
    shape, p = ModelShape.llama2_7b(), profile()
    n, c = zip(*steps)
    d = act_ratio_for_steps(shape, p, list(n), list(c))
    total = lambda ratio: sum(max(layer_stream_times(shape, p, ni, ratio, ci)) for ni, ci in steps)  # noqa: E731
    assert 0.0 <= d.act_ratio <= 1.0
    assert total(d.act_ratio) <= total(r) * (1 + 1e-9) + 1e-15
    assert d.layer_s == pytest.approx(total(d.act_ratio) / len(steps), rel=1e-9, abs=1e-15)


def test_one_step_is_the_balanced_ratio():
    shape, p = ModelShape.opt_30b(), profile()
    assert act_ratio_for_steps(shape, p, [50_000], [1e-3]) == balanced_act_ratio(shape, p, 50_000, 1e-3)
    gqa = act_ratio_for_steps(ModelShape.llama3_8b(), p, [50_000, 60_000], [1e-3, 1e-3])
    assert gqa.act_ratio == 0 and "grouped-query" in gqa.reason
    assert math.isclose(gqa.layer_s, gqa.layer_s_kv_only)
