"""Predicted prefill + decode time of a batch under a host-tier policy, from the cost model and policy code.

Policies:
- `kv-only` — FlexGen-like: every host-tier block is K,V, moved to the device for attention.
- `act-only` — every host-tier block is an activation, recomputed on the device.
- `hybrid` — the cost model's ratio (`cost_model.act_ratio_for_steps`: the balance point of
  `balanced_act_ratio`, chosen once for all the decode's steps); 0 for GQA models.

Memory layout (`plan_memory`), decided once per batch:
1. Weights stay on the device when they take at most `resident_weights_max_fraction` of it;
   otherwise they stream from the host layer by layer (FlexGen-style): the device keeps the
   embedding/lm_head and two layer buffers (the layer computing, the next one arriving).
2. What is left of the device is split: `staging_fraction` of it stages host-tier data (two
   mini-batch buffers of one layer: transferred K,V and activations, plus the K,V recomputed from
   them); the rest keeps the oldest tokens of every request as a device tier (KV that never moves).
   The number of mini-batches M is the smallest that makes two buffers fit the staging share; the
   buffers are sized as if all of a request's tokens were host-tier (an upper bound that keeps the
   layout a closed form instead of a fixed point).
3. The host tier holds the rest, placed per block (`policy.act_block_mask`, the default) or, as an
   ablation, per request (whole requests as ACT, the first round(r·B) of them). Host memory holds the
   offloaded weights too; `fits_host` says whether the batch's final host tier fits the rest.
4. Mini-batches are formed with `policy.form_minibatches` (balanced bytes and recompute FLOPs), or
   in arrival order as an ablation.

Timing (`simulate`): each decode step runs the layers in order, each layer mini-batch by mini-batch.
Three streams work in parallel — host→device link, device, device→host write-back — and a job
(layer ℓ, mini-batch i) goes through them in order:

    link:  [layer ℓ's weights, on its first mini-batch, if offloaded] + its KV + its activations
    device: recompute its activations → K,V; the layer's GEMMs (roofline) and decode attention
    write-back: the new token's K,V, or its activation where it lands in an ACT block

A link job may start only when its buffer is free (two mini-batch staging buffers: job k waits for
the device to finish job k−2; two layer weight buffers: layer g's weights wait for layer g−2). So a
balanced layer costs max(link, device) and an unbalanced one pays for its bubbles. Prefill is one pass
per layer: max(weights link, prefill compute, write-back of its host-tier K,V / activations).

Throughput = batch × output_len / (prefill + decode). These are model predictions, not measurements.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from kvmem.hybrid.cost_model import (
    ModelShape,
    RatioDecision,
    act_ratio_for_steps,
    decode_attention_s,
    gemm_s,
    prefill_attention_s,
    recompute_s,
)
from kvmem.hybrid.policy import (
    HostTierPlan,
    RequestLoad,
    act_tokens,
    form_minibatches,
    in_order_minibatches,
    is_act_block,
    minibatch_imbalance,
)
from kvmem.hybrid.profile import HardwareProfile

POLICIES = ("kv-only", "act-only", "hybrid")
PLACEMENTS = ("per-block", "per-request")
FORMATIONS = ("balanced", "in-order")


@dataclass(frozen=True)
class Workload:
    batch_size: int
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"batch_size, prompt_len and output_len must be >= 1, got {self}")

    @property
    def max_context(self) -> int:
        """Tokens each request holds at the end: the prompt and every output token."""
        return self.prompt_len + self.output_len

    @property
    def mean_decode_context(self) -> int:
        return self.prompt_len + self.output_len // 2


@dataclass(frozen=True)
class SimulatorOptions:
    block_size: int = 16
    offload_weights: bool | None = None  # None: offload when the weights take more than the fraction below
    resident_weights_max_fraction: float = 0.8
    staging_fraction: float = 0.5  # of the device memory left after weights
    placement: str = "per-block"  # per-block | per-request
    minibatch_formation: str = "balanced"  # balanced | in-order
    min_minibatches: int = 1
    step_stride: int = 1  # simulate every n-th decode step and scale (job times change slowly with context)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.minibatch_formation not in FORMATIONS:
            raise ValueError(f"minibatch_formation must be one of {FORMATIONS}, got {self.minibatch_formation!r}")
        if not 0.0 < self.staging_fraction <= 1.0:
            raise ValueError(f"staging_fraction must be in (0, 1], got {self.staging_fraction}")
        if self.block_size < 1 or self.min_minibatches < 1 or self.step_stride < 1:
            raise ValueError("block_size, min_minibatches and step_stride must be >= 1")


@dataclass
class MemoryLayout:
    """Where everything lives for one batch under one policy (step 1–4 of the module docstring)."""

    policy: str
    act_ratio: float
    ratio_reason: str
    offload_weights: bool
    device_weight_bytes: int
    staging_bytes: int
    num_minibatches: int
    device_tier_tokens_per_request: int
    act_requests: int  # per-request placement: requests whose host tier is all ACT (the rest all KV)
    host_budget_bytes: int  # host memory minus offloaded weights
    host_kv_blocks: int  # needed at the end of the batch
    host_act_blocks: int
    host_bytes_needed: int
    fits_host: bool
    plan: HostTierPlan  # the host budget divided at act_ratio (step one of HybridServe's division)


@dataclass
class LayerBreakdown:
    """One decode layer of the whole batch at the mean decode context, seconds per stream."""

    weights_link_s: float
    kv_link_s: float
    act_link_s: float
    compute_s: float  # GEMMs + attention, summed over mini-batches
    recompute_s: float
    writeback_s: float

    @property
    def link_s(self) -> float:
        return self.weights_link_s + self.kv_link_s + self.act_link_s

    @property
    def device_s(self) -> float:
        return self.compute_s + self.recompute_s

    @property
    def bound(self) -> str:
        return "link" if self.link_s >= self.device_s else "device"


@dataclass
class SimulationResult:
    model: str
    policy: str
    batch_size: int
    prompt_len: int
    output_len: int
    layout: MemoryLayout
    layer: LayerBreakdown
    minibatch_imbalance: float  # 1.0 = every mini-batch carries 1/M of the bytes and of the FLOPs
    prefill_s: float
    decode_s: float
    decode_link_busy_s: float
    decode_device_busy_s: float
    decode_recompute_s: float

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.batch_size * self.output_len / self.total_s

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.output_len - 1
        return self.batch_size * steps / self.decode_s if self.decode_s > 0 else float("inf")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer"].update(link_s=self.layer.link_s, device_s=self.layer.device_s, bound=self.layer.bound)
        d["total_s"], d["output_tokens_per_s"] = self.total_s, self.output_tokens_per_s
        d["decode_tokens_per_s"] = self.decode_tokens_per_s if self.output_len > 1 else None
        return d


def decode_contexts(workload: Workload) -> list[int]:
    """Tokens each request holds before each decode step: step s = 1 .. output_len-1 feeds output token
    s (prefill produced the first), so the cache holds prompt_len + s - 1 tokens and attention reads one more."""
    return [workload.prompt_len + s - 1 for s in range(1, workload.output_len)]


# --- memory layout --------------------------------------------------------------------------------
def _hybrid_decision(shape: ModelShape, profile: HardwareProfile, workload: Workload, device_tokens: int,
                     streamed_weight_bytes: int) -> RatioDecision:
    """The cost model's best single ratio over the decode's steps, given that each request keeps its
    first `device_tokens` tokens on the device."""
    b = workload.batch_size
    contexts = decode_contexts(workload) or [workload.prompt_len]
    host = [b * max(0, c - device_tokens) for c in contexts]
    compute = [gemm_s(shape, profile, b) + decode_attention_s(shape, profile, b * (c + 1)) for c in contexts]
    return act_ratio_for_steps(shape, profile, host, compute, streamed_weight_bytes)


def _ratio(policy: str, shape: ModelShape, profile: HardwareProfile, workload: Workload, device_tokens: int,
           streamed_weight_bytes: int) -> tuple[float, str]:
    if policy == "kv-only":
        return 0.0, "policy kv-only (FlexGen-like): every host-tier block holds K,V"
    if policy == "act-only":
        why = "" if shape.activations_pay_off else f" (worse here: {shape.why_activations_do_not_pay()})"
        return 1.0, "policy act-only: every host-tier block holds activations" + why
    if policy == "hybrid":
        d = _hybrid_decision(shape, profile, workload, device_tokens, streamed_weight_bytes)
        return d.act_ratio, d.reason
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")


def plan_memory(shape: ModelShape, profile: HardwareProfile, workload: Workload, policy: str,
                options: SimulatorOptions = SimulatorOptions()) -> MemoryLayout:
    b, end_ctx, layers = workload.batch_size, workload.max_context, shape.num_layers
    s_kv, s_act = shape.kv_bytes_per_token_per_layer, shape.act_bytes_per_token_per_layer
    offload = (options.offload_weights if options.offload_weights is not None else
               shape.weight_bytes_total > options.resident_weights_max_fraction * profile.device_memory_bytes)
    device_weights = shape.embedding_bytes + 2 * shape.weight_bytes_per_layer if offload else shape.weight_bytes_total
    device_free = profile.device_memory_bytes - device_weights
    if device_free <= 0:
        raise ValueError(f"{shape.name} needs {device_weights / 2**30:.1f} GiB of weights on the device "
                         f"({'streamed' if offload else 'resident'}), more than the {profile.device_memory_bytes / 2**30:.1f} GiB "
                         f"it has; offload the weights (offload_weights=True) or use a larger device")
    streamed = shape.weight_bytes_per_layer if offload else 0

    def split(ratio: float) -> tuple[int, int, int]:
        # A staged host-tier token: its K,V on the device (moved or recomputed), plus the activation it came from.
        per_token = s_kv + ratio * s_act
        budget = options.staging_fraction * device_free
        m = max(options.min_minibatches, math.ceil(2 * b * end_ctx * per_token / budget))
        m = min(m, b)
        staging = int(2 * math.ceil(b / m) * end_ctx * per_token)
        device_tokens = int((device_free - staging) // (b * layers * s_kv)) if device_free > staging else 0
        return m, staging, max(0, min(device_tokens, end_ctx))

    # One ratio for the whole batch (blocks keep their kind once written). The host tier depends on the
    # staging buffers, which depend on the ratio: two rounds settle it (the device tier is a small
    # share in practice).
    ratio, reason = _ratio(policy, shape, profile, workload, 0, streamed)
    for _ in range(2):
        m, staging, device_tokens = split(ratio)
        ratio, reason = _ratio(policy, shape, profile, workload, device_tokens, streamed)
    m, staging, device_tokens = split(ratio)
    if policy == "hybrid" and ratio > 0:
        # Activations need staging room (the activation beside its K,V), which the device tier pays for.
        # Where the host tier is small that can cost more than the activations save: compare the cost
        # model's layer time with KV only and its own (larger) device tier, and keep the better.
        m0, staging0, device_tokens0 = split(0.0)
        with_act = _hybrid_decision(shape, profile, workload, device_tokens, streamed)
        kv_only = _hybrid_decision(shape, profile, workload, device_tokens0, streamed)
        if kv_only.layer_s_kv_only <= with_act.layer_s:
            ratio, m, staging = 0.0, m0, staging0
            reason = (f"KV only: activations' staging buffers would move {device_tokens0 - device_tokens} tokens per "
                      f"request off the device tier, costing more than they save ({kv_only.layer_s_kv_only * 1e3:.3g} "
                      f"ms vs {with_act.layer_s * 1e3:.3g} ms per layer)")
            device_tokens = device_tokens0

    host_budget = max(0, profile.host_memory_bytes - (shape.weight_bytes_total if offload else 0))
    plan = HostTierPlan.for_budget(host_budget, ratio, options.block_size, shape)
    host_tokens = end_ctx - device_tokens
    act_requests = round(ratio * b) if options.placement == "per-request" else 0
    if options.placement == "per-block":
        kv_blocks, act_blocks = plan.request_blocks(host_tokens)
        kv_blocks, act_blocks = kv_blocks * b, act_blocks * b
    else:
        blocks = -(-host_tokens // options.block_size)
        kv_blocks, act_blocks = blocks * (b - act_requests), blocks * act_requests
    needed = kv_blocks * plan.kv_block_bytes + act_blocks * plan.act_block_bytes
    return MemoryLayout(policy, ratio, reason, offload, device_weights, staging, m, device_tokens, act_requests,
                        host_budget, kv_blocks, act_blocks, needed, needed <= host_budget, plan)


# --- per-request token split --------------------------------------------------------------------
def _split_tokens(context: int, layout: MemoryLayout, request_index: int, block_size: int,
                  placement: str) -> tuple[int, int]:
    """(KV tokens, ACT tokens) of one request's host tier when it holds `context` tokens."""
    host = max(0, context - layout.device_tier_tokens_per_request)
    if placement == "per-block":
        act = act_tokens(host, layout.act_ratio, block_size)
    else:
        act = host if request_index < layout.act_requests else 0
    return host - act, act


