"""A linear layer whose weight stays in GGUF's quantized blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K,
Q5_K, Q6_K): a model takes about its file's size in memory, and a decode step reads 4.5-8.5 bits per
weight instead of 16.

On the CPU the native kernel (`kvmem.models.quant_kernels`, csrc/quant_matmul.cpp) reads the blocks
directly for every batch size; each output is computed by the same operations whatever else is in
the batch. Elsewhere (no compiler, KVMEM_CPU_KERNELS=0, CUDA) the weight is dequantized with torch
ops at each call, which is correct but slow: `--quantization auto` dequantizes at load there instead.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kvmem.models import gguf_blocks, quant_kernels


class QuantizedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, type_id: int, bias: bool = False,
                 qweight: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> None:
        """An empty layer for `load_weights` to fill (`qweight` None), or one over an existing byte
        matrix (a tied lm_head shares the quantized embedding's)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.format = gguf_blocks.format_of(type_id)
        self.type_id = self.format.type_id
        shape = (out_features, self.format.row_bytes(in_features))
        if qweight is None:
            qweight = torch.empty(shape, dtype=torch.uint8)
        elif tuple(qweight.shape) != shape or qweight.dtype != torch.uint8:
            raise ValueError(f"qweight must be uint8 {shape}, got {qweight.dtype} {tuple(qweight.shape)}")
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None, persistent=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.format.name}"

    def dequantized_weight(self) -> torch.Tensor:
        return gguf_blocks.dequantize(self.qweight, self.type_id, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        native = quant_kernels.load() if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) \
            else None
        if native is None:
            y = F.linear(x, self.dequantized_weight().to(device=x.device, dtype=x.dtype))
        else:
            y = native.quant_linear(x.reshape(-1, self.in_features), self.qweight, self.type_id)
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def kernel(self):
        """This layer over [rows, in_features] CPU matrices as one native call with its blocks bound
        (`llama.direct_call`): what `forward` runs on that path, without its checks and reshapes."""
        native = quant_kernels.load()
        if native is None or self.qweight.device.type != "cpu":
            return self.forward
        quant_linear, qweight, type_id, bias, forward = native.quant_linear, self.qweight, self.type_id, self.bias, \
            self.forward

        def linear(x: torch.Tensor) -> torch.Tensor:
            if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16):
                return forward(x)
            y = quant_linear(x, qweight, type_id)
            return y if bias is None else y + bias
        return linear


class QuantizedConcatLinear(nn.Module):
    """A fused projection (q/k/v, gate/up) whose parts a GGUF stores in different block types:
    llama.cpp's K-quant mixes (Q4_K_M, ...) give v_proj more bits than q and k in some layers. Each part
    is a `QuantizedLinear` of its own type; their outputs are concatenated. Every output element is
    computed exactly as its part alone computes it, so a row's result still does not depend on the
    batch. The bias (Qwen2's q/k/v) covers the fused output."""

    def __init__(self, in_features: int, part_features: Sequence[int], type_ids: Sequence[int], bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if len(part_features) != len(type_ids) or not part_features:
            raise ValueError(f"part_features {list(part_features)} and type_ids {list(type_ids)} must pair up")
        self.in_features, self.out_features = in_features, sum(part_features)
        self.parts = nn.ModuleList(QuantizedLinear(in_features, n, t) for n, t in zip(part_features, type_ids))
        self.register_buffer("bias", torch.empty(self.out_features, dtype=dtype) if bias else None, persistent=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def dequantized_weight(self) -> torch.Tensor:
        return torch.cat([p.dequantized_weight() for p in self.parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _concatenated(x, list(self.parts), self.bias)

    def kernel(self):
        """The parts' bound kernels, concatenated (`llama.direct_call`)."""
        return functools.partial(_concatenated, parts=[p.kernel() for p in self.parts], bias=self.bias)


def _concatenated(x: torch.Tensor, parts: list, bias: torch.Tensor | None) -> torch.Tensor:
    y = torch.cat([part(x) for part in parts], dim=-1)
    return y if bias is None else y + bias
