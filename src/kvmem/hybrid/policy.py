"""Dividing the host tier between KV and activation (ACT) blocks, and forming balanced mini-batches.

HybridServe divides host memory in two steps:

1. The ratio: the cost model (`cost_model.balanced_act_ratio`) gives r, the fraction of host-tier
   blocks kept as activations. `HostTierPlan.for_budget` turns a byte budget and r into a number of KV
   blocks and ACT blocks (a block is `block_size` tokens across all layers, as in kvmem's paged cache).
2. Placement: which of a request's host-tier blocks are ACT. `act_block_mask` spreads them evenly
   over each request, so every request, every prefix of a request and therefore every mini-batch
   carries the ratio r: the link and the device stay balanced whichever requests run together.

Mini-batches (`form_minibatches`): a decode step runs its requests in mini-batches so that one
mini-batch's transfers overlap another's compute. Requests differ (lengths, placements), so they are
grouped so that each mini-batch gets an equal share of both the bytes to transfer and the FLOPs to
recompute; the greedy is documented on the function.

Pure Python and deterministic: no torch, no randomness, same input -> same output.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from kvmem.hybrid.cost_model import ModelShape


def _check_ratio(act_ratio: float) -> None:
    if not 0.0 <= act_ratio <= 1.0:
        raise ValueError(f"act_ratio must be in [0, 1], got {act_ratio}")


# --- placement within a request ---------------------------------------------------------------
def is_act_block(index: int, act_ratio: float) -> bool:
    """Whether a request's `index`-th host-tier block (0-based) holds activations.

    Block i is ACT iff round((i + 1)·r) > round(i·r) (rounding half up): ACT blocks are spread evenly
    (Bresenham), the first n blocks hold round(n·r) of them — within half a block of the ratio, for a
    short request too — and block i is decided from i and r alone, so a growing request places each
    new block without looking back.
    """
    return _num_act_blocks(index + 1, act_ratio) > _num_act_blocks(index, act_ratio)


def _num_act_blocks(num_blocks: int, act_ratio: float) -> int:
    """ACT blocks among a request's first `num_blocks` host-tier blocks: round(n·r), half up."""
    return math.floor(num_blocks * act_ratio + 0.5)


def act_block_mask(num_blocks: int, act_ratio: float) -> list[bool]:
    """For each of a request's `num_blocks` host-tier blocks, True where it holds activations."""
    _check_ratio(act_ratio)
    return [is_act_block(i, act_ratio) for i in range(num_blocks)]


def act_tokens(host_tokens: int, act_ratio: float, block_size: int) -> int:
    """How many of a request's `host_tokens` host-tier tokens sit in ACT blocks (the last block may be
    partial)."""
    _check_ratio(act_ratio)
    if host_tokens <= 0:
        return 0
    full_blocks, partial = divmod(host_tokens, block_size)
    count = _num_act_blocks(full_blocks, act_ratio) * block_size
    if partial and is_act_block(full_blocks, act_ratio):
        count += partial
    return count


