"""QuantizedLinear (native kernel and torch fallback) against the gguf package's dequantization
followed by a float64 matmul."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmem.models import quant_kernels
from kvmem.models.quantized_linear import QuantizedConcatLinear, QuantizedLinear
from tests.models.test_gguf_blocks import TYPES, quantized, row_length

needs_kernel = pytest.mark.skipif(quant_kernels.load() is None, reason="no C++ toolchain for the native kernels")


def layer(out_features: int, in_features: int, qtype, seed: int = 0) -> tuple[QuantizedLinear, torch.Tensor]:
    blocks, reference = quantized(out_features, in_features, qtype, seed)
    return QuantizedLinear(in_features, out_features, int(qtype), qweight=blocks), torch.from_numpy(reference)


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rtol: float) -> None:
    exact = x.double() @ weight.double().T
    # Each output is a float32 sum of K products: its error is bounded by ~K ulp of the |products|' sum.
    scale = x.double().abs() @ weight.double().abs().T
    assert ((y.double() - exact).abs() <= rtol * scale + 1e-30).all(), float(((y.double() - exact).abs() / scale).max())


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(qtype=st.sampled_from(TYPES), rows=st.integers(1, 20), out_features=st.integers(1, 70),
       blocks=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_native_kernel_equals_dequantize_then_matmul(qtype, rows, out_features, blocks, seed):
    in_features = row_length(qtype, blocks if row_length(qtype, 1) == 32 else 1 + blocks % 3)
    q, weight = layer(out_features, in_features, qtype, seed)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed))
    y = q(x)
    assert y.dtype == torch.float32 and y.shape == (rows, out_features)
    assert_close_to_reference(y, x, weight, rtol=in_features * 2**-23)
    # bfloat16 activations: float32 sums of exact products, rounded once to bfloat16; with AVX512-BF16
    # the weights are first rounded to bfloat16, exactly those dequantizing at load into bfloat16 gives.
    xb = x.bfloat16()
    yb = q(xb)
    assert yb.dtype == torch.bfloat16
    wb = weight.bfloat16().float() if quant_kernels.load().bf16_weights() else weight
    assert_close_to_reference(yb.float(), xb.float(), wb, rtol=in_features * 2**-23 + 2**-8)


@needs_kernel
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_a_row_gives_the_same_bits_alone_and_in_any_batch(qtype):
    in_features = 576 if row_length(qtype, 1) == 32 else 768  # SmolLM2's hidden size; K-quants: 3 x 256
    q, _ = layer(100, in_features, qtype)
    for dtype in (torch.float32, torch.bfloat16):
        # 67 rows: the bfloat16 path's scratch tiles (4 rows x 4 outputs) with a ragged end; 1-3 rows
        # read the blocks directly: every row must come out the same either way.
        x = torch.randn(67, in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
        batched = q(x)
        for r in (0, 5, 8, 64, 66):
            for n in (1, 2, 3, 9):
                assert torch.equal(q(x[r:r + n]), batched[r:r + n]), (dtype, r, n)


@needs_kernel
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("in_features", [576, 1536])
def test_rows_past_the_first_chunk_of_a_large_batch_give_the_same_bits(qtype, in_features):
    # Large bfloat16 batches (prefill chunks) pass over x in chunks of rows that fit in L2
    # (340 rows at K = 576, 128 at 1536): a row's bits must not depend on its chunk or its place in it.
    if in_features % row_length(qtype, 1):
        in_features = 512  # the K-quants' nearest whole super-blocks (384 rows per chunk)
    q, _ = layer(40, in_features, qtype, seed=3)
    x = torch.randn(700, in_features, generator=torch.Generator().manual_seed(4)).bfloat16()
    batched = q(x)
    for r, n in ((0, 1), (127, 2), (128, 5), (339, 1), (340, 3), (697, 3), (699, 1)):
        assert torch.equal(q(x[r:r + n]), batched[r:r + n]), (r, n)
    assert torch.equal(q(x[:200]), batched[:200])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_torch_fallback_equals_dequantize_then_matmul(qtype, monkeypatch):
    monkeypatch.setattr(quant_kernels, "load", lambda: None)
    q, weight = layer(33, 256, qtype)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2))
    assert_close_to_reference(q(x), x, weight, rtol=256 * 2**-23)


def test_bias_is_added():
    q, weight = layer(16, 64, TYPES[0])
    q_with_bias = QuantizedLinear(64, 16, int(TYPES[0]), bias=True, qweight=q.qweight)
    q_with_bias.bias.copy_(torch.arange(16.0))
    x = torch.randn(3, 64)
    torch.testing.assert_close(q_with_bias(x), q(x) + torch.arange(16.0))


def test_bad_weight_shape_is_a_value_error():
    with pytest.raises(ValueError, match="qweight must be uint8"):
        QuantizedLinear(64, 16, int(TYPES[0]), qweight=torch.zeros(16, 10, dtype=torch.uint8))


@needs_kernel
def test_kernel_rejects_mismatched_input():
    q, _ = layer(16, 64, TYPES[0])
    with pytest.raises(RuntimeError, match="needs"):
        quant_kernels.load().quant_linear(torch.randn(2, 96), q.qweight, q.type_id)


@needs_kernel
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kernel_dequantize_op_equals_gguf_package(qtype):
    # The op the quantized embedding's lookups use (and the portable path's per-chunk dequantization).
    in_features = row_length(qtype, 2)
    blocks, reference = quantized(9, in_features, qtype, seed=5)
    assert torch.equal(quant_kernels.load().dequantize(blocks, int(qtype), in_features), torch.from_numpy(reference))


@needs_kernel
def test_kernel_rejects_rows_that_are_not_whole_super_blocks():
    from gguf import GGMLQuantizationType

    with pytest.raises(RuntimeError, match="multiple of 256"):
        quant_kernels.load().quant_linear(torch.randn(2, 576), torch.zeros(4, 324, dtype=torch.uint8),
                                          int(GGMLQuantizationType.Q4_K))


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_parts_in_different_types_give_each_parts_own_bits(native, monkeypatch):
    """A fused q/k/v whose v is stored in another type (llama.cpp's Q4_K_M): each output column is
    what its part alone computes, for any batch, and the whole is the dequantized matmul."""
    if not native:
        monkeypatch.setattr(quant_kernels, "load", lambda: None)
    elif quant_kernels.load() is None:
        pytest.skip("no C++ toolchain for the native kernels")
    from gguf import GGMLQuantizationType as Q

    types, sizes = [Q.Q4_K, Q.Q4_K, Q.Q6_K], [64, 32, 32]
    fused = QuantizedConcatLinear(512, sizes, [int(t) for t in types], bias=True, dtype=torch.float32)
    weights = []
    for i, (part, t, n) in enumerate(zip(fused.parts, types, sizes)):
        blocks, reference = quantized(n, 512, t, seed=10 + i)
        part.qweight.copy_(blocks)
        weights.append(torch.from_numpy(reference))
    fused.bias.copy_(torch.randn(128))
    weight = torch.cat(weights)
    assert torch.equal(fused.dequantized_weight(), weight)
    x = torch.randn(7, 512, generator=torch.Generator().manual_seed(6))
    y = fused(x)
    assert y.shape == (7, 128)
    assert_close_to_reference(y - fused.bias, x, weight, rtol=512 * 2**-23 + 2**-22)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        batched = fused(xd)
        assert torch.equal(batched[:, 64:96], fused.parts[1](xd) + fused.bias[64:96])
        for r in range(7 if native else 0):  # the torch fallback is F.linear: no batch-invariance promise
            assert torch.equal(fused(xd[r:r + 1]), batched[r:r + 1])


def test_parts_must_pair_with_types():
    with pytest.raises(ValueError, match="pair up"):
        QuantizedConcatLinear(256, [32, 32], [12])
