"""Decode attention in Triton: one query token per sequence, keys read where they lie.

One kernel serves both cache layouts of `base.py`'s addressing, `[kv_heads, num_blocks,
block_size, head_dim]` with per-sequence block tables:
- `paged`: small blocks, a table of many;
- `virtual` / `static`: one block of `max_len` tokens per sequence, a table of one (the slot), so
  the kernel walks one contiguous range, as vAttention intends.

Each program computes one (sequence, query head): it walks the sequence's keys in tiles of
`BLOCK_N` tokens with an online softmax (running max and denominator, FlashAttention-style) and
never loads a key at or past the sequence's length: the loads are masked, and with the virtual
layout the memory past the length may be unmapped (on CUDA, touching it would fault).

Quantized caches (`kv_quant`): int8 rows are widened and multiplied by their (token, head) scale
as they are loaded; float8 rows are loaded as bytes and decoded from their bits (sign, exponent,
mantissa: e4m3fn or e5m2) in registers, which needs no float8 support from the hardware or from
the interpreter, then multiplied by the per-tensor scale.

Meant for CUDA; the tests run it on CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvmem.attention import kv_quant

# What the cache stores (the kernel's QUANT): the model's dtype, int8 + scales, or float8 bytes.
_PLAIN, _INT8, _FP8_E4M3, _FP8_E5M2 = 0, 1, 2, 3


@triton.jit
def _fp8_to_float(b, EXP_BITS: tl.constexpr, BIAS: tl.constexpr):
    """float8 bits (int32 holding 0..255) to float32: e4m3fn (EXP_BITS 4, BIAS 7) or e5m2 (5, 15)."""
    MANT_BITS: tl.constexpr = 7 - EXP_BITS
    sign = tl.where((b & 0x80) != 0, -1.0, 1.0)
    exp = (b >> MANT_BITS) & ((1 << EXP_BITS) - 1)
    mant = (b & ((1 << MANT_BITS) - 1)).to(tl.float32) * (1.0 / (1 << MANT_BITS))
    normal = (1.0 + mant) * tl.exp2((exp - BIAS).to(tl.float32))
    subnormal = mant * tl.exp2((1 - BIAS) * 1.0)
    return sign * tl.where(exp == 0, subnormal, normal)


@triton.jit
def _widen(x, QUANT: tl.constexpr):
    if QUANT == 2:
        return _fp8_to_float(x.to(tl.int32) & 0xFF, 4, 7)
    elif QUANT == 3:
        return _fp8_to_float(x.to(tl.int32) & 0xFF, 5, 15)
    else:
        return x.to(tl.float32)


@triton.jit
def _decode_kernel(Q, K, V, Out, Tables, Lens, scale, KS, VS, fp8_scale,
                   stride_qb, stride_qh, stride_kh, stride_kblk, stride_kt, stride_vh, stride_vblk, stride_vt,
                   stride_ob, stride_oh, stride_tb, stride_sh, stride_sblk, stride_st,
                   GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kv_head = h // GROUP
    length = tl.load(Lens + b)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + d, mask=d_mask, other=0.0).to(tl.float32)

    m_i = tl.full([], float("-inf"), tl.float32)  # running max of the scores
    l_i = tl.full([], 0.0, tl.float32)  # running sum of exp(score - m_i)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)  # running sum of exp(score - m_i) * v
    for start in range(0, length, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        t_mask = t < length
        block = tl.load(Tables + b * stride_tb + t // BLOCK_SIZE, mask=t_mask, other=0)
        within = t % BLOCK_SIZE
        mask = t_mask[:, None] & d_mask[None, :]
        k = _widen(tl.load(K + kv_head * stride_kh + (block * stride_kblk + within * stride_kt)[:, None] + d[None, :],
                           mask=mask, other=0), QUANT)
        s_off = kv_head * stride_sh + block * stride_sblk + within * stride_st  # int8's scales
        if QUANT == 1:  # int8: each row times its (token, head) scale
            k = k * tl.load(KS + s_off, mask=t_mask, other=0.0)[:, None]
        elif QUANT >= 2:
            k = k * fp8_scale
        s = tl.sum(k * q[None, :], axis=1) * scale
        s = tl.where(t_mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        v = _widen(tl.load(V + kv_head * stride_vh + (block * stride_vblk + within * stride_vt)[:, None] + d[None, :],
                           mask=mask, other=0), QUANT)
        if QUANT == 1:
            v = v * tl.load(VS + s_off, mask=t_mask, other=0.0)[:, None]
        elif QUANT >= 2:
            v = v * fp8_scale
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    out = acc / l_i
    tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=d_mask)


def triton_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, lens: torch.Tensor, scale: float,
                            block_n: int = 64, k_scales: torch.Tensor | None = None,
                            v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q `[B, heads, dim]`; caches `[kv_heads, num_blocks, block_size, dim]` (the last dim
    contiguous) in q's dtype, int8 (with `k_scales`, `v_scales` `[kv_heads, num_blocks,
    block_size]` float32, the same strides) or float8; block_tables `[B, max_blocks]` int32 (one
    column, the slot, for virtual); lens `[B]` int32, each >= 1. Returns `[B, heads, dim]` in q's
    dtype."""
    batch, num_heads, dim = q.shape
    num_kv_heads, _, block_size, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not divide into {num_kv_heads} KV heads")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the head dimension of q and of the caches must be contiguous")
    quant = {torch.int8: _INT8, torch.float8_e4m3fn: _FP8_E4M3, torch.float8_e5m2: _FP8_E5M2}.get(k_cache.dtype, _PLAIN)
    if quant == _PLAIN and k_cache.dtype != q.dtype:
        raise ValueError(f"kv_cache_dtype: the Triton kernel reads caches in q's dtype, int8 or float8, not {k_cache.dtype}")
    if quant == _INT8:
        if k_scales is None or v_scales is None or k_scales.stride() != v_scales.stride():
            raise ValueError("kv_cache_dtype='int8': the kernel needs K and V scales of one layout")
    else:
        k_scales = v_scales = torch.zeros(1, 1, 1, dtype=torch.float32, device=q.device)  # not read
    if quant >= _FP8_E4M3:  # loaded as bytes and decoded from their bits
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    out = torch.empty_like(q)
    block_tables = block_tables.to(torch.int32)
    lens = lens.to(torch.int32)
    _decode_kernel[(batch, num_heads)](
        q, k_cache, v_cache, out, block_tables, lens, scale, k_scales, v_scales, kv_quant.FP8_SCALE,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0), k_scales.stride(0), k_scales.stride(1), k_scales.stride(2),
        GROUP=num_heads // num_kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=dim,
        BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(dim), QUANT=quant)
    return out
