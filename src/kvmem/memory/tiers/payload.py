"""A KV block's bytes in one canonical layout, whatever the strategy that held it.

Layout `LAYOUT`: the K,V of the block's tokens as `[layers, 2 (K,V), kv_heads, block_size, head_dim]`
in the cache's storage dtype, followed, for int8 caches, by their float32 scales
`[layers, 2, kv_heads, block_size]`. Paged's pool is `[layers, 2, kv_heads, blocks, block_size,
head_dim]`, so a block is one strided view of it; a strategy with another layout converts into this
one, and blocks stay interchangeable between strategies of the same fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUT = "kv[L,2,H,T,D]+scales[L,2,H,T]f32"


@dataclass(frozen=True)
class BlockFormat:
    num_layers: int
    num_kv_heads: int
    block_size: int
    head_dim: int
    dtype: torch.dtype  # the storage dtype
    has_scales: bool

    @classmethod
    def of(cls, spec, block_size: int) -> BlockFormat:
        return cls(spec.num_layers, spec.num_kv_heads, block_size, spec.head_dim, spec.storage_dtype, spec.has_scales)

    @property
    def kv_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def kv_nbytes(self) -> int:
        n = 1
        for d in self.kv_shape:
            n *= d
        return n * self.dtype.itemsize

    @property
    def scales_nbytes(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.block_size * 4 if self.has_scales else 0

    @property
    def nbytes(self) -> int:
        return self.kv_nbytes + self.scales_nbytes

    def views(self, payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(K,V view, scales view or None) of a uint8 payload of `nbytes`, without copying."""
        assert payload.dtype == torch.uint8 and payload.numel() == self.nbytes, (payload.dtype, payload.numel())
        kv = payload[:self.kv_nbytes].view(self.dtype).view(self.kv_shape)
        scales = payload[self.kv_nbytes:].view(torch.float32).view(self.kv_shape[:-1]) if self.has_scales else None
        return kv, scales

    def gather(self, kv_block: torch.Tensor, scales_block: torch.Tensor | None, out: torch.Tensor) -> None:
        """Copy a block, given as (strided) views `[L, 2, H, T, D]` and `[L, 2, H, T]` of wherever a
        strategy keeps it, into payload `out`."""
        kv_out, scales_out = self.views(out)
        kv_out.copy_(kv_block)
        if scales_out is not None:
            scales_out.copy_(scales_block)

    def scatter(self, payload: torch.Tensor, kv_block: torch.Tensor, scales_block: torch.Tensor | None) -> None:
        """Copy payload into a block given as views (see `gather`)."""
        kv_in, scales_in = self.views(payload)
        kv_block.copy_(kv_in)
        if scales_in is not None:
            scales_block.copy_(scales_in)

    def gather_paged(self, kv: torch.Tensor, kv_scales: torch.Tensor | None, block_id: int,
                     out: torch.Tensor) -> None:
        """Copy block `block_id` of a paged pool (`[L, 2, H, blocks, T, D]`) into payload `out`."""
        self.gather(kv[:, :, :, block_id], None if kv_scales is None else kv_scales[:, :, :, block_id], out)

    def scatter_paged(self, payload: torch.Tensor, kv: torch.Tensor, kv_scales: torch.Tensor | None,
                      block_id: int) -> None:
        """Copy payload into block `block_id` of a paged pool."""
        self.scatter(payload, kv[:, :, :, block_id], None if kv_scales is None else kv_scales[:, :, :, block_id])
