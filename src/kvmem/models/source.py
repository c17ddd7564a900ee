"""What a loader hands the engine: a model's config, its tokenizer and a lazy stream of its weights.

Its own module so that the format loaders (`gguf_loader`, `hf_loader`) and `loader`, which picks
one of them, depend on it and not on each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
