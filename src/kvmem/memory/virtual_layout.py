"""virtual_layout: where `virtual` puts each (layer, K/V, head, slot, token), and the page arithmetic.

Every sequence owns a *slot*: a contiguous range of `max_len` tokens in each of `num_regions`
regions of one reservation. Memory is mapped in *chunks* of `page_tokens` tokens — the fewest whose
bytes fill whole pages — in every region at once, so a sequence of n tokens holds
ceil(n / page_tokens) chunks: at most `page_tokens - 1` tokens of waste (on average half that),
like a paged block of `page_tokens` tokens.

`SlotLayout` is what the manager, its mapping worker and the shared-chunk pool ask of a layout.
Two implement it:

- `VirtualLayout` (CPU, 4 KiB pages), head-major `[layers, 2, kv_heads, slots, max_len, head_dim]`:
  a layer's K cache is `[kv_heads, slots, max_len, head_dim]` — the shared addressing of `base.py`
  with one block of `max_len` tokens per slot, as in `static`. Head-major so that a page holds a
  whole number of one head's tokens: with `token_bytes = head_dim * dtype size`, a chunk of
  `page_tokens = PAGE / gcd(PAGE, token_bytes)` tokens fills whole pages (SmolLM2, head_dim 64:
  32 tokens per 4 KiB page in bf16, 16 in fp32); each (layer, K/V, kv head) is a region. The
  token-major `[slots, len, kv_heads, head_dim]` would put 10.7 SmolLM2 tokens in a page.
- `megacache.MegacacheLayout` (CUDA, 2 MiB pages): token-major across all layers, one region, the
  same logical shape as strided views (its docstring has the waste arithmetic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kvmem.memory.base import KVCacheSpec, cdiv


class SlotLayout(Protocol):
    """A reservation cut into slots and regions; sizes in bytes, lengths in tokens."""

    @property
    def spec(self) -> KVCacheSpec: ...

    @property
    def num_slots(self) -> int: ...

    @property
    def max_len(self) -> int:
        """Tokens per slot, a whole number of chunks."""

    @property
    def page_size(self) -> int:
        """The backend's page: every chunk is a whole number of them."""

    @property
    def token_bytes(self) -> int:
        """Bytes of one token in one region."""

    @property
    def page_tokens(self) -> int:
        """Tokens per mapping chunk: the fewest that fill whole pages."""

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one chunk in one region (page_tokens * token_bytes)."""

    @property
    def num_regions(self) -> int:
        """Regions a slot has one contiguous range in; a chunk is mapped in all of them at once."""

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot's range in one region."""

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole reservation."""

    @property
    def shape(self) -> tuple[int, ...]:
        """`[layers, 2, kv_heads, slots, max_len, head_dim]`: `kv[layer, k_or_v]` is a layer cache."""

    @property
    def strides(self) -> tuple[int, ...]:
        """Element strides of `shape` over the reservation."""

    def slot_offsets(self, slot: int) -> np.ndarray:
        """Byte offset of `slot`'s range in every region."""


@dataclass(frozen=True)
class VirtualLayout:
    """The CPU layout (module docstring): head-major, one region per (layer, K/V, kv head)."""

    spec: KVCacheSpec
    num_slots: int
    max_len: int  # tokens per slot, a whole number of chunks
    page_size: int

    @classmethod
    def build(cls, spec: KVCacheSpec, num_slots: int, max_model_len: int, page_size: int) -> VirtualLayout:
        token_bytes = spec.head_dim * spec.storage_dtype.itemsize
        page_tokens = page_size // math.gcd(page_size, token_bytes)
        return cls(spec, num_slots, cdiv(max_model_len, page_tokens) * page_tokens, page_size)

    @property
    def token_bytes(self) -> int:
        """One token of one head in one region."""
        return self.spec.head_dim * self.spec.storage_dtype.itemsize

    @property
    def page_tokens(self) -> int:
        """Tokens per mapping chunk: the fewest that fill whole pages."""
        return self.page_size // math.gcd(self.page_size, self.token_bytes)

    @property
    def chunk_bytes(self) -> int:
        return self.page_tokens * self.token_bytes

    @property
    def num_regions(self) -> int:
        """(layer, K/V, kv head) triples: each holds one contiguous range per slot."""
        return self.spec.num_layers * 2 * self.spec.num_kv_heads

    @property
    def slot_bytes(self) -> int:
        return self.max_len * self.token_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_regions * self.num_slots * self.slot_bytes

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.spec
        return (s.num_layers, 2, s.num_kv_heads, self.num_slots, self.max_len, s.head_dim)

    @property
    def strides(self) -> tuple[int, ...]:
        """Contiguous: the reservation is `shape` in row-major order."""
        shape = self.shape
        return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))

    def slot_offsets(self, slot: int) -> np.ndarray:
        """Byte offset of `slot`'s range in every region."""
        return np.arange(self.num_regions, dtype=np.int64) * (self.num_slots * self.slot_bytes) \
            + slot * self.slot_bytes
