"""Where each token of a step's flat batch reads and writes KV.

The model runner builds one `AttentionMetadata` per step from the memory manager's block tables;
all layers share it. Sequences are ordered decodes first (one query token each), then prefills
(a prompt chunk, possibly on top of tokens already in the cache).

Token writes use *flat slots*: `block_id * block_size + offset`, an index into dimension 1 of a
layer cache viewed as `[kv_heads, num_blocks * block_size, head_dim]`; reads gather whole blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def gathered_key_len(num_blocks: int, block_size: int, context_len: int) -> int:
    """How many key positions attention gathers for a context: whole blocks for a paged table, or
    just the live `context_len` tokens of a single block (a contiguous slot, as in `static`)."""
    return context_len if num_blocks == 1 else num_blocks * block_size


@dataclass
class PrefillSpan:
    query_start: int  # first row of this sequence in the flat batch
    query_len: int  # tokens computed this step
    context_len: int  # tokens in the cache after this step (cached prefix + query)
    # Blocks holding all context_len keys; None when the whole context is this step's tokens,
    # which attention then takes straight from the projections.
    block_table: torch.Tensor | None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] flat slot each new token's K,V is written to
    num_decodes: int  # the first num_decodes rows are single-token decodes
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks], padded with block 0
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, gathered key length] True where a key is valid
    prefills: list[PrefillSpan]
    # Unpadded per-sequence view, used by the reference backend and the tests.
    block_tables: list[list[int]]
    context_lens: list[int]
    query_lens: list[int]
    block_size: int
    # Contiguous slots (virtual): decodes read each sequence's keys in place, never past its length.
    # Runs of decode rows (start, end, first_slot, length) whose slots are consecutive and whose
    # lengths are equal, so one strided view covers the run; None for block-table gathers.
    decode_runs: list[tuple[int, int, int, int]] | None = None
    # Scratch tensors that every layer of this step reuses (see `buffer`).
    _buffers: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A scratch tensor kept for the whole step: all layers gather keys of the same shape, and
        allocating those megabytes anew per layer cost page faults (half the system time measured)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    @classmethod
    def build(cls, block_tables: list[list[int]], num_computed: list[int], query_lens: list[int],
              block_size: int, device: torch.device, in_place_decode: bool = False) -> "AttentionMetadata":
        """`block_tables[i]`, `num_computed[i]` (tokens already cached before this step) and
        `query_lens[i]` describe sequence i; decodes (query_len 1) must come first.
        `in_place_decode`: every table is one contiguous slot that attention must not read past
        the sequence's length (the virtual strategy); decodes then get `decode_runs`.

        Built with one tensor construction per field rather than per sequence: this runs every step."""
        num_decodes = 0
        while num_decodes < len(query_lens) and query_lens[num_decodes] == 1 and num_computed[num_decodes] > 0:
            num_decodes += 1
        context_lens = [c + q for c, q in zip(num_computed, query_lens)]
        bs = block_size
        slot_mapping = torch.tensor([table[p // bs] * bs + p % bs
                                     for table, c, q in zip(block_tables, num_computed, query_lens)
                                     for p in range(c, c + q)], dtype=torch.long, device=device)

        decode_block_tables = decode_mask = decode_runs = None
        if num_decodes and in_place_decode:
            decode_runs = []
            for i in range(num_decodes):
                slot, length = block_tables[i][0], context_lens[i]
                if decode_runs and decode_runs[-1][3] == length \
                        and decode_runs[-1][2] + (i - decode_runs[-1][0]) == slot:
                    start, _, first, _ = decode_runs[-1]
                    decode_runs[-1] = (start, i + 1, first, length)
                else:
                    decode_runs.append((i, i + 1, slot, length))
        elif num_decodes:
            # Whole blocks, not single tokens, are gathered at attention time: fewer, larger copies.
            max_blocks = max(-(-context_lens[i] // bs) for i in range(num_decodes))
            padded = [block_tables[i] + [0] * (max_blocks - len(block_tables[i])) for i in range(num_decodes)]
            decode_block_tables = torch.tensor(padded, dtype=torch.long, device=device)
            lens = torch.tensor(context_lens[:num_decodes], device=device)
            key_len = gathered_key_len(max_blocks, bs, max(context_lens[:num_decodes]))
            decode_mask = (torch.arange(key_len, device=device)[None, :] < lens[:, None])[:, None, None, :]

        prefills = []
        start = num_decodes
        for i in range(num_decodes, len(query_lens)):
            q, ctx = query_lens[i], context_lens[i]
            table = None if ctx == q else torch.tensor(block_tables[i][: -(-ctx // bs)], dtype=torch.long,
                                                       device=device)
            prefills.append(PrefillSpan(start, q, ctx, table))
            start += q
        return cls(slot_mapping, num_decodes, decode_block_tables, decode_mask, prefills,
                   block_tables, context_lens, query_lens, block_size, decode_runs)
