"""Attention over a block-addressed KV cache, in plain torch.

Two backends with one signature, `(q, k, v, k_cache, v_cache, meta, scale) -> out`:
- `batched_attention`: the fast path. On the CPU, every row (decode or prefill) in one call of the
  native kernel, reading keys where they lie. Otherwise all decodes in one batched call over keys
  gathered into a padded `[batch, max_len]` batch (or read in place from contiguous slots), and each
  prefill one SDPA call.
- `reference_attention`: a per-sequence loop that gathers keys block by block and computes softmax
  explicitly in float32. Slow and obvious; the fast path is tested against it.

Shapes: q `[T, num_heads, head_dim]`, k and v `[T, num_kv_heads, head_dim]` (this step's tokens,
already rotated), caches `[num_kv_heads, num_blocks, block_size, head_dim]`.
Both write this step's K,V into the caches first.

Quantized caches (`kv_cache_dtype` int8 / fp8, `kv_quant`): the caches hold int8 or float8 and,
for int8, every backend takes the scales as two more arguments `k_scales, v_scales`
(`[num_kv_heads, num_blocks, block_size]`). K,V are read where they lie and widened block by
block (the native kernel: row by row in registers); attention over this step's own tokens uses
their quantized-and-back values, so a token reads the same whichever step wrote it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvmem.attention import cpu_kernels, kv_quant
from kvmem.attention.metadata import AttentionMetadata, gathered_key_len


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scales: torch.Tensor | None = None,
             v_scales: torch.Tensor | None = None) -> None:
    if kv_quant.is_quantized(k_cache.dtype):
        if k_cache.device.type == "cpu" and kv_quant.FP8_SCALE == 1.0 and (native := cpu_kernels.load()) is not None:
            # one pass, the same bits as kv_quant.write_quantized's torch ops
            native.write_kv_quantized(k, v, k_cache, v_cache, slot_mapping, k_scales, v_scales)
        else:
            kv_quant.write_quantized(k, v, k_cache, v_cache, slot_mapping, k_scales, v_scales)
        return
    if k_cache.device.type == "cpu" and (native := cpu_kernels.load()) is not None:
        native.write_kv(k, v, k_cache, v_cache, slot_mapping)  # one pass instead of two index_copy_
        return
    num_kv_heads, _, _, dim = k_cache.shape
    k_cache.view(num_kv_heads, -1, dim).index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.view(num_kv_heads, -1, dim).index_copy_(1, slot_mapping, v.transpose(0, 1))


def gather_context(cache: torch.Tensor, block_tables: torch.Tensor, context_len: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Keys (or values) of each row of `block_tables` ([B, blocks]) covering at least `context_len`
    tokens, per KV head: [kv_heads, B, gathered_key_len(...), dim] with every (head, row) matrix
    contiguous, as BLAS wants it.

    Paged: whole blocks are copied with index_select (several times faster on CPU than advanced
    indexing); padding past a row's context is masked, not sliced off, because a slice would make
    the batch non-contiguous and bmm copy it again. A table of one block (a contiguous slot, as in
    `static`) is sliced to `context_len` before copying, so only live tokens move.
    """
    num_kv_heads, _, block_size, dim = cache.shape
    batch, num_blocks = block_tables.shape
    length = gathered_key_len(num_blocks, block_size, context_len)
    if out is None:
        out = torch.empty(num_kv_heads, batch, length, dim, dtype=cache.dtype, device=cache.device)
    if num_blocks == 1:  # stack slices: index_select on a sliced view takes a slow path (10x here)
        return torch.stack([cache[:, slot, :length] for slot in block_tables[:, 0].tolist()], dim=1, out=out)
    torch.index_select(cache, 1, block_tables.flatten(), out=out.view(num_kv_heads, batch * num_blocks, block_size, dim))
    return out


