"""What a stored KV block's bytes depend on besides its tokens: the fingerprint every tier key carries.

Two engines may exchange a block only if they would have computed the same bytes: same weights,
same model arithmetic (config numbers that change K,V), same compute dtype, same KV storage dtype
(`--kv-cache-dtype`), same payload layout, block size and KV shape. The digest of all that is the
fingerprint; the disk tier keeps one directory per fingerprint and checks it again in each file.

The weights part must be cheap for a 70B checkpoint yet tell different weights apart. Hashing every
byte would read the whole model at each start (seconds to minutes); instead, per tensor (sorted by
name): its name, shape and dtype, and the bytes of a fixed sample of its elements (the first
`HEAD_ELEMENTS` and `SAMPLE_ELEMENTS` evenly spaced over the rest). Any re-trained, fine-tuned,
re-quantized or differently-initialized checkpoint differs in essentially every element, so a
sample of ~1k elements per tensor catches it at a cost of a few ms; what it misses is an edit
confined to unsampled elements (a deliberate single-weight patch), which is named in the README.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

FORMAT_VERSION = 1  # bump when the payload layout or the key scheme changes
HEAD_ELEMENTS = 64
SAMPLE_ELEMENTS = 1024


def tensor_sample_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a fixed sample of `t`'s elements (no full copy of `t`)."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n <= HEAD_ELEMENTS + SAMPLE_ELEMENTS:
        sample = flat
    else:
        step = n // SAMPLE_ELEMENTS
        idx = torch.cat([torch.arange(HEAD_ELEMENTS), torch.arange(HEAD_ELEMENTS, n, step)[:SAMPLE_ELEMENTS]])
        sample = flat[idx.to(flat.device)]
    sample = sample.contiguous().cpu()
    return sample.reshape(-1).view(torch.uint8).numpy().tobytes() if sample.numel() else b""


def weights_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 hex of every tensor's name, shape, dtype and sampled bytes, in name order."""
    h = hashlib.sha256(b"kvmem-weights-v1")
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(tensor_sample_bytes(t))
    return h.hexdigest()


@dataclass(frozen=True)
class KVFingerprint:
    """Everything a block's bytes depend on besides its tokens (see the module's doc)."""

    weights: str  # weights_fingerprint(...)
    model: str  # the model's arithmetic: architecture and the config numbers that shape K,V
    dtype: str  # what the model computes in
    kv_cache_dtype: str  # what the cache stores (== dtype unless quantized)
    layout: str  # the payload layout (kvmem.memory.tiers.payload.LAYOUT)
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    version: int = FORMAT_VERSION

    @property
    def digest(self) -> bytes:
        """32 bytes naming this fingerprint (in file headers; its hex names the disk directory)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).digest()

    @property
    def hex(self) -> str:
        return self.digest.hex()


def model_arithmetic(model_config) -> str:
    """The config fields that change K,V for the same weights (not the name, tokens or file dtype)."""
    c = model_config
    fields = {k: getattr(c, k) for k in ("architecture", "vocab_size", "hidden_size", "intermediate_size",
                                          "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                          "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                                          "attention_bias")}
    fields["rope_scaling"] = asdict(c.rope_scaling)
    return json.dumps(fields, sort_keys=True, default=str)


def kv_fingerprint(weights: str, model_config, spec, block_size: int, layout: str) -> KVFingerprint:
    """The fingerprint of an engine's KV blocks (`weights`: weights_fingerprint of the model; `spec`: its
    KVCacheSpec)."""
    return KVFingerprint(weights=weights, model=model_arithmetic(model_config),
                         dtype=str(spec.dtype), kv_cache_dtype=str(spec.storage_dtype), layout=layout,
                         block_size=block_size, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
                         head_dim=spec.head_dim)
