"""kv_cache="hybrid" end to end: greedy float32 tokens identical to transformers with most requests in
the host tier (KV blocks, activation blocks, a mix), with weights streamed, on a tiny multi-head model
and on the embedded SmolLM2; K,V rebuilt from the activations the engine captured equal transformers'
own; memory back to baseline; bad settings rejected naming the parameter."""

from __future__ import annotations

import math

import pytest
import torch

from kvmem import LLM, SamplingParams
from kvmem.cli import main as cli_main
from kvmem.hybrid.recompute import recompute_kv
from kvmem.memory.base import cdiv
from tests.oracle import hf_default_model, hf_greedy, make_tiny_model

BLOCK = 4
MAX_LEN = 256
NEW = 16
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, min_tokens=NEW)


def device_budget(llm_config, device_blocks: int, block_size: int, max_model_len: int, elem: int = 4) -> int:
    """device_memory that leaves exactly `device_blocks` blocks beside the two staging buffers."""
    c = llm_config
    kv_layer = 2 * c.num_key_value_heads * c.head_dim * elem
    staging = 2 * cdiv(max_model_len, block_size) * block_size * (kv_layer + c.hidden_size * elem)
    return staging + device_blocks * block_size * c.num_hidden_layers * kv_layer


@pytest.fixture(scope="module")
def mha_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("hybrid") / "llama-mha", "llama-mha")


