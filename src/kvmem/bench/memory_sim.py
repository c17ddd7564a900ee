"""The simulation of `kvmem bench memory`: one KV strategy over a request stream, no model.

The real `Scheduler` drives the real manager (built through the strategy registry, from one budget,
as the engine's is) and a fake model step: every scheduled sequence gets `num_computed_tokens +=
num_new_tokens` and `on_tokens_computed`; one whose tokens are all computed appends one output token
and, at its output length, finishes. What a strategy costs in memory is then exactly what the
engine would see, step for step.

Memory over time: bytes physical / allocated / live (`MemoryStats`) and the running, waiting and
preempted counts, sampled every step after the fake forward pass (KV written, before finished
sequences leave). Waste is reported two ways: 1 - live/allocated (fragmentation inside what
sequences hold) and 1 - live/physical (everything backed, which for `virtual` includes pages kept by
deferred reclamation). Both are time averages taken as ratios of sums over steps (sum live / sum
allocated), for the whole run and for the saturated phase (steps where requests were left waiting:
memory, not demand, was the limit). For `virtual` the kernel's count of resident bytes
(`kernel_resident_bytes()`: mincore, or smaps plus the shared pool once prefix chunks are shared) is
checked against the manager's, and the mapping time on each step's critical path is traced.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from kvmem.bench.memory_recording import STEP_SECONDS, MemoryRecorder
from kvmem.bench.memory_stream import RequestSpec
from kvmem.engine.async_engine import EngineSnapshot
from kvmem.engine.detokenizer import IncrementalDetokenizer
from kvmem.engine.scheduler import Scheduler
from kvmem.engine.sequence import Sequence, SequenceStatus
from kvmem.memory.base import KVCacheManager, KVCacheSpec, StrategyOptions
from kvmem.memory.registry import build_manager
from kvmem.memory.virtual import VirtualOptions
from kvmem.sampling_params import SamplingParams

# The registry's strategies whose memory can be simulated without a model (hybrid's host tier
# recomputes K,V from activations, which takes the model's weights).
# Listed from the baseline up, the order of the report's tables and plots.
STRATEGIES = ("static", "paged", "virtual")
GiB = 2**30


@dataclass
class SimConfig:
    """Model shape (default SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, bf16) and engine limits."""

    budget_bytes: int = GiB
    max_model_len: int = 2048
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    num_layers: int = 30
    num_kv_heads: int = 3
    head_dim: int = 64
    dtype: str = "bfloat16"
    kv_cache_dtype: str = "auto"  # what the cache stores (kvmem.attention.kv_quant): auto | fp8* | int8

    def spec(self) -> KVCacheSpec:
        from kvmem.attention.kv_quant import storage_dtype

        model_dtype = getattr(torch, self.dtype)
        stored = storage_dtype(self.kv_cache_dtype, model_dtype)
        return KVCacheSpec(self.num_layers, self.num_kv_heads, self.head_dim, model_dtype, torch.device("cpu"),
                           None if stored == model_dtype else stored)


# --- results ----------------------------------------------------------------------------------
@dataclass
class StepTrace:
    """One entry per step, sampled after the fake forward pass."""

    bytes_physical: list[int] = field(default_factory=list)
    bytes_allocated: list[int] = field(default_factory=list)
    bytes_live: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    preemptions: list[int] = field(default_factory=list)  # cumulative
    schedule_s: list[float] = field(default_factory=list)  # wall time of Scheduler.schedule()
    allocate_s: list[float] = field(default_factory=list)  # wall time of the step's manager.allocate calls
    map_critical_s: list[float] = field(default_factory=list)  # virtual: mapping on the step's path
    map_background_s: list[float] = field(default_factory=list)  # virtual: mapping by the worker

    def downsampled(self, max_points: int) -> dict:
        every = max(1, -(-len(self.running) // max_points))
        return {"every": every, **{k: v[::every] for k, v in asdict(self).items()}}


@dataclass
class LatencySummary:
    """Per-step seconds: mean, median, 99th percentile, total."""

    mean_ms: float
    p50_ms: float
    p99_ms: float
    total_s: float

    @classmethod
    def of(cls, seconds: list[float]) -> LatencySummary:
        a = np.asarray(seconds, dtype=np.float64) if seconds else np.zeros(1)
        return cls(float(a.mean() * 1e3), float(np.percentile(a, 50) * 1e3), float(np.percentile(a, 99) * 1e3),
                   float(a.sum()))


@dataclass
class StrategyResult:
    strategy: str
    label: str  # strategy plus options, e.g. "virtual (no background mapping)"
    num_requests: int
    num_finished: int
    steps: int  # steps to finish the stream: fewer = more throughput at this budget
    preemptions: int
    peak_running: int
    mean_running: float
    mean_running_saturated: float | None
    saturated_steps: int
    waste_vs_allocated: float  # 1 - sum(live) / sum(allocated), whole run
    waste_vs_physical: float  # 1 - sum(live) / sum(physical), whole run
    waste_vs_allocated_saturated: float | None
    waste_vs_physical_saturated: float | None
    mean_step_waste_vs_allocated: float  # mean over steps of the per-step ratio (steps holding memory)
    peak_bytes_physical: int
    peak_bytes_allocated: int
    peak_bytes_live: int
    budget_bytes: int
    capacity_bytes: int  # the most physical memory the strategy may hold
    bytes_per_token: int
    prefix_cache_hits: int
    wall_s: float
    schedule_latency: LatencySummary
    allocate_latency: LatencySummary
    # virtual: per kind of allocate call ("prefill": a prompt chunk, "decode": one token), summed over the
    # run: calls, allocate wall seconds, mapping seconds on the critical path
    allocate_by_kind: dict = field(default_factory=dict)
    map_latency_critical: LatencySummary | None = None
    map_latency_background: LatencySummary | None = None
    kernel_check: dict | None = None  # virtual: the kernel's resident bytes vs the manager's bytes_physical
    options: dict = field(default_factory=dict)


class _NoDetokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return ""


def make_sequence(seq_id: int, token_ids: list[int], output_len: int) -> Sequence:
    """A sequence as the engine builds one, with a detokenizer over a tokenizer that decodes nothing."""
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    return Sequence(request_id=str(seq_id), index=0, token_ids=list(token_ids), num_prompt_tokens=len(token_ids),
                    params=params, max_tokens=output_len, seq_id=seq_id,
                    detokenizer=IncrementalDetokenizer(_NoDetokenizer(), [], params))


# --- managers, sized from one budget through the registry, as the engine's are ------------------
def make_manager(strategy: str, sim: SimConfig, virtual_options: VirtualOptions | None = None) -> KVCacheManager:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    common = {"block_size": sim.block_size, "enable_prefix_caching": sim.enable_prefix_caching,
              "max_num_seqs": sim.max_num_seqs}
    options = dataclasses.replace(virtual_options or VirtualOptions(), **common) if strategy == "virtual" \
        else StrategyOptions(**common)
    return build_manager(strategy, sim.spec(), sim.budget_bytes, sim.max_model_len, options)


def close_manager(manager: KVCacheManager) -> None:
    """Give the KV memory back before the next strategy allocates its own."""
    manager.close()  # virtual: finishes the queued (un)maps, stops its worker, gives the range back
    manager.kv = None
    gc.collect()


# --- the simulation ---------------------------------------------------------------------------
def _ratio_waste(live: np.ndarray, held: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    if mask is not None:
        live, held = live[mask], held[mask]
    total = held.sum()
    return None if total == 0 else float(1.0 - live.sum() / total)


def simulate(strategy: str, stream: list[RequestSpec], sim: SimConfig, virtual_options=None, label: str | None = None,
             progress: bool = True, kernel_check_every: int = 0,
             recorder: MemoryRecorder | None = None) -> tuple[StrategyResult, StepTrace]:
    """Run the whole stream through the scheduler and `strategy`'s manager with a fake model step.
    `recorder`: also record the run for /dashboard's replay."""
    from tqdm.auto import tqdm

    manager = make_manager(strategy, sim, virtual_options)
    label = label or strategy
    try:
        if recorder is not None:
            recorder.start(label)
        result = _simulate(manager, strategy, stream, sim, label, progress, kernel_check_every, tqdm, recorder)
        if recorder is not None:
            recorder.finish(label)
        return result
    finally:
        close_manager(manager)


