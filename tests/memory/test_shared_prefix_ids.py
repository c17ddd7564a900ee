"""`KVCacheManager.shared_prefix_ids`: equal leading ids mean the same KV memory (what cascade
attention groups rows by) — paged: the block table; virtual: shared pool chunks, else ids of the
slot's own chunks that no other slot has."""

import torch

from kvmem.attention.cascade import find_cascade_groups
from kvmem.memory.base import KVCacheSpec
from kvmem.memory.paged import PagedKVCacheManager
from tests.memory.test_virtual import make_manager, make_seq


def test_paged_ids_are_the_block_table_and_prefix_hits_share_them():
    m = PagedKVCacheManager(KVCacheSpec(2, 1, 16, torch.float32, torch.device("cpu")), num_blocks=32, block_size=4)
    assert m.prefix_id_tokens == 4
    a = make_seq(list(range(1, 20)))
    m.admit(a)
    m.allocate(a, a.num_tokens)
    a.num_computed_tokens = a.num_tokens
    m.on_tokens_computed(a)
    b = make_seq(list(range(1, 17)) + [99, 98])
    assert m.admit(b) == 16
    m.allocate(b, b.num_tokens - 16)
    ids_a, ids_b = m.shared_prefix_ids(a), m.shared_prefix_ids(b)
    assert ids_a == m.block_table(a) and ids_b == m.block_table(b) and ids_b[:4] == ids_a[:4]
    assert not set(ids_b[4:]) & set(ids_a)  # b's own blocks are its own


def test_virtual_ids_name_shared_chunks_and_keep_private_ones_apart():
    m = make_manager(num_slots=4, max_len=512, budget_chunks=16, lookahead_tokens=0)
    assert m.prefix_id_tokens == m.chunk_tokens == 64
    prefix = list(range(1, 201))  # 3 full chunks
    a = make_seq(prefix + [900, 901])
    m.admit(a)
    m.allocate(a, a.num_tokens)
    a.num_computed_tokens = a.num_tokens
    m.on_tokens_computed(a)
    b = make_seq(prefix + [5] * 30)
    assert m.admit(b) == 192
    m.allocate(b, b.num_tokens - 192)
    ids_a, ids_b = m.shared_prefix_ids(a), m.shared_prefix_ids(b)
    assert len(ids_a) == 4 and len(ids_b) == 4
    assert ids_a[:3] == ids_b[:3] and all(i >= 0 for i in ids_a[:3])  # the pool's chunks
    assert ids_a[3] < 0 and ids_b[3] < 0 and ids_a[3] != ids_b[3]  # each slot's own
    # Decode rows of a and b group on the 192 shared tokens.
    groups = find_cascade_groups([ids_a, ids_b], 64, [a.num_tokens - 1, b.num_tokens - 1], [1, 1],
                                 torch.device("cpu"))
    assert groups.rows.tolist() == [0, 1] and groups.prefix_lens.tolist() == [192]
    m.free(a)
    m.free(b)
    m.release_free_memory()
    m.close()
