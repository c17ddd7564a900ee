"""The fingerprint tells different weights, dtypes, KV dtypes, layouts and block sizes apart, and is
the same for the same ones."""

from __future__ import annotations

import torch

from kvmem.memory.base import KVCacheSpec
from kvmem.memory.tiers.fingerprint import kv_fingerprint, weights_fingerprint
from kvmem.models.config import ModelConfig


def weights(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(300, 200, generator=g).to(dtype), "b.bias": torch.randn(7, generator=g).to(dtype)}


def test_weights_fingerprint_tells_weights_apart():
    base = weights_fingerprint(weights(0).items())
    assert base == weights_fingerprint(reversed(list(weights(0).items())))  # order does not matter
    assert base != weights_fingerprint(weights(1).items())
    assert base != weights_fingerprint(weights(0, torch.bfloat16).items())
    renamed = {("c.weight" if k == "a.weight" else k): v for k, v in weights(0).items()}
    assert base != weights_fingerprint(renamed.items())
    scaled = weights(0)
    scaled["a.weight"] = scaled["a.weight"] * 1.001  # a fine-tune moves (nearly) every weight
    assert base != weights_fingerprint(scaled.items())
    reshaped = weights(0)
    reshaped["a.weight"] = reshaped["a.weight"].reshape(200, 300)
    assert base != weights_fingerprint(reshaped.items())


def test_kv_fingerprint_covers_dtype_kv_dtype_layout_and_block_size():
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=8, intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    cpu = torch.device("cpu")
    spec = KVCacheSpec(2, 1, 4, torch.float32, cpu)
    base = kv_fingerprint("w", config, spec, 16, "L")
    assert base == kv_fingerprint("w", config, spec, 16, "L")
    others = [kv_fingerprint("w2", config, spec, 16, "L"),
              kv_fingerprint("w", config, KVCacheSpec(2, 1, 4, torch.bfloat16, cpu), 16, "L"),
              kv_fingerprint("w", config, KVCacheSpec(2, 1, 4, torch.float32, cpu, torch.int8), 16, "L"),
              kv_fingerprint("w", config, spec, 32, "L"),
              kv_fingerprint("w", config, spec, 16, "L2")]
    config.rope_theta = 500000.0
    others.append(kv_fingerprint("w", config, spec, 16, "L"))
    assert len({base.digest, *(o.digest for o in others)}) == len(others) + 1
