"""GGUF's quantized block formats that kvmem keeps in memory as they are (Q8_0, Q4_0, Q4_1): their
sizes, and their dequantization in torch ops (where the native kernels are missing, and to check them).

A weight row of K values is K / 32 blocks, each an fp16 scale d (Q4_1: and an fp16 offset m) and 32
quantized values; llama.cpp's `ggml-common.h` defines them, the gguf package's `quants.py` reads them.
Values are dequantized exactly as the gguf package does: w = q * d (Q8_0), (q - 8) * d (Q4_0),
q * d + m (Q4_1), in float32, the multiply and the add rounded separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_SIZE = 32  # values per block, every type here


@dataclass(frozen=True)
class BlockFormat:
    name: str
    type_id: int  # gguf.GGMLQuantizationType's value
    block_bytes: int

    def row_bytes(self, in_features: int) -> int:
        if in_features % BLOCK_SIZE:
            raise ValueError(f"{self.name} rows must hold a multiple of {BLOCK_SIZE} values, got {in_features}")
        return in_features // BLOCK_SIZE * self.block_bytes


# The types with a native kernel, by gguf.GGMLQuantizationType value.
FORMATS: dict[int, BlockFormat] = {f.type_id: f for f in (
    BlockFormat("Q4_0", 2, 18),
    BlockFormat("Q4_1", 3, 20),
    BlockFormat("Q8_0", 8, 34),
)}


def format_of(type_id: int) -> BlockFormat:
    try:
        return FORMATS[int(type_id)]
    except KeyError:
        raise ValueError(f"quantized type {type_id} is not kept quantized by kvmem "
                         f"(supported: {', '.join(f.name for f in FORMATS.values())})") from None


def _halves(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte `offset` of each block, as float32 [..., blocks, 1]."""
    return blocks[..., offset:offset + 2].contiguous().view(torch.float16).float()


def dequantize(rows: torch.Tensor, type_id: int, in_features: int) -> torch.Tensor:
    """uint8 rows [R, K / 32 * block bytes] of type `type_id` as float32 [R, K]."""
    fmt = format_of(type_id)
    if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] != fmt.row_bytes(in_features):
        raise ValueError(f"expected uint8 rows of {fmt.row_bytes(in_features)} bytes ({fmt.name}, "
                         f"{in_features} values), got {rows.dtype} {tuple(rows.shape)}")
    blocks = rows.reshape(rows.shape[0], -1, fmt.block_bytes)
    d = _halves(blocks, 0)
    if fmt.name == "Q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
        values = q * d
    else:
        qs = blocks[..., 4:] if fmt.name == "Q4_1" else blocks[..., 2:]
        q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).float()  # low nibbles are values 0..15
        values = (q - 8) * d if fmt.name == "Q4_0" else q * d + _halves(blocks, 2)
    return values.reshape(rows.shape[0], in_features)


@dataclass
class QuantizedTensor:
    """A GGUF weight matrix kept in its blocks: what the GGUF loader yields instead of a float tensor
    for a weight the model keeps quantized. `data` holds row r's blocks in `data[r]`, so rows can be
    permuted, sliced and concatenated as bytes."""

    data: torch.Tensor  # uint8 [out_features, in_features / 32 * block bytes]
    type_id: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.in_features)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.data, self.type_id, self.in_features)


Q8_0 = 8  # gguf.GGMLQuantizationType.Q8_0


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """A float matrix [R, K] as Q8_0 rows (uint8 [R, K / 32 * 34]), bit for bit what llama.cpp's
    quantizer (and the gguf package's `quants.quantize`) writes: per block of 32 values
    d = max|w| / 127 (float32), q = round-half-away(w / d) computed as w * (1 / d), d stored as fp16.
    `--quantization int8` keeps a Hugging Face checkpoint's linear weights so."""
    if weight.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(weight.shape)}")
    rows, in_features = weight.shape
    FORMATS[Q8_0].row_bytes(in_features)  # K must be a multiple of 32
    blocks = weight.detach().to(torch.float32).reshape(rows, -1, BLOCK_SIZE)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    scaled = blocks * inverse
    magnitude = scaled.abs()
    floored = magnitude.floor()
    q = torch.sign(scaled) * (floored + (2 * (magnitude - floored)).floor())  # the gguf package's np_roundf
    out = torch.empty(rows, blocks.shape[1], FORMATS[Q8_0].block_bytes, dtype=torch.uint8)
    out[..., :2] = d.to(torch.float16).view(torch.uint8)
    out[..., 2:] = q.to(torch.int8).view(torch.uint8)
    return out.reshape(rows, -1)
