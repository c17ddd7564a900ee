"""What a loader hands the engine: a model's config, its tokenizer and a lazy stream of its weights.

Its own module so that the format loaders (`gguf_loader`, `hf_loader`) and `loader`, which picks
one of them, depend on it and not on each other.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvmem.models.config import ModelConfig
from kvmem.tokenizer import Tokenizer


@dataclass
class ModelSource:
    """A loaded model description. `weights()` opens the checkpoint anew on each call and yields
    `(hf_name, tensor)` pairs one at a time, so that peak memory stays near one tensor; GGUF tensors
    come dequantized to float32, safetensors ones in the checkpoint's dtype (the model casts)."""

    config: ModelConfig
    tokenizer: Tokenizer
    weights: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    path: Path
    # GGUF only: the weights stored in a block format kvmem can keep as it is (HF name -> GGML type
    # id), and `quantized_weights(names)`, which yields those named as `gguf_blocks.QuantizedTensor`s
    # and the rest as `weights()` does (`--quantization gguf|auto`).
    quantized_types: dict[str, int] = field(default_factory=dict)
    quantized_weights: Callable[[Collection[str]], Iterator[tuple[str, object]]] | None = None
    # Hugging Face directories only: per-tensor fp8 KV-cache scales the checkpoint carries (name ->
    # scalar tensor, vLLM's names; `kvmem.models.kv_scales`), empty where it has none.
    kv_scale_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
