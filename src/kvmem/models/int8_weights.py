"""`--quantization int8`: a Hugging Face checkpoint's linear weights (and the embedding, which a tied
lm_head shares) quantized at load to 8 bits, weight-only, and kept so: about half the memory of
bfloat16 weights, computed by the same native kernels as a GGUF's Q8_0 blocks.

The 8-bit format is llama.cpp's Q8_0 (one fp16 scale per 32 values of a row: 8.5 bits per weight)
rather than one scale per output channel: the scale follows the weights' magnitude within the row,
so the error is smaller, it costs 6 % more bytes, and every kernel and test for Q8_0 applies unchanged.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator

import torch

from kvmem.models.config import ModelConfig
from kvmem.models.gguf_blocks import Q8_0, QuantizedTensor, quantize_q8_0


def int8_types(config: ModelConfig) -> dict[str, int]:
    """Every matrix weight of the model (not the norms) -> Q8_0: what `LlamaForCausalLM.quantized_plan`
    chooses from, as it does from a GGUF's stored types."""
    return {name: Q8_0 for name in config.weight_names()
            if name.endswith(".weight") and not name.endswith("norm.weight")}


def quantize_at_load(weights: Iterable[tuple[str, torch.Tensor]], names: Collection[str]
                     ) -> Iterator[tuple[str, object]]:
    """The checkpoint's tensors, those named in `names` quantized to Q8_0 one at a time (the full-width
    tensor is dropped as soon as its blocks exist, so loading never holds two copies of the model)."""
    names = frozenset(names)
    for name, tensor in weights:
        if name in names:
            yield name, QuantizedTensor(quantize_q8_0(tensor), Q8_0, tensor.shape[1])
        else:
            yield name, tensor
