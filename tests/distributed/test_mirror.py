"""A replica driven by rank 0's logged manager calls reaches rank 0's state: the same block tables
(slots), the same pending copies and the same accounting, for every strategy TP supports, through
admissions with prefix hits, growth, preemption-like frees, forks and releases."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from kvmem.distributed.mirror import ManagerReplica, RecordingManager
from kvmem.memory.base import KVCacheSpec, StrategyOptions
from kvmem.memory.registry import build_manager
from kvmem.memory.virtual import VirtualOptions

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=16, dtype=torch.float32, device=torch.device("cpu"))


@dataclass(eq=False)
class Seq:
    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    max_tokens: int = 64
    num_computed_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def make(strategy: str):
    options = (VirtualOptions(block_size=4, max_num_seqs=6) if strategy == "virtual"
               else StrategyOptions(block_size=4, max_num_seqs=6))
    budget = 40 * 4 * SPEC.bytes_per_token if strategy != "virtual" else 2 * 2**20
    return build_manager(strategy, SPEC, budget, 96, options)


def assert_same(rank0: RecordingManager, replica: ManagerReplica, running: list[Seq]) -> None:
    for seq in running:
        mirror = replica.sequences[seq.seq_id]
        assert rank0.block_table(seq) == replica.manager.block_table(mirror)
        assert rank0.readable_tokens(seq) == replica.manager.readable_tokens(mirror)
    assert rank0.pending_copies == replica.manager.pending_copies
    a, b = rank0.stats(), replica.manager.stats()
    for field in ("bytes_physical", "bytes_allocated", "bytes_live", "bytes_cached", "num_sequences",
                  "prefix_cache_hits"):
        assert getattr(a, field) == getattr(b, field), field


@pytest.mark.parametrize("strategy", ["paged", "static", "virtual"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replayed_calls_reach_rank0s_tables(strategy, seed):
    rng = random.Random(seed)
    rank0, replica_manager = RecordingManager(make(strategy)), make(strategy)
    replica = ManagerReplica(replica_manager)
    prefixes = [[rng.randrange(100) for _ in range(rng.randrange(4, 14))] for _ in range(3)]
    running: list[Seq] = []
    next_id = 0
    try:
        for _ in range(60):
            if len(running) < 5 and rng.random() < 0.5:  # a new request, often with a shared prefix
                seq = Seq(next_id, rng.choice(prefixes) + [rng.randrange(100) for _ in range(rng.randrange(1, 6))], 0)
                seq.num_prompt_tokens = seq.num_tokens
                next_id += 1
                seq.num_computed_tokens = rank0.admit(seq)
                n = seq.num_tokens - seq.num_computed_tokens
                if rank0.can_allocate(seq, n):
                    rank0.allocate(seq, n)
                    running.append(seq)
                else:
                    rank0.free(seq)
            for seq in list(running):
                n = seq.num_tokens - seq.num_computed_tokens
                if n == 0:
                    seq.token_ids.append(rng.randrange(100))  # "sampled"
                    n = 1
                if seq.num_tokens >= 90 or not rank0.can_allocate(seq, n) or rng.random() < 0.05:
                    rank0.free(seq)  # finished, or preempted
                    running.remove(seq)
                    continue
                rank0.allocate(seq, n)
            if strategy == "paged" and running and rng.random() < 0.1:  # n > 1: a fork shares the blocks
                parent = running[0]
                if parent.num_computed_tokens == parent.num_tokens:
                    child = Seq(next_id, list(parent.token_ids), parent.num_prompt_tokens,
                                num_computed_tokens=parent.num_computed_tokens)
                    next_id += 1
                    rank0.fork(parent, child)
                    running.append(child)
            for seq in running:  # the step ran: every scheduled token is computed
                seq.num_computed_tokens = seq.num_tokens
                rank0.on_tokens_computed(seq)
            if rng.random() < 0.05:
                rank0.release_free_memory()
            replica.replay(rank0.take_calls())
            assert_same(rank0, replica, running)
            rank0.pending_copies.clear()  # the runners drain them
            replica_manager.pending_copies.clear()
        if strategy != "static":  # static keeps no prefixes
            assert rank0.stats().prefix_cache_hits > 0  # the replay covered prefix hits
        for seq in running:
            rank0.free(seq)
        rank0.release_free_memory()
        replica.replay(rank0.take_calls())
        assert_same(rank0, replica, [])
        assert replica.sequences == {}
        assert replica_manager.stats().bytes_allocated == 0
    finally:
        rank0.close()
        replica_manager.close()


def test_a_replica_out_of_step_says_so():
    rank0, replica = RecordingManager(make("paged")), ManagerReplica(make("paged"))
    seq = Seq(0, [1, 2, 3, 4, 5], 5)
    rank0.admit(seq)
    calls = rank0.take_calls()
    calls[0].seqs[0].num_known = 3  # as if an earlier message had been lost
    with pytest.raises(RuntimeError, match="out of step"):
        replica.replay(calls)
