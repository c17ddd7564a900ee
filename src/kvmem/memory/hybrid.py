"""hybrid: HybridServe's two-tier KV cache (arXiv 2501.01792): device blocks, and host memory holding
a mix of KV blocks and activation (ACT) blocks.

Tiers:
- device: a plain `PagedKVCacheManager` (block tables, prefix caching, copy-on-write), sized by
  `device_memory` minus a staging area. Attention reads it directly.
- host: two block pools in host memory (pinned on CUDA), each block `block_size` tokens across all
  layers: KV blocks `[layers, 2, kv_heads, blocks, block_size, head_dim]` and ACT blocks
  `[layers, blocks, block_size, hidden]`. An ACT block keeps, per layer, the *post-`input_layernorm`*
  hidden state of its tokens (the input of the q,k,v projection); K,V come back from it as
  rope(a · W_K), a · W_V (+ bias) — `kvmem.hybrid.recompute.recompute_kv`.
- staging: two device buffers, each holding one layer of a mini-batch of host-resident sequences
  (K,V blocks plus an activation area). While the model runs layer j of one mini-batch on one
  buffer, the other is filled for the next (`kvmem.engine.hybrid_runner`).

Residency: a sequence lives wholly in one tier. At its first allocation it goes to the device if the
rest of its prompt fits there, else to the host tier. A device-resident sequence that can no longer
grow on the device is moved to the host tier (its blocks become host KV blocks: there are no
activations for tokens computed on the device). A host-resident sequence stays there until it ends.
Only when the host tier is full too does `can_allocate` say no, and the scheduler preempts.

Division of the host tier (HybridServe's two steps): the ratio r (forced by `act_ratio`, or the cost
model's `balanced_act_ratio`) fixes how many KV and ACT blocks the budget holds (`HostTierPlan`);
placement then makes a request's i-th host block an ACT block iff `is_act_block(i, r)`, so every
request — and every mini-batch — carries the ratio. When the preferred pool is empty a block takes
the other kind (a block's kind is fixed before any of its tokens is computed, when both K,V and the
activation of those tokens will exist).

On a CPU-only machine "device" and "host" are both host memory: the code path, the schedule and the
tokens are the same, the speed is not representative.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from kvmem.hybrid.cost_model import ModelShape, RatioDecision, balanced_act_ratio, decode_attention_s, gemm_s
from kvmem.hybrid.policy import HostTierPlan, is_act_block
from kvmem.memory.base import (
    KVCacheManager, KVCacheSpec, MemoryStats, NoFreeMemory, SequenceView, StrategyOptions, cdiv,
)
from kvmem.memory.events import EventSink, TierMoved, medium_of
from kvmem.memory.paged import PagedKVCacheManager

if TYPE_CHECKING:
    from kvmem.config import EngineConfig
    from kvmem.engine.hybrid_runner import HybridModelRunner
    from kvmem.models.llama import LlamaForCausalLM
    from kvmem.models.config import ModelConfig

logger = logging.getLogger(__name__)

# Share of the device budget given to the two staging buffers (the simulator's default layout);
# they always hold at least one max_model_len sequence each.
STAGING_FRACTION = 0.5
DEFAULT_HOST_FRACTION = 0.2  # host tier: this share of the RAM available, where host_memory is not set


@dataclass(frozen=True)
class HostBlock:
    block_id: int  # in the KV pool or in the ACT pool, per `is_act`
    is_act: bool


@dataclass
class HybridCounters:
    """Residency. What steps move and recompute, the runner counts (`hybrid_runner.HybridRunnerCounters`)."""

    num_host_admitted: int = 0  # sequences that became host-resident (at first allocation or moved)
    num_offloaded: int = 0  # of which moved from the device with KV already computed there
    max_host_resident: int = 0  # the most sequences in the host tier at once


@dataclass
class StagingBuffer:
    """One layer's worth of a host mini-batch on the device: K,V blocks the attention backend reads
    as an ordinary layer cache, and the activations staged for recompute."""

    kv: torch.Tensor  # [2, kv_heads, blocks, block_size, head_dim], in the cache's storage dtype
    act: torch.Tensor  # [blocks * block_size, hidden], in the model's dtype
    kv_scales: torch.Tensor | None = None  # int8 caches: [2, kv_heads, blocks, block_size] float32

    @property
    def cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[0], self.kv[1]

    @property
    def scales(self) -> tuple[torch.Tensor, ...]:
        """(K scales, V scales) for an int8 cache; () otherwise (splice after the other arguments)."""
        return () if self.kv_scales is None else (self.kv_scales[0], self.kv_scales[1])

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[2]

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.act.nbytes + (0 if self.kv_scales is None else self.kv_scales.nbytes)


@dataclass
class MinibatchTransfers:
    """What one host mini-batch moves in a step; the same indices serve every layer.

    `*_host` index tensors address host pools (CPU), `*_dev` ones the staging buffer (device)."""

    block_tables: list[list[int]]  # per sequence: its staging block ids this step (in position order)
    num_staging_blocks: int
    kv_src_host: torch.Tensor  # host KV block ids holding computed tokens -> staging blocks 0, 1, ...
    act_src_host: torch.Tensor  # host ACT flat rows (block * block_size + offset) of computed tokens
    act_dst_dev: torch.Tensor  # -> staging flat slots their recomputed K,V go to
    act_positions_dev: torch.Tensor  # their positions (RoPE)
    wb_kv_src_dev: torch.Tensor  # new tokens in KV blocks: staging flat slots ...
    wb_kv_dst_host: torch.Tensor  # ... -> host KV flat slots
    wb_act_rows_dev: torch.Tensor  # new tokens in ACT blocks: rows of the mini-batch's token batch ...
    wb_act_dst_host: torch.Tensor  # ... -> host ACT flat rows

    @property
    def num_act_tokens(self) -> int:
        return self.act_src_host.numel()

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_src_host.numel()


class HybridKVCacheManager(KVCacheManager):
    name = "hybrid"

    def __init__(self, spec: KVCacheSpec, hidden_size: int, num_device_blocks: int, block_size: int,
                 plan: HostTierPlan, staging_blocks: int, enable_prefix_caching: bool = True,
                 ratio_reason: str = "") -> None:
        self.spec = spec
        self.block_size = block_size
        self.hidden_size = hidden_size
        self.plan = plan
        self.act_ratio = plan.act_ratio
        self.ratio_reason = ratio_reason
        self.device_tier = PagedKVCacheManager(spec, num_device_blocks, block_size, enable_prefix_caching)
        self.pending_copies = self.device_tier.pending_copies  # the same list: the runner drains it
        self.host_device = torch.device("cpu")
        pin = spec.device.type == "cuda"  # page-locked, so copies to the GPU run asynchronously
        L, heads, dim = spec.num_layers, spec.num_kv_heads, spec.head_dim
        # zeros, not empty: every page touched now, so physical = reserved (as for the device tier).
        # KV blocks in the cache's storage dtype (a quantized cache shrinks the host tier and its
        # transfers too; int8's scales travel beside), activations in the model's.
        self.host_kv = torch.zeros((L, 2, heads, plan.num_kv_blocks, block_size, dim), dtype=spec.storage_dtype,
                                   pin_memory=pin)
        self.host_kv_scales = torch.zeros((L, 2, heads, plan.num_kv_blocks, block_size), dtype=torch.float32,
                                          pin_memory=pin) if spec.has_scales else None
        self.host_act = torch.zeros((L, plan.num_act_blocks, block_size, hidden_size), dtype=spec.dtype,
                                    pin_memory=pin)
        self.free_kv = list(range(plan.num_kv_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self.free_act = list(range(plan.num_act_blocks - 1, -1, -1))
        self.host_tables: dict[int, list[HostBlock]] = {}
        self.host_seqs: dict[int, SequenceView] = {}
        self.on_device: set[int] = set()  # sequences placed in the device tier
        self.staging = [StagingBuffer(torch.zeros((2, heads, staging_blocks, block_size, dim),
                                                  dtype=spec.storage_dtype, device=spec.device),
                                      torch.zeros((staging_blocks * block_size, hidden_size), dtype=spec.dtype,
                                                  device=spec.device),
                                      torch.zeros((2, heads, staging_blocks, block_size), dtype=torch.float32,
                                                  device=spec.device) if spec.has_scales else None)
                        for _ in range(2)]
        self.counters = HybridCounters()

    # --- construction -------------------------------------------------------------------
    @classmethod
    def resolve_options(cls, config: EngineConfig, model_config: ModelConfig, spec: KVCacheSpec,
                        max_model_len: int) -> HybridOptions:
        return resolve_hybrid_options(config, model_config, spec, max_model_len)

    @classmethod
    def from_budget(cls, spec: KVCacheSpec, budget_bytes: int, max_model_len: int,
                    options: HybridOptions) -> HybridKVCacheManager:
        return hybrid_from_budget(spec, budget_bytes, max_model_len, options)

    def make_runner(self, model: LlamaForCausalLM, device: torch.device, attention_backend: str,
                    options: HybridOptions) -> HybridModelRunner:
        from kvmem.engine.hybrid_runner import HybridModelRunner

        return HybridModelRunner(model, self, device, attention_backend, offload_weights=options.offload_weights)

    # --- sizes --------------------------------------------------------------------------
    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return self.spec.bytes_per_token // self.spec.num_layers

    @property
    def act_bytes_per_token_per_layer(self) -> int:
        return self.hidden_size * self.host_act.element_size()

    @property
    def staging_tokens(self) -> int:
        return self.staging[0].num_blocks * self.block_size

    @property
    def max_tokens_per_sequence(self) -> int:
        # A host-resident sequence must fit one staging buffer (its whole context, one layer).
        return min(self.staging_tokens, max(self.device_tier.max_tokens_per_sequence, self.plan.capacity_tokens))

    # --- residency ----------------------------------------------------------------------
    def is_host_resident(self, seq: SequenceView) -> bool:
        return seq.seq_id in self.host_tables

    def host_table(self, seq: SequenceView) -> list[HostBlock]:
        return self.host_tables[seq.seq_id]

    def admit(self, seq: SequenceView, reuse_prefix: bool = True) -> int:
        return self.device_tier.admit(seq, reuse_prefix)  # prefix hits come from the device tier

    def _num_free_host(self) -> int:
        return len(self.free_kv) + len(self.free_act)

    def _fits_device(self, seq: SequenceView, num_new_tokens: int) -> bool:
        if seq.seq_id in self.on_device:
            return self.device_tier.can_allocate(seq, num_new_tokens)
        # First allocation: the device only if the rest of the prompt fits there, so a prompt is not
        # moved to the host tier in the middle of its chunked prefill. Without host KV blocks
        # (act_ratio 1) a device-resident sequence could never move (there are no activations of the
        # tokens it computed on the device): then only if its whole lifetime fits.
        rest = max(num_new_tokens, seq.num_tokens - seq.num_computed_tokens)
        if self.plan.num_kv_blocks == 0 and hasattr(seq, "max_tokens"):
            rest = max(rest, seq.num_prompt_tokens + seq.max_tokens - seq.num_computed_tokens)
        return self.device_tier.can_allocate(seq, rest)

    def _can_move_to_host(self, seq: SequenceView, num_new_tokens: int) -> bool:
        moved = len(self.device_tier.block_table(seq))  # become host KV blocks
        total = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return moved <= len(self.free_kv) and max(total, moved) <= self._num_free_host()

    def can_allocate(self, seq: SequenceView, num_new_tokens: int) -> bool:
        if self.is_host_resident(seq):
            need = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size) - len(self.host_table(seq))
            return need <= self._num_free_host()
        return self._fits_device(seq, num_new_tokens) or self._can_move_to_host(seq, num_new_tokens)

    def allocate(self, seq: SequenceView, num_new_tokens: int) -> None:
        if not self.can_allocate(seq, num_new_tokens):
            raise NoFreeMemory(f"no room for {num_new_tokens} tokens of sequence {seq.seq_id} in either tier")
        if not self.is_host_resident(seq):
            if self._fits_device(seq, num_new_tokens):
                self.device_tier.allocate(seq, num_new_tokens)
                self.on_device.add(seq.seq_id)
                return
            self._move_to_host(seq)
        self._grow_host(seq, num_new_tokens)

    def _move_to_host(self, seq: SequenceView) -> None:
        """The device has no room: the sequence's device blocks (if any) become host KV blocks."""
        device_ids = self.device_tier.block_table(seq)
        host_ids = [self.free_kv.pop() for _ in device_ids]
        if device_ids and seq.num_computed_tokens > 0:
            src = torch.tensor(device_ids, dtype=torch.long, device=self.spec.device)
            dst = torch.tensor(host_ids, dtype=torch.long)
            blocks = self.device_tier.kv.index_select(3, src).to(self.host_device)  # all layers, K and V
            _index_copy(self.host_kv, 3, dst, blocks)
            if self.host_kv_scales is not None:
                self.host_kv_scales.index_copy_(3, dst, self.device_tier.kv_scales.index_select(3, src).to(self.host_device))
            self.counters.num_offloaded += 1
        self.device_tier.free(seq)
        self.on_device.discard(seq.seq_id)
        if self.events is not None and host_ids:
            self.events.emit(TierMoved(seq.seq_id, len(host_ids), medium_of(self.spec.device), "CPU", "kv"))
        self.host_tables[seq.seq_id] = [HostBlock(b, False) for b in host_ids]
        self.host_seqs[seq.seq_id] = seq
        self.counters.num_host_admitted += 1
        self.counters.max_host_resident = max(self.counters.max_host_resident, len(self.host_tables))

    def _grow_host(self, seq: SequenceView, num_new_tokens: int) -> None:
        table = self.host_tables[seq.seq_id]
        start = len(table)
        for i in range(len(table), cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)):
            act = bool(self.free_act) and (is_act_block(i, self.act_ratio) or not self.free_kv)
            table.append(HostBlock(self.free_act.pop(), True) if act else HostBlock(self.free_kv.pop(), False))
        if self.events is not None and len(table) > start:  # new host blocks, by kind (src "": none before)
            num_act = sum(b.is_act for b in table[start:])
            for kind, n in (("kv", len(table) - start - num_act), ("act", num_act)):
                if n:
                    self.events.emit(TierMoved(seq.seq_id, n, "", "CPU", kind))

    def set_event_sink(self, sink: EventSink | None) -> None:
        self.events = sink
        self.device_tier.set_event_sink(sink)  # the device tier's prefix cache: BlockStored/Removed

    def free(self, seq: SequenceView) -> None:
        table = self.host_tables.pop(seq.seq_id, None)
        if table is None:
            self.device_tier.free(seq)
            self.on_device.discard(seq.seq_id)
            return
        for block in reversed(table):
            (self.free_act if block.is_act else self.free_kv).append(block.block_id)
        del self.host_seqs[seq.seq_id]

    def fork(self, parent: SequenceView, child: SequenceView) -> None:
        if self.is_host_resident(parent):
            child.num_computed_tokens = 0  # no sharing in the host tier: the child prefills its own copy
            return
        self.device_tier.fork(parent, child)
        self.on_device.add(child.seq_id)

    def on_tokens_computed(self, seq: SequenceView) -> None:
        if not self.is_host_resident(seq):
            self.device_tier.on_tokens_computed(seq)

    # --- what the model runner reads -----------------------------------------------------
    def layer_cache(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.device_tier.layer_cache(layer_idx)

    def layer_scales(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.device_tier.layer_scales(layer_idx)

    def block_table(self, seq: SequenceView) -> list[int]:
        """Device-tier blocks; a host-resident sequence gets staging blocks per step instead."""
        return self.device_tier.block_table(seq)

    def plan_minibatch(self, items: list[tuple[SequenceView, int, int]]) -> MinibatchTransfers:
        """Staging block tables and transfer indices for host-resident sequences run together.

        `items`: (sequence, tokens computed before this step, tokens computed in it), decodes first.
        Every sequence gets staging blocks for its whole context after the step. Blocks holding
        computed tokens are staged: KV blocks copied whole, ACT blocks' computed tokens recomputed. The
        staged KV blocks take staging blocks 0, 1, ... in order, so that staging them is one gather
        straight into the buffer; the other blocks follow. The step's new tokens are written back to the
        host block their position falls in."""
        bs = self.block_size
        num_staged_kv = sum(not b.is_act for seq, computed, _ in items
                            for b in self.host_tables[seq.seq_id][:cdiv(computed, bs)])
        next_kv, next_other = 0, num_staged_kv
        tables: list[list[int]] = []
        kv_src = []
        act_blocks, act_counts, act_stage, act_first_pos = [], [], [], []
        wb_kv_src, wb_kv_dst, wb_act_rows, wb_act_dst = [], [], [], []
        row = 0
        for seq, computed, num_new in items:
            blocks = self.host_tables[seq.seq_id]
            table = []
            for i in range(cdiv(computed + num_new, bs)):
                block = blocks[i]
                if i < cdiv(computed, bs) and not block.is_act:
                    table.append(next_kv)
                    next_kv += 1
                    kv_src.append(block.block_id)
                else:
                    table.append(next_other)
                    next_other += 1
                    if i < cdiv(computed, bs):
                        act_blocks.append(block.block_id)
                        act_counts.append(min(bs, computed - i * bs))
                        act_stage.append(table[-1])
                        act_first_pos.append(i * bs)
            tables.append(table)
            for pos in range(computed, computed + num_new):
                block = blocks[pos // bs]
                if block.is_act:
                    wb_act_rows.append(row + pos - computed)
                    wb_act_dst.append(block.block_id * bs + pos % bs)
                else:
                    wb_kv_src.append(table[pos // bs] * bs + pos % bs)
                    wb_kv_dst.append(block.block_id * bs + pos % bs)
            row += num_new
        dev, host = self.spec.device, self.host_device

        def t(values, device):
            return torch.tensor(values, dtype=torch.long, device=device)

        # ACT tokens: block b's first n tokens, as flat rows; vectorised (a decode re-stages every
        # computed ACT token of the batch each step).
        counts = t(act_counts, host)
        within = torch.arange(int(counts.sum()), dtype=torch.long) - torch.repeat_interleave(
            counts.cumsum(0) - counts, counts)
        act_src = torch.repeat_interleave(t(act_blocks, host) * bs, counts) + within
        act_dst = torch.repeat_interleave(t(act_stage, host) * bs, counts) + within
        act_pos = torch.repeat_interleave(t(act_first_pos, host), counts) + within
        return MinibatchTransfers(tables, next_other, t(kv_src, host), act_src, act_dst.to(dev),
                                  act_pos.to(dev), t(wb_kv_src, dev), t(wb_kv_dst, host), t(wb_act_rows, dev),
                                  t(wb_act_dst, host))

    # --- data movement (the runner schedules these) ---------------------------------------
    def stage(self, layer: int, transfers: MinibatchTransfers, buffer: StagingBuffer) -> int:
        """Host -> device for one layer of a mini-batch: KV blocks into the staging cache, activations
        into the staging activation area (rows in order of `act_dst_dev`). Recompute happens on the
        device afterwards (the runner's compute stream). Returns the bytes moved."""
        moved = 0
        n = transfers.num_kv_blocks
        if n:  # into staging blocks 0..n-1
            pairs = [(self.host_kv[layer], buffer.kv)]  # [2, heads, blocks, block_size, head_dim]
            if self.host_kv_scales is not None:  # int8: the blocks' scales with them
                pairs.append((self.host_kv_scales[layer], buffer.kv_scales))
            for src, dst in pairs:
                if dst.device == src.device:  # one gather per (K|V, head), no temporary
                    for kind in range(2):
                        for head in range(src.shape[1]):
                            torch.index_select(src[kind, head], 0, transfers.kv_src_host, out=dst[kind, head, :n])
                else:
                    dst[:, :, :n].copy_(src.index_select(2, transfers.kv_src_host), non_blocking=True)
            moved += n * self.block_size * self.kv_bytes_per_token_per_layer
        n = transfers.num_act_tokens
        if n:
            rows = self.host_act[layer].view(-1, self.hidden_size)
            if buffer.act.device == rows.device:
                torch.index_select(rows, 0, transfers.act_src_host, out=buffer.act[:n])
            else:
                buffer.act[:n].copy_(rows.index_select(0, transfers.act_src_host), non_blocking=True)
            moved += n * self.act_bytes_per_token_per_layer
        return moved

    def write_back(self, layer: int, transfers: MinibatchTransfers, buffer: StagingBuffer,
                   activations: torch.Tensor) -> int:
        """Device -> host after a layer ran: the new tokens' K,V (from the staging cache, where
        attention wrote them) for KV blocks, their captured activations for ACT blocks. Returns the
        bytes moved."""
        heads, dim = self.spec.num_kv_heads, self.spec.head_dim
        moved = 0
        if transfers.wb_kv_dst_host.numel():
            new = buffer.kv.view(2, heads, -1, dim).index_select(2, transfers.wb_kv_src_dev).to(self.host_device)
            _index_copy(self.host_kv[layer].view(2, heads, -1, dim), 2, transfers.wb_kv_dst_host, new)
            moved += new.nbytes
            if self.host_kv_scales is not None:
                new = buffer.kv_scales.view(2, heads, -1).index_select(2, transfers.wb_kv_src_dev).to(self.host_device)
                self.host_kv_scales[layer].view(2, heads, -1).index_copy_(2, transfers.wb_kv_dst_host, new)
                moved += new.nbytes
        if transfers.wb_act_dst_host.numel():
            new = activations.index_select(0, transfers.wb_act_rows_dev).to(self.host_device)
            self.host_act[layer].view(-1, self.hidden_size).index_copy_(0, transfers.wb_act_dst_host, new)
            moved += new.numel() * new.element_size()
        return moved

    def memory_map(self) -> dict:
        """The device tier's block map (paged's), and the host tier's KV and activation blocks as
        counts and per-sequence block lists."""
        m = self.device_tier.memory_map()
        m.update(strategy=self.name, kind="hybrid", host={
            "kv_blocks": self.plan.num_kv_blocks, "kv_used": self.plan.num_kv_blocks - len(self.free_kv),
            "act_blocks": self.plan.num_act_blocks, "act_used": self.plan.num_act_blocks - len(self.free_act),
            "owners": {str(sid): [[b.block_id, int(b.is_act)] for b in t] for sid, t in self.host_tables.items()},
            "kv_block_bytes": self.plan.kv_block_bytes, "act_block_bytes": self.plan.act_block_bytes},
            staging={"buffers": len(self.staging), "bytes": sum(b.nbytes for b in self.staging)})
        return m

    # --- accounting ---------------------------------------------------------------------
    def stats(self) -> MemoryStats:
        d = self.device_tier.stats()
        bs, L = self.block_size, self.spec.num_layers
        kv_token, act_token = L * self.kv_bytes_per_token_per_layer, L * self.act_bytes_per_token_per_layer
        used_kv = self.plan.num_kv_blocks - len(self.free_kv)
        used_act = self.plan.num_act_blocks - len(self.free_act)
        host_allocated = used_kv * self.plan.kv_block_bytes + used_act * self.plan.act_block_bytes
        host_live = 0
        for seq_id, table in self.host_tables.items():
            computed = self.host_seqs[seq_id].num_computed_tokens
            for i, block in enumerate(table):
                n = min(bs, max(computed - i * bs, 0))
                host_live += n * (act_token if block.is_act else kv_token)
        staging = sum(b.nbytes for b in self.staging)
        host_kv = self.host_kv.nbytes + (0 if self.host_kv_scales is None else self.host_kv_scales.nbytes)
        host_act = self.host_act.numel() * self.host_act.element_size()
        device_physical = d.bytes_physical + staging
        total = device_physical + host_kv + host_act
        return MemoryStats(
            strategy=self.name,
            bytes_reserved=total,
            bytes_physical=total,
            bytes_allocated=d.bytes_allocated + host_allocated,
            bytes_live=d.bytes_live + host_live,
            bytes_cached=d.bytes_cached,
            num_sequences=d.num_sequences + len(self.host_tables),
            prefix_cache_queries=d.prefix_cache_queries,
            prefix_cache_hits=d.prefix_cache_hits,
            extra=dict(
                device_bytes_physical=device_physical,
                device_tier_bytes=d.bytes_physical,
                device_bytes_allocated=d.bytes_allocated,
                staging_bytes=staging,
                host_bytes_physical=host_kv + host_act,
                host_kv_bytes=host_kv,
                host_act_bytes=host_act,
                host_bytes_allocated=host_allocated,
                host_kv_blocks=self.plan.num_kv_blocks,
                host_act_blocks=self.plan.num_act_blocks,
                host_kv_blocks_used=used_kv,
                host_act_blocks_used=used_act,
                num_device_resident=d.num_sequences,
                num_host_resident=len(self.host_tables),
                act_ratio=self.act_ratio,
                act_ratio_reason=self.ratio_reason,
                **asdict(self.counters),
            ),
        )

    def release_free_memory(self) -> int:
        return self.device_tier.release_free_memory()


def _index_copy(dst: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> None:
    """index_copy_ for every storage dtype (it has no float8 kernel: those copy as bytes)."""
    if dst.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        dst, src = dst.view(torch.uint8), src.view(torch.uint8)
    dst.index_copy_(dim, index, src)


# --- construction from the engine's configuration ---------------------------------------------
def choose_act_ratio(config: EngineConfig, shape: ModelShape, host_budget: int, device: torch.device,
                     dtype: torch.dtype) -> tuple[float, str]:
    """The forced `act_ratio`, or the cost model's balance for a full host tier decoding
    `max_num_seqs` sequences (`balanced_act_ratio`); KV only, with the reason, where activations
    cannot pay (grouped-query attention)."""
    if config.act_ratio is not None:
        note = "" if shape.activations_pay_off else f" (the cost model would say: {shape.why_activations_do_not_pay()})"
        return config.act_ratio, f"forced by act_ratio={config.act_ratio}{note}"
    from kvmem.hybrid import profile as hw

    if config.hybrid_profile is not None:
        profile = hw.load(config.hybrid_profile)
    elif shape.activations_pay_off:
        with torch.random.fork_rng(devices=[]):  # measuring draws random matrices: keep the engine's RNG
            profile = hw.measure(device, dtype, matmul_shape=(256, shape.hidden_size, 2 * shape.kv_size),
                                 copy_bytes=16 * 2**20, seconds_per_measurement=0.05)
    else:
        profile = hw.DEFAULT_PROFILE  # unused: GQA decides KV only from the shape alone
    host_tokens = host_budget // (shape.num_layers * shape.kv_bytes_per_token_per_layer)
    compute = gemm_s(shape, profile, config.max_num_seqs) + decode_attention_s(shape, profile, host_tokens)
    weights = shape.weight_bytes_per_layer if config.offload_weights else 0
    decision: RatioDecision = balanced_act_ratio(shape, profile, host_tokens, compute, weights)
    reason = f"{decision.reason} [profile: {profile.name}, {profile.source}]"
    logger.info("hybrid: act_ratio %.3f: %s", decision.act_ratio, reason)
    return decision.act_ratio, reason


@dataclass(frozen=True)
class HybridOptions(StrategyOptions):
    """hybrid's resolved sizes: the host tier's bytes and the share of its blocks that hold
    activations (decided, and measured where needed, before the manager is built)."""

    host_budget_bytes: int = 0
    act_ratio: float = 0.0
    act_ratio_reason: str = ""
    shape: ModelShape | None = None
    offload_weights: bool = False


def resolve_hybrid_options(config: EngineConfig, model_config: ModelConfig, spec: KVCacheSpec,
                           max_model_len: int) -> HybridOptions:
    from kvmem.config import resolve_memory_bytes
    from kvmem.memory.registry import usable_budget

    host_budget = resolve_memory_bytes(config.host_memory, torch.device("cpu"), DEFAULT_HOST_FRACTION, "host_memory")
    host_budget = usable_budget(host_budget, spec.bytes_per_token, max_model_len, config.max_num_seqs)
    elem = torch.empty((), dtype=spec.dtype).element_size()
    shape = ModelShape.from_model_config(model_config, dtype_bytes=elem, kv_token_head_bytes=spec.token_head_bytes)
    ratio, reason = choose_act_ratio(config, shape, host_budget, spec.device, spec.dtype)
    return HybridOptions(**StrategyOptions.common_from_config(config), host_budget_bytes=host_budget,
                         act_ratio=ratio, act_ratio_reason=reason, shape=shape,
                         offload_weights=config.offload_weights)


def hybrid_from_budget(spec: KVCacheSpec, device_budget: int, max_model_len: int,
                       options: HybridOptions) -> HybridKVCacheManager:
    """The device tier, the two staging buffers and the host tier, sized from resolved numbers."""
    shape, bs, host_budget = options.shape, options.block_size, options.host_budget_bytes
    plan = HostTierPlan.for_budget(host_budget, options.act_ratio, bs, shape)
    if plan.num_blocks == 0:
        raise ValueError(f"host_memory ({host_budget} bytes) holds no host-tier block: one block of {bs} tokens "
                         f"takes {plan.kv_block_bytes} bytes as K,V and {plan.act_block_bytes} as activations; "
                         f"raise host_memory")

    staging_block_bytes = bs * (shape.kv_bytes_per_token_per_layer + shape.act_bytes_per_token_per_layer)
    staging_blocks = max(cdiv(max_model_len, bs), math.floor(STAGING_FRACTION * device_budget / (2 * staging_block_bytes)))
    staging_bytes = 2 * staging_blocks * staging_block_bytes
    block_bytes = bs * spec.bytes_per_token
    num_device_blocks = (device_budget - staging_bytes) // block_bytes
    if num_device_blocks < 1:
        raise ValueError(f"device_memory ({device_budget} bytes) must hold two staging buffers for a "
                         f"max_model_len={max_model_len} sequence ({staging_bytes} bytes: one layer's K,V and "
                         f"activations each) plus one KV block ({block_bytes} bytes); raise device_memory or "
                         f"lower max_model_len")
    manager = HybridKVCacheManager(spec, shape.hidden_size, num_device_blocks, bs, plan, staging_blocks,
                                   options.enable_prefix_caching, options.act_ratio_reason)
    logger.info("hybrid: device tier %d blocks (%d tokens) + staging %d bytes; host tier %d KV + %d ACT blocks "
                "(%d bytes of %d), act_ratio %.3f", num_device_blocks, num_device_blocks * bs, staging_bytes,
                plan.num_kv_blocks, plan.num_act_blocks, plan.bytes_used, host_budget, options.act_ratio)
    return manager
