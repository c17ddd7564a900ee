"""The grammar's token mask, applied to the constrained rows of a batch of logits.

Each constrained row's matcher fills one row of an int32 bitmask (bit t of word t // 32 set: token t
allowed); the disallowed logits become -inf, in place, for those rows only. A matcher that allows
every token (`fill_next_token_bitmask` returns False) costs no masking.

Unpacking: the bitmask read as bytes (little-endian, so byte k of word w holds tokens 32w + 8k ..
32w + 8k + 7) indexes a 256 x 8 table of "forbidden" flags -- one gather instead of 32 shifts per
word, about 2x faster for a batch of 64 rows over a 49k vocabulary.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

# _FORBIDDEN[b, j]: bit j of byte b is clear.
_FORBIDDEN = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1) == 0
assert sys.byteorder == "little", "the bitmask is read as little-endian bytes"


def forbidden_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] bool: True where the row's bitmask forbids the token."""
    return _FORBIDDEN[bitmask.view(torch.uint8).long()].flatten(1)[:, :vocab]


def apply_grammar_masks(logits: torch.Tensor, row_indices: Sequence[int], matchers: Sequence[Any]) -> None:
    """In place: row `row_indices[j]` of `logits` keeps only the tokens `matchers[j]` allows next."""
    vocab = logits.shape[1]
    bitmask = torch.full((len(matchers), (vocab + 31) // 32), -1, dtype=torch.int32)
    needed = [j for j, matcher in enumerate(matchers) if matcher.fill_next_token_bitmask(bitmask, j)]
    if not needed:
        return
    if len(needed) < len(matchers):
        bitmask = bitmask[needed]
    forbidden = forbidden_tokens(bitmask, vocab).to(logits.device)
    rows = [row_indices[j] for j in needed]
    if rows == list(range(logits.shape[0])):  # every row: no gather and scatter
        logits.masked_fill_(forbidden, float("-inf"))
        return
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits.index_select(0, index).masked_fill_(forbidden, float("-inf"))
