from kvmem.models.llama import LlamaForCausalLM


def test_a_fused_module_is_kept_quantized_only_when_all_its_parts_share_a_type(default_source):
    config = default_source.config
    types = dict(default_source.quantized_types)
    types["model.layers.2.self_attn.v_proj.weight"] = 2  # Q4_0 beside Q4_1 q and k
    del types["model.layers.3.mlp.up_proj.weight"]  # a type kvmem does not keep (e.g. Q6_K)
    plan = LlamaForCausalLM.quantized_plan(config, types)
    assert not any(n.startswith(("model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj",
                                 "model.layers.3.mlp.gate_proj")) for n in plan)
    assert "model.layers.2.self_attn.o_proj.weight" in plan and "model.layers.3.mlp.down_proj.weight" in plan
    assert "model.embed_tokens.weight" in plan
    assert not any("norm" in n for n in plan)
