"""The model itself: logits over a prompt, prefilled in chunks through the paged cache, equal
transformers' logits for each architecture variant."""

from __future__ import annotations

import pytest
import torch

from kvmem.attention.metadata import AttentionMetadata
from kvmem.attention.torch_attention import BACKENDS
from kvmem.memory.base import KVCacheSpec
from kvmem.memory.paged import PagedKVCacheManager
from kvmem.models.config import ModelConfig
from kvmem.models.llama import LlamaForCausalLM, OneDNNLinear, rope_inv_freq
from tests.oracle import hf_logits, make_tiny_model


class _Seq:
    def __init__(self, token_ids):
        self.seq_id, self.token_ids, self.num_computed_tokens = 0, token_ids, 0

    @property
    def num_tokens(self):
        return len(self.token_ids)


@pytest.fixture(scope="module", params=["llama-mha", "llama3-gqa", "qwen2-bias"])
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    ours = LlamaForCausalLM.build(config, 512, torch.float32, torch.device("cpu"))
    ours.load_weights(hf.state_dict().items())
    return hf, ours


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_chunked_prefill_logits_equal_transformers(tiny, backend):
    hf, ours = tiny
    c = ours.config
    tokens = [(13 * i) % 300 + 2 for i in range(100)]
    expected = hf_logits(hf, tokens)

    spec = KVCacheSpec(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, torch.float32, torch.device("cpu"))
    mgr = PagedKVCacheManager(spec, num_blocks=40, block_size=4)
    caches = [mgr.layer_cache(i) for i in range(c.num_hidden_layers)]
    seq = _Seq(tokens)
    got = []
    for chunk in (30, 1, 33, 36):  # a decode-sized chunk in the middle too
        start = seq.num_computed_tokens
        mgr.allocate(seq, chunk)
        meta = AttentionMetadata.build([mgr.block_table(seq)], [start], [chunk], 4, torch.device("cpu"))
        logits = ours(torch.tensor(tokens[start:start + chunk]), torch.arange(start, start + chunk), caches, meta,
                      BACKENDS[backend], torch.arange(chunk))
        got.append(logits)
        seq.num_computed_tokens += chunk
    torch.testing.assert_close(torch.cat(got), expected, atol=2e-4, rtol=1e-4)


