"""The native CPU decode kernel: equal to the reference on paged tables and on contiguous slots,
for MHA and GQA, in float32 and bfloat16, without reading a single key past a sequence's length."""

import pytest
import torch

from kvmem.attention import cpu_kernels
from kvmem.attention.metadata import AttentionMetadata
from kvmem.attention.torch_attention import batched_attention, reference_attention

kernel = cpu_kernels.decode_attention_kernel()
pytestmark = pytest.mark.skipif(kernel is None, reason="no C++ toolchain for the native CPU kernel")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 16), (6, 2, 64), (8, 2, 128), (3, 1, 24)])
@pytest.mark.parametrize("layout", ["paged", "slots"])
def test_decode_matches_reference_and_reads_nothing_past_each_length(dtype, tol, heads, kv_heads, dim, layout):
    g = torch.Generator().manual_seed(heads * dim)
    lengths = [1, 7, 16, 17, 40, 3]
    if layout == "paged":  # blocks of 4 tokens, tables shuffled
        block, num_blocks = 4, 96
        order = torch.randperm(num_blocks, generator=g).tolist()
        tables, pos = [], 0
        for n in lengths:
            tables.append(order[pos: pos + -(-n // block)])
            pos += -(-n // block)
    else:  # one slot of 48 tokens per sequence, as virtual and static address them
        block, num_blocks = 48, len(lengths) + 2
        tables = [[s] for s in (3, 0, 7, 1, 2, 5)]
    # NaN everywhere; only each sequence's own tokens get values, so a stray read poisons the output.
    kc = torch.full((kv_heads, num_blocks, block, dim), float("nan"), dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    for table, n in zip(tables, lengths):
        for t in range(n):
            kc[:, table[t // block], t % block] = torch.randn(kv_heads, dim, generator=g).to(dtype)
            vc[:, table[t // block], t % block] = torch.randn(kv_heads, dim, generator=g).to(dtype)
    q = torch.randn(len(lengths), heads, dim, generator=g).to(dtype)
    meta = AttentionMetadata.build(tables, [n - 1 for n in lengths], [1] * len(lengths), block,
                                   torch.device("cpu"), in_place_decode=layout == "slots", native_kernel=True)
    # This step's token is already in the cache: write it again, unchanged.
    flat = kc.view(kv_heads, -1, dim)
    k_new, v_new = flat[:, meta.slot_mapping].transpose(0, 1), vc.view(kv_heads, -1, dim)[:, meta.slot_mapping].transpose(0, 1)
    fast = batched_attention(q, k_new.clone(), v_new.clone(), kc.clone(), vc.clone(), meta, dim ** -0.5)
    ref = reference_attention(q, k_new.clone(), v_new.clone(), kc.clone(), vc.clone(), meta, dim ** -0.5)
    assert not fast.isnan().any()
    torch.testing.assert_close(fast.float(), ref.float(), atol=tol, rtol=tol)


def test_a_strided_query_is_read_correctly():
    """The model passes q as a view of the fused q,k projection (rows longer than heads * dim)."""
    g = torch.Generator().manual_seed(1)
    kc = torch.randn(2, 8, 4, 16, generator=g)
    vc = torch.randn_like(kc)
    qk = torch.randn(3, 6 + 2, 16, generator=g)
    q = qk[:, :6]
    tables, lens = torch.tensor([[0, 1], [2, 3], [4, 5]]), torch.tensor([5, 8, 1])
    out = kernel(q, kc, vc, tables, lens, 0.25)
    expected = kernel(q.contiguous(), kc, vc, tables, lens, 0.25)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 3, 5, 8])
def test_vector_kernel_matches_the_portable_loops(dtype, dim, group):
    """The AVX-512 path (head dims 64 and 128) against the portable loops of the same kernel, for
    query-head groups that split into different tiles and lengths around its 16-token steps."""
    if not cpu_kernels.has_vector_kernel():
        pytest.skip("this CPU has no AVX-512 path")
    g = torch.Generator().manual_seed(dim + group)
    kv_heads, block = 2, 16
    lengths = [1, 15, 16, 17, 33, 100]
    per_seq = -(-max(lengths) // block)
    tables = torch.randperm(len(lengths) * per_seq, generator=g).view(len(lengths), per_seq)
    kc = torch.randn(kv_heads, tables.numel(), block, dim, generator=g).to(dtype)
    vc = torch.randn_like(kc, dtype=torch.float32).to(dtype)
    q = torch.randn(len(lengths), kv_heads * group, dim, generator=g).to(dtype)
    lens = torch.tensor(lengths)
    vector = kernel(q, kc, vc, tables, lens, dim ** -0.5, use_vector_kernel=True)
    portable = kernel(q, kc, vc, tables, lens, dim ** -0.5, use_vector_kernel=False)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(vector.float(), portable.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_equals_index_copy_and_rejects_a_bad_slot(dtype):
    """The native K,V write against two index_copy_ on flattened views (what the torch path does),
    with k and v as strided views into a fused projection, as the model passes them."""
    g = torch.Generator().manual_seed(0)
    kv_heads, blocks, block, dim, T = 3, 10, 4, 16, 7
    kc, vc = torch.randn(kv_heads, blocks, block, dim, generator=g).to(dtype), torch.randn(kv_heads, blocks, block, dim, generator=g).to(dtype)
    proj = torch.randn(T, 5 * kv_heads * dim, generator=g).to(dtype)
    k = proj[:, kv_heads * dim: 2 * kv_heads * dim].view(T, kv_heads, dim)
    v = proj[:, 4 * kv_heads * dim:].view(T, kv_heads, dim)
    slots = torch.tensor([39, 0, 5, 17, 18, 2, 33])
    expected_k, expected_v = kc.clone(), vc.clone()
    expected_k.view(kv_heads, -1, dim).index_copy_(1, slots, k.transpose(0, 1))
    expected_v.view(kv_heads, -1, dim).index_copy_(1, slots, v.transpose(0, 1))
    cpu_kernels.load().write_kv(k, v, kc, vc, slots)
    assert torch.equal(kc, expected_k) and torch.equal(vc, expected_v)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.load().write_kv(k, v, kc, vc, slots + 1)
