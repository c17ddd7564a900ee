"""The one list of KV-cache strategies, and the one way to build a manager.

Every name a user can pass as `kv_cache` (the config, the CLI, the server, the benchmarks) comes
from `STRATEGIES`. A new strategy is a module with a `KVCacheManager` subclass plus one line here.
Classes are imported on first use, so naming the strategies costs no import of their backends.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmem.memory.base import KVCacheManager, KVCacheSpec, StrategyOptions

# name -> "module:class"
STRATEGIES: dict[str, str] = {
    "paged": "kvmem.memory.paged:PagedKVCacheManager",  # the default: first
    "static": "kvmem.memory.static:StaticKVCacheManager",
    "virtual": "kvmem.memory.virtual:VirtualKVCacheManager",
    "hybrid": "kvmem.memory.hybrid:HybridKVCacheManager",
}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)


def strategy_class(name: str) -> type[KVCacheManager]:
    if name not in STRATEGIES:
        raise ValueError(f"kv_cache must be one of {', '.join(STRATEGY_NAMES)}, got {name!r}")
    module, _, cls = STRATEGIES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def usable_budget(budget_bytes: int, bytes_per_token: int, max_model_len: int, max_num_seqs: int) -> int:
    """Never more than `max_num_seqs` full-length sequences could use."""
    return min(budget_bytes, max_num_seqs * max_model_len * bytes_per_token)


def build_manager(name: str, spec: KVCacheSpec, budget_bytes: int, max_model_len: int,
                  options: StrategyOptions) -> KVCacheManager:
    """Strategy `name` sized from one budget, capped to what `options.max_num_seqs` could use."""
    budget = usable_budget(budget_bytes, spec.bytes_per_token, max_model_len, options.max_num_seqs)
    return strategy_class(name).from_budget(spec, budget, max_model_len, options)
