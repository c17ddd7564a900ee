"""Typed access to a GGUF file's key/value metadata, naming the file in every error.

Shared by the GGUF weight loader (architecture keys) and the tokenizer (`tokenizer.ggml.*` keys).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gguf import GGUFReader


class GGUFMetadata:
    def __init__(self, reader: GGUFReader, source: str | os.PathLike[str]) -> None:
        self.reader, self.source = reader, source

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        if key not in self.reader.fields:
            raise ValueError(f"{self.source}: GGUF metadata has no {key!r}")
        return self.get(key)

    def per_model(self, key: str, default: Any = None) -> Any:
        """A per-model value; llama.cpp allows per-layer arrays for some keys, which must then be uniform."""
        value = self.get(key, default)
        if isinstance(value, list):
            if not value or any(v != value[0] for v in value):
                raise ValueError(f"{self.source}: {key} varies per layer ({value}); kvmem needs one value")
            value = value[0]
        return value
