"""Continuous batching with chunked prefill and preemption by recompute (vLLM v1's policy).

Each step has a token budget (`max_num_batched_tokens`). Running sequences go first, oldest
first: a decode takes one token, an unfinished prompt takes as much of the rest as the budget
allows. When the memory manager has no room for a running sequence, the newest running sequence
is preempted: its memory is freed and it goes back to the front of the waiting queue, to be
recomputed later (prefix caching often makes that cheap). Waiting sequences are admitted while
budget, `max_num_seqs` and memory allow, and never in a step that had to preempt.

The scheduler decides only counts of tokens; it never touches tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvmem.engine.sequence import Sequence, SequenceStatus
from kvmem.memory.base import KVCacheManager


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerCounters:
    num_preemptions: int = 0
    num_chunked_prefills: int = 0  # steps in which some prompt was computed only in part
    num_prefix_cached_tokens: int = 0


class Scheduler:
    def __init__(self, manager: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.manager = manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.counters = SchedulerCounters()

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence, after: Sequence) -> None:
        """A forked sample joins right after its parent, already holding (shared) memory."""
        seq.status = SequenceStatus.RUNNING
        self.running.insert(self.running.index(after) + 1, seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its memory."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.manager.free(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.manager.can_allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self.manager.allocate(seq, num_new)
                out.scheduled.append(ScheduledSequence(seq, num_new))
                budget -= num_new
                i += 1
                continue
            break  # seq itself was preempted: nothing after it is left to schedule

        loading: list[Sequence] = []  # admitted, waiting for prefix blocks from a tier: passed over
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_computed_tokens == 0:
                seq.num_computed_tokens = self.manager.admit(seq, reuse_prefix=seq.reuses_prefix_cache)
            if self.manager.is_loading(seq):  # others compute meanwhile; it keeps its place in the queue
                loading.append(self.waiting.popleft())
                continue
            if seq.num_preemptions == 0:  # every tier's hit, once what was loaded is known
                seq.num_cached_tokens = seq.num_computed_tokens
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.manager.can_allocate(seq, num_new):
                self.manager.free(seq)  # give back the prefix blocks admit() took
                seq.num_computed_tokens = 0
                break
            self.counters.num_prefix_cached_tokens += seq.num_computed_tokens
            self.manager.allocate(seq, num_new)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(loading))

        if any(s.seq.num_computed_tokens + s.num_new_tokens < s.seq.num_tokens for s in out.scheduled):
            self.counters.num_chunked_prefills += 1
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.counters.num_preemptions += 1
