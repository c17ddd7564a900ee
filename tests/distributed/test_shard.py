"""Which heads and columns a rank holds: the ranks' slices put back together are the whole model."""

from __future__ import annotations

import pytest
import torch

from kvmem.distributed.shard import TensorParallelShard, check_divisible
from kvmem.models.config import ModelConfig


def config(heads: int, kv_heads: int, head_dim: int = 4, inner: int = 12, bias: bool = False) -> ModelConfig:
    return ModelConfig("LlamaForCausalLM", vocab_size=10, hidden_size=heads * head_dim, intermediate_size=inner,
                       num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=head_dim, attention_bias=bias)


def full_weights(c: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"q_proj": (c.num_attention_heads * c.head_dim, c.hidden_size),
              "k_proj": (c.num_key_value_heads * c.head_dim, c.hidden_size),
              "v_proj": (c.num_key_value_heads * c.head_dim, c.hidden_size),
              "o_proj": (c.hidden_size, c.num_attention_heads * c.head_dim)}
    out = {f"model.layers.0.self_attn.{m}.weight": torch.randn(s, generator=g) for m, s in shapes.items()}
    out.update({f"model.layers.0.self_attn.{m}.bias": torch.randn(s[0], generator=g) for m, s in shapes.items()
                if m != "o_proj"})
    for m, s in {"gate_proj": (c.intermediate_size, c.hidden_size), "up_proj": (c.intermediate_size, c.hidden_size),
                 "down_proj": (c.hidden_size, c.intermediate_size)}.items():
        out[f"model.layers.0.mlp.{m}.weight"] = torch.randn(s, generator=g)
    out["model.embed_tokens.weight"] = torch.randn(c.vocab_size, c.hidden_size, generator=g)
    out["model.layers.0.input_layernorm.weight"] = torch.randn(c.hidden_size, generator=g)
    return out


@pytest.mark.parametrize("heads,kv_heads,n", [(4, 4, 2), (4, 2, 2), (6, 3, 3), (4, 2, 4)])
def test_slices_of_all_ranks_rebuild_every_weight(heads, kv_heads, n):
    c = config(heads, kv_heads)
    full = full_weights(c)
    parts = [dict(TensorParallelShard(c, r, n).shard_weights(full.items())) for r in range(n)]
    replicas = max(n // kv_heads, 1)
    for name, tensor in full.items():
        pieces = [p[name] for p in parts]
        if any(m in name for m in ("q_proj", "gate_proj", "up_proj")):
            assert torch.equal(torch.cat(pieces), tensor), name
        elif any(m in name for m in ("k_proj", "v_proj")):  # replicated KV heads: every replicas-th rank's
            assert torch.equal(torch.cat(pieces[::replicas]), tensor), name
        elif name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
            assert torch.equal(torch.cat(pieces, dim=1), tensor), name
        else:
            assert all(torch.equal(p, tensor) for p in pieces), name


def test_replicated_kv_head_is_the_one_its_q_heads_read():
    # 4 q heads, 2 KV heads (groups of 2), 4 ranks: rank r holds q head r, which reads KV head r // 2.
    c = config(4, 2)
    for r in range(4):
        shard = TensorParallelShard(c, r, 4)
        assert (shard.num_heads, shard.num_kv_heads, shard.kv_head_replicas) == (1, 1, 2)
        assert shard.first_kv_head == r // 2
        local = shard.local_config()
        assert (local.num_attention_heads, local.num_key_value_heads, local.head_dim) == (1, 1, c.head_dim)


@pytest.mark.parametrize("heads,kv_heads,inner,n,words", [
    (4, 4, 12, 3, "does not divide the model's 4 attention heads"),
    (12, 4, 12, 6, "neither divides the model's 4 KV heads"),
    (4, 4, 10, 4, "does not divide the model's MLP size"),
])
def test_indivisible_models_are_refused_naming_the_setting(heads, kv_heads, inner, n, words):
    with pytest.raises(ValueError, match="tensor_parallel_size") as info:
        check_divisible(config(heads, kv_heads, inner=inner), n)
    assert words in str(info.value)
