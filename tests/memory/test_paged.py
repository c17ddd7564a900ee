"""Property tests for the paged manager: random lifecycles of sequences against a shadow of what
every cache slot should hold.

The shadow `slot_tokens[slot]` records which token id was "written" to a slot; the runner's work
is simulated by applying pending copy-on-write copies and then writing each computed token to its
slot. Whatever the interleaving of admit / prefill / decode / fork / free, every live sequence must
read back exactly its own tokens, blocks must never be double-owned, reference counts must equal
holders, and all memory must return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import itertools

import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvmem.memory.base import KVCacheSpec
from kvmem.memory.paged import PagedKVCacheManager

_ids = itertools.count()
SPEC = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))


@dataclass(eq=False)
class FakeSeq:
    token_ids: list[int]
    seq_id: int = field(default_factory=lambda: next(_ids))
    num_computed_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


# A few shared "system prompts" make prefix hits frequent.
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 9, 9, 9], [5] * 12, []]


class PagedLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.block_size = 4
        self.mgr = PagedKVCacheManager(SPEC, num_blocks=12, block_size=self.block_size, enable_prefix_caching=True)
        self.slot_tokens: dict[int, int] = {}
        self.live: list[FakeSeq] = []

    # --- the runner's side, simulated ---------------------------------------------------
    def compute(self, seq: FakeSeq, n: int) -> None:
        for src, dst in self.mgr.pending_copies:
            for off in range(self.block_size):
                s = src * self.block_size + off
                if s in self.slot_tokens:
                    self.slot_tokens[dst * self.block_size + off] = self.slot_tokens[s]
        self.mgr.pending_copies.clear()
        table = self.mgr.block_table(seq)
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            self.slot_tokens[table[pos // self.block_size] * self.block_size + pos % self.block_size] = seq.token_ids[pos]
        seq.num_computed_tokens += n
        self.mgr.on_tokens_computed(seq)

    # --- rules ----------------------------------------------------------------------------
    @rule(prefix=st.sampled_from(PREFIXES), own=st.lists(st.integers(0, 3), min_size=1, max_size=10),
          chunk=st.integers(1, 8))
    def admit_and_prefill(self, prefix: list[int], own: list[int], chunk: int) -> None:
        seq = FakeSeq(prefix + own)
        seq.num_computed_tokens = self.mgr.admit(seq)
        assert seq.num_computed_tokens % self.block_size == 0
        assert seq.num_computed_tokens < seq.num_tokens
        n = min(chunk, seq.num_tokens - seq.num_computed_tokens)
        if not self.mgr.can_allocate(seq, n):
            self.mgr.free(seq)
            return
        self.mgr.allocate(seq, n)
        self.compute(seq, n)
        self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), token=st.integers(0, 3))
    def step(self, i: int, token: int) -> None:
        seq = self.live[i % len(self.live)]
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(token)  # a decode: the sampled token joins the sequence
        n = min(3, seq.num_tokens - seq.num_computed_tokens)
        if self.mgr.can_allocate(seq, n):  # else no room: the scheduler would preempt; leave it waiting
            self.mgr.allocate(seq, n)
            self.compute(seq, n)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def fork(self, i: int) -> None:
        parent = self.live[i % len(self.live)]
        child = FakeSeq(list(parent.token_ids[: parent.num_computed_tokens]))
        child.num_computed_tokens = parent.num_computed_tokens
        self.mgr.fork(parent, child)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def free(self, i: int) -> None:
        self.mgr.free(self.live.pop(i % len(self.live)))

    @rule()
    def release_cached(self) -> None:
        self.mgr.release_free_memory()

    # --- invariants -----------------------------------------------------------------------
    @invariant()
    def pool_is_consistent(self) -> None:
        self.mgr.pool.check_invariants()

    @invariant()
    def refcounts_equal_holders(self) -> None:
        holders: dict[int, int] = {}
        for seq in self.live:
            table = self.mgr.block_table(seq)
            assert len(table) == len(set(table)), "a sequence holds a block twice"
            for b in table:
                holders[b] = holders.get(b, 0) + 1
        for block in self.mgr.pool.blocks:
            assert block.ref_count == holders.get(block.block_id, 0)

    @invariant()
    def every_sequence_reads_its_own_tokens(self) -> None:
        for seq in self.live:
            table = self.mgr.block_table(seq)
            for pos in range(seq.num_computed_tokens):
                slot = table[pos // self.block_size] * self.block_size + pos % self.block_size
                assert self.slot_tokens.get(slot) == seq.token_ids[pos], (seq, pos)

    def teardown(self) -> None:
        for seq in self.live:
            self.mgr.free(seq)
        assert self.mgr.pool.num_free == self.mgr.pool.num_blocks
        stats = self.mgr.stats()
        assert stats.bytes_allocated == 0 and stats.bytes_live == 0 and stats.num_sequences == 0


TestPagedLifecycle = PagedLifecycle.TestCase
TestPagedLifecycle.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_prefix_hit_reuses_blocks_and_counts_hits() -> None:
    mgr = PagedKVCacheManager(SPEC, num_blocks=8, block_size=4)
    a = FakeSeq(list(range(10)))
    assert mgr.admit(a) == 0
    mgr.allocate(a, 10)
    a.num_computed_tokens = 10
    mgr.on_tokens_computed(a)
    b = FakeSeq(list(range(9)) + [99])
    assert mgr.admit(b) == 8  # two full blocks shared
    assert mgr.block_table(b) == mgr.block_table(a)[:2]
    stats = mgr.stats()
    assert stats.prefix_cache_hits == 8 and stats.prefix_cache_queries == 20


def test_freed_cached_blocks_are_evicted_lru_and_uncached_blocks_go_first() -> None:
    mgr = PagedKVCacheManager(SPEC, num_blocks=4, block_size=2)
    a = FakeSeq([1, 2, 3, 4, 5])
    mgr.admit(a)
    mgr.allocate(a, 5)
    a.num_computed_tokens = 5
    mgr.on_tokens_computed(a)
    mgr.free(a)
    assert mgr.stats().bytes_cached == 2 * mgr.block_bytes  # [1,2] and [3,4]; the partial block is not
    b = FakeSeq([7, 8, 9])  # takes the never-cached blocks first
    mgr.admit(b)
    mgr.allocate(b, 3)
    assert mgr.stats().bytes_cached == 2 * mgr.block_bytes
    c = FakeSeq([1, 2, 3, 4, 0])
    assert mgr.admit(c) == 4


def test_copy_on_write_when_a_forked_sequence_writes_its_shared_last_block() -> None:
    mgr = PagedKVCacheManager(SPEC, num_blocks=4, block_size=4)
    parent = FakeSeq([1, 2, 3, 4, 5, 6])
    mgr.admit(parent)
    mgr.allocate(parent, 6)
    parent.num_computed_tokens = 6
    child = FakeSeq(list(parent.token_ids))
    child.num_computed_tokens = 6
    mgr.fork(parent, child)
    assert mgr.block_table(child) == mgr.block_table(parent)
    parent.token_ids.append(7)
    assert mgr.can_allocate(parent, 1)
    mgr.allocate(parent, 1)
    src, dst = mgr.pending_copies[0]
    assert src == mgr.block_table(child)[1] and dst == mgr.block_table(parent)[1] and src != dst
    assert mgr.block_table(parent)[0] == mgr.block_table(child)[0]  # the full block stays shared


def test_can_allocate_never_overcommits() -> None:
    mgr = PagedKVCacheManager(SPEC, num_blocks=2, block_size=4)
    a = FakeSeq(list(range(9)))
    mgr.admit(a)
    assert not mgr.can_allocate(a, 9)
    with pytest.raises(Exception):
        mgr.allocate(a, 9)
    assert mgr.pool.num_free == 2
