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


# ------------------------------------------------------------------ K-quants: a tiny llama in Q4_K/Q5_K/Q6_K

def _k_quant_llama(path: Path) -> Path:
    """A tiny random llama whose rows are whole 256-value super-blocks, every matrix in a K-quant
    (random blocks: the gguf package cannot write K-quants), norms in F32, lm_head untied. As in
    llama.cpp's Q4_K_M, one layer's v_proj has more bits (Q6_K) than its q and k (Q4_K)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from tests.conftest import tiny_bpe_gguf_metadata, write_gguf
    from tests.models.test_gguf_blocks import random_blocks

    hidden, heads, kv_heads, ffn, layers = 256, 4, 2, 512, 2
    meta = {"llama.block_count": layers, "llama.context_length": 256, "llama.embedding_length": hidden,
            "llama.feed_forward_length": ffn, "llama.attention.head_count": heads,
            "llama.attention.head_count_kv": kv_heads, "llama.rope.freq_base": 10000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "general.name": "tiny-k-quants",
            **tiny_bpe_gguf_metadata()}
    vocab = len(meta["tokenizer.ggml.tokens"])
    rng = np.random.default_rng(0)
    seed = iter(range(1000))

    def matrix(rows: int, cols: int, qtype: Q, scale: float = 2e-3) -> tuple[np.ndarray, Q]:
        return random_blocks(rows, cols, qtype, next(seed), scale), qtype

    head_dim = hidden // heads
    tensors = {"token_embd.weight": matrix(vocab, hidden, Q.Q6_K), "output.weight": matrix(vocab, hidden, Q.Q4_K),
               "output_norm.weight": (1 + 0.1 * rng.standard_normal(hidden), Q.F32)}
    for i in range(layers):
        p = f"blk.{i}."
        tensors.update({
            p + "attn_norm.weight": (1 + 0.1 * rng.standard_normal(hidden), Q.F32),
            p + "ffn_norm.weight": (1 + 0.1 * rng.standard_normal(hidden), Q.F32),
            p + "attn_q.weight": matrix(heads * head_dim, hidden, Q.Q4_K),
            p + "attn_k.weight": matrix(kv_heads * head_dim, hidden, Q.Q4_K),
            p + "attn_v.weight": matrix(kv_heads * head_dim, hidden, Q.Q6_K if i == 1 else Q.Q4_K),
            p + "attn_output.weight": matrix(hidden, heads * head_dim, Q.Q5_K),
            p + "ffn_gate.weight": matrix(ffn, hidden, Q.Q5_K), p + "ffn_up.weight": matrix(ffn, hidden, Q.Q5_K),
            p + "ffn_down.weight": matrix(hidden, ffn, Q.Q6_K),
        })
    return write_gguf(path, metadata=meta, tensors=tensors)


@pytest.fixture(scope="module")
def k_quant_model(tmp_path_factory) -> Path:
    return _k_quant_llama(tmp_path_factory.mktemp("k_quants") / "tiny-k-quants.gguf")


def _generate(model: Path, prompts: list[str], **config):
    llm = LLM(model=str(model), kv_cache_memory="16MiB", max_model_len=256, **config)
    try:
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return llm, outputs
    finally:
        llm.engine.close()


def test_k_quant_layers_stay_quantized_and_match_the_dequantized_model(k_quant_model):
    import math

    prompts = ["The quick brown fox", "def main():", "Memory is the bottleneck"]
    llm, quantized = _generate(k_quant_model, prompts, quantization="gguf", dtype="float32")
    model = llm.engine.model
    kinds = {name: m.format.name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert kinds["layers.0.self_attn.qkv_proj"] == "Q4_K" and kinds["layers.1.mlp.gate_up_proj"] == "Q5_K"
    assert kinds["layers.1.mlp.down_proj"] == "Q6_K" and kinds["lm_head"] == "Q4_K"
    # layer 1's q/k/v: one quantized layer per part, each in its own type
    assert [kinds[f"layers.1.self_attn.qkv_proj.parts.{i}"] for i in range(3)] == ["Q4_K", "Q4_K", "Q6_K"]
    assert len(kinds) == 2 * 4 + 1 + 2 and model.embed_tokens.format.name == "Q6_K"
    # The blocks are all the weights there are: norms and RoPE tables are the only extra.
    assert model_bytes(model) < 1.2 * k_quant_model.stat().st_size
    _, dequantized = _generate(k_quant_model, prompts, quantization="none", dtype="float32")
    # Same float32 weights (dequantization is exact), additions in another order: the same greedy
    # tokens, and their logprobs agree to float32 rounding.
    for q, d in zip(quantized, dequantized):
        assert list(q.outputs[0].token_ids) == list(d.outputs[0].token_ids)
        for lq, ld, t in zip(q.outputs[0].logprobs, d.outputs[0].logprobs, q.outputs[0].token_ids):
            assert math.isclose(lq[t].logprob, ld[t].logprob, rel_tol=1e-3, abs_tol=1e-3)


def test_k_quant_bfloat16_greedy_output_does_not_depend_on_the_batch(k_quant_model):
    prompts = ["The quick brown fox", "def main():", "Memory is the bottleneck", "Hello, world!"]
    llm = LLM(model=str(k_quant_model), quantization="gguf", dtype="bfloat16", kv_cache_memory="16MiB",
              max_model_len=256)
    try:
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        batched = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        alone = [list(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids) for p in prompts]
        assert batched == alone and all(len(t) == 12 for t in batched)
    finally:
        llm.engine.close()
