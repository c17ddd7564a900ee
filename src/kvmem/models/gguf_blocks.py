"""GGUF's quantized block formats that kvmem keeps in memory as they are (Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1 and the K-quants Q4_K, Q5_K, Q6_K): their sizes, and their dequantization in torch ops (where
the native kernels are missing, and to check them).

A weight row of K values is K / 32 blocks (the K-quants: K / 256 super-blocks), laid out as in
llama.cpp's `ggml-common.h`; the gguf package's `quants.py` reads them. Values are dequantized
exactly as the gguf package does, in float32, every multiply and add rounded separately:
  Q8_0: q * d                 Q4_0: (q - 8) * d           Q4_1: q * d + m
  Q5_0: (q - 16) * d          Q5_1: q * d + m             (q: 5 bits, the 5th from a 32-bit mask qh)
  Q4_K, Q5_K: (d * sc) * q - (dmin * m), sc and m 6-bit per sub-block of 32 values
  Q6_K: (d * sc) * (q - 32), sc int8 per sub-block of 16 values
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_SIZE = 32  # values per block of the legacy types (Q8_0, Q4_x, Q5_x)
SUPER_BLOCK_SIZE = 256  # values per super-block of the K-quants (llama.cpp's QK_K)


@dataclass(frozen=True)
class BlockFormat:
    name: str
    type_id: int  # gguf.GGMLQuantizationType's value
    block_bytes: int
    block_values: int = BLOCK_SIZE  # 256 for the K-quants

    def fits(self, in_features: int) -> bool:
        """Whether rows of `in_features` values are whole blocks of this type."""
        return in_features > 0 and in_features % self.block_values == 0

    def row_bytes(self, in_features: int) -> int:
        if not self.fits(in_features):
            raise ValueError(f"{self.name} rows must hold a multiple of {self.block_values} values, got {in_features}")
        return in_features // self.block_values * self.block_bytes


# The types with a native kernel, by gguf.GGMLQuantizationType value.
FORMATS: dict[int, BlockFormat] = {f.type_id: f for f in (
    BlockFormat("Q4_0", 2, 18),
    BlockFormat("Q4_1", 3, 20),
    BlockFormat("Q5_0", 6, 22),
    BlockFormat("Q5_1", 7, 24),
    BlockFormat("Q8_0", 8, 34),
    BlockFormat("Q4_K", 12, 144, SUPER_BLOCK_SIZE),
    BlockFormat("Q5_K", 13, 176, SUPER_BLOCK_SIZE),
    BlockFormat("Q6_K", 14, 210, SUPER_BLOCK_SIZE),
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


def _bits(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Bit i of each little-endian byte string in `mask` [..., count / 8] as [..., count] (0 or 1)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((mask.unsqueeze(-1) >> shifts) & 1).reshape(*mask.shape[:-1], count)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of packed 6-bit scales and mins [..., 12] as float32 [..., 8, 1] each
    (llama.cpp's get_scale_min_k4: sub-blocks 0-3 in the low 6 bits of bytes 0-3 / 4-7, 4-7 in the
    nibbles of bytes 8-11 with their top 2 bits in the top bits of bytes 0-3 / 4-7)."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc.float().unsqueeze(-1), mn.float().unsqueeze(-1)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Bytes [..., n * group] as 4-bit values: per group of `group` bytes, the low nibbles, then the
    high nibbles ([..., 2 n, group])."""
    qs = qs.reshape(*qs.shape[:-1], -1, 1, group)
    return torch.cat((qs & 0x0F, qs >> 4), dim=-2).reshape(*qs.shape[:-3], -1, group)


def _dequantize_blocks(blocks: torch.Tensor, name: str) -> torch.Tensor:
    """Blocks [R, n, block bytes] of type `name` as float32 [R, n, block values]."""
    if name == "Q6_K":
        d = _halves(blocks, 208)  # [R, n, 1]
        sc = blocks[..., 192:208].contiguous().view(torch.int8).float()  # 16 sub-blocks of 16 values
        ql = _nibbles(blocks[..., :128], 64).reshape(*blocks.shape[:2], 2, 2, 64)  # [half, low/high, 64]
        qh = blocks[..., 128:192].reshape(*blocks.shape[:2], 2, 1, 32) >> torch.tensor([0, 2, 4, 6],
                                                                                     dtype=torch.uint8).view(4, 1)
        q = (ql.reshape(*blocks.shape[:2], 2, 4, 32) | ((qh & 3) << 4)).float() - 32  # [half, 4, 32]
        return ((d * sc).unsqueeze(-1) * q.reshape(*blocks.shape[:2], 16, 16)).flatten(-2)
    d = _halves(blocks, 0)
    if name == "Q8_0":
        return blocks[..., 2:].contiguous().view(torch.int8).float() * d
    if name in ("Q4_K", "Q5_K"):
        dmin = _halves(blocks, 2).unsqueeze(-1)
        sc, mn = _scale_min_k4(blocks[..., 4:16])
        q = _nibbles(blocks[..., 48 if name == "Q5_K" else 16:], 32)  # [R, n, 8, 32]
        if name == "Q5_K":  # bit j of qh[i] is the 5th bit of sub-block j's value i
            qh = blocks[..., 16:48].unsqueeze(-2) >> torch.arange(8, dtype=torch.uint8).view(8, 1)
            q = q | ((qh & 1) << 4)
        return ((d.unsqueeze(-1) * sc) * q.float() - dmin * mn).flatten(-2)
    offset = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 6, "Q5_1": 8}[name]
    q = _nibbles(blocks[..., offset:], 16).flatten(-2)  # low nibbles are values 0..15
    if name in ("Q5_0", "Q5_1"):
        q = q | (_bits(blocks[..., offset - 4:offset], 32) << 4)
    q = q.float()
    if name == "Q4_0":
        return (q - 8) * d
    if name == "Q5_0":
        return (q - 16) * d
    return q * d + _halves(blocks, 2)


def dequantize(rows: torch.Tensor, type_id: int, in_features: int) -> torch.Tensor:
    """uint8 rows [R, K / block values * block bytes] of type `type_id` as float32 [R, K]."""
    fmt = format_of(type_id)
    if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] != fmt.row_bytes(in_features):
        raise ValueError(f"expected uint8 rows of {fmt.row_bytes(in_features)} bytes ({fmt.name}, "
                         f"{in_features} values), got {rows.dtype} {tuple(rows.shape)}")
    blocks = rows.reshape(rows.shape[0], -1, fmt.block_bytes)
    return _dequantize_blocks(blocks, fmt.name).reshape(rows.shape[0], in_features)


@dataclass
class QuantizedTensor:
    """A GGUF weight matrix kept in its blocks: what the GGUF loader yields instead of a float tensor
    for a weight the model keeps quantized. `data` holds row r's blocks in `data[r]`, so rows can be
    permuted, sliced and concatenated as bytes."""

    data: torch.Tensor  # uint8 [out_features, in_features / block values * block bytes]
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
