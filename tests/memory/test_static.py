"""static: one max-length slot per sequence, whatever its length."""

import torch

from kvmem.memory.base import KVCacheSpec
from kvmem.memory.static import StaticKVCacheManager
from tests.memory.test_paged import FakeSeq

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))


def test_each_sequence_reserves_a_whole_slot_and_gives_it_back() -> None:
    mgr = StaticKVCacheManager(SPEC, num_slots=2, max_model_len=32)
    a, b, c = FakeSeq([1, 2, 3]), FakeSeq([4]), FakeSeq([5])
    for seq in (a, b):
        assert mgr.can_allocate(seq, seq.num_tokens)
        mgr.allocate(seq, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
    assert not mgr.can_allocate(c, 1)  # two slots, both taken
    assert mgr.block_table(a) != mgr.block_table(b)
    stats = mgr.stats()
    assert stats.bytes_allocated == 2 * 32 * SPEC.bytes_per_token
    assert stats.bytes_live == 4 * SPEC.bytes_per_token
    assert abs(stats.waste - (1 - 4 / 64)) < 1e-9
    assert not mgr.can_allocate(a, 30)  # past max_model_len
    mgr.free(a)
    assert mgr.can_allocate(c, 1)
    mgr.free(b)
    assert mgr.stats().bytes_allocated == 0 and mgr.stats().num_sequences == 0


def test_fork_recomputes_instead_of_sharing() -> None:
    mgr = StaticKVCacheManager(SPEC, num_slots=2, max_model_len=8)
    parent, child = FakeSeq([1, 2]), FakeSeq([1, 2])
    mgr.allocate(parent, 2)
    parent.num_computed_tokens = child.num_computed_tokens = 2
    mgr.fork(parent, child)
    assert child.num_computed_tokens == 0