def gather_dequantized(cache: torch.Tensor, scales: torch.Tensor | None, block_tables: torch.Tensor,
                       context_len: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """`gather_context` for a quantized cache: the rows' blocks (only those: never the whole cache),
    widened to `dtype`, into `out` when given."""
    stored = gather_context(cache, block_tables, context_len)
    gathered_scales = None
    if scales is not None:
        gathered_scales = gather_context(scales.unsqueeze(-1), block_tables, context_len).squeeze(-1)
    return kv_quant.dequantize(stored, gathered_scales, dtype, out)


def _gather(cache: torch.Tensor, scales: torch.Tensor | None, block_tables: torch.Tensor, context_len: int,
            dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    if kv_quant.is_quantized(cache.dtype):
        return gather_dequantized(cache, scales, block_tables, context_len, dtype, out)
    return gather_context(cache, block_tables, context_len, out)


def _widen(stored: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A view of the cache (a run of slots, one block) in `dtype`; unchanged if not quantized."""
    return kv_quant.dequantize(stored, scales, dtype) if kv_quant.is_quantized(stored.dtype) else stored


def _causal_mask(query_len: int, context_len: int, device: torch.device) -> torch.Tensor:
    """Query i sits at position context_len - query_len + i and sees keys up to that position."""
    q_pos = torch.arange(context_len - query_len, context_len, device=device)
    return torch.arange(context_len, device=device)[None, :] <= q_pos[:, None]


def batched_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                      k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None) -> torch.Tensor:
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scales, v_scales)
    quantized = kv_quant.is_quantized(k_cache.dtype)
    if meta.native_context_lens is not None:  # the native CPU kernel: every row, in place, any layout
        if quantized:
            return cpu_kernels.quantized_attention(q, k_cache, v_cache, k_scales, v_scales, meta.native_block_tables,
                                                   meta.native_context_lens, scale)
        if meta.cascade is not None:  # quantized KV stays on the row-at-a-time path above
            groups = meta.cascade
            return cpu_kernels.cascade_attention_kernel()(q, k_cache, v_cache, meta.native_block_tables,
                                                          meta.native_context_lens, scale, groups.rows,
                                                          groups.starts, groups.prefix_lens)
        return cpu_kernels.decode_attention_kernel()(q, k_cache, v_cache, meta.native_block_tables,
                                                     meta.native_context_lens, scale)
    out = torch.empty_like(q)

    nd = meta.num_decodes
    if nd and meta.decode_runs is not None:
        out[:nd] = _decode_attention_in_place(q[:nd], k_cache, v_cache, meta, scale, k_scales, v_scales)
    elif nd and meta.decode_gather_tokens:  # contiguous slots in a ragged batch: gather chunks
        kv_heads, dim = k_cache.shape[0], k_cache.shape[-1]
        chunk = meta.decode_gather_tokens
        ks, vs = ((None, None) if k_scales is None else
                  (k_scales.view(kv_heads, -1, chunk), v_scales.view(kv_heads, -1, chunk)))
        out[:nd] = _decode_attention(q[:nd], k_cache.view(kv_heads, -1, chunk, dim),
                                     v_cache.view(kv_heads, -1, chunk, dim), meta, scale, ks, vs)
    elif nd:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta, scale, k_scales, v_scales)

    for span in meta.prefills:
        rows = slice(span.query_start, span.query_start + span.query_len)
        qs = q[rows].transpose(0, 1)[None]  # [1, heads, qlen, dim]
        if span.block_table is None:  # no cached prefix: keys are exactly this step's tokens
            keys = kv_quant.round_trip(k[rows], k_cache.dtype).transpose(0, 1)  # [kv_heads, qlen, dim]
            values = kv_quant.round_trip(v[rows], v_cache.dtype).transpose(0, 1)
            mask, causal = None, True
        else:
            table = span.block_table[None]
            keys = _gather(k_cache, k_scales, table, span.context_len, q.dtype)[:, 0, : span.context_len]
            values = _gather(v_cache, v_scales, table, span.context_len, q.dtype)[:, 0, : span.context_len]
            mask, causal = _causal_mask(span.query_len, span.context_len, q.device), False
        o = F.scaled_dot_product_attention(qs, keys[None], values[None], attn_mask=mask, is_causal=causal,
                                           scale=scale, enable_gqa=True)
        out[rows] = o[0].transpose(0, 1)
    return out


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float, k_scales: torch.Tensor | None = None,
                      v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence, all sequences at once, as two batched GEMMs over
    (kv head, sequence): the query heads of a group share their KV head's keys, so GQA costs no copy
    of K or V, and the head-major cache makes each (head, sequence) key matrix contiguous for BLAS.

    Not SDPA: for a single query row its CPU kernel tiles over queries and was ~5x slower here than
    bmm + softmax. Softmax runs in float32, as in the reference.
    """
    nd, num_heads, dim = q.shape
    num_kv_heads = k_cache.shape[0]
    group = num_heads // num_kv_heads
    length = meta.decode_mask.shape[-1]
    shape = (num_kv_heads, nd, length, dim)
    keys = _gather(k_cache, k_scales, meta.decode_block_tables, length, q.dtype,
                   meta.buffer("decode_keys", shape, q.dtype, q.device)).view(num_kv_heads * nd, length, dim)
    values = _gather(v_cache, v_scales, meta.decode_block_tables, length, q.dtype,
                     meta.buffer("decode_values", shape, q.dtype, q.device)).view(num_kv_heads * nd, length, dim)
    qg = q.view(nd, num_kv_heads, group, dim).transpose(0, 1).reshape(num_kv_heads * nd, group, dim)
    scores = torch.bmm(qg, keys.transpose(1, 2)).mul_(scale).view(num_kv_heads, nd, group, length)
    scores.masked_fill_(~meta.decode_mask[:, 0], float("-inf"))  # mask [nd, 1, length] broadcasts
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).view(num_kv_heads * nd, group, length)
    out = torch.bmm(probs, values).view(num_kv_heads, nd, group, dim)
    return out.transpose(0, 1).reshape(nd, num_heads, dim)


def _decode_attention_in_place(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               meta: AttentionMetadata, scale: float, k_scales: torch.Tensor | None = None,
                               v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention straight on contiguous slots (vAttention): no gather, no copy of K or V.
    `cache[:, slot, :len]` is an ordinary strided tensor, so plain bmm reads it in place.

    A run of rows in consecutive slots is one strided view per KV head, `cache[h, first:first + n,
    :length]`: one bmm pair per head covers the run. Rows shorter than the run's `length` read past
    their own tokens only into memory their slot has backed, and the run's padding sets those scores to
    -inf, so they weigh exactly 0 (the keys there are finite: zero pages or an earlier sequence's KV).
    A row alone is one bmm pair over its KV heads. A quantized cache is widened run by run (the
    run's live range only).
    """
    nd, num_heads, dim = q.shape
    num_kv_heads = k_cache.shape[0]
    group = num_heads // num_kv_heads
    qg = q.view(nd, num_kv_heads, group, dim)
    out = torch.empty(nd, num_kv_heads, group, dim, dtype=q.dtype, device=q.device)
    quantized = kv_quant.is_quantized(k_cache.dtype)
    for start, end, first, length, padding in meta.decode_runs:
        if end - start == 1:
            keys, values = k_cache[:, first, :length], v_cache[:, first, :length]  # [kv_heads, len, dim]
            if quantized:
                keys = _widen(keys, None if k_scales is None else k_scales[:, first, :length], q.dtype)
                values = _widen(values, None if v_scales is None else v_scales[:, first, :length], q.dtype)
            scores = torch.bmm(qg[start], keys.transpose(1, 2)).mul_(scale)  # [kv_heads, group, len]
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out[start] = torch.bmm(probs, values)
            continue
        slots = slice(first, first + end - start)
        for h in range(num_kv_heads):
            keys, values = k_cache[h, slots, :length], v_cache[h, slots, :length]  # [n, len, dim]
            if quantized:
                keys = _widen(keys, None if k_scales is None else k_scales[h, slots, :length], q.dtype)
                values = _widen(values, None if v_scales is None else v_scales[h, slots, :length], q.dtype)
            scores = torch.bmm(qg[start:end, h], keys.transpose(1, 2)).mul_(scale)  # [n, group, len]
            if padding is not None:
                scores.masked_fill_(padding, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out[start:end, h] = torch.bmm(probs, values)
    return out.view(nd, num_heads, dim)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                        k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None) -> torch.Tensor:
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scales, v_scales)

    def block(cache: torch.Tensor, scales: torch.Tensor | None, b: int, n: int) -> torch.Tensor:
        return _widen(cache[:, b, :n], None if scales is None else scales[:, b, :n], torch.float32)

    num_heads, num_kv_heads = q.shape[1], k_cache.shape[0]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    row = 0
    for table, ctx, qlen in zip(meta.block_tables, meta.context_lens, meta.query_lens):
        # Gather this sequence's keys block by block, in order, never past ctx: [ctx, kv_heads, dim].
        bs = k_cache.shape[2]
        parts = [(b, min(bs, ctx - i * bs)) for i, b in enumerate(table[: -(-ctx // bs)])]
        keys = torch.cat([block(k_cache, k_scales, b, n) for b, n in parts], dim=1).transpose(0, 1).float()
        values = torch.cat([block(v_cache, v_scales, b, n) for b, n in parts], dim=1).transpose(0, 1).float()
        keys = keys.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
        values = values.repeat_interleave(group, dim=1)
        qs = q[row: row + qlen].float()  # [qlen, heads, dim]
        scores = torch.einsum("qhd,khd->hqk", qs, keys) * scale
        scores = scores.masked_fill(~_causal_mask(qlen, ctx, q.device), float("-inf"))
        out[row: row + qlen] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
        row += qlen
    return out


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                     k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """The `triton` backend, meant for CUDA: every row, decode or prompt, through the Triton kernel
    (`triton_decode`), which reads K,V in place through the row's table up to its causal length
    (the per-row tables the native CPU kernel reads too), never past it."""
    from kvmem.attention.triton_decode import triton_decode_attention

    write_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scales, v_scales)
    return triton_decode_attention(q, k_cache, v_cache, meta.native_block_tables, meta.native_context_lens, scale,
                                   k_scales=k_scales, v_scales=v_scales)


BACKENDS = {"torch": batched_attention, "reference": reference_attention, "triton": triton_attention}
# Backends that read every row through per-row tables (AttentionMetadata's native_* fields) on any
# device; the others get them only where the native CPU kernel runs.
ROW_TABLE_BACKENDS = frozenset({"triton"})


def check_backend(name: str) -> None:
    """Raise a ValueError naming what is missing for backend `name` (before any model is built)."""
    if name == "triton":
        try:
            import kvmem.attention.triton_decode  # noqa: F401
        except ImportError as e:
            raise ValueError(f"attention_backend='triton' needs the triton package ({e}); "
                             "it comes with CUDA builds of torch") from e

