"""The grammar's token mask, applied to the constrained rows of a batch of logits.

Each constrained row's matcher fills one row of an int32 bitmask (bit t of word t // 32 set: token t
allowed); the bits are unpacked and the disallowed logits set to -inf, in place, for those rows only.
A matcher that allows every token (`fill_next_token_bitmask` returns False) costs no masking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

_BIT_POSITIONS = torch.arange(32, dtype=torch.int32)


def apply_grammar_masks(logits: torch.Tensor, row_indices: Sequence[int], matchers: Sequence[Any]) -> None:
    """In place: row `row_indices[j]` of `logits` keeps only the tokens `matchers[j]` allows next."""
    vocab = logits.shape[1]
    words = (vocab + 31) // 32
    bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
    needed = [j for j, matcher in enumerate(matchers) if matcher.fill_next_token_bitmask(bitmask, j)]
    if not needed:
        return
    if len(needed) < len(matchers):
        bitmask = bitmask[needed]
    allowed = ((bitmask.unsqueeze(-1) >> _BIT_POSITIONS) & 1).bool().flatten(1)[:, :vocab]
    index = torch.tensor([row_indices[j] for j in needed], device=logits.device)
    rows = logits.index_select(0, index)
    logits[index] = rows.masked_fill_(~allowed.to(logits.device), float("-inf"))
