"""kvmem's torch dequantization of GGUF blocks against the gguf package's (the reference)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from kvmem.models import gguf_blocks

TYPES = [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
         GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1,
         GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K]
# The K-quants: 256-value super-blocks, which the gguf package reads but cannot write.
K_QUANTS = [t for t in TYPES if t.name.endswith("_K")]
# Byte offsets of each type's fp16 fields (scales, mins) inside a block.
_HALVES = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
           "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(rows: int, cols: int, qtype, seed: int = 0, scale: float = 0.01) -> np.ndarray:
    """Rows of `qtype` blocks with random quantized bytes (every bit pattern of the packed values and
    6-bit sub-block scales is valid) and finite fp16 scales drawn around `scale`: uint8 [rows, bytes]."""
    fmt = gguf_blocks.format_of(int(qtype))
    rng = np.random.default_rng(seed)
    n = cols // fmt.block_values
    raw = rng.integers(0, 256, (rows, n, fmt.block_bytes), dtype=np.uint8)
    for offset in _HALVES[qtype.name]:
        halves = (rng.standard_normal((rows, n)) * scale).astype(np.float16)
        raw[..., offset:offset + 2] = halves.view(np.uint8).reshape(rows, n, 2)
    return raw.reshape(rows, -1)


def quantized(rows: int, cols: int, qtype, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Weights in `qtype`'s blocks and the gguf package's own dequantization of them: random weights
    quantized by the gguf package, or for the K-quants (which it cannot quantize) random blocks."""
    if qtype in K_QUANTS:
        blocks = random_blocks(rows, cols, qtype, seed)
    else:
        values = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
        blocks = gguf_quantize(values, qtype)
    return torch.from_numpy(np.ascontiguousarray(blocks)), gguf_dequantize(blocks, qtype).reshape(rows, cols)


def row_length(qtype, blocks: int) -> int:
    """`blocks` whole blocks of `qtype` (32 or 256 values each)."""
    return gguf_blocks.format_of(int(qtype)).block_values * blocks


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_package(qtype):
    cols = row_length(qtype, 3)
    blocks, reference = quantized(7, cols, qtype)
    assert torch.equal(gguf_blocks.dequantize(blocks, int(qtype), cols), torch.from_numpy(reference))


@settings(max_examples=60, deadline=None)
@given(qtype=st.sampled_from(TYPES), rows=st.integers(1, 4), blocks=st.integers(1, 3), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-6, 1e-3, 1.0, 1000.0]))
def test_dequantizing_any_blocks_equals_gguf_package(qtype, rows, blocks, seed, scale):
    """Every bit pattern of the quantized values and sub-block scales, fp16 scales from subnormal to
    large: the same float32 bits as the gguf package (which multiplies and adds in this order)."""
    cols = row_length(qtype, blocks)
    raw = random_blocks(rows, cols, qtype, seed, scale)
    reference = gguf_dequantize(raw, qtype).reshape(rows, cols)
    got = gguf_blocks.dequantize(torch.from_numpy(raw), int(qtype), cols)
    assert np.array_equal(got.numpy().view(np.uint32), reference.view(np.uint32))


def test_block_sizes_match_gguf_package():
    from gguf.constants import GGML_QUANT_SIZES

    for fmt in gguf_blocks.FORMATS.values():
        assert GGML_QUANT_SIZES[GGMLQuantizationType(fmt.type_id)] == (fmt.block_values, fmt.block_bytes)
    assert {GGMLQuantizationType(t) for t in gguf_blocks.FORMATS} == set(TYPES)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="not kept quantized"):
        gguf_blocks.format_of(int(GGMLQuantizationType.Q3_K))
    with pytest.raises(ValueError, match="multiple of 32"):
        gguf_blocks.format_of(8).row_bytes(40)
    with pytest.raises(ValueError, match="Q4_K rows must hold a multiple of 256 values, got 576"):
        gguf_blocks.format_of(int(GGMLQuantizationType.Q4_K)).row_bytes(576)
    assert gguf_blocks.format_of(int(GGMLQuantizationType.Q6_K)).row_bytes(1536) == 6 * 210
    assert not gguf_blocks.format_of(int(GGMLQuantizationType.Q5_K)).fits(576)
    with pytest.raises(ValueError, match="expected uint8 rows"):
        gguf_blocks.dequantize(torch.zeros(2, 33, dtype=torch.uint8), 8, 32)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), blocks=st.integers(1, 5), scale=st.sampled_from([1e-3, 1.0, 300.0]),
       seed=st.integers(0, 2**16), zero_block=st.booleans(), halves=st.booleans())
def test_quantize_q8_0_equals_the_gguf_packages(rows, blocks, scale, seed, zero_block, halves):
    values = (np.random.default_rng(seed).standard_normal((rows, 32 * blocks)) * scale).astype(np.float32)
    if halves:  # d = 1 and values exactly between two steps: llama.cpp's roundf rounds half away from 0
        values = np.clip(np.round(values / scale * 40) / 2, -126.5, 126.5).astype(np.float32)
        values[:, ::32] = 127.0
    if zero_block:
        values[0, :32] = 0.0  # d = 0: every q is 0
    expected = gguf_quantize(values, GGMLQuantizationType.Q8_0)
    got = gguf_blocks.quantize_q8_0(torch.from_numpy(values))
    assert np.array_equal(got.numpy(), np.asarray(expected).reshape(rows, -1))


def test_quantize_q8_0_rejects_rows_that_are_not_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        gguf_blocks.quantize_q8_0(torch.zeros(2, 40))
    with pytest.raises(ValueError, match="matrix"):
        gguf_blocks.quantize_q8_0(torch.zeros(64))
