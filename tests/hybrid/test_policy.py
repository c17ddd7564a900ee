"""The host tier's division and mini-batch formation: properties that hold for every input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmem.hybrid.cost_model import ModelShape, balanced_act_ratio
from kvmem.hybrid.policy import (
    HostTierPlan,
    RequestLoad,
    act_block_mask,
    act_tokens,
    form_minibatches,
    in_order_minibatches,
    minibatch_imbalance,
)
from kvmem.hybrid.profile import HardwareProfile

GiB = 2**30
ratios = st.floats(min_value=0.0, max_value=1.0)
SHAPES = [ModelShape.opt_30b(), ModelShape.llama2_7b(), ModelShape.llama3_8b()]


# --- placement ----------------------------------------------------------------------------------
@given(n=st.integers(min_value=0, max_value=500), r=ratios)
def test_act_blocks_are_spread_evenly(n, r):
    mask = act_block_mask(n, r)
    assert len(mask) == n
    for k in range(n + 1):  # every prefix (a growing request) holds the ratio to within half a block
        assert abs(sum(mask[:k]) - k * r) <= 0.5 + 1e-9


def test_act_block_mask_ends():
    assert act_block_mask(7, 0.0) == [False] * 7
    assert act_block_mask(7, 1.0) == [True] * 7
    assert act_block_mask(4, 0.5) == [True, False, True, False]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        act_block_mask(3, 1.5)


@given(tokens=st.integers(min_value=0, max_value=5000), r=ratios, block=st.sampled_from([1, 4, 16, 32]))
def test_act_tokens_counts_the_tokens_in_act_blocks(tokens, r, block):
    blocks = -(-tokens // block)
    mask = act_block_mask(blocks, r)
    expected = sum(min(block, tokens - i * block) for i, is_act in enumerate(mask) if is_act)
    assert act_tokens(tokens, r, block) == expected


# --- the host tier's division ---------------------------------------------------------------------
@settings(max_examples=300)
@given(budget=st.integers(min_value=0, max_value=2**40), r=ratios, block=st.sampled_from([1, 16, 64]),
       shape=st.sampled_from(SHAPES))
def test_the_plan_never_exceeds_the_host_budget(budget, r, block, shape):
    plan = HostTierPlan.for_budget(budget, r, block, shape)
    assert plan.num_kv_blocks >= 0 and plan.num_act_blocks >= 0
    assert plan.bytes_used <= budget
    # ... and uses it: fewer than two blocks' worth is left over, split near the ratio.
    mean = (1 - r) * plan.kv_block_bytes + r * plan.act_block_bytes
    assert plan.num_blocks >= int(budget // mean) - 2
    assert abs(plan.num_act_blocks - r * plan.num_blocks) <= 2.5


def test_plan_for_opt_30b():
    shape = ModelShape.opt_30b()
    plan = HostTierPlan.for_budget(100 * GiB, 0.5, 16, shape)
    assert plan.kv_block_bytes == 16 * 48 * 28672 == 2 * plan.act_block_bytes
    assert plan.num_act_blocks in (plan.num_kv_blocks, plan.num_kv_blocks + 1)
    # Half the blocks as activations: a third more tokens than KV only in the same bytes.
    kv_only = HostTierPlan.for_budget(100 * GiB, 0.0, 16, shape)
    assert plan.capacity_tokens == pytest.approx(kv_only.capacity_tokens * 4 / 3, rel=1e-4)
    assert plan.fits(*plan.request_blocks(16 * plan.num_kv_blocks))
    assert not plan.fits(plan.num_kv_blocks + 1, 0)
    with pytest.raises(ValueError):
        HostTierPlan.for_budget(-1, 0.5, 16, shape)


@settings(max_examples=200, deadline=None)
@given(shape=st.sampled_from(SHAPES), n=st.integers(min_value=0, max_value=10**7),
       link=st.floats(min_value=1e8, max_value=1e13), flops=st.floats(min_value=1e9, max_value=1e17),
       compute=st.floats(min_value=0, max_value=10.0), weights=st.booleans())
def test_the_ratio_is_a_fraction_and_gqa_is_kv_only(shape, n, link, flops, compute, weights):
    p = HardwareProfile("h", link, link, flops, 1e12, 40 * GiB, 512 * GiB)
    d = balanced_act_ratio(shape, p, n, compute, shape.weight_bytes_per_layer if weights else 0)
    assert 0.0 <= d.act_ratio <= 1.0 and d.reason
    if not shape.activations_pay_off:
        assert d.act_ratio == 0.0 and "grouped-query" in d.reason


# --- mini-batches -------------------------------------------------------------------------------
loads = st.lists(st.tuples(st.integers(min_value=0, max_value=10**9), st.integers(min_value=0, max_value=10**12)),
                 min_size=0, max_size=60)


@settings(max_examples=300)
@given(items=loads, m=st.integers(min_value=1, max_value=12))
def test_minibatches_partition_the_requests(items, m):
    requests = [RequestLoad(i, b, f) for i, (b, f) in enumerate(items)]
    mbs = form_minibatches(requests, m)
    ids = [r.request_id for mb in mbs for r in mb]
    assert sorted(ids) == list(range(len(requests)))  # every request exactly once
    assert len(mbs) <= m and all(mbs)
    assert all([r.request_id for r in mb] == sorted(r.request_id for r in mb) for mb in mbs)  # input order kept
    assert form_minibatches(requests, m) == mbs  # deterministic
    if requests:
        # The greedy's bound: no mini-batch's larger share exceeds 2/M + the largest request's share.
        tb = sum(r.transfer_bytes for r in requests) or 1
        tf = sum(r.recompute_flops for r in requests) or 1
        biggest = max(max(r.transfer_bytes / tb, r.recompute_flops / tf) for r in requests)
        for mb in mbs:
            share = max(sum(r.transfer_bytes for r in mb) / tb, sum(r.recompute_flops for r in mb) / tf)
            assert share <= 2 / m + biggest + 1e-9


def test_balanced_formation_beats_arrival_order():
    # Whole requests placed as ACT (recompute, few bytes) first, then KV requests (bytes, no recompute):
    # in arrival order one mini-batch gets all the recompute and another all the transfer.
    shape = ModelShape.opt_30b()
    requests = [RequestLoad.of(i, shape, 0, 1000) for i in range(8)] + [RequestLoad.of(8 + i, shape, 1000, 0) for i in range(8)]
    naive, balanced = in_order_minibatches(requests, 4), form_minibatches(requests, 4)
    assert minibatch_imbalance(naive) == pytest.approx(2.0)
    assert minibatch_imbalance(balanced) == pytest.approx(1.0)
    assert all(sum(r.recompute_flops > 0 for r in mb) == 2 for mb in balanced)
    with pytest.raises(ValueError):
        form_minibatches(requests, 0)