@pytest.fixture(scope="module")
def hf_mha(mha_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(mha_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def mha_config(mha_dir):
    from kvmem.models.loader import load_model

    return load_model(str(mha_dir)).config


def tiny_prompts() -> list[list[int]]:
    lengths = [1, 5, 17, 40, 130, 60, 33, 90]
    return [[(7 * i + 3 * j) % 300 + 2 for j in range(n)] for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def mha_reference(hf_mha):
    return [hf_greedy(hf_mha, p, NEW) for p in tiny_prompts()]


def hybrid_llm(path, config, act_ratio, device_blocks=6, host_memory="4MiB", **kw) -> LLM:
    kw.setdefault("max_num_batched_tokens", 48)  # the 130-token prompt is prefilled in chunks
    return LLM(str(path), dtype="float32", kv_cache="hybrid", block_size=BLOCK, max_model_len=MAX_LEN,
               device_memory=device_budget(config, device_blocks, BLOCK, MAX_LEN), host_memory=host_memory,
               act_ratio=act_ratio, **kw)


def generate_ids(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def assert_back_to_baseline(llm: LLM, baseline) -> None:
    stats = llm.stats()
    assert stats.num_sequences == 0 and stats.bytes_allocated == 0 and stats.bytes_live == 0, stats
    x = stats.extra
    assert x["num_host_resident"] == 0 and x["host_kv_blocks_used"] == 0 and x["host_act_blocks_used"] == 0
    assert x["host_bytes_allocated"] == 0 and x["device_bytes_allocated"] == 0
    llm.release_free_memory()
    after = llm.stats()
    assert after.bytes_cached == 0
    for field in ("bytes_physical", "bytes_reserved"):
        assert getattr(after, field) == getattr(baseline, field)
    for key in ("device_bytes_physical", "host_kv_bytes", "host_act_bytes", "staging_bytes"):
        assert after.extra[key] == baseline.extra[key]
    llm.engine.manager.device_tier.pool.check_invariants()
    manager = llm.engine.manager
    assert sorted(manager.free_kv) == list(range(manager.plan.num_kv_blocks))
    assert sorted(manager.free_act) == list(range(manager.plan.num_act_blocks))


# --- greedy identity ------------------------------------------------------------------------------
@pytest.mark.parametrize("act_ratio", [0.0, 0.5, 1.0])
def test_tiny_mha_matches_transformers_with_most_requests_in_the_host_tier(mha_dir, mha_config, mha_reference,
                                                                           act_ratio):
    llm = hybrid_llm(mha_dir, mha_config, act_ratio)
    manager = llm.engine.manager
    assert manager.device_tier.pool.num_blocks == 6  # 24 tokens of device tier for 8 requests of 17-146
    baseline = llm.stats()
    prompts = tiny_prompts()
    assert generate_ids(llm, prompts) == mha_reference
    x = llm.stats().extra
    assert x["num_host_admitted"] >= 5 and x["max_host_resident"] >= 4, x  # most requests lived on the host
    assert x["max_minibatches_per_step"] >= 1 and x["bytes_to_host"] > 0
    if act_ratio > 0:
        assert x["num_recomputed_tokens"] > 0 and manager.plan.num_act_blocks > 0
    else:
        assert x["num_recomputed_tokens"] == 0 and manager.plan.num_act_blocks == 0
    if act_ratio < 1:  # room in host KV blocks: a full device never preempts, it moves requests
        assert llm.engine.scheduler.counters.num_preemptions == 0
        assert x["num_offloaded"] >= 1
    assert_back_to_baseline(llm, baseline)


def test_several_minibatches_per_step(mha_dir, mha_config, mha_reference):
    """Long contexts against one staging buffer of max_model_len tokens: the host-resident requests
    cannot all be staged at once, so steps run several mini-batches."""
    llm = hybrid_llm(mha_dir, mha_config, 0.5, device_blocks=1)
    prompts = tiny_prompts()
    long_prompts = [p * (200 // len(p) + 1) for p in prompts[3:6]]
    long_prompts = [p[:200] for p in long_prompts]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(mha_dir, dtype=torch.float32).eval()
    assert generate_ids(llm, long_prompts) == [hf_greedy(hf, p, NEW) for p in long_prompts]
    assert llm.stats().extra["max_minibatches_per_step"] >= 2


def test_offloaded_weights_give_identical_tokens(mha_dir, mha_config, mha_reference):
    llm = hybrid_llm(mha_dir, mha_config, 0.5, offload_weights=True)
    baseline = llm.stats()
    assert generate_ids(llm, tiny_prompts()) == mha_reference
    x = llm.stats().extra
    layer_bytes = llm.engine.runner.weights.layer_bytes[0]
    assert x["weight_bytes_streamed"] >= 2 * layer_bytes and x["weight_bytes_streamed"] % layer_bytes == 0
    assert x["device_weight_buffer_bytes"] == 2 * layer_bytes
    assert_back_to_baseline(llm, baseline)


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_weight_buffers_are_packed_like_the_host_layers(mha_dir, mha_config, batch_invariant):
    from kvmem.models.llama import OneDNNLinear

    llm = hybrid_llm(mha_dir, mha_config, 0.5, offload_weights=True, batch_invariant=batch_invariant)
    def packing(layer):
        return [(n, m.pad_lone_row) for n, m in layer.named_modules() if isinstance(m, OneDNNLinear)]
    host = packing(llm.engine.model.layers[0])
    assert all(packing(b) == host for b in llm.engine.runner.weights.buffers)
    assert host or not OneDNNLinear.available(torch.float32)
    llm.close()


def test_full_host_tier_preempts_and_stays_exact(mha_dir, mha_config, mha_reference):
    """A host tier of 40 blocks (160 tokens) for 8 requests: the scheduler preempts (recompute), the
    tokens do not change."""
    from kvmem.hybrid.cost_model import ModelShape
    from kvmem.hybrid.policy import HostTierPlan

    shape = ModelShape.from_model_config(mha_config, dtype_bytes=4)
    plan = HostTierPlan.for_budget(10**9, 0.5, BLOCK, shape)
    host = 20 * plan.kv_block_bytes + 20 * plan.act_block_bytes
    llm = hybrid_llm(mha_dir, mha_config, 0.5, host_memory=host)
    assert llm.engine.manager.plan.num_blocks == 40
    baseline = llm.stats()
    assert generate_ids(llm, tiny_prompts()) == mha_reference
    assert llm.engine.scheduler.counters.num_preemptions > 0
    assert_back_to_baseline(llm, baseline)


def test_n_samples_and_prefix_hits_in_both_tiers(mha_dir, mha_config, hf_mha):
    llm = hybrid_llm(mha_dir, mha_config, 0.5, device_blocks=12)
    prompt = tiny_prompts()[3]  # 40 tokens: fits the device tier alone
    params = SamplingParams(n=2, temperature=0, max_tokens=NEW, min_tokens=NEW)
    expected = hf_greedy(hf_mha, prompt, NEW)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [expected, expected]
    # Same prompt twice beside a long one that fills the device: prefix hits on the device tier, and a
    # host-resident parent whose second sample prefills its own copy.
    outs = llm.generate([{"prompt_token_ids": tiny_prompts()[4]}, {"prompt_token_ids": prompt}], params,
                        use_tqdm=False)
    assert [c.token_ids for c in outs[1].outputs] == [expected, expected]
    assert [c.token_ids for c in outs[0].outputs] == [hf_greedy(hf_mha, tiny_prompts()[4], NEW)] * 2
    assert llm.stats().prefix_cache_hits > 0
    assert llm.stats().num_sequences == 0


# --- the activations the engine captured --------------------------------------------------------
def test_kv_rebuilt_from_captured_activations_equals_transformers(mha_dir, mha_config, hf_mha):
    """After a host-resident prefill, per layer: K,V recomputed from the activation blocks the engine
    wrote, and the K,V in its KV blocks, equal transformers' K,V cache for the same prompt."""
    llm = hybrid_llm(mha_dir, mha_config, 0.5, device_blocks=1)
    engine, manager = llm.engine, llm.engine.manager
    prompt = tiny_prompts()[4][:70]
    rid = engine.add_request({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=4))
    seq = engine.requests[rid].seqs[0]
    while seq.num_computed_tokens < len(prompt):
        engine.step()
    assert manager.is_host_resident(seq)
    table = manager.host_table(seq)
    assert any(b.is_act for b in table) and not all(b.is_act for b in table)
    with torch.inference_mode():
        hf_cache = hf_mha(torch.tensor([prompt]), use_cache=True).past_key_values
    positions = torch.arange(len(prompt))
    bs, hidden = manager.block_size, manager.hidden_size
    act_pos = [p for p in range(len(prompt)) if table[p // bs].is_act]
    kv_pos = [p for p in range(len(prompt)) if not table[p // bs].is_act]
    act_rows = torch.tensor([table[p // bs].block_id * bs + p % bs for p in act_pos])
    kv_slots = torch.tensor([table[p // bs].block_id * bs + p % bs for p in kv_pos])
    for j, layer in enumerate(engine.model.layers):
        hf_k = hf_cache.layers[j].keys[0].transpose(0, 1)  # [tokens, kv_heads, head_dim]
        hf_v = hf_cache.layers[j].values[0].transpose(0, 1)
        acts = manager.host_act[j].reshape(-1, hidden)[act_rows]
        k, v = recompute_kv(acts, layer.self_attn, positions[act_pos], engine.model.rope)
        torch.testing.assert_close(k, hf_k[act_pos], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, hf_v[act_pos], atol=1e-5, rtol=1e-5)
        heads, dim = manager.spec.num_kv_heads, manager.spec.head_dim
        stored = manager.host_kv[j].reshape(2, heads, -1, dim)[:, :, kv_slots].transpose(1, 2)
        torch.testing.assert_close(stored[0], hf_k[kv_pos], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stored[1], hf_v[kv_pos], atol=1e-5, rtol=1e-5)
    while engine.has_unfinished_requests():
        engine.step()


# --- the cost model's choice ----------------------------------------------------------------------
def test_gqa_models_keep_kv_only_unless_forced(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("hybrid-gqa") / "qwen2-bias", "qwen2-bias")
    from transformers import AutoModelForCausalLM

    from kvmem.models.loader import load_model

    config = load_model(str(path)).config
    auto = hybrid_llm(path, config, None)
    assert auto.engine.manager.act_ratio == 0.0 and auto.engine.manager.plan.num_act_blocks == 0
    assert "grouped-query" in auto.stats().extra["act_ratio_reason"]
    # Forced: activations with the q,k,v bias, on a model where they do not pay.
    forced = hybrid_llm(path, config, 0.5)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = tiny_prompts()[2:6]
    assert generate_ids(forced, prompts) == [hf_greedy(hf, p, NEW) for p in prompts]
    assert forced.stats().extra["num_recomputed_tokens"] > 0


def test_mha_ratio_from_the_cost_model(mha_dir, mha_config):
    llm = hybrid_llm(mha_dir, mha_config, None)
    manager = llm.engine.manager
    assert 0.0 <= manager.act_ratio <= 1.0 and "profile: measured" in manager.ratio_reason


# --- the embedded SmolLM2 ---------------------------------------------------------------------------
SMOL_MAX_LEN = 128


@pytest.fixture(scope="module")
def smol_prompts():
    from kvmem.models.loader import load_model

    source = load_model(None)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
             "1, 2, 3, 4,"]
    return source.config, [source.tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("act_ratio", [0.0, 0.5, 1.0])
def test_smollm2_matches_transformers_from_the_host_tier(smol_prompts, act_ratio):
    config, prompts = smol_prompts
    llm = LLM(dtype="float32", kv_cache="hybrid", max_model_len=SMOL_MAX_LEN, host_memory="32MiB",
              device_memory=device_budget(config, 1, 16, SMOL_MAX_LEN), act_ratio=act_ratio)
    baseline = llm.stats()
    got = generate_ids(llm, prompts, SamplingParams(temperature=0, max_tokens=8, min_tokens=8))
    assert got == [hf_greedy(hf_default_model(), p, 8) for p in prompts]
    x = llm.stats().extra
    assert x["num_host_admitted"] >= 3, x  # one 16-token device block: the others live on the host
    assert_back_to_baseline(llm, baseline)


# --- bad settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,param", [
    ({"act_ratio": -0.1}, "act_ratio"), ({"act_ratio": 1.5}, "act_ratio"), ({"act_ratio": math.nan}, "act_ratio"),
    ({"act_ratio": True}, "act_ratio"), ({"act_ratio": "half"}, "act_ratio"),
    ({"device_memory": -1}, "device_memory"), ({"device_memory": "-64MiB"}, "device_memory"),
    ({"host_memory": -5}, "host_memory"), ({"host_memory": "-1GiB"}, "host_memory"), ({"host_memory": 0}, "host_memory"),
    ({"offload_weights": "yes"}, "offload_weights"),
    ({"kv_cache": "paged", "act_ratio": 0.5}, "act_ratio"), ({"kv_cache": "paged", "host_memory": "1GiB"}, "host_memory"),
    ({"kv_cache_memory": "8MiB", "device_memory": "8MiB"}, "device_memory"),
])
def test_bad_settings_name_the_parameter(kwargs, param):
    kwargs = {"kv_cache": "hybrid", **kwargs}
    with pytest.raises(ValueError, match=param):
        LLM(dtype="float32", **kwargs)


def test_too_small_budgets_fail_clearly(mha_dir, mha_config):
    with pytest.raises(ValueError, match="host_memory"):
        hybrid_llm(mha_dir, mha_config, 0.5, host_memory=1000)
    with pytest.raises(ValueError, match="device_memory.*max_model_len"):
        LLM(str(mha_dir), dtype="float32", kv_cache="hybrid", block_size=BLOCK, max_model_len=MAX_LEN,
            device_memory=100_000, host_memory="4MiB")


def test_cli_prints_a_clear_error(capsys):
    assert cli_main(["generate", "--prompt", "hi", "--kv-cache", "hybrid", "--act-ratio", "1.5"]) == 2
    assert "kvmem: error: act_ratio must be" in capsys.readouterr().err
    assert cli_main(["generate", "--prompt", "hi", "--kv-cache", "hybrid", "--host-memory=-1GiB"]) == 2
    assert "kvmem: error: host_memory" in capsys.readouterr().err


def test_cli_generate_and_serve_take_the_hybrid_flags(mha_dir, mha_config, capsys):
    from kvmem.cli import build_parser, engine_kwargs
    from kvmem.config import EngineConfig

    device = str(device_budget(mha_config, 4, BLOCK, MAX_LEN))
    flags = ["--kv-cache", "hybrid", "--device-memory", device, "--host-memory", "4MiB", "--act-ratio", "0.5",
             "--offload-weights", "--block-size", str(BLOCK), "--max-model-len", str(MAX_LEN), "--dtype", "float32"]
    config = EngineConfig(**engine_kwargs(build_parser().parse_args(["serve", str(mha_dir), *flags])))
    assert (config.kv_cache, config.device_memory, config.host_memory, config.act_ratio, config.offload_weights) == \
        ("hybrid", int(device), "4MiB", 0.5, True)
    assert cli_main(["generate", "--model", str(mha_dir), "--prompt", "The quick brown fox", "--raw",
                     "--max-tokens", "5", *flags]) == 0
    assert "kv_cache=hybrid" in capsys.readouterr().err
