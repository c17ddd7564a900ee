"""The batched attention path agrees with the per-sequence reference, and the reference agrees
with attention computed from scratch on contiguous tensors."""

import random

import pytest
import torch

from kvmem.attention import cpu_kernels
from kvmem.attention.metadata import AttentionMetadata
from kvmem.attention.torch_attention import batched_attention, reference_attention

NATIVE = [False, pytest.param(True, marks=pytest.mark.skipif(
    cpu_kernels.decode_attention_kernel() is None, reason="no C++ toolchain for the native CPU kernel"))]

HEADS, KV_HEADS, DIM, BLOCK, NUM_BLOCKS = 6, 2, 16, 4, 64


def make_batch(seed: int, dtype: torch.dtype, native: bool = False):
    """Random sequences: some decoding, some prefilling on top of a cached prefix, some fresh."""
    rng = random.Random(seed)
    blocks = list(range(NUM_BLOCKS))
    rng.shuffle(blocks)  # tables are non-contiguous on purpose
    seqs = []  # (num_computed, query_len)
    for _ in range(3):
        seqs.append((rng.randint(1, 20), 1))  # decodes first
    seqs += [(0, rng.randint(1, 9)), (rng.randint(1, 12), rng.randint(2, 7)), (0, 1)]
    tables, pos = [], 0
    for computed, q in seqs:
        n = -(-(computed + q) // BLOCK)
        tables.append(blocks[pos: pos + n])
        pos += n
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(KV_HEADS, NUM_BLOCKS, BLOCK, DIM, generator=g).to(dtype)
    v_cache = torch.randn(KV_HEADS, NUM_BLOCKS, BLOCK, DIM, generator=g).to(dtype)
    total = sum(q for _, q in seqs)
    q = torch.randn(total, HEADS, DIM, generator=g).to(dtype)
    k = torch.randn(total, KV_HEADS, DIM, generator=g).to(dtype)
    v = torch.randn(total, KV_HEADS, DIM, generator=g).to(dtype)
    meta = AttentionMetadata.build(tables, [c for c, _ in seqs], [q for _, q in seqs], BLOCK, torch.device("cpu"),
                                   native_kernel=native)
    return q, k, v, k_cache, v_cache, meta


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_batched_matches_reference(seed, dtype, tol, native):
    """Decodes through torch ops (gathered blocks) and prefills through SDPA, or every row through the
    native kernel (in place)."""
    q, k, v, kc, vc, meta = make_batch(seed, dtype, native)
    assert (meta.native_context_lens is not None) == native
    kc2, vc2 = kc.clone(), vc.clone()
    ref = reference_attention(q, k, v, kc, vc, meta, DIM ** -0.5)
    fast = batched_attention(q, k, v, kc2, vc2, meta, DIM ** -0.5)
    assert meta.num_decodes == 3
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)  # both wrote the same KV
    torch.testing.assert_close(fast.float(), ref.float(), atol=tol, rtol=tol)


def test_reference_equals_contiguous_causal_attention():
    """One sequence: cached prefix + chunk through the block table == plain causal attention."""
    torch.manual_seed(0)
    ctx, qlen, group = 11, 5, HEADS // KV_HEADS
    keys, values = torch.randn(ctx, KV_HEADS, DIM), torch.randn(ctx, KV_HEADS, DIM)
    queries = torch.randn(ctx, HEADS, DIM)
    table = [7, 2, 9]
    kc, vc = torch.zeros(KV_HEADS, NUM_BLOCKS, BLOCK, DIM), torch.zeros(KV_HEADS, NUM_BLOCKS, BLOCK, DIM)
    for pos in range(ctx - qlen):  # the prefix is already cached
        kc[:, table[pos // BLOCK], pos % BLOCK] = keys[pos]
        vc[:, table[pos // BLOCK], pos % BLOCK] = values[pos]
    meta = AttentionMetadata.build([table], [ctx - qlen], [qlen], BLOCK, torch.device("cpu"))
    out = reference_attention(queries[-qlen:], keys[-qlen:], values[-qlen:], kc, vc, meta, DIM ** -0.5)
    full = torch.nn.functional.scaled_dot_product_attention(
        queries.transpose(0, 1), keys.repeat_interleave(group, 1).transpose(0, 1),
        values.repeat_interleave(group, 1).transpose(0, 1), is_causal=True).transpose(0, 1)
    torch.testing.assert_close(out, full[-qlen:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths, slots, num_runs", [
    ([9, 9, 9, 9], [2, 3, 4, 5], 1),  # one run: read in place
    ([9, 10, 16, 11], [2, 3, 4, 5], 1),  # unequal lengths within the backed chunks: one padded run
    ([9, 9, 30, 2], [2, 3, 0, 5], 3),  # a few runs: in place
    ([7, 9, 9, 9], [2, 3, 4, 5], 2),  # slot 2 is backed to 8 tokens only: its own run
    ([3, 17, 30, 2, 12, 25, 8], [6, 0, 2, 5, 1, 4, 3], None),  # ragged: chunks gathered
])
def test_contiguous_slots_decode_matches_reference_without_reading_past_lengths(lengths, slots, num_runs):
    """The virtual layout: one slot of MAX_LEN tokens per sequence, backed in whole chunks, NaN past
    them (memory that must not be read). In place or chunk-gathered, the result equals the reference's."""
    max_len, chunk = 32, 8
    g = torch.Generator().manual_seed(len(lengths))
    kc = torch.full((KV_HEADS, 8, max_len, DIM), float("nan"))
    vc = torch.full_like(kc, float("nan"))
    for slot, n in zip(slots, lengths):  # whole chunks up to the last token are backed (zeros past it)
        backed = -(-n // chunk) * chunk
        kc[:, slot, :backed] = 0
        vc[:, slot, :backed] = 0
        kc[:, slot, :n] = torch.randn(KV_HEADS, n, DIM, generator=g)
        vc[:, slot, :n] = torch.randn(KV_HEADS, n, DIM, generator=g)
    q = torch.randn(len(lengths), HEADS, DIM, generator=g)
    meta = AttentionMetadata.build([[s] for s in slots], [n - 1 for n in lengths], [1] * len(lengths), max_len,
                                   torch.device("cpu"), in_place_decode=True, chunk_tokens=chunk,
                                   native_kernel=False)
    assert (None if meta.decode_runs is None else len(meta.decode_runs)) == num_runs
    k_new = kc.view(KV_HEADS, -1, DIM)[:, meta.slot_mapping].transpose(0, 1).clone()
    v_new = vc.view(KV_HEADS, -1, DIM)[:, meta.slot_mapping].transpose(0, 1).clone()
    fast = batched_attention(q, k_new, v_new, kc.clone(), vc.clone(), meta, DIM ** -0.5)
    ref = reference_attention(q, k_new, v_new, kc.clone(), vc.clone(), meta, DIM ** -0.5)
    assert not fast.isnan().any()
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
