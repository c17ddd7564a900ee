"""The GGUF loader: config from metadata, dequantized + un-permuted weights under Hugging Face names."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from kvmem.models.config import RopeScaling
from kvmem.models.gguf_loader import _llama3_factors, dequantize_tensor, hf_tensor_name, open_gguf
from kvmem.models.loader import load_model
from tests.conftest import tiny_bpe_gguf_metadata
from tests.oracle import hf_default_model

# ------------------------------------------------------------------ the embedded SmolLM2 file vs transformers


@pytest.fixture(scope="module")
def smollm(default_source):
    return default_source


@pytest.fixture(scope="module")
def smollm_weights(smollm):
    return dict(smollm.weights())


@pytest.mark.slow
def test_embedded_config_matches_transformers(smollm):
    hf = hf_default_model().config
    c = smollm.config
    assert c.architecture == "LlamaForCausalLM"
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (hf.vocab_size, hf.hidden_size, hf.intermediate_size)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert c.rms_norm_eps == hf.rms_norm_eps
    assert c.rope_theta == hf.rope_parameters["rope_theta"] == 100000.0
    assert c.rope_scaling == RopeScaling()
    assert c.max_position_embeddings == hf.max_position_embeddings == 8192
    assert c.tie_word_embeddings is hf.tie_word_embeddings is True
    assert c.bos_token_id == hf.bos_token_id and c.eos_token_ids == [hf.eos_token_id]
    assert c.attention_bias is False and c.torch_dtype == "float32"
    assert c.name == "SmolLM2-135M-Instruct"  # the file name without ".Q4_1"


@pytest.mark.slow
def test_embedded_weights_equal_transformers(smollm, smollm_weights):
    state = hf_default_model().state_dict()
    assert set(smollm_weights) == set(smollm.config.weight_names())
    assert "lm_head.weight" not in smollm_weights  # tied
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
                 "model.embed_tokens.weight", "model.layers.3.input_layernorm.weight", "model.norm.weight",
                 "model.layers.7.mlp.down_proj.weight"]:
        assert smollm_weights[name].dtype == torch.float32
        assert torch.equal(smollm_weights[name], state[name]), name
    mismatched = [n for n, w in smollm_weights.items() if not torch.equal(w, state[n])]
    assert mismatched == []


@pytest.mark.slow
def test_weights_can_be_iterated_twice(smollm):
    first = next(smollm.weights())
    again = next(smollm.weights())
    assert first[0] == again[0] and torch.equal(first[1], again[1])


# ------------------------------------------------------------------ tiny GGUF files written here

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2


def _arch_metadata(arch: str, **extra) -> dict:
    meta = {
        f"{arch}.block_count": LAYERS, f"{arch}.context_length": 256, f"{arch}.embedding_length": HIDDEN,
        f"{arch}.feed_forward_length": FFN, f"{arch}.attention.head_count": HEADS,
        f"{arch}.attention.head_count_kv": KV_HEADS, f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, "general.name": "tiny",
    }
    meta.update(extra)
    return {**meta, **tiny_bpe_gguf_metadata()}


def _hf_tensors(vocab: int, bias: bool, tie: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tie:
        shapes["lm_head.weight"] = (vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        })
        if bias:
            shapes.update({p + "self_attn.q_proj.bias": (HEADS * head_dim,),
                           p + "self_attn.k_proj.bias": (KV_HEADS * head_dim,),
                           p + "self_attn.v_proj.bias": (KV_HEADS * head_dim,)})
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_tensors(hf: dict[str, np.ndarray], permute: bool, qtype: Q) -> dict[str, tuple[np.ndarray, Q]]:
    """What llama.cpp's converter writes: renamed, Q/K rows permuted (llama), norms and biases in F32."""
    out = {}
    for name, w in hf.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{_TO_GGUF[rest]}"
        if permute and ("q_proj" in name or "k_proj" in name):
            w = _permute(w, HEADS if "q_proj" in name else KV_HEADS)
        out[gname] = (w, qtype if w.ndim == 2 else Q.F32)
    return out


def _vocab() -> int:
    return len(tiny_bpe_gguf_metadata()["tokenizer.ggml.tokens"])


