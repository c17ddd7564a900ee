"""Cascade (shared-prefix) attention: the native kernel's grouped rows give exactly decode_attention's
results, bit for bit, whatever the groups; groups are found from block tables; the log-sum-exp
reference agrees with plain attention."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmem.attention import cpu_kernels
from kvmem.attention.cascade import PREFIX_GRAIN, find_cascade_groups, merged_attention

decode = cpu_kernels.decode_attention_kernel()
cascade = cpu_kernels.cascade_attention_kernel()
needs_kernel = pytest.mark.skipif(cascade is None, reason="no C++ toolchain for the native CPU kernel")
CPU = torch.device("cpu")


def _shared_batch(g: torch.Generator, dtype, kv_heads: int, heads: int, dim: int, block: int, prefix_tokens: int,
                  suffix_lens: list[int], num_blocks: int = 256):
    """Sequences whose tables start with the same blocks (prefix_tokens of them filled), then their
    own blocks; NaN in every slot nobody owns, so a stray read poisons the output."""
    kc = torch.full((kv_heads, num_blocks, block, dim), float("nan"), dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    order = torch.randperm(num_blocks, generator=g).tolist()
    shared = order[: -(-prefix_tokens // block)]
    free = order[len(shared):]
    tables, lens = [], []
    for n in suffix_lens:
        total = prefix_tokens + n
        # A prefix that ends inside a block: that block is the sequence's own copy from there on.
        own_from = prefix_tokens // block
        table = shared[:own_from]
        while len(table) * block < total:
            table.append(free.pop())
        tables.append(table)
        lens.append(total)
    for t in range(prefix_tokens):  # the shared tokens, the same in every table holding them
        values_k = torch.randn(kv_heads, dim, generator=g).to(dtype)
        values_v = torch.randn(kv_heads, dim, generator=g).to(dtype)
        for table in tables:
            kc[:, table[t // block], t % block] = values_k
            vc[:, table[t // block], t % block] = values_v
    for table, n in zip(tables, lens):
        for t in range(prefix_tokens, n):
            kc[:, table[t // block], t % block] = torch.randn(kv_heads, dim, generator=g).to(dtype)
            vc[:, table[t // block], t % block] = torch.randn(kv_heads, dim, generator=g).to(dtype)
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [t[0]] * (width - len(t)) for t in tables])
    q = torch.randn(len(lens), heads, dim, generator=g).to(dtype)
    return q, kc, vc, tables, padded, torch.tensor(lens)


@needs_kernel
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16]), dim=st.sampled_from([64, 128]),
       kv_heads=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 3, 4]),
       prefix_tokens=st.integers(1, 200), suffix=st.lists(st.integers(0, 40), min_size=1, max_size=12),
       block=st.sampled_from([16, 32]), seed=st.integers(0, 2 ** 16), data=st.data())
def test_grouped_rows_equal_rows_alone_bit_for_bit(dtype, dim, kv_heads, group, prefix_tokens, suffix, block, seed,
                                                   data):
    g = torch.Generator().manual_seed(seed)
    q, kc, vc, tables, padded, lens = _shared_batch(g, dtype, kv_heads, kv_heads * group, dim, block,
                                                    prefix_tokens, suffix)
    alone = decode(q, kc, vc, padded, lens, dim ** -0.5)
    assert not alone.isnan().any()
    # Any subset of rows, in any order, as one group with any usable prefix (not block-aligned too).
    usable = min(int(lens.min()), prefix_tokens // block * block) // PREFIX_GRAIN * PREFIX_GRAIN
    members = data.draw(st.permutations(range(len(suffix))))
    members = members[: data.draw(st.integers(1, len(members)))]
    prefix = data.draw(st.sampled_from(sorted({0, usable, usable // 64 * 32})))
    out = cascade(q, kc, vc, padded, lens, dim ** -0.5, torch.tensor(members), torch.tensor([0, len(members)]),
                  torch.tensor([prefix]))
    assert torch.equal(out, alone)
    # Split in two groups (a row's neighbours change; its result may not).
    half = len(members) // 2
    out = cascade(q, kc, vc, padded, lens, dim ** -0.5, torch.tensor(members),
                  torch.tensor([0, half, len(members)]), torch.tensor([prefix, prefix // 64 * 32]))
    assert torch.equal(out, alone)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_large_group_of_decode_rows_on_a_long_prefix(dtype):
    """The prefix workload's shape: many rows, 512 shared tokens, GQA 9/3, head dim 64 (float16 takes
    the portable loops, which compute every row alone)."""
    g = torch.Generator().manual_seed(5)
    q, kc, vc, tables, padded, lens = _shared_batch(g, dtype, 3, 9, 64, 16, 512, [32 + i % 7 for i in range(40)],
                                                    num_blocks=4096 // 4)
    groups = find_cascade_groups([t for t in tables], 16, [int(n) - 1 for n in lens], [1] * len(tables), CPU)
    assert groups is not None and groups.num_groups == 1 and int(groups.prefix_lens[0]) == 512
    alone = decode(q, kc, vc, padded, lens, 0.125)
    out = cascade(q, kc, vc, padded, lens, 0.125, groups.rows, groups.starts, groups.prefix_lens)
    assert torch.equal(out, alone)
    ref = torch.empty(len(tables), 9, 64)
    for i, (table, n) in enumerate(zip(tables, lens.tolist())):
        k = torch.stack([kc[:, table[t // 16], t % 16] for t in range(n)])  # [n, kv_heads, dim]
        v = torch.stack([vc[:, table[t // 16], t % 16] for t in range(n)])
        ref[i] = merged_attention(q[i:i + 1], k, v, [k[:0]], [v[:0]], 0.125)[0]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@needs_kernel
def test_prompt_rows_of_one_sequence_group_on_its_own_table():
    """A prompt chunk on a cached prefix: its rows (lengths position + 1) share the sequence's table."""
    g = torch.Generator().manual_seed(9)
    q, kc, vc, tables, padded, lens = _shared_batch(g, torch.bfloat16, 2, 6, 64, 16, 100, [60])
    num_computed, query_len = 120, 40  # rows for positions 120..159
    rows_tables = padded.repeat(query_len, 1)
    rows_lens = torch.arange(num_computed, num_computed + query_len) + 1
    rows_q = torch.randn(query_len, 6, 64, generator=g).to(torch.bfloat16)
    groups = find_cascade_groups([tables[0]], 16, [num_computed], [query_len], CPU)
    assert groups is not None and int(groups.prefix_lens[0]) == 96 and groups.rows.tolist() == list(range(query_len))
    out = cascade(rows_q, kc, vc, rows_tables, rows_lens, 0.125, groups.rows, groups.starts, groups.prefix_lens)
    assert torch.equal(out, decode(rows_q, kc, vc, rows_tables, rows_lens, 0.125))


