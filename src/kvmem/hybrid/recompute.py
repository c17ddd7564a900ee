"""K,V from activations: what the device does with an ACT block.

The activation kept in the host tier is the post-`input_layernorm` hidden state of a layer, the
input of its fused `qkv_proj`. The layer computed, for those tokens,

    q, k, v = split(qkv_proj(a))          k, v: [tokens, kv_heads, head_dim]
    k = rope(positions, k)                 (v is not rotated)

so K,V come back from the rows of the fused weight that make K and V (no Q: a third of the GEMM for
MHA, more for GQA is skipped), the same bias rows, and the model's own RoPE tables at each token's
position. Positions are arbitrary: a block's tokens need not be contiguous or start at 0.

FLOPs: 2 · tokens · hidden · 2·kv_size (`KVProjection.flops`, the cost model's f per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvmem.models.fused import apply_rope_reference
from kvmem.models.llama import Attention, RotaryEmbedding


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    # `pack_linear_weights_for_cpu` stores weights in oneDNN's blocked layout, which cannot be sliced.
    return None if t is None else (t.to_dense() if t.is_mkldnn else t)


@dataclass
class KVProjection:
    """The K and V rows of one layer's fused q,k,v projection: `[2 · kv_size, hidden]` (K rows, then V)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_attention(cls, attention: Attention) -> "KVProjection":
        """Views (no copy) of the K,V rows of `attention.qkv_proj`; a copy when the weight is oneDNN-packed."""
        q, kv = attention.q_size, attention.kv_size
        weight = _dense(attention.qkv_proj.weight)[q:q + 2 * kv]
        bias = _dense(attention.qkv_proj.bias)
        return cls(weight, None if bias is None else bias[q:q + 2 * kv], attention.num_kv_heads, attention.head_dim)

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def flops(self, num_tokens: int) -> int:
        return 2 * num_tokens * self.weight.shape[1] * self.weight.shape[0]


def rotate_keys(k: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
    """RoPE on keys only, with the model's own cos/sin tables (same values, same dtype as its forward)."""
    if positions.numel() and int(positions.max()) >= rope.cos.shape[0]:
        raise ValueError(f"position {int(positions.max())} is past the model's RoPE table ({rope.cos.shape[0]} "
                         f"positions); build the model with a larger max_positions")
    return apply_rope_reference(k, *rope.tables(positions))


def recompute_kv(activations: torch.Tensor, projection: KVProjection | Attention, positions: torch.Tensor,
                 rope: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V `[tokens, kv_heads, head_dim]` for `activations` `[tokens, hidden]` (post input_layernorm) at
    `positions` `[tokens]`, exactly as the layer's forward pass computed them (up to GEMM rounding).

    `projection`: a `KVProjection` (made once per layer, as an engine would keep it) or the layer's
    `Attention` module."""
    if isinstance(projection, Attention):
        projection = KVProjection.from_attention(projection)
    if activations.shape[0] != positions.shape[0]:
        raise ValueError(f"{activations.shape[0]} activations but {positions.shape[0]} positions")
    kv = F.linear(activations, projection.weight, projection.bias)
    k, v = kv.split(projection.kv_size, dim=-1)
    k = k.reshape(-1, projection.num_kv_heads, projection.head_dim)
    v = v.reshape(-1, projection.num_kv_heads, projection.head_dim)
    return rotate_keys(k, positions, rope), v
