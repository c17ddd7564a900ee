"""The scheduler's policy: token budget, chunked prefill, preemption of the newest, admission."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmem.engine.scheduler import Scheduler
from kvmem.engine.sequence import SequenceStatus
from kvmem.memory.base import KVCacheSpec
from kvmem.memory.paged import PagedKVCacheManager
from tests.memory.test_paged import FakeSeq

SPEC = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))


@dataclass(eq=False)
class Seq(FakeSeq):
    """A sequence as the scheduler sees it: the memory test's fake plus scheduling state."""

    num_cached_tokens: int = 0
    num_preemptions: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    reuses_prefix_cache: bool = True


def run_step(sched: Scheduler):
    """Schedule, then do what the engine does: advance computed tokens, 'sample' a token."""
    out = sched.schedule()
    for s in out.scheduled:
        s.seq.num_computed_tokens += s.num_new_tokens
        sched.manager.on_tokens_computed(s.seq)
        if s.seq.num_computed_tokens == s.seq.num_tokens:
            s.seq.token_ids.append(0)
    return out


def test_budget_chunks_long_prompts_and_decodes_go_first() -> None:
    mgr = PagedKVCacheManager(SPEC, num_blocks=64, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(mgr, max_num_seqs=8, max_num_batched_tokens=10)
    short, long = Seq([1, 2, 3]), Seq(list(range(25)))
    sched.add(short)
    sched.add(long)
    out = run_step(sched)
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(short, 3), (long, 7)]
    out = run_step(sched)  # short decodes (1), long gets the rest of the budget
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(short, 1), (long, 9)]
    assert sched.counters.num_chunked_prefills == 2
    assert all(s.num_new_tokens > 0 for s in out.scheduled)
    assert out.num_batched_tokens <= 10


def test_preempts_newest_and_admits_nobody_that_step() -> None:
    mgr = PagedKVCacheManager(SPEC, num_blocks=4, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(mgr, max_num_seqs=8, max_num_batched_tokens=64)
    old, new, waiting = Seq([1, 2, 3, 4]), Seq([5, 6, 7, 8, 9, 10, 11, 12]), Seq([13])
    sched.add(old)
    sched.add(new)
    run_step(sched)  # old: 1 block, new: 2 blocks, 1 left
    assert mgr.pool.num_free == 1
    sched.add(waiting)
    out = run_step(sched)  # old needs a 2nd block (takes the last), new needs a 3rd: preempt new
    assert out.preempted == [new]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0
    assert list(sched.waiting) == [new, waiting]  # the preempted goes first
    assert [s.seq for s in out.scheduled] == [old]
    assert sched.counters.num_preemptions == 1


def test_max_num_seqs_caps_admission() -> None:
    mgr = PagedKVCacheManager(SPEC, num_blocks=64, block_size=4)
    sched = Scheduler(mgr, max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [Seq([i]) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = run_step(sched)
    assert [s.seq for s in out.scheduled] == seqs[:2]
    sched.remove(seqs[0])
    out = run_step(sched)
    assert seqs[2] in [s.seq for s in out.scheduled]


def test_failed_admission_returns_prefix_blocks() -> None:
    mgr = PagedKVCacheManager(SPEC, num_blocks=3, block_size=2)
    sched = Scheduler(mgr, max_num_seqs=8, max_num_batched_tokens=64)
    first = Seq([1, 2, 3, 4, 5])
    sched.add(first)
    run_step(sched)
    sched.remove(first)  # its two full blocks stay cached
    big = Seq([1, 2, 3, 4, 9, 9, 9, 9, 9])  # prefix hit on 2 blocks, but needs 5 in all
    sched.add(big)
    out = run_step(sched)
    assert out.is_empty and big.num_computed_tokens == 0
    assert mgr.pool.num_free == 3
    mgr.pool.check_invariants()