def test_groups_from_tables():
    ids = [[5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 1, 2], [3, 4], [5, 6, 7, 8, 10]]
    groups = find_cascade_groups(ids, 32, [127, 127, 127, 63, 150], [1, 1, 1, 1, 1], CPU, min_prefix=64)
    # Rows 0, 1 and 4 share 3 blocks (96 tokens), row 2 only 2 (64): 96 x 3 rows pays more than 64 x 4.
    assert groups.rows.tolist() == [0, 1, 4] and groups.starts.tolist() == [0, 3]
    assert groups.prefix_lens.tolist() == [96]
    # Not enough shared tokens, or one row: no groups.
    assert find_cascade_groups(ids, 16, [127, 127, 127, 63, 150], [1] * 5, CPU, min_prefix=96) is None
    assert find_cascade_groups([[1, 2, 3]], 32, [90], [1], CPU) is None
    assert find_cascade_groups(ids, None, [127] * 5, [1] * 5, CPU) is None
    # A prompt chunk starting before the prefix ends: only its rows that reach the prefix join.
    groups = find_cascade_groups([[1, 2, 3, 4]], 32, [60], [40], CPU)
    assert groups.prefix_lens.tolist() == [96] and groups.rows.tolist() == list(range(35, 40))


@needs_kernel
def test_bad_groups_are_refused():
    q = torch.randn(2, 2, 64)
    kc = torch.randn(1, 8, 16, 64)
    tables, lens = torch.tensor([[0, 1, 2], [0, 1, 3]]), torch.tensor([40, 48])
    for rows, starts, prefix in [([0, 1], [0, 2], [48]), ([0, 1], [0, 2], [16]), ([0, 0], [0, 2], [32]),
                                 ([0, 5], [0, 2], [32]), ([0, 1], [0, 1], [32])]:
        with pytest.raises(RuntimeError):
            cascade(q, kc, kc, tables, lens, 0.125, torch.tensor(rows), torch.tensor(starts), torch.tensor(prefix))


def test_merged_attention_equals_plain_attention():
    g = torch.Generator().manual_seed(3)
    rows, heads, kv_heads, dim, prefix = 5, 6, 2, 32, 40
    q = torch.randn(rows, heads, dim, generator=g)
    pk, pv = torch.randn(prefix, kv_heads, dim, generator=g), torch.randn(prefix, kv_heads, dim, generator=g)
    sk = [torch.randn(n, kv_heads, dim, generator=g) for n in (0, 1, 7, 20, 3)]
    sv = [torch.randn(n, kv_heads, dim, generator=g) for n in (0, 1, 7, 20, 3)]
    out = merged_attention(q, pk, pv, sk, sv, 0.2)
    for i in range(rows):
        k = torch.cat([pk, sk[i]]).repeat_interleave(3, dim=1)
        v = torch.cat([pv, sv[i]]).repeat_interleave(3, dim=1)
        p = (torch.einsum("hd,khd->hk", q[i], k) * 0.2).softmax(-1)
        torch.testing.assert_close(out[i], torch.einsum("hk,khd->hd", p, v), atol=1e-5, rtol=1e-5)
