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

TYPES = [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1]


def quantized(rows: int, cols: int, qtype, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Random weights quantized by the gguf package: (blocks as uint8 rows, its own dequantization)."""
    values = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    blocks = gguf_quantize(values, qtype)
    return torch.from_numpy(np.ascontiguousarray(blocks)), gguf_dequantize(blocks, qtype).reshape(rows, cols)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_package(qtype):
    blocks, reference = quantized(7, 96, qtype)
    assert torch.equal(gguf_blocks.dequantize(blocks, int(qtype), 96), torch.from_numpy(reference))


def test_block_sizes_match_gguf_package():
    from gguf.constants import GGML_QUANT_SIZES

    for fmt in gguf_blocks.FORMATS.values():
        assert GGML_QUANT_SIZES[GGMLQuantizationType(fmt.type_id)] == (gguf_blocks.BLOCK_SIZE, fmt.block_bytes)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="not kept quantized"):
        gguf_blocks.format_of(int(GGMLQuantizationType.Q6_K))
    with pytest.raises(ValueError, match="multiple of 32"):
        gguf_blocks.format_of(8).row_bytes(40)
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
