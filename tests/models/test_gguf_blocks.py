"""kvmem's torch dequantization of GGUF blocks against the gguf package's (the reference)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
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
