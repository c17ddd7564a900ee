"""fp8 KV-cache scales from a checkpoint (`kvmem.models.kv_scales`): every spelling vLLM accepts is
read, bad scales are refused naming the tensor or kv_cache_dtype, folding them into the projections
changes nothing but rounding (transformers as the oracle), and the engine uses them with fp8 only."""

from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvmem import LLM, SamplingParams
from kvmem.models import kv_scales
from kvmem.models.kv_scales import fold, parse_kv_scales, resolve
from tests.oracle import make_tiny_model

LAYERS = 2  # the tiny models' layer count
K_SCALES, V_SCALES = (0.37, 0.052), (0.61, 0.093)  # not powers of two: folding must really divide


def scalar(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def llm_compressor_scales(layers: int = LAYERS) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(layers):
        out[f"model.layers.{i}.self_attn.k_scale"] = scalar(K_SCALES[i % 2])
        out[f"model.layers.{i}.self_attn.v_scale"] = scalar(V_SCALES[i % 2])
    return out


def with_scales(src, dst, scales: dict[str, torch.Tensor]):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file({**tensors, **scales}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):  # GQA with q/k/v biases: the biases must be scaled with their weights
    return make_tiny_model(tmp_path_factory.mktemp("kvscales") / "qwen", "qwen2-bias")


@pytest.fixture(scope="module")
def scaled(qwen, tmp_path_factory):
    return with_scales(qwen, tmp_path_factory.mktemp("kvscales") / "scaled", llm_compressor_scales())


# --- reading and checking ------------------------------------------------------------------------------
@pytest.mark.parametrize("k_name,v_name", [
    ("self_attn.k_scale", "self_attn.v_scale"),  # llm-compressor / compressed-tensors
    ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"),  # ModelOpt
    ("self_attn.attn.k_scale", "self_attn.attn.v_scale"),  # vLLM's own parameter names
])
def test_every_spelling_vllm_accepts_is_read(k_name, v_name):
    tensors = {}
    for i in range(3):
        tensors[f"model.layers.{i}.{k_name}"] = scalar(0.1 * (i + 1))
        tensors[f"model.layers.{i}.{v_name}"] = torch.tensor([0.5 + i])  # shape [1] is a scalar too
    assert all(kv_scales.is_scale_name(n) for n in tensors)
    s = parse_kv_scales(tensors, 3)
    assert s.k == pytest.approx((0.1, 0.2, 0.3)) and s.v == pytest.approx((0.5, 1.5, 2.5))


def test_the_deprecated_kv_scale_serves_k_and_v():
    s = parse_kv_scales({f"model.layers.{i}.self_attn.kv_scale": scalar(0.25) for i in range(2)}, 2)
    assert s.k == s.v == (0.25, 0.25)


def test_other_tensors_are_not_scales():
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.k_proj.weight_scale",
                 "model.layers.0.mlp.k_scale", "layers.0.self_attn.k_scale"):
        assert not kv_scales.is_scale_name(name)


@pytest.mark.parametrize("value", [0.0, -0.5, math.inf, math.nan])
def test_zero_negative_or_non_finite_scales_are_refused_naming_the_tensor(value):
    tensors = llm_compressor_scales()
    tensors["model.layers.1.self_attn.v_scale"] = scalar(value)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_scale.*finite and > 0"):
        parse_kv_scales(tensors, LAYERS)


def test_scales_for_another_model_are_refused():
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.k_scale.*2 layers.*another model"):
        parse_kv_scales(llm_compressor_scales(3), LAYERS)
    with pytest.raises(ValueError, match=r"k_scale.*lack layer\(s\) 2, 3 of 4"):
        parse_kv_scales(llm_compressor_scales(2), 4)
    tensors = llm_compressor_scales()
    del tensors["model.layers.0.self_attn.v_scale"]
    with pytest.raises(ValueError, match=r"v_scale.*lack layer\(s\) 0 of 2"):
        parse_kv_scales(tensors, LAYERS)


def test_per_head_scales_and_duplicates_are_refused():
    tensors = llm_compressor_scales()
    tensors["model.layers.0.self_attn.k_scale"] = torch.ones(4)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_scale.*one number.*\[4\]"):
        parse_kv_scales(tensors, LAYERS)
    tensors = llm_compressor_scales()
    tensors["model.layers.0.self_attn.k_proj.k_scale"] = scalar(0.2)
    with pytest.raises(ValueError, match="two k_scale tensors"):
        parse_kv_scales(tensors, LAYERS)


def test_which_kv_cache_dtypes_use_them():
    tensors = llm_compressor_scales()
    for dtype in ("fp8", "fp8_e4m3"):
        scales, note = resolve(tensors, LAYERS, dtype)
        assert scales is not None and scales.k == pytest.approx(K_SCALES) and "k_scale/v_scale for all 2 layers" in note
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8_e5m2'.*e4m3"):
        resolve(tensors, LAYERS, "fp8_e5m2")
    scales, note = resolve(tensors, LAYERS, "int8")
    assert scales is None and "not used" in note and "per (token, KV head)" in note
    scales, note = resolve(tensors, LAYERS, "auto")
    assert scales is None and "not used" in note
    assert resolve({}, LAYERS, "fp8") == (None, None)
    bad = {**tensors, "model.layers.0.self_attn.k_scale": scalar(0.0)}
    assert resolve(bad, LAYERS, "int8")[0] is None  # checked only where used


