"""One list of strategies and one way to build them: the engine, the CLI, the config and the benchmarks
read the registry, and a new strategy is a class plus one registry line."""

from __future__ import annotations

import pytest
import torch

from kvmem import LLM, SamplingParams
from kvmem.cli import build_parser
from kvmem.config import KV_CACHE_STRATEGIES, EngineConfig
from kvmem.memory import registry
from kvmem.memory.base import KVCacheSpec, StrategyOptions
from kvmem.memory.paged import PagedKVCacheManager
from kvmem.memory.static import StaticKVCacheManager
from tests.oracle import make_tiny_model

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32, device=torch.device("cpu"))


def test_every_list_of_names_is_the_registry():
    assert KV_CACHE_STRATEGIES == registry.STRATEGY_NAMES == ("paged", "static", "virtual", "hybrid")
    kv_cache = next(a for a in build_parser()._subparsers._group_actions[0].choices["serve"]._actions
                    if a.dest == "kv_cache")
    assert tuple(kv_cache.choices) == registry.STRATEGY_NAMES
    with pytest.raises(ValueError, match="kv_cache must be one of paged, static, virtual, hybrid"):
        EngineConfig(kv_cache="nope")
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        registry.strategy_class("nope")


@pytest.mark.parametrize("name", ["paged", "static", "virtual"])
def test_built_from_one_budget_capped_by_what_max_num_seqs_can_use(name):
    options = StrategyOptions(block_size=4, max_num_seqs=2)
    manager = registry.build_manager(name, SPEC, 10 * 2**20, 64, options)
    try:
        assert manager.name == name
        # Two sequences of 64 tokens at most, however big the budget.
        held = manager.stats().bytes_capacity or manager.stats().bytes_reserved
        assert held <= 2 * 64 * SPEC.bytes_per_token
    finally:
        manager.close()


def test_a_budget_smaller_than_one_sequence_shortens_static_everywhere():
    # The engine and `bench memory` used to disagree here (one shortened, the other raised).
    manager = registry.build_manager("static", SPEC, 10 * SPEC.bytes_per_token, 64, StrategyOptions())
    assert manager.max_tokens_per_sequence == 10
    with pytest.raises(ValueError, match="holds no KV block"):
        registry.build_manager("paged", SPEC, SPEC.bytes_per_token, 64, StrategyOptions(block_size=16))


class HalfStaticKVCacheManager(StaticKVCacheManager):
    """A fifth strategy, as a user would add one: reserve half of max_model_len per request."""

    name = "half-static"

    @classmethod
    def from_budget(cls, spec, budget_bytes, max_model_len, options):
        return cls(spec, budget_bytes // (max_model_len // 2 * spec.bytes_per_token), max_model_len // 2)


def test_a_fifth_strategy_is_a_class_and_one_registry_line(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.STRATEGIES, "half-static", f"{__name__}:HalfStaticKVCacheManager")
    monkeypatch.setattr(registry, "STRATEGY_NAMES", tuple(registry.STRATEGIES))
    monkeypatch.setattr("kvmem.config.KV_CACHE_STRATEGIES", registry.STRATEGY_NAMES)
    tiny = make_tiny_model(tmp_path / "llama", "llama-mha")
    with LLM(str(tiny), dtype="float32", kv_cache="half-static", kv_cache_memory="1MiB", max_model_len=64) as llm:
        assert llm.engine.manager.name == "half-static" and llm.engine.max_model_len == 32
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, min_tokens=4), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
    with LLM(str(tiny), dtype="float32", kv_cache_memory="1MiB", max_model_len=64) as llm:
        reference = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, min_tokens=4),
                                 use_tqdm=False)
    assert reference[0].outputs[0].token_ids == out[0].outputs[0].token_ids
    assert isinstance(registry.strategy_class("paged")(SPEC, 4), PagedKVCacheManager)
