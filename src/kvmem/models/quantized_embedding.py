"""A token embedding whose table stays in GGUF's quantized blocks: a lookup dequantizes only the
rows it reads. A tied lm_head is a `QuantizedLinear` over the same bytes."""

from __future__ import annotations

import torch
from torch import nn

from kvmem.models import gguf_blocks, quant_kernels


class QuantizedEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, type_id: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self.format = gguf_blocks.format_of(type_id)
        self.type_id = self.format.type_id
        self.register_buffer("qweight", torch.empty((num_embeddings, self.format.row_bytes(embedding_dim)),
                                                    dtype=torch.uint8), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.format.name}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight.index_select(0, ids.reshape(-1))
        native = quant_kernels.load() if rows.device.type == "cpu" else None
        if native is None:
            values = gguf_blocks.dequantize(rows, self.type_id, self.embedding_dim)
        else:
            values = native.dequantize(rows, self.type_id, self.embedding_dim)
        # float32 first, then the model's dtype: what dequantizing the whole table at load gives.
        return values.to(self.dtype).reshape(*ids.shape, self.embedding_dim)