# --- folding: a reparametrization, checked against transformers ---------------------------------------
def test_folding_into_the_projections_leaves_the_model_unchanged(qwen):
    """q*k_scale . k/k_scale = q . k and o_proj(v/v_scale * v_scale) = o_proj(v): the folded weights give
    transformers' float32 logits up to rounding (RoPE is linear, so it commutes with the scaling)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 60, 61, 2]])
    with torch.no_grad():
        torch.manual_seed(0)
        for layer in model.model.layers:  # the tiny model's biases are zero: make them count
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.2)
        before = model(ids).logits
        scales = parse_kv_scales(llm_compressor_scales(), LAYERS)
        state = {n: t.clone() for n, t in model.state_dict().items()}  # HF names: model.layers.N...
        folded = dict(fold(iter(state.items()), scales))
        changed = [n for n in folded if not torch.equal(folded[n], state[n])]
        assert sorted(changed) == sorted(f"model.layers.{i}.self_attn.{p}_proj.{w}" for i in range(LAYERS)
                                         for p, w in (("q", "weight"), ("k", "weight"), ("v", "weight"),
                                                      ("o", "weight"), ("q", "bias"), ("k", "bias"), ("v", "bias")))
        model.load_state_dict(folded)
        after = model(ids).logits
    assert not torch.equal(model.model.layers[0].self_attn.k_proj.weight, state["model.layers.0.self_attn.k_proj.weight"])
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


# --- the engine -------------------------------------------------------------------------------------------
GREEDY = SamplingParams(temperature=0, max_tokens=6, min_tokens=6)
PROMPTS = [[5, 17, 42, 99, 3], [250, 7, 8, 60, 61, 2, 9, 11, 13]]


def ids(llm: LLM, batch) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY,
                                                            use_tqdm=False)]


@pytest.fixture
def loaded(monkeypatch):
    """The k_proj weights the engine's model is loaded with (the CPU packs its weights afterwards)."""
    from kvmem.models.llama import LlamaForCausalLM

    seen: dict[str, torch.Tensor] = {}
    original = LlamaForCausalLM.load_weights

    def recording(self, weights):
        def stream():
            for name, tensor in weights:
                if name.endswith("self_attn.k_proj.weight"):
                    seen[name] = tensor.clone()
                yield name, tensor
        return original(self, stream())

    monkeypatch.setattr(LlamaForCausalLM, "load_weights", recording)
    return seen


def test_fp8_uses_the_checkpoint_scales_and_says_so(qwen, scaled, caplog, loaded):
    plain = load_file(qwen / "model.safetensors")
    with caplog.at_level(logging.INFO):
        llm = LLM(str(scaled), dtype="float32", kv_cache_dtype="fp8", kv_cache_memory="1MiB", block_size=4,
                  max_model_len=64)
    try:
        assert "KV cache scales: the checkpoint's per-tensor k_scale/v_scale for all 2 layers" in caplog.text
        for i in range(LAYERS):  # folded: K rows / k_scale (what the fp8 cache stores is k / k_scale)
            expected = plain[f"model.layers.{i}.self_attn.k_proj.weight"].float() / float(scalar(K_SCALES[i]))
            assert torch.equal(loaded[f"model.layers.{i}.self_attn.k_proj.weight"], expected)
        batched = ids(llm, PROMPTS)
        assert [ids(llm, [p])[0] for p in PROMPTS] == batched  # batch invariant, as without scales
        assert all(len(t) == 6 for t in batched)
    finally:
        llm.close()


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "auto"])
def test_other_kv_dtypes_leave_the_weights_alone_and_say_so(qwen, scaled, caplog, loaded, kv_cache_dtype):
    plain = load_file(qwen / "model.safetensors")
    with caplog.at_level(logging.INFO):
        llm = LLM(str(scaled), dtype="float32", kv_cache_dtype=kv_cache_dtype, kv_cache_memory="1MiB", block_size=4,
                  max_model_len=64)
    try:
        assert "k_scale/v_scale are not used" in caplog.text
        assert torch.equal(loaded["model.layers.0.self_attn.k_proj.weight"], plain["model.layers.0.self_attn.k_proj.weight"])
    finally:
        llm.close()


def test_the_engine_refuses_scales_it_cannot_use(qwen, scaled, tmp_path):
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8_e5m2'"):
        LLM(str(scaled), dtype="float32", kv_cache_dtype="fp8_e5m2", kv_cache_memory="1MiB")
    other = with_scales(qwen, tmp_path / "other", llm_compressor_scales(4))  # a 4-layer model's scales
    with pytest.raises(ValueError, match="another model"):
        LLM(str(other), dtype="float32", kv_cache_dtype="fp8", kv_cache_memory="1MiB")
    zero = with_scales(qwen, tmp_path / "zero", {**llm_compressor_scales(),
                                                 "model.layers.0.self_attn.k_scale": scalar(0.0)})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_scale is 0\.0"):
        LLM(str(zero), dtype="float32", kv_cache_dtype="fp8", kv_cache_memory="1MiB")
