"""The one interface every KV-cache strategy implements, and the stats they all report.

The scheduler talks to a manager only through `KVCacheManager`; the model runner reads the layer
caches and the per-sequence addressing (`block_table`) from it. A manager never samples and
never runs the model.

Addressing, shared by every strategy: a layer cache is a tensor shaped
`[num_kv_heads, num_blocks, block_size, head_dim]`; token `pos` of a sequence lives in block
`block_table[pos // block_size]` at offset `pos % block_size`. Heads come first so that the keys
one head reads from a block are contiguous: attention then multiplies them in place. Paged uses
small blocks (16 tokens); static uses one block of `max_model_len` tokens per request, i.e. a
contiguous slot.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from kvmem.attention import kv_quant

if TYPE_CHECKING:
    from kvmem.config import EngineConfig
    from kvmem.engine.model_runner import ModelRunner
    from kvmem.memory.events import EventSink
    from kvmem.models.config import ModelConfig
    from kvmem.models.llama import LlamaForCausalLM


def cdiv(a: int, b: int) -> int:
    """Ceiling division: how many blocks (chunks) of b tokens hold a tokens."""
    return -(-a // b)


class SequenceView(Protocol):
    """What a manager knows of a sequence: the engine's `Sequence` is one, and tests and benchmarks
    pass their own. A manager reads these and never keeps anything else of the sequence."""

    seq_id: int  # unique among the sequences a manager holds
    token_ids: list[int]  # prompt, then output
    num_prompt_tokens: int
    num_computed_tokens: int  # tokens whose KV is written; a manager may reset it (a fork that recomputes)
    max_tokens: int  # output tokens it may still grow to (eager mapping sizes by it)

    @property
    def num_tokens(self) -> int: ...


class NoFreeMemory(RuntimeError):
    """Raised by `allocate` when called without room; the scheduler checks `can_allocate` first."""


@dataclass(frozen=True)
class MemoryStats:
    """What a strategy holds, in bytes, measured the same way for every strategy.

    - `bytes_reserved`: capacity set aside for KV (address space for `virtual`).
    - `bytes_physical`: memory actually backed by RAM / device memory.
    - `bytes_allocated`: the part of it assigned to resident sequences (their blocks or slots).
    - `bytes_live`: the part of that holding tokens the sequences have written.
    - `bytes_cached`: memory not assigned to any sequence that still holds a reusable prefix.
    - `bytes_capacity`: the most physical memory the strategy may use (its budget); 0 = `bytes_physical`,
      as for strategies that back their whole budget up front.
    """

    strategy: str
    bytes_reserved: int
    bytes_physical: int
    bytes_allocated: int
    bytes_live: int
    bytes_cached: int
    num_sequences: int
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found cached
    bytes_capacity: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def waste(self) -> float:
        """Internal fragmentation: the share of memory held for sequences that holds no token."""
        return 0.0 if self.bytes_allocated == 0 else 1.0 - self.bytes_live / self.bytes_allocated

    @property
    def usage(self) -> float:
        """Share of the KV budget assigned to sequences (vLLM's kv_cache_usage)."""
        capacity = self.bytes_capacity or self.bytes_physical
        return 0.0 if capacity == 0 else self.bytes_allocated / capacity


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape and size of one token's KV, fixed by the model and the dtype."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # the model's: what attention computes in
    device: torch.device
    # What the cache stores (`kv_cache_dtype`, `kvmem.attention.kv_quant`): None = `dtype`; int8 or a
    # float8 type = quantized (int8 with a float32 scale per token and KV head beside the blocks).
    cache_dtype: torch.dtype | None = None

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.dtype if self.cache_dtype is None else self.cache_dtype

    @property
    def quantized(self) -> bool:
        return kv_quant.is_quantized(self.storage_dtype)

    @property
    def has_scales(self) -> bool:
        """Whether a scale per (token, KV head) is stored beside the blocks (int8)."""
        return kv_quant.has_token_scales(self.storage_dtype)

    @property
    def token_head_bytes(self) -> int:
        """One token of one KV head in K (or V): its elements and, for int8, its scale."""
        return self.head_dim * self.storage_dtype.itemsize + kv_quant.scale_bytes_per_head_token(self.storage_dtype)

    @property
    def scale_bytes_per_token(self) -> int:
        """The part of `bytes_per_token` that is scales (int8; 0 otherwise)."""
        return 2 * self.num_layers * self.num_kv_heads * kv_quant.scale_bytes_per_head_token(self.storage_dtype)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers, scales included."""
        return 2 * self.num_layers * self.num_kv_heads * self.token_head_bytes


@dataclass(frozen=True)
class StrategyOptions:
    """What a strategy is sized with besides its byte budget: resolved values, never the engine's
    configuration (a strategy with more to say subclasses this: `VirtualOptions`, `HybridOptions`)."""

    block_size: int = 16
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256  # sequences that may run at once

    @classmethod
    def common_from_config(cls, config: EngineConfig) -> dict:
        return {"block_size": config.block_size, "enable_prefix_caching": config.enable_prefix_caching,
                "max_num_seqs": config.max_num_seqs}


class KVCacheManager(ABC):
    """Owns the KV memory of every resident sequence.

    Construction, the same for every strategy (`kvmem.memory.registry.build_manager` runs it):
    `resolve_options(config, ...)` turns the user's settings into numbers (measuring what it must),
    `from_budget(spec, budget_bytes, max_model_len, options)` sizes the manager from one byte
    budget, and `make_runner(...)` names the model runner its layout needs.
    """

    name: str
    spec: KVCacheSpec
    block_size: int
    # Pairs (src_block, dst_block) whose contents must be copied before the next forward pass
    # (copy-on-write of a shared partial block). The model runner drains it.
    pending_copies: list[tuple[int, int]]
    # True when each sequence's table is one contiguous slot that attention must not read past the
    # sequence's length (virtual: pages past it may be unmapped); decode then reads in place.
    contiguous_slots: bool = False
    # With contiguous slots: the mapping granule in tokens (all of a slot below it is backed), so a
    # ragged decode batch may gather whole chunks instead of reading each slot on its own.
    chunk_tokens: int | None = None
    # Where the manager reports what happens to its memory (kvmem.memory.events); None: nowhere.
    events: EventSink | None = None

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def resolve_options(cls, config: EngineConfig, model_config: ModelConfig, spec: KVCacheSpec,
                        max_model_len: int) -> StrategyOptions:
        """This strategy's options from the engine's configuration (before the model is built)."""
        return StrategyOptions(**StrategyOptions.common_from_config(config))

    @classmethod
    @abstractmethod
    def from_budget(cls, spec: KVCacheSpec, budget_bytes: int, max_model_len: int,
                    options: StrategyOptions) -> KVCacheManager:
        """A manager using at most `budget_bytes` of KV memory for sequences of up to `max_model_len`
        tokens (fewer where the budget cannot hold one: see `max_tokens_per_sequence`). Raises
        ValueError, naming the budget, where it holds nothing usable."""

    def make_runner(self, model: LlamaForCausalLM, device: torch.device, attention_backend: str,
                    options: StrategyOptions) -> ModelRunner:
        """The model runner for this manager's layout; the default runs the model's own forward."""
        from kvmem.engine.model_runner import ModelRunner

        return ModelRunner(model, self, device, attention_backend)

    # --- admission and growth -------------------------------------------------------------
    def admit(self, seq: SequenceView, reuse_prefix: bool = True) -> int:
        """Called once when a waiting sequence is first scheduled (again). Returns how many of its
        leading tokens are already in the cache (prefix hit); they become computed. Default: none.
        `reuse_prefix=False`: take no hit (the sequence needs every prompt row computed)."""
        return 0

    # The prefix-cache tiers below the budget (a kvmem.memory.tiers TierLink), where the strategy
    # attached them (attach_tiers); None: no tiers.
    tiers = None

    def is_loading(self, seq: SequenceView) -> bool:
        """Whether an admitted `seq` still waits for prefix blocks from a slower tier (kvmem.memory.tiers);
        the scheduler leaves it waiting meanwhile. May finish the load (and lower
        `seq.num_computed_tokens` where blocks could not be read)."""
        return self.tiers is not None and self.tiers.is_loading(seq)

    def has_pending_loads(self) -> bool:
        """Whether any sequence waits for tier loads (an idle engine then waits a little, not spins)."""
        return self.tiers is not None and self.tiers.has_pending_loads()

    def wait_for_loads(self, timeout: float) -> None:
        """Block up to `timeout` seconds until some tier load is done."""
        if self.tiers is not None:
            self.tiers.wait_for_loads(timeout)

    def attach_tiers(self, store) -> None:
        """Keep evicted prefix blocks in `store` (kvmem.memory.tiers.TierStore) and load them back."""
        raise ValueError(f"kv_offload_memory / kv_offload_dir are not supported by kv_cache={self.name!r}")

    @abstractmethod
    def can_allocate(self, seq: SequenceView, num_new_tokens: int) -> bool:
        """Whether `allocate(seq, num_new_tokens)` would succeed now."""

    @abstractmethod
    def allocate(self, seq: SequenceView, num_new_tokens: int) -> None:
        """Make room for tokens [seq.num_computed_tokens, + num_new_tokens). Never over-commits:
        raises NoFreeMemory instead."""

    @abstractmethod
    def free(self, seq: SequenceView) -> None:
        """Release everything `seq` holds (finished, aborted or preempted)."""

    def fork(self, parent: SequenceView, child: SequenceView) -> None:
        """Let `child` share every block `parent` holds (n > 1 sampling)."""
        raise NotImplementedError(f"{self.name} does not support forking sequences (n > 1)")

    def on_tokens_computed(self, seq: SequenceView) -> None:
        """Called after a step wrote KV for `seq`; lets a prefix cache register full blocks."""

    # --- what the model runner reads ------------------------------------------------------
    @abstractmethod
    def layer_cache(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) caches of one layer, each `[kv_heads, num_blocks, block_size, head_dim]`."""

    def layer_scales(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """int8 caches: (K, V) scales of one layer, each `[kv_heads, num_blocks, block_size]` float32,
        addressed as `layer_cache`'s blocks; None for caches without per-token scales."""
        return None

    def layer_kv(self, layer_idx: int) -> tuple[torch.Tensor, ...]:
        """What attention gets for one layer: (K, V), followed by (K scales, V scales) for int8."""
        scales = self.layer_scales(layer_idx)
        return self.layer_cache(layer_idx) + (() if scales is None else tuple(scales))

    @abstractmethod
    def block_table(self, seq: SequenceView) -> list[int]:
        """Block ids holding `seq`'s tokens, in order."""

    # Tokens per id of `shared_prefix_ids`; None: this manager reports no shared prefixes.
    prefix_id_tokens: int | None = None

    def shared_prefix_ids(self, seq: SequenceView) -> list[int]:
        """Ids of the memory holding `seq`'s leading tokens, one per `prefix_id_tokens` tokens: where
        two running sequences' lists start with the same ids, their KV there is the same memory, which
        cascade attention reads once for both (`kvmem.attention.cascade`). Default: none."""
        return []

    def readable_tokens(self, seq: SequenceView) -> int:
        """How many tokens from the start of `seq`'s table are backed by memory, written or not
        (attention may read that far and mask the rest). Default: all of its blocks."""
        return len(self.block_table(seq)) * self.block_size

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src → dst in every layer (copy-on-write)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.spec.device)
        dst = torch.tensor([d for _, d in pairs], device=self.spec.device)
        for layer in range(self.spec.num_layers):
            for cache in self.layer_kv(layer):  # int8: the scales travel with their blocks
                cache[:, dst] = cache[:, src]

    # --- capacity and accounting ----------------------------------------------------------
    @property
    @abstractmethod
    def max_tokens_per_sequence(self) -> int:
        """The most tokens one sequence can ever hold here (caps max_model_len)."""

    @abstractmethod
    def stats(self) -> MemoryStats: ...

    def memory_map(self) -> dict:
        """A compact, JSON-able picture of the physical KV memory for /dashboard: per block (page,
        slot) state codes and owners. Called on the engine thread at most a few times a second, and
        only while a dashboard is open. Default: the strategy's name only (the page then shows the
        counts from `stats()`)."""
        return {"strategy": self.name, "kind": "counts"}

    def release_free_memory(self) -> int:
        """Give back idle memory (e.g. cached prefixes); returns bytes released."""
        return 0

    def set_event_sink(self, sink: EventSink | None) -> None:
        """Report what happens to this manager's memory to `sink` from now on (None: stop). A manager
        with parts that produce events of their own (a block pool, a tier) hands it on."""
        self.events = sink

    def close(self) -> None:
        """Release what the manager holds beyond Python objects (threads, mappings). Idempotent."""
