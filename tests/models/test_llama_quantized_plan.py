from kvmem.models.llama import LlamaForCausalLM


def test_a_fused_module_is_kept_quantized_only_when_all_its_parts_are_kept_types(default_source):
    config = default_source.config
    types = dict(default_source.quantized_types)
    types["model.layers.2.self_attn.v_proj.weight"] = 2  # Q4_0 beside Q4_1 q and k: kept, part by part
    del types["model.layers.3.mlp.up_proj.weight"]  # a type kvmem does not keep (e.g. Q3_K)
    plan = LlamaForCausalLM.quantized_plan(config, types)
    assert plan["model.layers.2.self_attn.v_proj.weight"] == 2 and plan["model.layers.2.self_attn.q_proj.weight"] == 3
    assert not any(n.startswith(("model.layers.3.mlp.gate_proj", "model.layers.3.mlp.up_proj")) for n in plan)
    assert "model.layers.2.self_attn.o_proj.weight" in plan and "model.layers.3.mlp.down_proj.weight" in plan
    assert "model.embed_tokens.weight" in plan
    assert not any("norm" in n for n in plan)


def test_a_fused_module_with_parts_in_different_types_is_one_quantized_layer_per_part(default_source):
    import torch

    from kvmem.models.quantized_linear import QuantizedConcatLinear, QuantizedLinear

    config = default_source.config
    types = dict(default_source.quantized_types)
    types["model.layers.2.self_attn.v_proj.weight"] = 8  # Q8_0 beside Q4_1 q and k
    modules = LlamaForCausalLM._quantized_modules(config, LlamaForCausalLM.quantized_plan(config, types))
    assert modules["layers.2.self_attn.qkv_proj"] == (3, 3, 8) and modules["layers.1.self_attn.qkv_proj"] == 3
    model = LlamaForCausalLM.build(config, 64, torch.float32, torch.device("cpu"), quantized={
        n: t for n, t in LlamaForCausalLM.quantized_plan(config, types).items() if "layers.2." in n})
    qkv = model.layers[2].self_attn.qkv_proj
    assert isinstance(qkv, QuantizedConcatLinear) and qkv.out_features == 576 + 2 * 192
    assert [p.format.name for p in qkv.parts] == ["Q4_1", "Q4_1", "Q8_0"]
    assert [p.out_features for p in qkv.parts] == [576, 192, 192]
    assert isinstance(model.layers[2].mlp.gate_up_proj, QuantizedLinear)
    assert isinstance(model.layers[1].self_attn.qkv_proj, torch.nn.Linear)  # not in this plan: dequantized
