"""Quantized KV caches (kv_cache_dtype int8 / fp8): the round trip is bounded (property tests), a
write lands where the slots say with its scales, and every attention path reading the quantized
cache in place (the torch path's gathers, in-place runs and prefills, the native kernel, the
reference) computes attention over exactly the dequantized values."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmem.attention import cpu_kernels, kv_quant
from kvmem.attention.metadata import AttentionMetadata
from kvmem.attention.torch_attention import batched_attention, reference_attention

NATIVE = [False, pytest.param(True, marks=pytest.mark.skipif(
    cpu_kernels.decode_attention_kernel() is None, reason="no C++ toolchain for the native CPU kernel"))]
QUANTIZED = [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2]


def test_names_map_to_storage_dtypes():
    assert kv_quant.storage_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_quant.storage_dtype("fp8", torch.float32) == torch.float8_e4m3fn
    assert kv_quant.storage_dtype("fp8_e4m3", torch.float32) == torch.float8_e4m3fn
    assert kv_quant.storage_dtype("fp8_e5m2", torch.float32) == torch.float8_e5m2
    assert kv_quant.storage_dtype("int8", torch.float32) == torch.int8
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_quant.storage_dtype("fp4", torch.float32)


# --- round trip --------------------------------------------------------------------------------
finite = st.floats(min_value=-300, max_value=300, allow_nan=False, width=32)
rows = st.lists(st.lists(finite, min_size=8, max_size=8), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(rows)
def test_int8_round_trip_within_half_a_step_of_its_row(values):
    x = torch.tensor(values, dtype=torch.float32)[:, None, :]  # [tokens, 1 head, 8]
    stored, scales = kv_quant.quantize(x, torch.int8)
    assert stored.dtype == torch.int8 and scales.shape == (x.shape[0], 1)
    back = kv_quant.dequantize(stored, scales, torch.float32)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((back - x).abs() <= step / 2 * (1 + 1e-5) + 1e-30).all()


@settings(max_examples=200, deadline=None)
@given(rows, st.sampled_from([(torch.float8_e4m3fn, 3, -6), (torch.float8_e5m2, 2, -14)]))
def test_fp8_round_trip_relative_error_of_its_mantissa(values, fmt):
    dtype, mantissa_bits, min_normal_exp = fmt
    x = torch.tensor(values, dtype=torch.float32)[:, None, :]
    stored, scales = kv_quant.quantize(x, dtype)
    assert stored.dtype == dtype and scales is None
    back = kv_quant.dequantize(stored, None, torch.float32)
    limit = torch.finfo(dtype).max
    expected = x.clamp(-limit, limit)
    # Round to nearest: half a unit in the last place, relative for normals, absolute below them.
    bound = torch.maximum(expected.abs() * 2.0 ** -(mantissa_bits + 1),
                          torch.tensor(2.0 ** (min_normal_exp - mantissa_bits - 1)))
    assert ((back - expected).abs() <= bound * (1 + 1e-6)).all()


def test_fp8_clamps_to_its_range_instead_of_overflowing():
    x = torch.tensor([[[1e6, -1e6, 3.0]]])
    back = kv_quant.dequantize(kv_quant.quantize(x, torch.float8_e4m3fn)[0], None, torch.float32)
    assert back.tolist() == [[[448.0, -448.0, 3.0]]]


def test_write_lands_in_the_slots_with_its_scales():
    heads, blocks, bs, dim = 2, 5, 4, 8
    k_cache = torch.zeros(heads, blocks, bs, dim, dtype=torch.int8)
    v_cache = torch.zeros_like(k_cache)
    k_scales = torch.zeros(heads, blocks, bs)
    v_scales = torch.zeros_like(k_scales)
    k, v = torch.randn(3, heads, dim), torch.randn(3, heads, dim)
    slots = torch.tensor([13, 2, 7])
    kv_quant.write_quantized(k, v, k_cache, v_cache, slots, k_scales, v_scales)
    for i, slot in enumerate(slots.tolist()):
        b, o = divmod(slot, bs)
        got = kv_quant.dequantize(k_cache[:, b, o], k_scales[:, b, o], torch.float32)
        torch.testing.assert_close(got, k[i], atol=k[i].abs().max().item() / 127, rtol=0)
        assert (v_scales[:, b, o] > 0).all()
    assert int((k_scales > 0).sum()) == 3 * heads  # nothing else written


@pytest.mark.skipif(cpu_kernels.load() is None, reason="no C++ toolchain for the native CPU kernel")
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", QUANTIZED)
@pytest.mark.parametrize("layout", ["blocks", "strided"])
def test_native_write_stores_the_torch_writes_bits(model_dtype, dtype, layout):
    """The native one-pass write (used on CPU) stores exactly what kv_quant.write_quantized's torch ops
    store, scales included: into block-major caches and into strided views of a larger cache (a layer
    of the whole, as paged and hybrid hand out), with values past fp8's range, zeros and ties."""
    heads, blocks, bs, dim, tokens = 3, 7, 4, 64, 11
    g = torch.Generator().manual_seed(QUANTIZED.index(dtype) * 10 + (layout == "strided"))
    k = (torch.randn(tokens, heads, dim, generator=g) * 40).to(model_dtype)
    v = (torch.randn(tokens, heads, dim, generator=g) * 3).to(model_dtype)
    k[0] = 0  # an all-zero row: int8's scale is the smallest normal float
    k[1, :, :8] = 1000  # past e4m3's 448: clamped
    v[2, :, 0] = 63.5  # a tie for int8's rounding when it is the row's max/2
    slots = torch.randperm(blocks * bs, generator=g)[:tokens]

    def caches():
        if layout == "blocks":
            kc = torch.zeros(heads, blocks, bs, dim, dtype=dtype)
            ks = torch.zeros(heads, blocks, bs) if dtype == torch.int8 else None
            return kc, kc.clone(), ks, None if ks is None else ks.clone()
        whole = torch.zeros(2, 2, heads, blocks, bs, dim, dtype=dtype)  # [layers, K/V, ...]: layer 1's views
        scales = torch.zeros(2, 2, heads, blocks, bs) if dtype == torch.int8 else None
        return whole[1, 0], whole[1, 1], None if scales is None else scales[1, 0], None if scales is None else scales[1, 1]

    expected, got = caches(), caches()
    kv_quant.write_quantized(k, v, *expected[:2], slots, *expected[2:])
    cpu_kernels.load().write_kv_quantized(k, v, *got[:2], slots, *got[2:])
    for e, g_ in zip(expected, got):
        if e is not None:
            assert torch.equal(e.view(torch.uint8) if e.dtype != torch.float32 else e,
                               g_.view(torch.uint8) if g_.dtype != torch.float32 else g_)


