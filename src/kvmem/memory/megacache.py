"""megacache: how `virtual` lays KV out on CUDA, where a physical page is 2 MiB.

The CPU layout (`virtual_layout.VirtualLayout`, head-major `[layers, 2, kv_heads, slots, max_len,
head_dim]`) gives every (layer, K/V, head) its own contiguous range per slot and maps memory in
all of them at once. That is right for 4 KiB pages and ruinous for 2 MiB ones: a page of one
region holds `2 MiB / (head_dim * itemsize)` tokens, and a sequence maps one page in each of the
`layers * 2 * kv_heads` regions. SmolLM2-135M in bf16 (30 layers, 3 KV heads, head_dim 64):
16,384 tokens a page, 180 regions, so the smallest mapping is 360 MiB — for one token.

So on CUDA a slot is *token-major across all layers* (vAttention's "megacache"): a token's K and V
of every layer and head sit next to each other in one row, and a slot is `max_len` rows:

    reservation  [slots, max_len, row]      row = [layers, 2, kv_heads, head_dim] + padding

A page now holds `page / row_bytes` tokens of one sequence in every layer (SmolLM2 bf16: 23,040
bytes a token, 91 tokens in 2 MiB), which divides the waste per sequence by the number of regions.
The layer cache the attention code sees is still `[kv_heads, slots, max_len, head_dim]`, as a
strided view (strides `(head_dim, max_len * row, row, 1)` in elements): the head dimension is
contiguous and slots x tokens merge into one dimension, which is all that `torch_attention`
(`view(kv_heads, -1, head_dim)` for writes, slices for reads) and `triton_decode` (explicit strides,
stride(-1) == 1) ask of a cache.

Whole tokens in whole pages. The manager maps, and shares between sequences, in *chunks* of whole
tokens that fill whole pages: `chunk_tokens = page / gcd(page, row_bytes)`. With the bare row that
can be large (SmolLM2 bf16: gcd(2 MiB, 23,040) = 512, so 4,096 tokens over 45 pages), so the row may
be padded with unused head rows: more rows cost every token the padding, fewer tokens per chunk
save the tail. `build` picks the row length (between the bare row and twice it) that minimises

    expected waste per sequence = typical_tokens * padding_bytes + chunk_bytes / 2

with `typical_tokens` = max_model_len / 2 by default (a heuristic: the tail is on average half a
chunk; the padding is paid on every token). Worked out for a 2 MiB page, max_model_len 2048:

| model, bf16              | bare row | row chosen      | chunk            | 1,000 tokens: mapped - live | head-major |
|--------------------------|----------|-----------------|------------------|-----------------------------|------------|
| SmolLM2-135M (30, 3, 64) | 22.5 KiB | 24 KiB (+6.7 %) | 256 tok, 3 pages | 2.0 MiB of 24 MiB (8.4 %)   | 360 MiB    |
| Qwen2-0.5B (24, 2, 64)   | 12 KiB   | 12 KiB          | 512 tok, 3 pages | 0.3 MiB of 12 MiB (2.3 %)   | 192 MiB    |
| Llama-3-8B (32, 8, 128)  | 128 KiB  | 128 KiB         | 16 tok, 1 page   | 1.0 MiB of 126 MiB (0.8 %)  | 1 GiB      |
| Llama-2-7B (32, 32, 128) | 512 KiB  | 512 KiB         | 4 tok, 1 page    | 0 of 500 MiB                | 4 GiB      |

((layers, kv_heads, head_dim); "head-major" is the least the CPU layout would map for a
sequence's first token: one 2 MiB page in each of the `layers * 2 * kv_heads` regions.) On average
a sequence wastes half a chunk plus the padding of its rows; a tiny test model (a 512-byte row)
holds 4,096 tokens in one page, so every sequence maps one 2 MiB page whatever its length.

The trade-off, honestly: small models still waste a few MiB a sequence (a 2 MiB page is large
next to a 23 KiB token), and the padding of the chosen row is allocated for every token. A head's
keys are no longer one contiguous range but rows `row_bytes` apart; each row of head_dim values is
contiguous (head_dim * itemsize bytes: 128 for SmolLM2 in bf16, a whole number of 32-byte sectors),
so a decode kernel still reads whole sectors, but a kernel that wants one flat range per head (or
a TMA box over [tokens, head_dim] with a small stride) does not get it. The vAttention paper also
adds smaller pages (64-256 KiB) through changes to NVIDIA's open-source kernel driver; stock CUDA
has only the granularity this module is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvmem.memory.base import KVCacheSpec, cdiv


def _chunk_tokens(page_size: int, row_bytes: int) -> int:
    """The fewest tokens whose rows fill whole pages."""
    return page_size // math.gcd(page_size, row_bytes)


@dataclass(frozen=True)
class MegacacheLayout:
    """Where each (layer, K/V, head, slot, token) lives in a CUDA reservation, and the page
    arithmetic: a `virtual_layout.SlotLayout`, as `VirtualLayout` is, with a single region."""

    spec: KVCacheSpec
    num_slots: int
    max_len: int  # tokens per slot, a whole number of chunks
    page_size: int
    row_heads: int  # head rows per token: 2 * layers * kv_heads of KV, the rest padding

    @classmethod
    def build(cls, spec: KVCacheSpec, num_slots: int, max_model_len: int, page_size: int,
              typical_tokens: int | None = None) -> MegacacheLayout:
        head_bytes = spec.head_dim * spec.storage_dtype.itemsize
        kv_heads = 2 * spec.num_layers * spec.num_kv_heads
        typical = typical_tokens if typical_tokens is not None else max(max_model_len // 2, 1)

        def expected_waste(rows: int) -> float:
            chunk_bytes = _chunk_tokens(page_size, rows * head_bytes) * rows * head_bytes
            return typical * (rows - kv_heads) * head_bytes + chunk_bytes / 2

        rows = min(range(kv_heads, 2 * kv_heads + 1), key=lambda r: (expected_waste(r), r))
        chunk = _chunk_tokens(page_size, rows * head_bytes)
        return cls(spec, num_slots, cdiv(max_model_len, chunk) * chunk, page_size, rows)

    @property
    def token_bytes(self) -> int:
        """One token's row: K and V of every layer and head, plus padding."""
        return self.row_heads * self.spec.head_dim * self.spec.storage_dtype.itemsize

    @property
    def padding_fraction(self) -> float:
        """Share of every row that holds no KV."""
        return 1 - 2 * self.spec.num_layers * self.spec.num_kv_heads / self.row_heads

    @property
    def page_tokens(self) -> int:
        """Tokens per mapping chunk: the fewest that fill whole pages."""
        return _chunk_tokens(self.page_size, self.token_bytes)

    @property
    def chunk_bytes(self) -> int:
        return self.page_tokens * self.token_bytes

    @property
    def num_regions(self) -> int:
        """One: a slot's tokens of all layers are one contiguous range."""
        return 1

    @property
    def slot_bytes(self) -> int:
        return self.max_len * self.token_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def shape(self) -> tuple[int, ...]:
        """The same logical shape as the CPU layout: `kv[layer, k_or_v]` is a layer cache."""
        s = self.spec
        return (s.num_layers, 2, s.num_kv_heads, self.num_slots, self.max_len, s.head_dim)

    @property
    def strides(self) -> tuple[int, ...]:
        """Element strides of `shape` over the token-major reservation."""
        s = self.spec
        row = self.token_bytes // s.dtype.itemsize
        return (2 * s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.head_dim, self.max_len * row, row, 1)

    def slot_offsets(self, slot: int) -> np.ndarray:
        """Byte offset of `slot`'s range in every region (there is one)."""
        return np.array([slot * self.slot_bytes], dtype=np.int64)
