"""K,V recomputed from captured activations equal the K,V the model's forward pass wrote to its cache.

Activations are captured with forward hooks on each layer's `input_layernorm`; the forward pass's K,V
are read back from the paged cache the model wrote, at the slots the metadata gave each token. Token
positions are arbitrary (non-contiguous, up to ~60k) so RoPE is checked where it matters.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kvmem.attention.metadata import AttentionMetadata
from kvmem.attention.torch_attention import BACKENDS
from kvmem.hybrid.cost_model import ModelShape
from kvmem.hybrid.recompute import KVProjection, recompute_kv
from kvmem.memory.base import KVCacheSpec
from kvmem.memory.paged import PagedKVCacheManager
from kvmem.models.config import ModelConfig, RopeScaling
from kvmem.models.llama import LlamaForCausalLM

MAX_POSITIONS = 65536
CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa-llama3": dict(num_key_value_heads=2, rope_theta=500000.0,
                       rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=64)),
    "qkv-bias": dict(num_key_value_heads=2, attention_bias=True, architecture="Qwen2ForCausalLM"),
}


class _Seq:
    def __init__(self, token_ids):
        self.seq_id, self.token_ids, self.num_computed_tokens = 0, token_ids, 0

    @property
    def num_tokens(self):
        return len(self.token_ids)


def make_model(kind: str, dtype: torch.dtype) -> LlamaForCausalLM:
    kw = {"architecture": "LlamaForCausalLM", **CONFIGS[kind]}
    config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, head_dim=16, max_position_embeddings=MAX_POSITIONS, **kw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config, MAX_POSITIONS, dtype)
    for layer in model.layers:  # a non-trivial norm weight, so the test sees whether the norm was applied
        torch.nn.init.uniform_(layer.input_layernorm.weight, 0.5, 1.5)
    return model.to(dtype).eval()


class _CaptureActivations:
    """LayerHooks keeping each layer's normed q,k,v input: the activation the hybrid cache stores."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model, self.layer = model, 0
        self.acts: list[list[torch.Tensor]] = [[] for _ in model.layers]

    def before_layer(self, j: int):
        self.layer = j
        return self.model.layers[j]

    def after_layer(self, j: int) -> None:
        pass

    def capture(self, a: torch.Tensor) -> None:
        self.acts[self.layer].append(a.clone())


def run_and_capture(model: LlamaForCausalLM, tokens: list[int], positions: torch.Tensor, chunks: list[int]):
    """Forward the tokens in chunks through a paged cache; return per layer (activations, K, V) of every
    token, the activations from hooks and K,V read back from the cache."""
    c = model.config
    dtype = model.embed_tokens.weight.dtype
    spec = KVCacheSpec(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype, torch.device("cpu"))
    mgr = PagedKVCacheManager(spec, num_blocks=32, block_size=4, enable_prefix_caching=False)
    caches = [mgr.layer_cache(i) for i in range(c.num_hidden_layers)]
    hooks = _CaptureActivations(model)
    seq, slots = _Seq(tokens), []
    for chunk in chunks:
        start = seq.num_computed_tokens
        mgr.allocate(seq, chunk)
        meta = AttentionMetadata.build([mgr.block_table(seq)], [start], [chunk], 4, torch.device("cpu"))
        model(torch.tensor(tokens[start:start + chunk]), positions[start:start + chunk], caches, meta,
              BACKENDS["torch"], torch.arange(chunk), hooks=hooks)
        slots.append(meta.slot_mapping)
        seq.num_computed_tokens += chunk
    acts = hooks.acts
    slot = torch.cat(slots)
    out = []
    for i, (k_cache, v_cache) in enumerate(caches):
        heads, _, _, dim = k_cache.shape
        k = k_cache.reshape(heads, -1, dim)[:, slot].transpose(0, 1)
        v = v_cache.reshape(heads, -1, dim)[:, slot].transpose(0, 1)
        out.append((torch.cat(acts[i]), k, v))
    return out


def scattered_positions(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(MAX_POSITIONS - 1, generator=g)[:n].sort().values


TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}  # about one bf16 ulp at |K| ~ 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_recomputed_kv_equals_the_forward_pass(kind, dtype):
    model = make_model(kind, dtype)
    tokens = [(7 * i) % 290 + 3 for i in range(40)]
    positions = scattered_positions(40)
    assert positions.max() > 10_000 and (positions.diff() > 1).any()  # large and non-contiguous
    for layer, (act, k_model, v_model) in zip(model.layers, run_and_capture(model, tokens, positions, [30, 1, 9])):
        k, v = recompute_kv(act, layer.self_attn, positions, model.rope)
        assert k.dtype == v.dtype == dtype and k.shape == k_model.shape == (40, model.config.num_key_value_heads, 16)
        torch.testing.assert_close(k, k_model, **TOLERANCE[dtype])
        torch.testing.assert_close(v, v_model, **TOLERANCE[dtype])


def test_wrong_positions_change_keys_not_values():
    model = make_model("gqa-llama3", torch.float32)
    positions = scattered_positions(24, seed=1)
    act, k_model, v_model = run_and_capture(model, list(range(3, 27)), positions, [24])[1]
    k, v = recompute_kv(act, model.layers[1].self_attn, positions + 1, model.rope)
    torch.testing.assert_close(v, v_model, atol=1e-5, rtol=1e-5)
    assert (k - k_model).abs().max() > 1e-2  # RoPE at the wrong place is caught


def test_oneDNN_packed_weights_and_the_flop_count():
    model = make_model("mha", torch.float32)
    positions = scattered_positions(16, seed=2)
    captured = run_and_capture(model, list(range(3, 19)), positions, [16])
    model.pack_linear_weights_for_cpu()  # weights in oneDNN's blocked layout: sliced via to_dense
    act, k_model, v_model = captured[2]
    proj = KVProjection.from_attention(model.layers[2].self_attn)
    with FlopCounterMode(display=False) as counter:
        k, v = recompute_kv(act, proj, positions, model.rope)
    torch.testing.assert_close(k, k_model, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, v_model, atol=1e-5, rtol=1e-5)
    # The GEMM is only K and V: the cost model's f per token.
    shape = ModelShape.from_model_config(model.config, dtype_bytes=4)
    assert counter.get_total_flops() == proj.flops(16) == 16 * shape.recompute_flops_per_token_per_layer


def test_positions_past_the_rope_table_are_refused():
    model = make_model("mha", torch.float32)
    act = torch.randn(2, 64)
    with pytest.raises(ValueError, match="RoPE table"):
        recompute_kv(act, model.layers[0].self_attn, torch.tensor([0, MAX_POSITIONS]), model.rope)
    with pytest.raises(ValueError, match="positions"):
        recompute_kv(act, model.layers[0].self_attn, torch.tensor([0]), model.rope)