def test_layer_hooks_supply_the_weights_and_see_the_activations_of_each_layer(tiny):
    """`LayerHooks` (the hybrid runner's way into the forward pass): each layer's weights from another
    module (as a streamed buffer), its normed q,k,v input captured, a call after it; the logits are
    bit-identical to the plain forward pass."""
    import copy

    _, ours = tiny
    c = ours.config
    tokens = [(7 * i) % 300 + 2 for i in range(21)]
    spec = KVCacheSpec(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, torch.float32, torch.device("cpu"))

    def forward(hooks):
        mgr = PagedKVCacheManager(spec, num_blocks=8, block_size=4)
        seq = _Seq(tokens)
        mgr.allocate(seq, len(tokens))
        meta = AttentionMetadata.build([mgr.block_table(seq)], [0], [len(tokens)], 4, torch.device("cpu"))
        return ours(torch.tensor(tokens), torch.arange(len(tokens)), [mgr.layer_cache(i) for i in range(len(ours.layers))],
                    meta, BACKENDS["torch"], torch.tensor([0, len(tokens) - 1]), hooks=hooks)

    class Hooks:
        def __init__(self):
            self.buffers = [copy.deepcopy(layer) for layer in ours.layers]
            self.calls, self.captured = [], []

        def capture(self, a):
            self.calls.append("capture")
            self.captured.append(a.clone())

        def before_layer(self, j):
            self.calls.append(("before", j))
            return self.buffers[j]

        def after_layer(self, j):
            self.calls.append(("after", j))

    hooks = Hooks()
    assert torch.equal(forward(hooks), forward(None))
    assert hooks.calls == [call for j in range(len(ours.layers)) for call in (("before", j), "capture", ("after", j))]
    with torch.inference_mode():
        first = ours.layers[0].input_layernorm(ours.embed_tokens(torch.tensor(tokens)))
    assert torch.equal(hooks.captured[0], first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_calls_follow_packed_layers_and_equal_the_module_calls(tiny, dtype):
    """The forward pass binds each layer's kernels once (`LayerOps`); packing the linear layers after
    a first pass replaces the modules, and the next pass must run the packed ones: bit-identical to
    calling every module through nn.Module (the hooks path). (In float32 oneDNN adds in another order
    than the unpacked layers, so a pass still bound to those differs; checked by removing the reset.)"""
    import copy

    _, base = tiny
    ours = copy.deepcopy(base).to(dtype)
    c = ours.config
    tokens = [(11 * i) % 300 + 2 for i in range(9)]
    spec = KVCacheSpec(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype, torch.device("cpu"))

    class ModuleCalls:  # every layer through its module's forward
        capture = None

        def before_layer(self, j):
            return ours.layers[j]

        def after_layer(self, j):
            pass

    def forward(hooks):
        mgr = PagedKVCacheManager(spec, num_blocks=8, block_size=4)
        seq = _Seq(tokens)
        mgr.allocate(seq, len(tokens))
        meta = AttentionMetadata.build([mgr.block_table(seq)], [0], [len(tokens)], 4, torch.device("cpu"))
        return ours(torch.tensor(tokens), torch.arange(len(tokens)), [mgr.layer_cache(i) for i in range(c.num_hidden_layers)],
                    meta, BACKENDS["torch"], torch.arange(len(tokens)), hooks=hooks)

    unpacked = forward(None)
    assert torch.equal(unpacked, forward(ModuleCalls()))
    if not OneDNNLinear.available(dtype):
        pytest.skip("no oneDNN in this torch build")
    ours.pack_linear_weights_for_cpu()
    packed = forward(None)
    assert isinstance(ours.layers[0].self_attn.qkv_proj, OneDNNLinear)
    assert torch.equal(packed, forward(ModuleCalls()))
    torch.testing.assert_close(packed.float(), unpacked.float(), atol=5e-2, rtol=5e-2)


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    hf_config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = ModelConfig.from_hf_dict({**hf_config.to_dict(), "architectures": ["LlamaForCausalLM"]})
    torch.testing.assert_close(rope_inv_freq(128, ours.rope_theta, ours.rope_scaling), expected)


def test_missing_or_misshapen_weight_is_named(tiny):
    hf, ours = tiny
    weights = dict(hf.state_dict())
    model = LlamaForCausalLM.build(ours.config, 64, torch.float32, torch.device("cpu"))
    del weights["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"missing weights: model\.layers\.1\.self_attn\.k_proj\.weight"):
        model.load_weights(weights.items())
    weights["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="k_proj.weight' has shape"):
        model.load_weights(weights.items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_track_transformers_in_the_same_dtype(tiny, dtype):
    hf, ours32 = tiny
    c = ours32.config
    hf_half = type(hf)(hf.config).to(dtype).eval()
    hf_half.load_state_dict(hf.state_dict())
    ours = LlamaForCausalLM.build(c, 512, dtype, torch.device("cpu"))
    ours.load_weights(hf.state_dict().items())
    tokens = [(11 * i) % 300 + 2 for i in range(40)]
    spec = KVCacheSpec(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype, torch.device("cpu"))
    mgr = PagedKVCacheManager(spec, num_blocks=16, block_size=4)
    seq = _Seq(tokens)
    mgr.allocate(seq, len(tokens))
    meta = AttentionMetadata.build([mgr.block_table(seq)], [0], [len(tokens)], 4, torch.device("cpu"))
    got = ours(torch.tensor(tokens), torch.arange(len(tokens)), [mgr.layer_cache(i) for i in range(c.num_hidden_layers)],
               meta, BACKENDS["torch"], torch.arange(len(tokens)))
    expected = hf_logits(hf_half, tokens)
    assert got.dtype == dtype  # the sampler widens to float32 what needs arithmetic
    got = got.float()
    # Same operations in the same dtype: agreement to a few half-precision ulps of the logits' scale.
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=0.05 * scale, rtol=0.05)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


@pytest.mark.skipif(not OneDNNLinear.available(torch.bfloat16), reason="torch built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_linear_gives_a_row_the_same_result_alone_and_in_any_batch(dtype):
    # SmolLM2's down_proj shape, where oneDNN's lone-row kernel rounds differently from its GEMM.
    torch.manual_seed(0)
    linear = OneDNNLinear(torch.nn.Linear(1536, 576, bias=False).to(dtype))
    x = torch.randn(300, 1536).to(dtype)
    batched = linear(x)
    alone = torch.cat([linear(x[r:r + 1]) for r in range(len(x))])
    assert torch.equal(alone, batched)
    for rows in (2, 7, 32, 129):
        assert torch.equal(linear(x[5:5 + rows]), batched[5:5 + rows])
