"""Where each token of a step's flat batch reads and writes KV.

The model runner builds one `AttentionMetadata` per step from the memory manager's block tables;
all layers share it. Sequences are ordered decodes first (one query token each), then prefills
(a prompt chunk, possibly on top of tokens already in the cache).

Token writes use *flat slots*: `block_id * block_size + offset`, an index into dimension 1 of a
layer cache viewed as `[kv_heads, num_blocks * block_size, head_dim]`; reads gather whole blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from kvmem.attention import cpu_kernels
from kvmem.attention.cascade import CascadeGroups, find_cascade_groups


def gathered_key_len(num_blocks: int, block_size: int, context_len: int) -> int:
    """How many key positions attention gathers for a context: whole blocks for a paged table, or
    just the live `context_len` tokens of a single block (a contiguous slot, as in `static`)."""
    return context_len if num_blocks == 1 else num_blocks * block_size


# Decode runs up to this many are read in place (a few bmm per run); more, and gathering chunks into
# one padded batch (two index_select, two bmm) is faster. Measured at batch 32 on the 2-core CPU:
# one run 1.9 ms vs 3.6 ms gathered, 32 single-sequence runs 5.8 ms vs 3.4 ms (SmolLM2, 1k context).
IN_PLACE_MAX_RUNS = 4


class DecodeRun(NamedTuple):
    """Decode rows [start, end) whose sequences sit in consecutive slots first_slot, first_slot + 1,
    ...: one strided view `cache[head, first_slot:first_slot + n, :length]` holds all their keys.
    `length` is the longest row's context; shorter rows read past their own length only into memory
    their slot has backed (see `readable_lens`), and `padding` ([n, 1, length], True at those keys;
    None when every row has `length` tokens) hides them."""

    start: int
    end: int
    first_slot: int
    length: int
    padding: torch.Tensor | None


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
    # Contiguous slots (virtual): decodes read their keys in place, a run of consecutive slots at a
    # time, never past what the slots have backed; None for block-table gathers.
    decode_runs: list[DecodeRun] | None = None
    # Contiguous slots in a ragged batch: decodes gather whole chunks of this many tokens, as paged
    # gathers blocks (`decode_block_tables` then count chunks of a cache viewed in chunk units).
    decode_gather_tokens: int | None = None
    # The native CPU kernel computes every row (decodes and prefill chunks alike) reading keys in
    # place through its sequence's table, row i up to native_context_lens[i] keys (its position + 1:
    # the causal mask). Tables are [num_tokens, width], one slot per row for contiguous slots. When
    # set, the decode and prefill fields above are not used by `batched_attention`.
    native_block_tables: torch.Tensor | None = None
    native_context_lens: torch.Tensor | None = None
    # Rows of the native kernel's batch that share a prefix's KV (`cascade`); None: every row alone.
    cascade: CascadeGroups | None = None
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
              chunk_tokens: int | None = None, readable_lens: list[int] | None = None,
              native_kernel: bool | None = None, prefix_ids: list[list[int]] | None = None,
              prefix_id_tokens: int | None = None) -> "AttentionMetadata":
        """`block_tables[i]`, `num_computed[i]` (tokens already cached before this step) and
        `query_lens[i]` describe sequence i; decodes (query_len 1) must come first.
        `in_place_decode`: every table is one contiguous slot that attention must not read past
        what is backed (the virtual strategy); decodes then get `decode_runs`, or, when the batch
        is too ragged for few runs and `chunk_tokens` is given, chunk tables to gather from.
        `readable_lens[i]`: how many tokens from the start of sequence i's slot are backed (at least
        its context; by default its context rounded up to `chunk_tokens`). Decodes in consecutive
        slots whose lengths differ share a run when every one of them can be read to the longest.
        `native_kernel`: every row goes to the C++ kernel (`cpu_kernels`), which reads any table in
        place; None: whenever it is available on a CPU device.
        `prefix_ids[i]` / `prefix_id_tokens`: where sequence i's leading KV lies
        (`KVCacheManager.shared_prefix_ids`); given, the native kernel's rows that share a prefix
        are grouped for cascade attention (`cascade.find_cascade_groups`).

        Built with one tensor construction per field rather than per sequence: this runs every step."""
        num_decodes = 0
        while num_decodes < len(query_lens) and query_lens[num_decodes] == 1 and num_computed[num_decodes] > 0:
            num_decodes += 1
        context_lens = [c + q for c, q in zip(num_computed, query_lens)]
        bs = block_size
        slot_mapping = torch.tensor([table[p // bs] * bs + p % bs
                                     for table, c, q in zip(block_tables, num_computed, query_lens)
                                     for p in range(c, c + q)], dtype=torch.long, device=device)

        if native_kernel is None:
            native_kernel = device.type == "cpu" and cpu_kernels.decode_attention_kernel() is not None
        if native_kernel:
            # Each sequence's blocks up to its context, padded with its own first block.
            needed = [-(-n // bs) for n in context_lens]
            width = max(needed)
            tables = torch.tensor([t[:k] + [t[0]] * (width - k) for t, k in zip(block_tables, needed)],
                                  dtype=torch.long, device=device)
            if any(q != 1 for q in query_lens):
                tables = tables.repeat_interleave(torch.tensor(query_lens, device=device), dim=0)
            lens = torch.tensor([p + 1 for c, q in zip(num_computed, query_lens) for p in range(c, c + q)],
                                dtype=torch.long, device=device)
            cascade = None
            if prefix_ids is not None and cpu_kernels.cascade_attention_kernel() is not None:
                cascade = find_cascade_groups(prefix_ids, prefix_id_tokens, num_computed, query_lens, device)
            return cls(slot_mapping, num_decodes, None, None, [], block_tables, context_lens, query_lens,
                       block_size, native_block_tables=tables, native_context_lens=lens, cascade=cascade)

        decode_block_tables = decode_mask = decode_runs = None
        gather_tokens = None
        if num_decodes and in_place_decode:
            if readable_lens is None:
                grain = chunk_tokens or 1
                readable_lens = [-(-n // grain) * grain for n in context_lens]
            # Greedy left to right: extend the run while the slot follows on and every row so far
            # can be read up to the longest context so far.
            bounds: list[list[int]] = []  # [start, end, first_slot, longest, least readable]
            for i in range(num_decodes):
                slot, length, readable = block_tables[i][0], context_lens[i], readable_lens[i]
                run = bounds[-1] if bounds else None
                if run is not None and run[2] + (i - run[0]) == slot \
                        and max(run[3], length) <= min(run[4], readable):
                    run[1], run[3], run[4] = i + 1, max(run[3], length), min(run[4], readable)
                else:
                    bounds.append([i, i + 1, slot, length, readable])
            if len(bounds) <= IN_PLACE_MAX_RUNS or chunk_tokens is None:
                decode_runs = []
                for start, end, first, longest, _ in bounds:
                    lens = context_lens[start:end]
                    padding = None
                    if min(lens) != longest:
                        padding = (torch.arange(longest, device=device)[None, :]
                                   >= torch.tensor(lens, device=device)[:, None])[:, None, :]
                    decode_runs.append(DecodeRun(start, end, first, longest, padding))
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