@pytest.mark.parametrize("arch, bias, tie", [("llama", False, False), ("llama", False, True), ("qwen2", True, True)])
def test_tiny_gguf_roundtrip_f32_is_exact(gguf_file, arch, bias, tie):
    hf = _hf_tensors(_vocab(), bias=bias, tie=tie)
    path = gguf_file(arch=arch, metadata=_arch_metadata(arch), tensors=_gguf_tensors(hf, arch == "llama", Q.F32))
    source = load_model(path)
    c = source.config
    assert c.architecture == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (HIDDEN, HEADS, KV_HEADS, 16)
    assert (c.intermediate_size, c.num_hidden_layers, c.vocab_size) == (FFN, LAYERS, _vocab())
    assert c.attention_bias is bias and c.tie_word_embeddings is tie and c.name == "model"  # the file stem
    assert source.path == path and source.tokenizer.vocab_size == _vocab()
    weights = dict(source.weights())
    assert set(weights) == set(hf)
    for name, w in hf.items():
        assert torch.equal(weights[name], torch.from_numpy(w)), name


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_tiny_gguf_quantized_weights_are_close(gguf_file, qtype):
    hf = _hf_tensors(_vocab(), bias=False, tie=False)
    path = gguf_file(metadata=_arch_metadata("llama"), tensors=_gguf_tensors(hf, True, qtype))
    weights = dict(load_model(path).weights())
    tolerance = {Q.F16: 2e-3, Q.BF16: 2e-2, Q.Q8_0: 0.03}.get(qtype, 0.5)
    for name, w in hf.items():
        assert weights[name].dtype == torch.float32
        assert weights[name].shape == w.shape
        err = (weights[name] - torch.from_numpy(w)).abs().max().item()
        assert err < tolerance * np.abs(w).max(), (name, err)


def _random_kquant_bytes(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks (gguf cannot quantize these) with sane fp16 scales in place."""
    block = {Q.Q2_K: 84, Q.Q3_K: 110, Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}[qtype]
    scale_at = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // 256, block), dtype=np.uint8)
    for offset in scale_at:
        halves = rng.uniform(1e-3, 1e-1, size=raw.shape[0]).astype(np.float16)
        raw[:, offset:offset + 2] = halves.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K])
def test_k_quants_match_transformers_dequantizer(gguf_file, qtype):
    # transformers carries its own torch implementation of these formats: an independent oracle.
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    rows, cols = 6, 512
    raw = _random_kquant_bytes(qtype, rows, cols, np.random.default_rng(int(qtype)))
    reader = open_gguf(gguf_file(tensors={"w": (raw, qtype)}))
    ours = dequantize_tensor(reader.tensors[0])
    assert ours.shape == (rows, cols) and ours.dtype == np.float32
    theirs = hf_dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(qtype)).reshape(rows, cols)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-5)


def test_unpermute_matches_transformers_for_tiny_gguf(gguf_file):
    """transformers' GGUF loader also undoes the permutation; check ours against it with GQA heads."""
    from transformers import AutoModelForCausalLM

    hf = _hf_tensors(_vocab(), bias=False, tie=False, seed=5)
    path = gguf_file(metadata=_arch_metadata("llama"), tensors=_gguf_tensors(hf, True, Q.F32))
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).state_dict()
    for name, w in load_model(path).weights():
        assert torch.equal(w, theirs[name]), name


# ------------------------------------------------------------------ RoPE scaling


