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

Meant for CUDA; the tests run it on CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(Q, K, V, Out, Tables, Lens, scale,
                   stride_qb, stride_qh, stride_kh, stride_kblk, stride_kt, stride_vh, stride_vblk, stride_vt,
                   stride_ob, stride_oh, stride_tb,
                   GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
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
        k = tl.load(K + kv_head * stride_kh + (block * stride_kblk + within * stride_kt)[:, None] + d[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scale
        s = tl.where(t_mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(V + kv_head * stride_vh + (block * stride_vblk + within * stride_vt)[:, None] + d[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    out = acc / l_i
    tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=d_mask)


def triton_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, lens: torch.Tensor, scale: float,
                            block_n: int = 64) -> torch.Tensor:
    """q `[B, heads, dim]`; caches `[kv_heads, num_blocks, block_size, dim]` (the last dim
    contiguous); block_tables `[B, max_blocks]` int32 (one column, the slot, for virtual);
    lens `[B]` int32, each >= 1. Returns `[B, heads, dim]` in q's dtype."""
    batch, num_heads, dim = q.shape
    num_kv_heads, _, block_size, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not divide into {num_kv_heads} KV heads")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the head dimension of q and of the caches must be contiguous")
    out = torch.empty_like(q)
    block_tables = block_tables.to(torch.int32)
    lens = lens.to(torch.int32)
    _decode_kernel[(batch, num_heads)](
        q, k_cache, v_cache, out, block_tables, lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=dim,
        BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(dim))
    return out