# --- the host tier's two pools ----------------------------------------------------------------
@dataclass(frozen=True)
class HostTierPlan:
    """How many KV blocks and ACT blocks the host tier holds: step one of the division.

    A KV block holds `block_size` tokens' K and V in every layer; an ACT block the same tokens'
    activations (s_act per token per layer). Sizes follow from `ModelShape`; the counts never exceed
    the budget: num_kv_blocks · kv_block_bytes + num_act_blocks · act_block_bytes ≤ budget.
    """

    num_kv_blocks: int
    num_act_blocks: int
    kv_block_bytes: int
    act_block_bytes: int
    block_size: int
    act_ratio: float  # the ratio asked for; num_act_blocks is round(num_blocks · act_ratio) or one less
    budget_bytes: int

    @classmethod
    def for_budget(cls, budget_bytes: int, act_ratio: float, block_size: int, shape: ModelShape) -> "HostTierPlan":
        """The most blocks that fit `budget_bytes` with a fraction `act_ratio` of them ACT blocks."""
        _check_ratio(act_ratio)
        if budget_bytes < 0:
            raise ValueError(f"host budget must be >= 0 bytes, got {budget_bytes}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        kv_b = block_size * shape.num_layers * shape.kv_bytes_per_token_per_layer
        act_b = block_size * shape.num_layers * shape.act_bytes_per_token_per_layer
        mean_block_bytes = (1 - act_ratio) * kv_b + act_ratio * act_b
        num_blocks = int(budget_bytes // mean_block_bytes)
        num_act = _num_act_blocks(num_blocks, act_ratio)  # the count act_block_mask gives n blocks
        num_kv = num_blocks - num_act
        # Float rounding in mean_block_bytes may overshoot by a block: give back from whichever pool
        # is over its share until the plan fits.
        while num_kv * kv_b + num_act * act_b > budget_bytes:
            total = num_kv + num_act
            if num_act > 0 and (num_kv == 0 or num_act / total > act_ratio):
                num_act -= 1
            else:
                num_kv -= 1
        return cls(num_kv, num_act, kv_b, act_b, block_size, act_ratio, int(budget_bytes))

    @property
    def num_blocks(self) -> int:
        return self.num_kv_blocks + self.num_act_blocks

    @property
    def bytes_used(self) -> int:
        return self.num_kv_blocks * self.kv_block_bytes + self.num_act_blocks * self.act_block_bytes

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def fits(self, kv_blocks: int, act_blocks: int) -> bool:
        """Whether requests needing these many blocks of each kind fit the two pools."""
        return kv_blocks <= self.num_kv_blocks and act_blocks <= self.num_act_blocks

    def request_blocks(self, host_tokens: int) -> tuple[int, int]:
        """(KV blocks, ACT blocks) of one request with `host_tokens` host-tier tokens, placed by
        `act_block_mask` at this plan's ratio."""
        num_blocks = -(-host_tokens // self.block_size)
        num_act = _num_act_blocks(num_blocks, self.act_ratio)
        return num_blocks - num_act, num_act


# --- mini-batches -----------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestLoad:
    """What one request costs per layer of a decode step: host->device bytes of its host-tier blocks
    (K,V of KV blocks + activations of ACT blocks) and FLOPs to recompute its ACT tokens."""

    request_id: Hashable
    transfer_bytes: int
    recompute_flops: int

    @classmethod
    def of(cls, request_id: Hashable, shape: ModelShape, kv_tokens: int, act_tokens: int) -> "RequestLoad":
        return cls(request_id, kv_tokens * shape.kv_bytes_per_token_per_layer + act_tokens * shape.act_bytes_per_token_per_layer,
                   act_tokens * shape.recompute_flops_per_token_per_layer)


def _normalised(requests: Sequence[RequestLoad]) -> list[tuple[float, float]]:
    """Each request's share of the batch's total bytes and of its total FLOPs (0 where a total is 0)."""
    total_b = sum(r.transfer_bytes for r in requests)
    total_f = sum(r.recompute_flops for r in requests)
    return [(r.transfer_bytes / total_b if total_b else 0.0, r.recompute_flops / total_f if total_f else 0.0)
            for r in requests]


def form_minibatches(requests: Sequence[RequestLoad], num_minibatches: int) -> list[list[RequestLoad]]:
    """Partition `requests` into at most `num_minibatches` mini-batches with balanced bytes and FLOPs.

    Each request is a 2-vector (its share of the batch's transfer bytes, its share of the recompute
    FLOPs); a mini-batch's load in each coordinate ideally is 1/M. Greedy, LPT-style for vectors:
    requests in decreasing order of their larger share (ties: input order), each to the mini-batch
    whose larger coordinate after adding it is smallest (ties: fewer requests, then lower index).
    Bound: no mini-batch's larger coordinate exceeds 2/M + the largest request share (the chosen
    mini-batch had the least max-load, and max ≤ sum, whose mean over mini-batches is 2/M).

    Every request appears in exactly one mini-batch; empty mini-batches are dropped; within a
    mini-batch requests keep their input order. Deterministic.
    """
    if num_minibatches <= 0:
        raise ValueError(f"num_minibatches must be positive, got {num_minibatches}")
    shares = _normalised(requests)
    order = sorted(range(len(requests)), key=lambda i: (-max(shares[i]), i))
    loads = [[0.0, 0.0] for _ in range(num_minibatches)]
    members: list[list[int]] = [[] for _ in range(num_minibatches)]
    for i in order:
        b, f = shares[i]
        best = min(range(num_minibatches),
                   key=lambda m: (max(loads[m][0] + b, loads[m][1] + f), len(members[m]), m))
        loads[best][0] += b
        loads[best][1] += f
        members[best].append(i)
    return [[requests[i] for i in sorted(m)] for m in members if m]


def in_order_minibatches(requests: Sequence[RequestLoad], num_minibatches: int) -> list[list[RequestLoad]]:
    """The naive baseline: consecutive equal-count chunks in arrival order (what a static batcher does)."""
    if num_minibatches <= 0:
        raise ValueError(f"num_minibatches must be positive, got {num_minibatches}")
    per = -(-len(requests) // num_minibatches) if requests else 1
    return [list(requests[i:i + per]) for i in range(0, len(requests), per)]


def minibatch_imbalance(minibatches: Sequence[Sequence[RequestLoad]]) -> float:
    """M × the largest share (of bytes or of FLOPs) any one mini-batch carries: 1.0 is a perfect split,
    M means one mini-batch carries everything of some kind."""
    flat = [r for mb in minibatches for r in mb]
    if not flat:
        return 1.0
    shares = _normalised(flat)
    worst, k = 0.0, 0
    for mb in minibatches:
        b = sum(shares[k + j][0] for j in range(len(mb)))
        f = sum(shares[k + j][1] for j in range(len(mb)))
        worst, k = max(worst, b, f), k + len(mb)
    return worst * len(minibatches)
