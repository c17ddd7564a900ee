"""One rank's shard of the Llama model: the same `LlamaForCausalLM` code, built for the rank's heads
and MLP columns (`TensorParallelShard.local_config`), loaded from the checkpoint's slices, with an
all-reduce after each row-parallel projection (o_proj, down_proj).

Embeddings and the final norm are replicated (on CPU the vocabulary matrix is small next to the
layers, and a replicated embedding needs no all-gather of the input). lm_head is computed on rank 0
only, which samples: the other ranks' lm_head is `NoLogits`, so they neither hold it (where it is
not tied to the embeddings) nor spend its GEMM.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvmem.distributed.group import TensorParallelGroup
from kvmem.distributed.shard import TensorParallelShard
from kvmem.models.llama import LlamaForCausalLM


class RowParallel(nn.Module):
    """A row-parallel projection: this rank's partial sum, then the sum over ranks (one all-reduce).

    float32 exactness: the unsplit GEMM adds its K products in one order; the ranks add their
    K / N slices and the all-reduce adds those N partial sums, so a result can differ from the
    one-device one in the last bit. Greedy tokens still match on the models tested
    (tests/distributed/test_tensor_parallel.py), as they match transformers, whose GEMMs add in
    yet another order. What must hold exactly is that every rank gets the same bits, or the ranks'
    shards would see different inputs: the all-reduce gives every rank the same result (the
    shared-memory one adds the partial sums in rank order on every rank).
    """

    def __init__(self, linear: nn.Module, group: TensorParallelGroup) -> None:
        super().__init__()
        self.linear = linear
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce_(self.linear(x))


class NoLogits(nn.Module):
    """The lm_head of a rank that does not sample: rows without logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], 0)


def build_parallel_model(shard: TensorParallelShard, group: TensorParallelGroup, max_positions: int,
                         dtype: torch.dtype, device: torch.device, weights: Iterable[tuple[str, torch.Tensor]],
                         pack_for_cpu: bool, batch_invariant: bool = True) -> LlamaForCausalLM:
    """This rank's model, loaded, (on CPU) packed, with its row-parallel projections all-reduced."""
    model = LlamaForCausalLM.build(shard.local_config(), max_positions, dtype, device)
    model.load_weights(shard.shard_weights(weights))
    if shard.rank != 0:
        model.lm_head = NoLogits()
    if pack_for_cpu:
        model.pack_linear_weights_for_cpu(batch_invariant=batch_invariant)
    for layer in model.layers:
        layer.self_attn.o_proj = RowParallel(layer.self_attn.o_proj, group)
        layer.mlp.down_proj = RowParallel(layer.mlp.down_proj, group)
    return model
