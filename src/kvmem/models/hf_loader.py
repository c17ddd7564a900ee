"""Load a Hugging Face model directory: config.json, tokenizer.json and safetensors weights.

Weights are `model.safetensors`, or shards listed in `model.safetensors.index.json`; failing both,
every `*.safetensors` file in the directory. Only safetensors is read (never pickled `.bin` files,
which can run code when loaded).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from kvmem.models import kv_scales
from kvmem.models.config import ModelConfig
from kvmem.models.source import ModelSource
from kvmem.tokenizer import Tokenizer

__all__ = ["load_hf_config", "load_hf_dir"]


def load_hf_config(path: Path) -> ModelConfig:
    """`ModelConfig` from `path/config.json`, named after the directory."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file}: no such file; a Hugging Face model directory needs config.json, tokenizer.json and "
            "safetensors weights"
        )
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file}: cannot read JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file}: expected a JSON object")
    try:
        return ModelConfig.from_hf_dict(raw, name=path.resolve().name)
    except KeyError as e:
        raise ValueError(f"{config_file}: missing field {e.args[0]!r}") from e
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config_file}: {e}") from e


def _weight_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_file}: not a safetensors index (needs a 'weight_map' object): {e}") from e
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard listed in {index_file.name} is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    hint = " (only PyTorch .bin weights are there; kvmem reads safetensors)" if any(path.glob("*.bin")) else ""
    raise FileNotFoundError(
        f"{path}: no weights found: expected model.safetensors or model.safetensors.index.json{hint}"
    )


def _tensor_names(file: Path) -> list[str]:
    # Opening parses the header and checks it against the file size, so truncation is caught here,
    # before any weight is read.
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # SafetensorError, OSError, ...: all mean this file is unusable
        raise ValueError(f"{file}: corrupt or truncated safetensors file: {e}") from e


def load_hf_dir(path: Path) -> ModelSource:
    """Config, tokenizer and a lazy weight iterator for a Hugging Face model directory."""
    config = load_hf_config(path)
    tokenizer = Tokenizer.from_hf_dir(path)
    files = _weight_files(path)

    wanted = set(config.weight_names())
    located: dict[Path, list[str]] = {}
    found: set[str] = set()
    kv_scale_tensors: dict[str, torch.Tensor] = {}
    for file in files:
        # Others (rotary_emb.inv_freq buffers, lm_head.weight saved next to tied embeddings) are not needed.
        all_names = _tensor_names(file)
        names = [n for n in all_names if n in wanted]
        located[file] = names
        found.update(names)
        # fp8 KV-cache scales (llm-compressor / ModelOpt): a few scalars, read now; the engine decides
        # whether its kv_cache_dtype uses them (kvmem.models.kv_scales).
        scale_names = [n for n in all_names if kv_scales.is_scale_name(n)]
        if scale_names:
            with safe_open(str(file), framework="pt") as f:
                kv_scale_tensors.update((n, f.get_tensor(n)) for n in scale_names)
    missing = [n for n in config.weight_names() if n not in found]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{path}: checkpoint is missing tensor(s) {', '.join(missing[:5])}{more}")

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for file, names in located.items():
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in names:
                        yield name, f.get_tensor(name)
            except Exception as e:  # a file changed or truncated since load_model checked it
                raise ValueError(f"{file}: cannot read tensors: {e}") from e

    return ModelSource(config=config, tokenizer=tokenizer, weights=weights, path=path,
                       kv_scale_tensors=kv_scale_tensors)
