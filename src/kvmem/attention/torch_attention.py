"""Attention over a block-addressed KV cache, in plain torch.

Two backends with one signature, `(q, k, v, k_cache, v_cache, meta, scale) -> out`:
- `batched_attention`: the fast path. All decodes in one SDPA call over keys gathered into a padded
  `[batch, max_len]` batch; each prefill one SDPA call.
- `reference_attention`: a per-sequence loop that gathers keys block by block and computes softmax
  explicitly in float32. Slow and obvious; the fast path is tested against it.

Shapes: q `[T, num_heads, head_dim]`, k and v `[T, num_kv_heads, head_dim]` (this step's tokens,
already rotated), caches `[num_blocks, block_size, num_kv_heads, head_dim]`.
Both write this step's K,V into the caches first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvmem.attention.metadata import AttentionMetadata


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def gather_context(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens addressed by each row of `block_tables` ([B, blocks]):
    [B, length, kv_heads, dim]. Whole blocks are copied (a few large copies beat many small ones);
    a table of one block (a contiguous slot, as in `static`) is sliced before copying instead, so
    only `length` tokens move, not the whole slot."""
    if block_tables.shape[1] == 1:
        return cache[block_tables[:, 0], :length]
    return cache[block_tables].flatten(1, 2)[:, :length]


def _causal_mask(query_len: int, context_len: int, device: torch.device) -> torch.Tensor:
    """Query i sits at position context_len - query_len + i and sees keys up to that position."""
    q_pos = torch.arange(context_len - query_len, context_len, device=device)
    return torch.arange(context_len, device=device)[None, :] <= q_pos[:, None]


def batched_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)

    nd = meta.num_decodes
    if nd:
        length = meta.decode_mask.shape[-1]  # [nd, length, kv_heads, dim] -> [nd, kv_heads, length, dim]
        keys = gather_context(k_cache, meta.decode_block_tables, length).transpose(1, 2)
        values = gather_context(v_cache, meta.decode_block_tables, length).transpose(1, 2)
        o = F.scaled_dot_product_attention(q[:nd, :, None, :], keys, values, attn_mask=meta.decode_mask,
                                           scale=scale, enable_gqa=True)
        out[:nd] = o[:, :, 0, :]

    for span in meta.prefills:
        rows = slice(span.query_start, span.query_start + span.query_len)
        qs = q[rows].transpose(0, 1)[None]  # [1, heads, qlen, dim]
        if span.block_table is None:  # no cached prefix: keys are exactly this step's tokens
            keys, values, mask, causal = k[rows], v[rows], None, True
        else:
            keys = gather_context(k_cache, span.block_table[None], span.context_len)[0]
            values = gather_context(v_cache, span.block_table[None], span.context_len)[0]
            mask, causal = _causal_mask(span.query_len, span.context_len, q.device), False
        o = F.scaled_dot_product_attention(qs, keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                           attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
        out[rows] = o[0].transpose(0, 1)
    return out


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    row = 0
    for table, ctx, qlen in zip(meta.block_tables, meta.context_lens, meta.query_lens):
        # Gather this sequence's keys block by block, in order.
        keys = torch.cat([k_cache[b] for b in table])[:ctx].float()  # [ctx, kv_heads, dim]
        values = torch.cat([v_cache[b] for b in table])[:ctx].float()
        keys = keys.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
        values = values.repeat_interleave(group, dim=1)
        qs = q[row: row + qlen].float()  # [qlen, heads, dim]
        scores = torch.einsum("qhd,khd->hqk", qs, keys) * scale
        scores = scores.masked_fill(~_causal_mask(qlen, ctx, q.device), float("-inf"))
        out[row: row + qlen] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
        row += qlen
    return out


BACKENDS = {"torch": batched_attention, "reference": reference_attention}
