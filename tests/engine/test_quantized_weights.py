"""--quantization: GGUF weights kept in their blocks, end to end through the engine."""

from pathlib import Path

import pytest

from kvmem import LLM, SamplingParams
from kvmem.config import EngineConfig
from kvmem.engine.llm_engine import LLMEngine, model_bytes
from kvmem.models import gguf_blocks
from kvmem.models.loader import default_model_path
from kvmem.models.quantized_linear import QuantizedLinear

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def tokens(llm: LLM, prompts: list[str]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def quantized_fp32():
    llm = LLM(quantization="gguf", dtype="float32", kv_cache_memory="64MiB", max_model_len=512)
    yield llm
    llm.engine.close()


def test_weights_stay_quantized_and_take_about_the_files_size(quantized_fp32):
    model = quantized_fp32.engine.model
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 30 * 4 + 1  # qkv, o, gate_up, down per layer; the tied lm_head
    assert model.lm_head.qweight is model.embed_tokens.qweight  # tied: one copy of the bytes
    size = default_model_path().stat().st_size
    # norms and RoPE tables in float32 are the only extra
    assert 0.9 * size < model_bytes(model) < 1.1 * size


def test_greedy_float32_tokens_equal_the_dequantized_models(quantized_fp32):
    """Same float32 weights (dequantization is exact), additions in another order: the greedy tokens
    of these prompts agree with the dequantize-at-load engine's."""
    dequantized = LLM(quantization="none", dtype="float32", kv_cache_memory="64MiB", max_model_len=512)
    try:
        assert tokens(quantized_fp32, PROMPTS) == tokens(dequantized, PROMPTS)
    finally:
        dequantized.engine.close()


def test_bfloat16_greedy_output_does_not_depend_on_the_batch():
    llm = LLM(quantization="gguf", dtype="bfloat16", kv_cache_memory="64MiB", max_model_len=512)
    try:
        batched = tokens(llm, PROMPTS)
        alone = [tokens(llm, [p])[0] for p in PROMPTS]
        assert batched == alone
        assert all(len(t) == 16 for t in batched)
    finally:
        llm.engine.close()


def test_auto_keeps_a_gguf_quantized_on_the_cpu_and_none_does_not():
    assert EngineConfig(quantization="auto", device="cpu").keeps_quantized_weights()
    assert not EngineConfig(quantization="auto", device="cpu", kv_cache="hybrid").keeps_quantized_weights()
    assert not EngineConfig(quantization="auto", device="cpu", tensor_parallel_size=2).keeps_quantized_weights()
    assert not EngineConfig(quantization="none", device="cpu").keeps_quantized_weights()
    assert not EngineConfig(device="cpu").keeps_quantized_weights()  # the default dequantizes at load


@pytest.mark.parametrize("kwargs, message", [
    ({"quantization": "int4"}, "quantization must be one of"),
    ({"quantization": "gguf", "device": "cuda"}, "CPU only"),
    ({"quantization": "gguf", "kv_cache": "hybrid"}, "hybrid"),
    ({"quantization": "gguf", "tensor_parallel_size": 2}, "tensor_parallel_size"),
])
def test_bad_settings_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_gguf_needs_a_gguf_file(default_source):
    import dataclasses

    not_gguf = dataclasses.replace(default_source, quantized_weights=None, path=Path("/models/llama"))
    with pytest.raises(ValueError, match="needs a GGUF model"):
        LLMEngine._quantized_plan(EngineConfig(quantization="gguf", device="cpu"), not_gguf)
    assert LLMEngine._quantized_plan(EngineConfig(quantization="auto", device="cpu"), not_gguf) == {}
    plan = LLMEngine._quantized_plan(EngineConfig(quantization="auto", device="cpu"), default_source)
    assert {gguf_blocks.format_of(t).name for t in plan.values()} == {"Q4_1", "Q8_0"}


def test_auto_dequantizes_at_load_without_the_native_kernels(default_source, monkeypatch):
    from kvmem.models import quant_kernels

    monkeypatch.setattr(quant_kernels, "load", lambda: None)
    assert LLMEngine._quantized_plan(EngineConfig(quantization="auto", device="cpu"), default_source) == {}
    # gguf still keeps them (torch ops dequantize per call): the user asked for the memory
    assert LLMEngine._quantized_plan(EngineConfig(quantization="gguf", device="cpu"), default_source)