# --- attention reads the quantized cache in place ---------------------------------------------------
HEADS, KV_HEADS, DIM, BLOCK, NUM_BLOCKS = 6, 2, 16, 4, 64


def quantized_batch(seed: int, dtype: torch.dtype, native: bool):
    """Random decodes, prefills on a cached prefix and fresh prefills over a quantized cache, and
    the same cache dequantized into float32 (the oracle's input)."""
    rng = random.Random(seed)
    blocks = list(range(NUM_BLOCKS))
    rng.shuffle(blocks)
    seqs = [(rng.randint(1, 20), 1) for _ in range(3)]
    seqs += [(0, rng.randint(1, 9)), (rng.randint(1, 12), rng.randint(2, 7)), (0, 1)]
    tables, pos = [], 0
    for computed, q in seqs:
        n = -(-(computed + q) // BLOCK)
        tables.append(blocks[pos: pos + n])
        pos += n
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(2, KV_HEADS, NUM_BLOCKS, BLOCK, DIM, generator=g) * 3
    stored, scales = kv_quant.quantize(full, dtype)
    total = sum(q for _, q in seqs)
    q = torch.randn(total, HEADS, DIM, generator=g)
    k = torch.randn(total, KV_HEADS, DIM, generator=g)
    v = torch.randn(total, KV_HEADS, DIM, generator=g)
    meta = AttentionMetadata.build(tables, [c for c, _ in seqs], [q for _, q in seqs], BLOCK, torch.device("cpu"),
                                   native_kernel=native)
    return q, k, v, stored, scales, meta


def cache_args(stored, scales):
    extra = () if scales is None else (scales[0].clone(), scales[1].clone())
    return (stored[0].clone(), stored[1].clone()) + extra


def plain_oracle(q, k, v, stored, scales, meta):
    """reference_attention over float32 caches holding what the quantized cache holds, with this
    step's K,V replaced by their round trips (what a quantized cache gives back)."""
    dq = kv_quant.dequantize(stored, scales, torch.float32)
    kr, vr = kv_quant.round_trip(k, stored.dtype), kv_quant.round_trip(v, stored.dtype)
    return reference_attention(q, kr, vr, dq[0].clone(), dq[1].clone(), meta, DIM ** -0.5)


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_every_path_reads_the_quantized_cache_as_its_values(seed, dtype, native):
    q, k, v, stored, scales, meta = quantized_batch(seed, dtype, native)
    expected = plain_oracle(q, k, v, stored, scales, meta)
    ref = reference_attention(q, k, v, *cache_args(stored, scales)[:2], meta, DIM ** -0.5,
                              *cache_args(stored, scales)[2:])
    caches = cache_args(stored, scales)
    fast = batched_attention(q, k, v, caches[0], caches[1], meta, DIM ** -0.5, *caches[2:])
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)
    assert caches[0].dtype == dtype  # read in place: the cache is still the quantized one


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_contiguous_slot_runs_and_chunk_gathers_read_quantized_slots(dtype):
    """The virtual layout's decode paths (runs of consecutive slots in place; ragged batches
    gathering chunks) over a quantized cache of one block per slot."""
    slots, max_len = 6, 32
    g = torch.Generator().manual_seed(3)
    full = torch.randn(2, KV_HEADS, slots, max_len, DIM, generator=g)
    stored, scales = kv_quant.quantize(full, dtype)
    lens = [9, 30, 17, 4, 25]
    tables = [[0], [1], [2], [4], [5]]
    q = torch.randn(len(lens), HEADS, DIM, generator=g)
    k = torch.randn(len(lens), KV_HEADS, DIM, generator=g)
    v = torch.randn(len(lens), KV_HEADS, DIM, generator=g)
    for chunk_tokens in (None, 8):
        meta = AttentionMetadata.build(tables, [n - 1 for n in lens], [1] * len(lens), max_len, torch.device("cpu"),
                                       in_place_decode=True, chunk_tokens=chunk_tokens,
                                       readable_lens=[max_len] * len(lens), native_kernel=False)
        if chunk_tokens is None:
            assert meta.decode_runs is not None
        caches = cache_args(stored, scales)
        got = batched_attention(q, k, v, caches[0], caches[1], meta, DIM ** -0.5, *caches[2:])
        ref_meta = AttentionMetadata.build(tables, [n - 1 for n in lens], [1] * len(lens), max_len,
                                           torch.device("cpu"), native_kernel=False)
        torch.testing.assert_close(got, plain_oracle(q, k, v, stored, scales, ref_meta), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(cpu_kernels.decode_attention_kernel() is None, reason="no native CPU kernel")
def test_native_kernel_refuses_a_cache_it_cannot_read_naming_kv_cache_dtype():
    q = torch.zeros(1, 2, 8)
    cache = torch.zeros(2, 1, 4, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        cpu_kernels.quantized_attention(q, cache, cache, None, None, torch.zeros(1, 1, dtype=torch.long),
                                        torch.ones(1, dtype=torch.long), 1.0)


@pytest.mark.skipif(not cpu_kernels.has_vector_kernel(), reason="no AVX-512 kernel on this CPU")
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_the_avx512_kernel_reads_quantized_rows_as_the_portable_loops_do(dtype, dim):
    """Head dims 64 and 128 take the AVX-512 path: scores 16 tokens at a time with the row factors
    applied to the tile, value factors folded into the probabilities."""
    g = torch.Generator().manual_seed(dim)
    kv_heads, heads, block, blocks = 2, 6, 16, 24
    full = torch.randn(2, kv_heads, blocks, block, dim, generator=g)
    full[0, 0, 0, 0, :3] = torch.tensor([1e-3, -2e-5, 0.0])  # float8 subnormals and zero
    stored, scales = kv_quant.quantize(full, dtype)
    ks, vs = (None, None) if scales is None else (scales[0], scales[1])
    lens = torch.tensor([1, 17, 100, 200, 33])
    tables = torch.stack([torch.randperm(blocks, generator=g)[:13] for _ in lens])
    q = torch.randn(len(lens), heads, dim, generator=g).to(torch.bfloat16)
    vector = cpu_kernels.quantized_attention(q, stored[0], stored[1], ks, vs, tables, lens, dim ** -0.5)
    portable = cpu_kernels.quantized_attention(q, stored[0], stored[1], ks, vs, tables, lens, dim ** -0.5,
                                               use_vector_kernel=False)
    torch.testing.assert_close(vector.float(), portable.float(), atol=2e-2, rtol=2e-2)  # bf16 output rounding
    meta = AttentionMetadata.build(tables.tolist(), (lens - 1).tolist(), [1] * len(lens), block, torch.device("cpu"),
                                   native_kernel=False)
    dq = kv_quant.dequantize(stored, scales, torch.float32)
    k_now = dq[0].view(kv_heads, -1, dim)[:, meta.slot_mapping].transpose(0, 1)
    v_now = dq[1].view(kv_heads, -1, dim)[:, meta.slot_mapping].transpose(0, 1)
    ref = reference_attention(q.float(), k_now, v_now, dq[0].clone(), dq[1].clone(), meta, dim ** -0.5)
    torch.testing.assert_close(vector.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not cpu_kernels.has_vector_kernel(), reason="no AVX-512 kernel on this CPU")
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", QUANTIZED)
def test_the_avx512_kernel_reads_q_in_its_own_dtype_where_it_lies(dtype, q_dtype):
    """The vector path reads a bf16/fp16 q in place (here a strided view) and writes its dtype: the
    same bits as the float32 computation on q widened, rounded once at the end; and a row's result
    does not depend on the other rows of the call."""
    g = torch.Generator().manual_seed(7)
    kv_heads, heads, block, blocks, dim = 3, 9, 16, 30, 64
    stored, scales = kv_quant.quantize(torch.randn(2, kv_heads, blocks, block, dim, generator=g) * 4, dtype)
    ks, vs = (None, None) if scales is None else (scales[0], scales[1])
    lens = torch.tensor([1, 16, 31, 90, 160])
    tables = torch.stack([torch.randperm(blocks, generator=g)[:10] for _ in lens])
    q = torch.randn(len(lens), 2 * heads, dim, generator=g).to(q_dtype)[:, ::2]  # a view, not contiguous
    assert not q.is_contiguous()
    got = cpu_kernels.quantized_attention(q, stored[0], stored[1], ks, vs, tables, lens, dim ** -0.5)
    assert got.dtype == q_dtype
    widened = cpu_kernels.quantized_attention(q.float(), stored[0], stored[1], ks, vs, tables, lens, dim ** -0.5)
    assert torch.equal(got, widened.to(q_dtype))
    for i in (0, 3):
        alone = cpu_kernels.quantized_attention(q[i:i + 1], stored[0], stored[1], ks, vs, tables[i:i + 1],
                                                lens[i:i + 1], dim ** -0.5)
        assert torch.equal(alone[0], got[i])