def _new_token_is_act(context: int, layout: MemoryLayout, request_index: int, block_size: int, placement: str) -> bool | None:
    """Where the token at position `context` lands: None on the device tier, else whether in an ACT block."""
    host_index = context - layout.device_tier_tokens_per_request
    if host_index < 0:
        return None
    if placement == "per-block":
        return is_act_block(host_index // block_size, layout.act_ratio)
    return request_index < layout.act_requests


def _form(layout: MemoryLayout, shape: ModelShape, workload: Workload, options: SimulatorOptions) -> tuple[list[list[int]], float]:
    loads = []
    for i in range(workload.batch_size):
        kv, act = _split_tokens(workload.mean_decode_context, layout, i, options.block_size, options.placement)
        loads.append(RequestLoad.of(i, shape, kv, act))
    form = form_minibatches if options.minibatch_formation == "balanced" else in_order_minibatches
    minibatches = form(loads, layout.num_minibatches)
    return [[r.request_id for r in mb] for mb in minibatches], minibatch_imbalance(minibatches)


# --- timing ---------------------------------------------------------------------------------------
@dataclass
class _Job:
    link_s: float  # without the layer's weights
    device_s: float
    recompute_s: float
    writeback_s: float
    kv_link_s: float
    act_link_s: float


def _step_jobs(context: int, minibatches: list[list[int]], layout: MemoryLayout, shape: ModelShape,
               profile: HardwareProfile, options: SimulatorOptions) -> list[_Job]:
    """One layer's mini-batch jobs for a decode step whose requests hold `context` tokens before it."""
    bw, wb_bw = profile.host_to_device_bytes_per_s, profile.device_to_host_bytes_per_s
    s_kv, s_act = shape.kv_bytes_per_token_per_layer, shape.act_bytes_per_token_per_layer
    jobs = []
    for mb in minibatches:
        kv = act = wb = 0
        for i in mb:
            k, a = _split_tokens(context, layout, i, options.block_size, options.placement)
            kv, act = kv + k, act + a
            lands = _new_token_is_act(context, layout, i, options.block_size, options.placement)
            wb += 0 if lands is None else (s_act if lands else s_kv)
        rc = recompute_s(shape, profile, act)
        compute = gemm_s(shape, profile, len(mb)) + decode_attention_s(shape, profile, len(mb) * (context + 1))
        jobs.append(_Job((kv * s_kv + act * s_act) / bw, compute + rc, rc, wb / wb_bw, kv * s_kv / bw, act * s_act / bw))
    return jobs


def _run_pipeline(steps: list[list[_Job]], num_layers: int, weights_link_s: float) -> tuple[float, float, float]:
    """Flow-shop over (step, layer, mini-batch) jobs: link → device → write-back, two staging buffers
    and two weight buffers. Returns (finish time, link busy s, device busy s)."""
    link_free = device_free = wb_free = 0.0
    dev_end: list[float] = []  # device finish time of every job so far
    layer_end: list[float] = []  # device finish time of every layer so far
    link_busy = device_busy = 0.0
    for jobs in steps:
        for _ in range(num_layers):
            for i, job in enumerate(jobs):
                start = link_free
                if len(dev_end) >= 2:
                    start = max(start, dev_end[-2])  # its staging buffer is free once job k-2 is done
                link = job.link_s
                if i == 0 and weights_link_s:
                    if len(layer_end) >= 2:
                        start = max(start, layer_end[-2])  # its weight buffer is free once layer g-2 is done
                    link += weights_link_s
                link_free = start + link
                dev_start = max(link_free, device_free)
                device_free = dev_start + job.device_s
                wb_free = max(wb_free, device_free) + job.writeback_s
                dev_end.append(device_free)
                link_busy += link
                device_busy += job.device_s
            layer_end.append(device_free)
    return max(device_free, wb_free), link_busy, device_busy


def _prefill_s(layout: MemoryLayout, shape: ModelShape, profile: HardwareProfile, workload: Workload,
               options: SimulatorOptions) -> float:
    b, p = workload.batch_size, workload.prompt_len
    weights = (shape.weight_bytes_per_layer / profile.host_to_device_bytes_per_s) if layout.offload_weights else 0.0
    compute = gemm_s(shape, profile, b * p) + prefill_attention_s(shape, profile, b, p)
    written = 0
    for i in range(b):
        kv, act = _split_tokens(p, layout, i, options.block_size, options.placement)
        written += kv * shape.kv_bytes_per_token_per_layer + act * shape.act_bytes_per_token_per_layer
    writeback = written / profile.device_to_host_bytes_per_s
    return weights + shape.num_layers * max(weights, compute, writeback)  # the first layer's weights are not hidden


def simulate(shape: ModelShape, profile: HardwareProfile, workload: Workload, policy: str,
             options: SimulatorOptions = SimulatorOptions()) -> SimulationResult:
    layout = plan_memory(shape, profile, workload, policy, options)
    minibatches, imbalance = _form(layout, shape, workload, options)
    weights_link = shape.weight_bytes_per_layer / profile.host_to_device_bytes_per_s if layout.offload_weights else 0.0

    all_steps = decode_contexts(workload)
    sampled = all_steps[::options.step_stride]
    steps = [_step_jobs(context, minibatches, layout, shape, profile, options) for context in sampled]
    finish, link_busy, device_busy = _run_pipeline(steps, shape.num_layers, weights_link)
    scale = len(all_steps) / len(sampled) if sampled else 0.0
    recompute_busy = sum(j.recompute_s for jobs in steps for j in jobs) * shape.num_layers

    mean_jobs = _step_jobs(workload.mean_decode_context, minibatches, layout, shape, profile, options)
    layer = LayerBreakdown(weights_link, sum(j.kv_link_s for j in mean_jobs), sum(j.act_link_s for j in mean_jobs),
                           sum(j.device_s - j.recompute_s for j in mean_jobs), sum(j.recompute_s for j in mean_jobs),
                           sum(j.writeback_s for j in mean_jobs))
    return SimulationResult(shape.name, policy, workload.batch_size, workload.prompt_len, workload.output_len, layout,
                            layer, imbalance, _prefill_s(layout, shape, profile, workload, options), finish * scale,
                            link_busy * scale, device_busy * scale, recompute_busy * scale)


def max_batch_that_fits(shape: ModelShape, profile: HardwareProfile, prompt_len: int, output_len: int, policy: str,
                        options: SimulatorOptions = SimulatorOptions(), limit: int = 4096) -> int:
    """The largest batch (≤ limit) whose host tier fits host memory under `policy`; 0 if none does.
    Binary search: the host bytes a batch needs grow with the batch."""
    def fits(b: int) -> bool:
        return plan_memory(shape, profile, Workload(b, prompt_len, output_len), policy, options).fits_host

    if not fits(1):
        return 0
    lo, hi = 1, limit
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
