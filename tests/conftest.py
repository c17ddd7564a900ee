"""Shared test helpers: the embedded default model, and tiny GGUF files written on the spot (no downloads)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

# Triton kernels are defined when kvmem.attention.triton_decode is first imported, by whichever test
# module gets there first; without a GPU they must be defined for Triton's CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@lru_cache(maxsize=1)
def tiny_bpe_json() -> str:
    """A byte-level BPE (~400 tokens) trained on a few sentences, ChatML specials first; as tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "The quick brown fox jumps over the lazy dog.", "Paged attention keeps the KV cache in blocks.",
        "Hello, world! 12345 67890 1234 café naïve 日本語 🙂", "def main():\n    return 42\n",
        "Memory is the bottleneck of LLM serving; it's what we're measuring.",
    ] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=TINY_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


def tiny_bpe_gguf_metadata(pre: str = "smollm", **overrides: Any) -> dict[str, Any]:
    """`tokenizer.*` GGUF metadata describing `tiny_bpe_json()`, as llama.cpp's converter writes it."""
    model = json.loads(tiny_bpe_json())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in TINY_SPECIALS else 1 for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": vocab["<|im_start|>"],
        "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"],
        "tokenizer.ggml.padding_token_id": vocab["<|endoftext|>"],
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML_TEMPLATE,
    }
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def write_gguf(
    path: Path,
    arch: str = "llama",
    metadata: dict[str, Any] | None = None,
    tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]] | None = None,
) -> Path:
    """Write a GGUF file. Tensors are given in numpy order and quantized here; a uint8 array with a
    quantized type is taken as already-quantized bytes (for the K-quants gguf cannot produce)."""
    writer = GGUFWriter(path, arch)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            raise TypeError(f"{key}: {type(value)}")
    for name, (array, qtype) in (tensors or {}).items():
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        elif qtype == GGMLQuantizationType.F16:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float16))
        elif array.dtype == np.uint8:
            writer.add_tensor(name, array, raw_dtype=qtype)
        else:
            writer.add_tensor(name, quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def default_source():
    """`load_model(None)`: the embedded SmolLM2 GGUF, read once per test session (seconds)."""
    from kvmem.models.loader import load_model

    return load_model(None)


@pytest.fixture
def gguf_file(tmp_path: Path) -> Callable[..., Path]:
    """`gguf_file(name="x.gguf", arch=..., metadata=..., tensors=...)` writes a GGUF under tmp_path."""

    def make(name: str = "model.gguf", **kwargs: Any) -> Path:
        return write_gguf(tmp_path / name, **kwargs)

    return make