def _converter_rope_freqs(theta: float, dim: int, factor: float, low: float, high: float, old: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, verbatim in numpy float32
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _rope_gguf(gguf_file, freqs: np.ndarray | None, **meta_extra):
    heads = 2  # head_dim 32
    meta = _arch_metadata("llama", **{"llama.attention.head_count": heads, "llama.attention.head_count_kv": heads,
                                      "llama.rope.freq_base": 500000.0}, **meta_extra)
    hf = _hf_tensors(_vocab(), bias=False, tie=True)
    hf = {k: v for k, v in hf.items() if "proj" not in k or "mlp" in k}
    for i in range(LAYERS):
        for x in "qkvo":
            hf[f"model.layers.{i}.self_attn.{x}_proj.weight"] = np.ones((HIDDEN, HIDDEN), np.float32)
    tensors = _gguf_tensors(hf, False, Q.F32)
    if freqs is not None:
        tensors["rope_freqs.weight"] = (freqs, Q.F32)
    return gguf_file(metadata=meta, tensors=tensors)


@pytest.mark.parametrize("factor, low, high, old", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (8.0, 2.0, 8.0, 8192)])
def test_llama3_rope_scaling_from_rope_freqs(gguf_file, factor, low, high, old):
    head_dim = HIDDEN // 2
    path = _rope_gguf(gguf_file, _converter_rope_freqs(500000.0, head_dim, factor, low, high, old))
    config = load_model(path).config
    s = config.rope_scaling
    assert s.rope_type == "llama3" and s.factor == pytest.approx(factor)
    # Only old/low and old/high are determined by the file; the frequencies they give are what matters.
    np.testing.assert_allclose(_llama3_factors(500000.0, head_dim, s),
                               _converter_rope_freqs(500000.0, head_dim, factor, low, high, old), rtol=1e-4)
    if (low, high) == (1.0, 4.0):  # the ramp holds several frequencies here, which pin both factors down
        assert (s.low_freq_factor, s.high_freq_factor) == pytest.approx((low, high), rel=1e-3)
    # rope_freqs is consumed by the config, not yielded as a weight.
    assert hf_tensor_name("rope_freqs.weight") is None
    assert "rope_freqs.weight" not in dict(load_model(path).weights())


def test_rope_freqs_of_ones_means_no_scaling(gguf_file):
    path = _rope_gguf(gguf_file, np.ones(HIDDEN // 4, np.float32))
    assert load_model(path).config.rope_scaling == RopeScaling()


def test_unrecognized_rope_freqs_is_rejected(gguf_file):
    freqs = np.linspace(1.0, 5.0, HIDDEN // 4, dtype=np.float32) ** 2
    path = _rope_gguf(gguf_file, freqs)
    with pytest.raises(ValueError, match="rope_freqs.weight") as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_linear_rope_scaling_is_rejected(gguf_file):
    path = _rope_gguf(gguf_file, None, **{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(ValueError, match="linear") as e:
        load_model(path)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------ errors


def test_unsupported_gguf_architecture(gguf_file):
    path = gguf_file("phi.gguf", arch="phi2", metadata=tiny_bpe_gguf_metadata())
    with pytest.raises(ValueError) as e:
        load_model(path)
    assert "phi.gguf" in str(e.value) and "phi2" in str(e.value)


def test_missing_gguf_tensor(gguf_file):
    hf = _hf_tensors(_vocab(), bias=False, tie=True)
    tensors = _gguf_tensors(hf, True, Q.F32)
    del tensors["blk.1.ffn_up.weight"]
    path = gguf_file("partial.gguf", metadata=_arch_metadata("llama"), tensors=tensors)
    with pytest.raises(ValueError) as e:
        load_model(path)
    assert "partial.gguf" in str(e.value) and "blk.1.ffn_up.weight" in str(e.value)


def test_quantized_types_skip_rows_that_are_not_whole_blocks_of_their_type():
    # llama.cpp never writes such a tensor (it falls back to Q5_0/Q8_0 for K = 576 rows), but a file
    # that did must be dequantized at load, not make the kept layer's row size check fail.
    from types import SimpleNamespace

    from kvmem.models.gguf_loader import quantized_types

    def tensor(name, qtype, cols):
        return SimpleNamespace(name=name, tensor_type=qtype, shape=[cols, 64])

    reader = SimpleNamespace(tensors=[tensor("blk.0.ffn_down.weight", Q.Q4_K, 1536),
                                      tensor("blk.0.ffn_up.weight", Q.Q6_K, 576),
                                      tensor("blk.0.ffn_gate.weight", Q.Q5_0, 576)])
    assert quantized_types(reader) == {"model.layers.0.mlp.down_proj.weight": int(Q.Q4_K),
                                       "model.layers.0.mlp.gate_proj.weight": int(Q.Q5_0)}
