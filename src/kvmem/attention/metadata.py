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


# Decode runs up to this many are read in place (a few bmm per run); more, and gathering chunks into
# one padded batch (two index_select, two bmm) is faster. Measured at batch 32 on the 2-core CPU:
# one run 1.9 ms vs 3.6 ms gathered, 32 single-sequence runs 5.8 ms vs 3.4 ms (SmolLM2, 1k context).
IN_PLACE_MAX_RUNS = 4


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
    # Contiguous slots in a ragged batch: decodes gather whole chunks of this many tokens, as paged
    # gathers blocks (`decode_block_tables` then count chunks of a cache viewed in chunk units).
    decode_gather_tokens: int | None = None
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
              block_size: int, device: torch.device, in_place_decode: bool = False,
              chunk_tokens: int | None = None) -> "AttentionMetadata":
        """`block_tables[i]`, `num_computed[i]` (tokens already cached before this step) and
        `query_lens[i]` describe sequence i; decodes (query_len 1) must come first.
        `in_place_decode`: every table is one contiguous slot that attention must not read past
        the sequence's length (the virtual strategy); decodes then get `decode_runs`, or, when the
        batch is too ragged for few runs and `chunk_tokens` is given, chunk tables to gather from.

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
        gather_tokens = None
        if num_decodes and in_place_decode:
            runs: list[tuple[int, int, int, int]] = []
            for i in range(num_decodes):
                slot, length = block_tables[i][0], context_lens[i]
                if runs and runs[-1][3] == length and runs[-1][2] + (i - runs[-1][0]) == slot:
                    start, _, first, _ = runs[-1]
                    runs[-1] = (start, i + 1, first, length)
                else:
                    runs.append((i, i + 1, slot, length))
            if len(runs) <= IN_PLACE_MAX_RUNS or chunk_tokens is None:
                decode_runs = runs
            else:
                # Ragged: a slot is a row of chunks; gather each sequence's chunks up to the one
                # holding its last token (mapped memory), padding with its own first chunk.
                gather_tokens = chunk_tokens
                per_slot = block_size // chunk_tokens
                tables = [[block_tables[i][0] * per_slot + j for j in range(-(-context_lens[i] // chunk_tokens))]
                          for i in range(num_decodes)]
                decode_block_tables, decode_mask = cls._gather_tables(tables, context_lens[:num_decodes],
                                                                      chunk_tokens, device)
        elif num_decodes:
            # Whole blocks, not single tokens, are gathered at attention time: fewer, larger copies.
            decode_block_tables, decode_mask = cls._gather_tables(block_tables[:num_decodes],
                                                                  context_lens[:num_decodes], bs, device)

        prefills = []
        start = num_decodes
        for i in range(num_decodes, len(query_lens)):
            q, ctx = query_lens[i], context_lens[i]
            table = None if ctx == q else torch.tensor(block_tables[i][: -(-ctx // bs)], dtype=torch.long,
                                                       device=device)
            prefills.append(PrefillSpan(start, q, ctx, table))
            start += q
        return cls(slot_mapping, num_decodes, decode_block_tables, decode_mask, prefills,
                   block_tables, context_lens, query_lens, block_size, decode_runs, gather_tokens)

    @staticmethod
    def _gather_tables(tables: list[list[int]], context_lens: list[int], block_size: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables padded to one width (with each row's first block, so padding reads only
        memory the sequence owns), and the mask of valid keys over the gathered length."""
        max_blocks = max(-(-n // block_size) for n in context_lens)
        padded = [t[:max_blocks] + [t[0]] * (max_blocks - len(t[:max_blocks])) for t in tables]
        lens = torch.tensor(context_lens, device=device)
        key_len = gathered_key_len(max_blocks, block_size, max(context_lens))
        mask = (torch.arange(key_len, device=device)[None, :] < lens[:, None])[:, None, None, :]
        return torch.tensor(padded, dtype=torch.long, device=device), mask
