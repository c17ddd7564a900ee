"""Which part of a Llama model one tensor-parallel rank holds (Megatron-LM's split, as vLLM does it).

Per layer, rank r of N holds:
- q heads [r * H/N, (r + 1) * H/N) and the KV heads they read: KV heads [r * K/N, (r + 1) * K/N) when
  N divides K; when N > K (N a multiple of K) one KV head, `r // (N / K)`, replicated on N / K ranks
  (vLLM's rule), so every rank's q heads find their group's K,V locally;
- columns [r * I/N, (r + 1) * I/N) of gate/up (the MLP's inner dimension);
- the matching input columns of o_proj and down_proj ("row-parallel"): each rank's output is a
  partial sum over its heads / its MLP columns, which one all-reduce per projection completes.
Everything else (embeddings, norms, lm_head) is replicated on every rank.

Attention needs no communication: a head's K,V never leave the rank that computes it, which is
also why each rank's KV cache holds only its own heads (`local_config().num_key_value_heads`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from kvmem.models.config import ModelConfig

# HF weight name suffix -> (dimension to slice, what it is split by)
_COLUMN_PARALLEL = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "mlp", "up_proj": "mlp"}
_ROW_PARALLEL = {"o_proj": "q", "down_proj": "mlp"}


def check_divisible(config: ModelConfig, tensor_parallel_size: int) -> None:
    """ValueError naming tensor_parallel_size when the model cannot be split over that many ranks."""
    n, heads, kv_heads = tensor_parallel_size, config.num_attention_heads, config.num_key_value_heads
    if heads % n:
        raise ValueError(f"tensor_parallel_size {n} does not divide the model's {heads} attention heads; "
                         f"use a divisor of {heads}")
    if kv_heads % n and n % kv_heads:
        raise ValueError(f"tensor_parallel_size {n} neither divides the model's {kv_heads} KV heads nor is a "
                         f"multiple of them (KV heads are split, or replicated when there are fewer than ranks)")
    if config.intermediate_size % n:
        raise ValueError(f"tensor_parallel_size {n} does not divide the model's MLP size "
                         f"({config.intermediate_size})")


@dataclass(frozen=True)
class TensorParallelShard:
    """Rank `rank` of `world_size`: the head and column ranges it holds of `config` (the full model's)."""

    config: ModelConfig
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        check_divisible(self.config, self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world_size})")

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads // self.world_size

    @property
    def num_kv_heads(self) -> int:
        return max(self.config.num_key_value_heads // self.world_size, 1)

    @property
    def kv_head_replicas(self) -> int:
        """Ranks holding each KV head: 1, or N / K when there are fewer KV heads than ranks."""
        return max(self.world_size // self.config.num_key_value_heads, 1)

    @property
    def first_kv_head(self) -> int:
        return (self.rank // self.kv_head_replicas) * self.num_kv_heads

    def ranges(self) -> dict[str, slice]:
        """Rows of each kind of split, in the full model's weight (head_dim rows per head)."""
        d = self.config.head_dim
        inner = self.config.intermediate_size // self.world_size
        return {"q": slice(self.rank * self.num_heads * d, (self.rank + 1) * self.num_heads * d),
                "kv": slice(self.first_kv_head * d, (self.first_kv_head + self.num_kv_heads) * d),
                "mlp": slice(self.rank * inner, (self.rank + 1) * inner)}

    def local_config(self) -> ModelConfig:
        """The architecture this rank's model has: its heads, its MLP columns, the same head_dim."""
        return dataclasses.replace(self.config, num_attention_heads=self.num_heads,
                                   num_key_value_heads=self.num_kv_heads,
                                   intermediate_size=self.config.intermediate_size // self.world_size)

    def shard_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors (Hugging Face names, full shapes) cut to this rank's part:
        column-parallel weights (and q/k/v biases) by rows, row-parallel ones by columns; the rest whole.
        Each slice is copied (`contiguous`), so the full tensor is freed as the stream moves on."""
        ranges = self.ranges()
        for name, tensor in weights:
            module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
            if module in _COLUMN_PARALLEL:
                tensor = tensor[ranges[_COLUMN_PARALLEL[module]]].contiguous()
            elif module in _ROW_PARALLEL and name.endswith(".weight"):
                tensor = tensor[:, ranges[_ROW_PARALLEL[module]]].contiguous()
            yield name, tensor