def _simulate(manager, strategy, stream, sim, label, progress, kernel_check_every, tqdm, recorder=None):
    scheduler = Scheduler(manager, sim.max_num_seqs, sim.max_num_batched_tokens)
    is_virtual = strategy == "virtual"
    # Time every allocate the scheduler makes (an instance attribute shadows the method; the class is
    # untouched), and for virtual split the mapping time on the critical path by prefill / decode.
    by_kind = {k: {"calls": 0, "allocate_s": 0.0, "map_critical_s": 0.0} for k in ("prefill", "decode")}
    step_allocate = [0.0]
    real_allocate = manager.allocate

    def timed_allocate(seq, num_new_tokens):
        kind = by_kind["prefill" if seq.num_computed_tokens < seq.num_prompt_tokens else "decode"]
        crit = manager.mapper.critical_seconds if is_virtual else 0.0
        t0 = time.perf_counter()
        real_allocate(seq, num_new_tokens)
        dt = time.perf_counter() - t0
        step_allocate[0] += dt
        kind["calls"] += 1
        kind["allocate_s"] += dt
        if is_virtual:
            kind["map_critical_s"] += manager.mapper.critical_seconds - crit

    manager.allocate = timed_allocate
    pending = deque(sorted(range(len(stream)), key=lambda i: stream[i].arrival_step))
    output_len: dict[int, int] = {}
    trace = StepTrace()
    kernel_checks: list[dict] = []
    finished = step = prompt_tokens = generated = 0
    prev_crit = prev_bg = 0.0
    start = time.perf_counter()
    bar = tqdm(total=len(stream), desc=f"{label:<32}", unit="req", disable=not progress, leave=True,
               mininterval=0.5, file=sys.stderr)
    while finished < len(stream):
        while pending and stream[pending[0]].arrival_step <= step:
            i = pending.popleft()
            seq = make_sequence(i, stream[i].prompt_token_ids, stream[i].output_len)
            output_len[seq.seq_id] = stream[i].output_len
            scheduler.add(seq)
        t0 = time.perf_counter()
        out = scheduler.schedule()
        trace.schedule_s.append(time.perf_counter() - t0)
        trace.allocate_s.append(step_allocate[0])
        step_allocate[0] = 0.0
        if out.is_empty and scheduler.waiting and not scheduler.running:
            seq = scheduler.waiting[0]
            raise RuntimeError(f"{label}: request {seq.request_id} ({seq.num_tokens} tokens) can never fit "
                               f"(max {manager.max_tokens_per_sequence} tokens per sequence)")
        # The fake forward pass: every scheduled token's KV is now written.
        for s in out.scheduled:
            prompt_tokens += max(0, min(s.num_new_tokens, s.seq.num_prompt_tokens - s.seq.num_computed_tokens))
            s.seq.num_computed_tokens += s.num_new_tokens
            manager.on_tokens_computed(s.seq)
        st = manager.stats()
        trace.bytes_physical.append(st.bytes_physical)
        trace.bytes_allocated.append(st.bytes_allocated)
        trace.bytes_live.append(st.bytes_live)
        trace.running.append(len(scheduler.running))
        trace.waiting.append(len(scheduler.waiting))
        trace.preemptions.append(scheduler.counters.num_preemptions)
        if recorder is not None and recorder.wants(step):
            snapshot = EngineSnapshot(
                time=step * STEP_SECONDS, memory=st, num_requests=len(scheduler.running) + len(scheduler.waiting),
                num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
                num_preemptions=scheduler.counters.num_preemptions, num_prompt_tokens=prompt_tokens,
                num_generation_tokens=generated, num_steps=step)
            recorder.frame(label, step, manager, [*scheduler.running, *scheduler.waiting], snapshot)
        if is_virtual:
            crit, bg = st.extra["map_seconds_critical"], st.extra["map_seconds_background"]
            trace.map_critical_s.append(crit - prev_crit)
            trace.map_background_s.append(bg - prev_bg)
            prev_crit, prev_bg = crit, bg
            if kernel_check_every and step and step % kernel_check_every == 0:
                kernel_checks.append(_kernel_check(manager, step))
        # Sampling: a sequence with all its tokens computed gets one more (any id); at its length it ends.
        done = 0
        for s in out.scheduled:
            seq = s.seq
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prompt chunk: no token yet
            seq.token_ids.append(100 + seq.num_tokens % 1000)
            generated += 1
            if seq.num_output_tokens >= output_len[seq.seq_id]:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "length"
                scheduler.remove(seq)
                done += 1
        finished += done
        step += 1
        if done:
            bar.update(done)
            bar.set_postfix(step=step, running=trace.running[-1], refresh=False)
    bar.close()
    wall = time.perf_counter() - start

    end_stats = manager.stats()
    kernel = None
    if is_virtual:
        kernel_checks.append(_kernel_check(manager, step))
        kernel = {"end_kernel_resident_bytes": kernel_checks[-1]["kernel_resident_bytes"],
                  "end_manager_bytes_physical": kernel_checks[-1]["manager_bytes_physical"],
                  "match": all(c["match"] for c in kernel_checks), "checks": kernel_checks}

    live = np.asarray(trace.bytes_live, dtype=np.float64)
    alloc = np.asarray(trace.bytes_allocated, dtype=np.float64)
    phys = np.asarray(trace.bytes_physical, dtype=np.float64)
    running = np.asarray(trace.running)
    saturated = np.asarray(trace.waiting) > 0
    holding = alloc > 0
    per_step = 1.0 - live[holding] / alloc[holding]
    spec = manager.spec
    capacity = end_stats.bytes_capacity or end_stats.bytes_physical
    options = asdict(manager.options) if is_virtual else {}
    result = StrategyResult(
        strategy=strategy, label=label, num_requests=len(stream), num_finished=finished, steps=step,
        preemptions=scheduler.counters.num_preemptions, peak_running=int(running.max()),
        mean_running=float(running.mean()),
        mean_running_saturated=float(running[saturated].mean()) if saturated.any() else None,
        saturated_steps=int(saturated.sum()),
        waste_vs_allocated=_ratio_waste(live, alloc) or 0.0, waste_vs_physical=_ratio_waste(live, phys) or 0.0,
        waste_vs_allocated_saturated=_ratio_waste(live, alloc, saturated) if saturated.any() else None,
        waste_vs_physical_saturated=_ratio_waste(live, phys, saturated) if saturated.any() else None,
        mean_step_waste_vs_allocated=float(per_step.mean()) if len(per_step) else 0.0,
        peak_bytes_physical=int(phys.max()), peak_bytes_allocated=int(alloc.max()), peak_bytes_live=int(live.max()),
        budget_bytes=sim.budget_bytes, capacity_bytes=int(capacity), bytes_per_token=spec.bytes_per_token,
        prefix_cache_hits=end_stats.prefix_cache_hits, wall_s=wall,
        schedule_latency=LatencySummary.of(trace.schedule_s),
        allocate_latency=LatencySummary.of(trace.allocate_s), allocate_by_kind=by_kind,
        map_latency_critical=LatencySummary.of(trace.map_critical_s) if is_virtual else None,
        map_latency_background=LatencySummary.of(trace.map_background_s) if is_virtual else None,
        kernel_check=kernel, options=options)
    return result, trace


def _kernel_check(manager, step: int) -> dict:
    kernel = manager.kernel_resident_bytes()  # drains queued background maps first
    ours = manager.stats().bytes_physical
    if getattr(manager, "scales", None) is not None:
        # int8: the manager counts its scales per mapped token; their pages are backed on first
        # write, and nothing writes KV here, so the kernel sees the KV pages alone: compare those.
        ours -= manager.mapped_chunks * manager.layout.page_tokens * manager.spec.scale_bytes_per_token
    method = "mincore" if getattr(manager, "pool", None) is None else "smaps Anonymous + shared pool"
    return {"step": step, "kernel_resident_bytes": int(kernel), "manager_bytes_physical": int(ours),
            "match": kernel == ours, "method": method}
