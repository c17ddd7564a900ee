"""The decode attention microbenchmark of `kvmem bench memory`: virtual vs paged KV layout.

`batched_attention` for one layer over a batch of sequences, virtual (in place on contiguous slots)
vs paged (block gather), same K/V content, outputs compared. Equal lengths in consecutive slots is
virtual's best case (one strided bmm per KV head); the "ragged" batch (lengths spread over
[ctx/2, ctx]) takes its per-sequence path, as a real decode batch mostly does. Calls are interleaved
paged/virtual; the min of the repeats is the headline (on a shared machine the median mostly
measures the neighbours), the median is reported beside it. Per-step figures multiply by the
model's layers.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from kvmem.bench.memory_sim import close_manager, make_sequence
from kvmem.memory.base import KVCacheSpec
from kvmem.memory.paged import PagedKVCacheManager
from kvmem.memory.virtual import VirtualOptions


@dataclass
class AttentionConfig:
    batch: int = 32
    contexts: tuple[int, ...] = (1024, 4096)
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    dtype: str = "bfloat16"
    warmup: int = 3
    repeats: int = 20
    ragged: bool = True  # also a batch whose lengths are spread over [ctx/2, ctx]
    model_layers: int = 30  # for the per-step extrapolation
    seed: int = 0


@dataclass
class AttentionCase:
    context: int
    ragged: bool
    batch: int
    context_lens: list[int]
    paged_ms_median: float
    paged_ms_min: float
    virtual_ms_median: float
    virtual_ms_min: float
    speedup_median: float  # paged / virtual
    speedup_min: float  # the headline: the least disturbed repeat of each, on a shared machine
    per_step_paged_ms: float  # min x model_layers
    per_step_virtual_ms: float
    metadata_build_ms: dict  # per step, not per layer
    max_abs_diff: float  # virtual vs paged output
    max_abs_diff_vs_reference: float  # paged vs the float32 per-sequence reference
    outputs_match: bool


def _attention_managers(cfg: AttentionConfig, context_lens: list[int], max_ctx: int):
    from kvmem.memory.virtual import VirtualKVCacheManager, VirtualLayout
    from kvmem.memory.vmm_cpu import PAGE_SIZE

    # One layer: per-layer cost does not depend on how many other layers the cache holds.
    spec = KVCacheSpec(1, cfg.num_kv_heads, cfg.head_dim, getattr(torch, cfg.dtype), torch.device("cpu"))
    block = 16
    paged = PagedKVCacheManager(spec, sum(-(-n // block) for n in context_lens), block, enable_prefix_caching=False)
    layout = VirtualLayout.build(spec, cfg.batch, max_ctx, PAGE_SIZE)
    budget = cfg.batch * (layout.max_len // layout.page_tokens) * layout.chunk_bytes * layout.num_regions
    virtual = VirtualKVCacheManager(spec, cfg.batch, max_ctx, budget,
                                    VirtualOptions(background_mapping=False), enable_prefix_caching=False)
    return paged, virtual


def _flat_slots(table: list[int], block_size: int, length: int) -> torch.Tensor:
    pos = torch.arange(length)
    return torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size


def attention_case(cfg: AttentionConfig, context: int, ragged: bool) -> AttentionCase:
    from kvmem.attention.metadata import AttentionMetadata
    from kvmem.attention.torch_attention import batched_attention, reference_attention, write_kv

    gen = torch.Generator().manual_seed(cfg.seed + context + ragged)
    dtype = getattr(torch, cfg.dtype)
    if ragged:
        lens = torch.randint(context // 2, context + 1, (cfg.batch,), generator=gen).tolist()
    else:
        lens = [context] * cfg.batch
    paged, virtual = _attention_managers(cfg, lens, context)
    try:
        seqs = [make_sequence(i, [100 + (i + j) % 1000 for j in range(n)], 1) for i, n in enumerate(lens)]
        kv_hist = [(torch.randn(n - 1, cfg.num_kv_heads, cfg.head_dim, generator=gen).to(dtype),
                    torch.randn(n - 1, cfg.num_kv_heads, cfg.head_dim, generator=gen).to(dtype)) for n in lens]
        q = torch.randn(cfg.batch, cfg.num_heads, cfg.head_dim, generator=gen).to(dtype)
        k_new = torch.randn(cfg.batch, cfg.num_kv_heads, cfg.head_dim, generator=gen).to(dtype)
        v_new = torch.randn(cfg.batch, cfg.num_kv_heads, cfg.head_dim, generator=gen).to(dtype)
        scale = cfg.head_dim ** -0.5
        metas, build_ms, outputs = {}, {}, {}
        for m in (paged, virtual):
            tables = []
            for seq, n, (kh, vh) in zip(seqs, lens, kv_hist):
                seq.num_computed_tokens = 0
                m.admit(seq)
                m.allocate(seq, n)
                table = m.block_table(seq)
                tables.append(table)
                k_cache, v_cache = m.layer_cache(0)
                write_kv(kh, vh, k_cache, v_cache, _flat_slots(table, m.block_size, n - 1))
            t0 = time.perf_counter()
            # The torch paths, whose speed depends on the layout (the native kernel reads both in place).
            metas[m.name] = AttentionMetadata.build(tables, [n - 1 for n in lens], [1] * len(lens), m.block_size,
                                                    torch.device("cpu"), in_place_decode=m.contiguous_slots,
                                                    chunk_tokens=m.chunk_tokens, native_kernel=False)
            build_ms[m.name] = (time.perf_counter() - t0) * 1e3
        if virtual.kernel_resident_bytes() < sum(lens) * virtual.spec.bytes_per_token:
            raise RuntimeError("virtual: the kernel reports fewer resident bytes than the KV written")

        def call(m):
            k_cache, v_cache = m.layer_cache(0)
            return batched_attention(q, k_new, v_new, k_cache, v_cache, metas[m.name], scale)

        times: dict[str, list[float]] = {"paged": [], "virtual": []}
        with torch.inference_mode():
            for m in (paged, virtual):
                outputs[m.name] = call(m).clone()
                for _ in range(cfg.warmup):
                    call(m)
            for _ in range(cfg.repeats):  # interleaved, so noise from a busy machine hits both alike
                for m in (paged, virtual):
                    t0 = time.perf_counter()
                    call(m)
                    times[m.name].append(time.perf_counter() - t0)
            k_cache, v_cache = paged.layer_cache(0)
            ref = reference_attention(q, k_new, v_new, k_cache, v_cache, metas["paged"], scale)
        diff = (outputs["virtual"].float() - outputs["paged"].float()).abs().max().item()
        diff_ref = (outputs["paged"].float() - ref.float()).abs().max().item()
        match = bool(torch.allclose(outputs["virtual"].float(), outputs["paged"].float(), atol=2e-2, rtol=2e-2))
        pm, vm = statistics.median(times["paged"]) * 1e3, statistics.median(times["virtual"]) * 1e3
        pmin, vmin = min(times["paged"]) * 1e3, min(times["virtual"]) * 1e3
        return AttentionCase(context, ragged, cfg.batch, lens, pm, pmin, vm, vmin, pm / vm, pmin / vmin,
                             pmin * cfg.model_layers, vmin * cfg.model_layers, build_ms, diff, diff_ref, match)
    finally:
        close_manager(paged)
        close_manager(virtual)


def run_attention(cfg: AttentionConfig) -> dict:
    load_before = list(os.getloadavg())
    cases = []
    for ctx in cfg.contexts:
        for ragged in ((False, True) if cfg.ragged else (False,)):
            cases.append(attention_case(cfg, ctx, ragged))
    return {"config": asdict(cfg), "torch_threads": torch.get_num_threads(), "loadavg_before": load_before,
            "loadavg_after": list(os.getloadavg()), "cases": [asdict(c) for c in cases]}
