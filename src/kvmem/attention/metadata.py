"""Where each token of a step's flat batch reads and writes KV.

The model runner builds one `AttentionMetadata` per step from the memory manager's block tables;
all layers share it. Sequences are ordered decodes first (one query token each), then prefills
(a prompt chunk, possibly on top of tokens already in the cache).

All addresses are *flat slots*: `block_id * block_size + offset`, an index into a layer cache
viewed as `[num_blocks * block_size, kv_heads, head_dim]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillSpan:
    query_start: int  # first row of this sequence in the flat batch
    query_len: int  # tokens computed this step
    context_len: int  # tokens in the cache after this step (cached prefix + query)
    # Flat slots of all context_len keys; None when the whole context is this step's tokens,
    # which attention then takes straight from the projections.
    key_slots: torch.Tensor | None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] flat slot each new token's K,V is written to
    num_decodes: int  # the first num_decodes rows are single-token decodes
    decode_key_slots: torch.Tensor | None  # [num_decodes, max_len] flat slots, padded with 0
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_len] True where a key is valid
    prefills: list[PrefillSpan]
    # Unpadded per-sequence view, used by the reference backend and the tests.
    block_tables: list[list[int]]
    context_lens: list[int]
    query_lens: list[int]
    block_size: int

    @classmethod
    def build(cls, block_tables: list[list[int]], num_computed: list[int], query_lens: list[int],
              block_size: int, device: torch.device) -> "AttentionMetadata":
        """`block_tables[i]`, `num_computed[i]` (tokens already cached before this step) and
        `query_lens[i]` describe sequence i; decodes (query_len 1) must come first."""
        num_decodes = 0
        while num_decodes < len(query_lens) and query_lens[num_decodes] == 1 and num_computed[num_decodes] > 0:
            num_decodes += 1
        context_lens = [c + q for c, q in zip(num_computed, query_lens)]

        def key_slots(table: list[int], start: int, end: int) -> torch.Tensor:
            pos = torch.arange(start, end)
            return torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size

        slot_mapping = torch.cat(
            [key_slots(t, c, c + q) for t, c, q in zip(block_tables, num_computed, query_lens)]
        ) if block_tables else torch.empty(0, dtype=torch.long)

        decode_key_slots = decode_mask = None
        if num_decodes:
            max_len = max(context_lens[:num_decodes])
            decode_key_slots = torch.zeros(num_decodes, max_len, dtype=torch.long)
            for i in range(num_decodes):
                decode_key_slots[i, : context_lens[i]] = key_slots(block_tables[i], 0, context_lens[i])
            lens = torch.tensor(context_lens[:num_decodes])
            decode_mask = (torch.arange(max_len)[None, :] < lens[:, None])[:, None, None, :]
            decode_key_slots, decode_mask = decode_key_slots.to(device), decode_mask.to(device)

        prefills = []
        start = num_decodes
        for i in range(num_decodes, len(query_lens)):
            q, ctx = query_lens[i], context_lens[i]
            slots = None if ctx == q else key_slots(block_tables[i], 0, ctx).to(device)
            prefills.append(PrefillSpan(start, q, ctx, slots))
            start += q
        return cls(slot_mapping.to(device), num_decodes, decode_key_slots, decode_mask, prefills,
                   block_tables, context_lens, query_lens, block_size)
