"""The hybrid manager without a model: residency in two tiers, block ownership, placement of ACT blocks,
moving a sequence's KV to the host, and the staging / write-back indices."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmem.hybrid.cost_model import ModelShape
from kvmem.hybrid.policy import HostTierPlan, is_act_block
from kvmem.memory.base import KVCacheSpec, cdiv
from kvmem.memory.hybrid import HybridKVCacheManager

BS = 4
SHAPE = ModelShape("tiny", num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=2, head_dim=4,
                   intermediate_size=16, vocab_size=100, dtype_bytes=4)
SPEC = KVCacheSpec(SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim, torch.float32, torch.device("cpu"))


class Seq:
    _next = 0

    def __init__(self, num_tokens: int) -> None:
        Seq._next += 1
        self.seq_id, self.token_ids, self.num_computed_tokens = Seq._next, list(range(num_tokens)), 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def make_manager(act_ratio: float, host_blocks: int = 12, device_blocks: int = 4,
                 staging_blocks: int = 16) -> HybridKVCacheManager:
    plan = HostTierPlan.for_budget(10**9, act_ratio, BS, SHAPE)
    per = act_ratio * plan.act_block_bytes + (1 - act_ratio) * plan.kv_block_bytes
    plan = HostTierPlan.for_budget(int(host_blocks * per) + 1, act_ratio, BS, SHAPE)
    return HybridKVCacheManager(SPEC, SHAPE.hidden_size, device_blocks, BS, plan, staging_blocks,
                                enable_prefix_caching=False)


def check_invariants(m: HybridKVCacheManager, live: list[Seq]) -> None:
    m.device_tier.pool.check_invariants()
    kv_owned = [b.block_id for t in m.host_tables.values() for b in t if not b.is_act]
    act_owned = [b.block_id for t in m.host_tables.values() for b in t if b.is_act]
    assert sorted(kv_owned + m.free_kv) == list(range(m.plan.num_kv_blocks))  # each block once
    assert sorted(act_owned + m.free_act) == list(range(m.plan.num_act_blocks))
    for seq in live:
        on_host, on_device = seq.seq_id in m.host_tables, seq.seq_id in m.device_tier.tables
        assert not (on_host and on_device)
        if on_host:
            assert len(m.host_tables[seq.seq_id]) == cdiv(seq.num_computed_tokens, BS)


@settings(max_examples=60, deadline=None)
@given(ratio=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
       ops=st.lists(st.tuples(st.sampled_from(["new", "step", "finish"]), st.integers(1, 30)), max_size=40))
def test_random_traffic_keeps_ownership_and_returns_to_baseline(ratio, ops):
    m = make_manager(ratio)
    baseline = m.stats()
    live: list[Seq] = []
    for op, n in ops:
        if op == "new":
            live.append(Seq(n))
        elif op == "step":
            for seq in list(live):
                num_new = min(n, max(seq.num_tokens - seq.num_computed_tokens, 1))
                if seq.num_computed_tokens == 0 and seq.seq_id not in m.host_tables \
                        and seq.seq_id not in m.device_tier.tables:
                    m.admit(seq)
                if not m.can_allocate(seq, num_new):
                    m.free(seq)  # the scheduler would preempt it
                    live.remove(seq)
                    continue
                m.allocate(seq, num_new)
                seq.num_computed_tokens += num_new
                if seq.num_computed_tokens >= seq.num_tokens:
                    seq.token_ids.append(0)  # decode: one more token next step
                m.on_tokens_computed(seq)
        elif live:
            m.free(live.pop(n % len(live)))
        check_invariants(m, live)
        stats = m.stats()
        assert stats.bytes_allocated <= stats.bytes_physical and stats.bytes_live <= stats.bytes_allocated
    for seq in live:
        m.free(seq)
    check_invariants(m, [])
    end = m.stats()
    assert end.bytes_allocated == end.bytes_live == end.num_sequences == 0
    assert end.bytes_physical == baseline.bytes_physical and end.extra["num_host_resident"] == 0


def test_new_sequences_that_do_not_fit_the_device_go_to_the_host_with_the_ratio():
    m = make_manager(0.5, host_blocks=40, device_blocks=2)
    small, big = Seq(6), Seq(40)
    for seq in (small, big):
        m.admit(seq)
        m.allocate(seq, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
    assert not m.is_host_resident(small) and m.is_host_resident(big)
    assert [b.is_act for b in m.host_table(big)] == [is_act_block(i, 0.5) for i in range(10)]
    stats = m.stats()
    assert stats.extra["num_host_admitted"] == 1 and stats.extra["num_offloaded"] == 0
    assert stats.extra["host_act_blocks_used"] == 5 and stats.extra["host_kv_blocks_used"] == 5


def test_a_full_device_moves_the_growing_sequence_with_its_kv():
    m = make_manager(0.5, host_blocks=20, device_blocks=2)
    seq = Seq(8)
    m.admit(seq)
    m.allocate(seq, 8)
    seq.num_computed_tokens = 8
    table = m.block_table(seq)
    data = torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, len(table), BS, SPEC.head_dim)
    m.device_tier.kv[:, :, :, table] = data
    seq.token_ids.append(1)
    assert not m.device_tier.can_allocate(seq, 1) and m.can_allocate(seq, 1)
    m.allocate(seq, 1)  # the device is full: the sequence moves, its blocks become host KV blocks
    assert m.is_host_resident(seq) and m.block_table(seq) == []
    host = m.host_table(seq)
    assert [b.is_act for b in host[:2]] == [False, False] and len(host) == 3
    torch.testing.assert_close(m.host_kv[:, :, :, [b.block_id for b in host[:2]]], data, rtol=0, atol=0)
    assert m.stats().extra["num_offloaded"] == 1 and m.device_tier.pool.num_free == 2


def test_no_host_kv_blocks_means_no_move():
    m = make_manager(1.0, host_blocks=20, device_blocks=2)
    seq = Seq(8)
    m.admit(seq)
    m.allocate(seq, 8)
    seq.num_computed_tokens = 8
    assert not m.can_allocate(seq, 1)  # only ACT blocks, and no activations for device tokens: preempt


def test_staging_and_write_back_move_the_right_tokens():
    m = make_manager(0.5, host_blocks=20)
    m.host_kv.copy_(torch.randn_like(m.host_kv))
    m.host_act.copy_(torch.randn_like(m.host_act))
    a, b = Seq(40), Seq(40)
    for seq, computed in ((a, 9), (b, 13)):  # both host-resident (40 tokens > 4 device blocks)
        m.admit(seq)
        m.allocate(seq, computed)
        seq.num_computed_tokens = computed
        m.allocate(seq, 3)
    assert m.is_host_resident(a) and m.is_host_resident(b)
    t = m.plan_minibatch([(a, 9, 3), (b, 13, 3)])
    tables = t.block_tables
    assert [len(x) for x in tables] == [3, 4] and sorted(sum(tables, [])) == list(range(7)) == list(range(t.num_staging_blocks))
    staged_kv = [table[i] for seq, table, c in ((a, tables[0], 9), (b, tables[1], 13))
                 for i, blk in enumerate(m.host_table(seq)[:cdiv(c, BS)]) if not blk.is_act]
    assert staged_kv == list(range(t.num_kv_blocks))  # staged KV blocks first: one gather into the buffer
    buffer = m.staging[0]
    buffer.kv.zero_()
    m.stage(1, t, buffer)
    heads, dim, hidden = SPEC.num_kv_heads, SPEC.head_dim, SHAPE.hidden_size
    act_rows = []
    for seq, computed, table in ((a, 9, tables[0]), (b, 13, tables[1])):
        for i, block in enumerate(m.host_table(seq)[:cdiv(computed, BS)]):
            if block.is_act:
                act_rows += [(block.block_id * BS + o, table[i], i * BS + o) for o in range(min(BS, computed - i * BS))]
            else:
                torch.testing.assert_close(buffer.kv[:, :, table[i]], m.host_kv[1, :, :, block.block_id], rtol=0, atol=0)
    assert t.num_act_tokens == len(act_rows)
    torch.testing.assert_close(buffer.act[:len(act_rows)],
                               m.host_act[1].reshape(-1, hidden)[[r for r, _, _ in act_rows]], rtol=0, atol=0)
    assert t.act_dst_dev.tolist() == [s * BS + p % BS for _, s, p in act_rows]
    assert t.act_positions_dev.tolist() == [p for _, _, p in act_rows]

    # Write-back: the step's tokens 9..11 of a and 13..15 of b, rows 0..5 of the mini-batch.
    new_kv = torch.randn(2, heads, 6, dim)
    slots = torch.tensor([tables[0][p // BS] * BS + p % BS for p in range(9, 12)] +
                         [tables[1][p // BS] * BS + p % BS for p in range(13, 16)])
    buffer.kv.view(2, heads, -1, dim)[:, :, slots] = new_kv
    activations = torch.randn(6, hidden)
    m.write_back(0, t, buffer, activations)
    for row, (seq, pos) in enumerate([(a, p) for p in range(9, 12)] + [(b, p) for p in range(13, 16)]):
        block = m.host_table(seq)[pos // BS]
        if block.is_act:
            torch.testing.assert_close(m.host_act[0, block.block_id, pos % BS], activations[row], rtol=0, atol=0)
        else:
            torch.testing.assert_close(m.host_kv[0, :, :, block.block_id, pos % BS], new_kv[:, :, row], rtol=0, atol=0)
