"""--quantization int8: a Hugging Face checkpoint's weights quantized to 8 bits at load, end to end."""

import pytest
import torch

from kvmem import LLM, SamplingParams
from kvmem.engine.llm_engine import model_bytes
from kvmem.models import gguf_blocks, quant_kernels
from kvmem.models.int8_weights import int8_types, quantize_at_load
from kvmem.models.quantized_embedding import QuantizedEmbedding
from kvmem.models.quantized_linear import QuantizedLinear
from tests.oracle import make_tiny_model

PROMPTS = [[5, 9, 23, 42, 7], [100, 3, 17], [64, 65, 66, 67, 68, 69, 70, 71]]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
needs_kernel = pytest.mark.skipif(quant_kernels.load() is None, reason="no C++ toolchain for the native kernels")


@pytest.fixture(scope="module", params=["llama-mha", "qwen2-bias"])
def tiny(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("int8") / request.param, request.param)


def engine(path, quantization, dtype):
    return LLM(model=str(path), quantization=quantization, dtype=dtype, kv_cache_memory="16MiB", max_model_len=256)


def tokens(llm, prompts):
    return [list(o.outputs[0].token_ids) for o in
            llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)]


@needs_kernel
def test_weights_are_kept_in_8_bits_at_about_half_of_bfloat16(tiny):
    int8, bf16 = engine(tiny, "int8", "bfloat16"), engine(tiny, "none", "bfloat16")
    try:
        model = int8.engine.model
        linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        assert len(linears) == 2 * 4 + 1 and all(m.type_id == gguf_blocks.Q8_0 for m in linears)
        assert isinstance(model.embed_tokens, QuantizedEmbedding)
        for m in linears:  # 34 bytes per 32 weights: 8.5 bits, about half of bfloat16's 16
            assert m.qweight.numel() == m.out_features * m.in_features // 32 * 34
        assert model.lm_head.qweight is model.embed_tokens.qweight or not int8.engine.model_config.tie_word_embeddings
        # the whole model (norms and RoPE tables included, which dominate at this tiny size) is smaller
        assert model_bytes(model) < model_bytes(bf16.engine.model)
    finally:
        int8.engine.close()
        bf16.engine.close()


def with_weights_round_tripped_through_q8_0(path, directory):
    """A copy of checkpoint `path` whose matrices hold their Q8_0-dequantized values: the weights the
    int8 engine computes with, as an ordinary checkpoint."""
    import shutil

    from safetensors.torch import load_file, save_file

    from kvmem.models.loader import load_model

    shutil.copytree(path, directory)
    names = int8_types(load_model(path).config)
    for file in directory.glob("*.safetensors"):
        tensors = load_file(file)
        for name, t in tensors.items():
            if name in names or (name == "lm_head.weight" and "model.embed_tokens.weight" in names):
                blocks = gguf_blocks.quantize_q8_0(t)
                tensors[name] = gguf_blocks.dequantize(blocks, gguf_blocks.Q8_0, t.shape[1]).to(t.dtype)
        save_file(tensors, file, metadata={"format": "pt"})
    return directory


@needs_kernel
def test_greedy_float32_tokens_equal_those_of_the_round_tripped_weights(tiny, tmp_path):
    """Same float32 weights (Q8_0 dequantization is exact), additions in another order: the int8
    engine's greedy tokens equal those of an ordinary engine over the quantized-then-dequantized
    checkpoint (a wrong scale, a transposed block or a misplaced bias would change them)."""
    int8 = engine(tiny, "int8", "float32")
    reference = engine(with_weights_round_tripped_through_q8_0(tiny, tmp_path / "q8"), "none", "float32")
    try:
        assert tokens(int8, PROMPTS) == tokens(reference, PROMPTS)
    finally:
        int8.engine.close()
        reference.engine.close()


@needs_kernel
def test_bfloat16_greedy_output_does_not_depend_on_the_batch(tiny):
    llm = engine(tiny, "int8", "bfloat16")
    try:
        assert tokens(llm, PROMPTS) == [tokens(llm, [p])[0] for p in PROMPTS]
    finally:
        llm.engine.close()


def test_int8_refuses_a_gguf(default_source):
    with pytest.raises(ValueError, match="use quantization 'gguf'"):
        LLM(quantization="int8", kv_cache_memory="16MiB", max_model_len=256)


def test_quantize_at_load_quantizes_only_the_named_tensors():
    weights = [("a.weight", torch.randn(4, 64)), ("b.weight", torch.randn(3, 32)), ("norm.weight", torch.ones(64))]
    out = dict(quantize_at_load(iter(weights), {"a.weight", "b.weight"}))
    assert isinstance(out["a.weight"], gguf_blocks.QuantizedTensor) and out["a.weight"].shape == (4, 64)
    torch.testing.assert_close(out["a.weight"].dequantize(), weights[0][1], atol=0.03, rtol=0.01)
    assert out["norm.weight"] is weights[2][1]


def test_int8_types_name_every_matrix_but_no_norm(tiny):
    from kvmem.models.loader import load_model

    names = int8_types(load_model(tiny).config)
    assert "model.embed_tokens.weight" in names and "model.layers.1.mlp.down_proj.weight" in names
    assert not any("norm" in n for n in names) and set(names.values()) == {gguf_blocks.Q8_0}
