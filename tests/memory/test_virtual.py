"""virtual (vAttention): page arithmetic, and random request lifecycles checked against the
kernel's own count of resident pages (mincore), not only the manager's."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvmem.engine.detokenizer import IncrementalDetokenizer
from kvmem.engine.sequence import Sequence
from kvmem.memory.base import KVCacheSpec, NoFreeMemory
from kvmem.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU backend is Linux's mmap")

from kvmem.memory.virtual import VirtualKVCacheManager, VirtualLayout, VirtualOptions  # noqa: E402

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32, device=torch.device("cpu"))
PAGE_TOKENS = 64  # 4096 / (16 * 4 bytes)


class _NoDetok:
    def decode(self, ids, skip_special_tokens=True):
        return ""


_seq_ids = itertools.count()


def make_seq(token_ids: list[int]) -> Sequence:
    params = SamplingParams(max_tokens=1000)
    return Sequence(request_id="r", index=0, token_ids=list(token_ids), num_prompt_tokens=len(token_ids),
                    params=params, max_tokens=1000, detokenizer=IncrementalDetokenizer(_NoDetok(), [], params),
                    seq_id=next(_seq_ids))


def make_manager(num_slots=4, max_len=256, budget_chunks=8, **options) -> VirtualKVCacheManager:
    layout = VirtualLayout.build(SPEC, num_slots, max_len, 4096)
    budget = budget_chunks * layout.chunk_bytes * layout.num_regions
    return VirtualKVCacheManager(SPEC, num_slots, max_len, budget, VirtualOptions(**options))


# --- page arithmetic ------------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim, dtype, page_tokens", [
    (64, torch.bfloat16, 32),  # SmolLM2: 128 bytes a token a head, 32 in a 4 KiB page
    (64, torch.float32, 16),
    (128, torch.bfloat16, 16),  # Llama
    (80, torch.bfloat16, 128),  # 160 bytes: 128 tokens fill 5 pages exactly
])
def test_a_chunk_holds_a_whole_number_of_tokens(head_dim, dtype, page_tokens):
    spec = KVCacheSpec(30, 3, head_dim, dtype, torch.device("cpu"))
    layout = VirtualLayout.build(spec, num_slots=8, max_model_len=1000, page_size=4096)
    assert layout.page_tokens == page_tokens
    assert layout.chunk_bytes % 4096 == 0
    assert layout.max_len % page_tokens == 0 and layout.max_len >= 1000
    assert layout.num_regions == 30 * 2 * 3
    assert layout.total_bytes == 180 * 8 * layout.max_len * head_dim * dtype.itemsize


def test_waste_is_below_one_chunk_and_the_lookahead_per_sequence():
    m = make_manager(budget_chunks=8)
    seq = make_seq(list(range(100)))
    m.admit(seq)
    m.allocate(seq, 100)
    seq.num_computed_tokens = 100
    s = m.stats()
    assert s.bytes_allocated >= s.bytes_live
    assert s.bytes_allocated - s.bytes_live < PAGE_TOKENS * SPEC.bytes_per_token * 2  # < 1 chunk + look-ahead


# --- configuration errors -------------------------------------------------------------------------
def test_a_reservation_beyond_the_address_space_is_a_clear_error():
    with pytest.raises(ValueError, match="address space|reserve"):
        VirtualKVCacheManager(SPEC, num_slots=2**40, max_model_len=2**20, physical_budget_bytes=2**30)


def test_a_budget_below_one_chunk_is_a_clear_error():
    with pytest.raises(ValueError, match="kv_cache_memory"):
        VirtualKVCacheManager(SPEC, num_slots=2, max_model_len=256, physical_budget_bytes=1000)


# --- each optimization does what it says --------------------------------------------------------
def test_deferred_reclamation_keeps_pages_and_best_fit_reuses_them():
    m = make_manager(lookahead_tokens=0)
    a = make_seq(list(range(1, 130)))  # 129 tokens: 3 chunks
    m.admit(a)
    m.allocate(a, 129)
    a.num_computed_tokens = 129
    slot = m.block_table(a)[0]
    m.free(a)
    assert m.kernel_resident_bytes() == m.stats().bytes_physical == 3 * m.chunk_set_bytes  # kept
    b = make_seq([500] + list(range(1, 100)))  # no common prefix; needs 2 chunks: best fit is a's slot
    assert m.admit(b) == 0 and m.block_table(b)[0] == slot
    m.allocate(b, 100)
    assert m.stats().extra["map_calls"] == 1  # nothing new mapped
    m.free(b)
    assert m.release_free_memory() == 3 * m.chunk_set_bytes
    assert m.kernel_resident_bytes() == 0


def test_without_deferred_reclamation_pages_go_back_at_once():
    m = make_manager(deferred_reclamation=False)
    a = make_seq(list(range(1, 70)))
    m.admit(a)
    m.allocate(a, 69)
    m.free(a)
    assert m.stats().bytes_physical == 0 and m.kernel_resident_bytes() == 0


def test_eager_mapping_maps_the_whole_prompt_at_admission():
    eager, lazy = make_manager(lookahead_tokens=0), make_manager(eager_mapping=False, lookahead_tokens=0)
    for m in (eager, lazy):
        seq = make_seq(list(range(1, 200)))  # 199 tokens, prefilled 64 at a time
        m.admit(seq)
        m.allocate(seq, 64)
    assert eager.kernel_resident_bytes() == 4 * eager.chunk_set_bytes
    assert lazy.kernel_resident_bytes() == 1 * lazy.chunk_set_bytes


def test_background_mapping_takes_lookahead_off_the_critical_path():
    m = make_manager(lookahead_tokens=64, eager_mapping=False)
    seq = make_seq(list(range(1, 10)))
    m.admit(seq)
    m.allocate(seq, 9)  # chunk 0 now (a miss), chunk 1 in the background
    for _ in range(100):  # decode: every chunk it reaches was mapped ahead by the worker
        seq.num_computed_tokens = seq.num_tokens
        seq.token_ids.append(7)
        m.allocate(seq, 1)
    assert m.kernel_resident_bytes() == m.stats().bytes_physical == 3 * m.chunk_set_bytes  # drains the worker
    extra = m.stats().extra
    assert extra["map_calls"] == 3 and extra["map_seconds_background"] > 0
    critical_calls_only_first = make_manager(background_mapping=False, lookahead_tokens=64, eager_mapping=False)
    seq2 = make_seq(list(range(1, 10)))
    critical_calls_only_first.admit(seq2)
    critical_calls_only_first.allocate(seq2, 9)
    assert critical_calls_only_first.stats().extra["map_seconds_background"] == 0


def test_prefix_reuse_takes_the_slot_holding_the_longest_prefix():
    m = make_manager()
    a, b = make_seq(list(range(1, 101))), make_seq(list(range(1, 41)) + [999] * 20)
    for s in (a, b):
        m.admit(s)
        m.allocate(s, s.num_tokens)
        s.num_computed_tokens = s.num_tokens
    slot_a = m.block_table(a)[0]
    m.free(a)
    m.free(b)
    c = make_seq(list(range(1, 81)) + [5, 6])
    assert m.admit(c) == 80 and m.block_table(c)[0] == slot_a
    assert m.stats().prefix_cache_hits == 80


# --- sharing between running sequences --------------------------------------------------------
def test_running_sequences_share_full_prompt_chunks_physically():
    m = make_manager(num_slots=4, max_len=512, budget_chunks=16, lookahead_tokens=0)
    prefix = list(range(1, 201))  # 200 tokens: 3 full chunks of 64
    a = make_seq(prefix + [900, 901])
    m.admit(a)
    m.allocate(a, a.num_tokens)
    m.kv[:, :, :, m.block_table(a)[0], : a.num_tokens] = torch.arange(a.num_tokens, dtype=torch.float32)[:, None]
    a.num_computed_tokens = a.num_tokens
    m.on_tokens_computed(a)
    alone = m.stats().bytes_physical
    b = make_seq(prefix + [5] * 30)
    assert m.admit(b) == 192 and m.block_table(b)[0] != m.block_table(a)[0]
    m.allocate(b, b.num_tokens - 192)
    # b reads a's keys through the shared pages, without a copy in its own slot
    assert torch.equal(m.kv[:, :, :, m.block_table(b)[0], :192], m.kv[:, :, :, m.block_table(a)[0], :192])
    s = m.stats()
    assert s.extra["shared_chunks"] == 3
    assert s.bytes_physical == alone + 1 * m.chunk_set_bytes  # b's own chunk only: 3 shared, 1 private
    assert m.kernel_resident_bytes() == s.bytes_physical
    m.free(a)
    m.free(b)
    m.release_free_memory()
    assert m.kernel_resident_bytes() == 0 and m.stats().bytes_physical == 0 and m.pool.allocated_bytes() == 0


# --- random lifecycles against the kernel -------------------------------------------------------
class VirtualLifecycle(RuleBasedStateMachine):
    """Sequences come, grow (prefill chunks, decodes), get preempted or finish, in random order;
    some share a long common prefix, so that running sequences share physical pages.

    The value written for token p of a sequence is a function of (token, p) alone, as a model's
    K would be of the prefix: sequences that share a chunk write identical values there. After each
    step every running sequence must read back exactly its own values — a shared page that someone
    overwrote with other tokens, or a page mapped into the wrong slot, shows up — the manager's
    physical bytes must equal the kernel's count, the budget must hold, and no slot is owned twice."""

    def __init__(self) -> None:
        super().__init__()
        self.m = make_manager(num_slots=4, max_len=320, budget_chunks=12, lookahead_tokens=8)
        self.k = self.m.kv[:, 0]  # K of every layer: [layers, heads, slots, len, dim]
        self.running: list[Sequence] = []
        self.stamp = 0

    @staticmethod
    def _values(seq: Sequence, start: int, end: int) -> torch.Tensor:
        tokens = torch.tensor(seq.token_ids[start:end], dtype=torch.float32)
        return tokens * 1000.0 + torch.arange(start, end, dtype=torch.float32)

    def _compute(self, seq: Sequence, n: int) -> None:
        start = seq.num_computed_tokens
        self.k[:, :, self.m.block_table(seq)[0], start:start + n, :] = self._values(seq, start, start + n)[:, None]
        seq.num_computed_tokens += n
        self.m.on_tokens_computed(seq)

    @rule(length=st.integers(1, 200), shared=st.booleans())
    def admit(self, length, shared):
        tokens = list(range(1, length + 1)) if shared else [self.stamp + 10_000 + i for i in range(length)]
        self.stamp += length
        seq = make_seq(tokens)
        seq.num_computed_tokens = self.m.admit(seq)
        chunk = min(64, seq.num_tokens - seq.num_computed_tokens)
        if not self.m.can_allocate(seq, chunk):
            self.m.free(seq)
            return
        self.m.allocate(seq, chunk)
        self._compute(seq, chunk)
        self.running.append(seq)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100), n=st.integers(1, 70))
    def grow(self, i, n):
        seq = self.running[i % len(self.running)]
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids += [7] * n  # decodes (or a resumed prompt) to compute
        n = min(n, seq.num_tokens - seq.num_computed_tokens)
        if seq.num_computed_tokens + n > self.m.layout.max_len or not self.m.can_allocate(seq, n):
            return
        self.m.allocate(seq, n)
        self._compute(seq, n)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100))
    def finish(self, i):
        self.m.free(self.running.pop(i % len(self.running)))

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100))
    def preempt_and_resume(self, i):
        """Free a running sequence and admit it again at once, as the scheduler's preemption and a
        later re-admission do: it may get its own slot back with its tokens, or start over."""
        seq = self.running.pop(i % len(self.running))
        self.m.free(seq)
        seq.num_computed_tokens = self.m.admit(seq)
        if seq.num_computed_tokens < seq.num_tokens and self.m.can_allocate(seq, 1):
            self.m.allocate(seq, 1)
            self._compute(seq, 1)
            self.running.append(seq)
        elif seq.num_computed_tokens == seq.num_tokens:
            self.running.append(seq)
        else:
            self.m.free(seq)

    @rule()
    def release(self):
        self.m.release_free_memory()

    @invariant()
    def kernel_agrees_and_budget_holds(self):
        s = self.m.stats()
        assert self.m.kernel_resident_bytes() == s.bytes_physical
        assert s.bytes_physical <= s.bytes_capacity
        assert s.bytes_allocated >= s.bytes_live

    @invariant()
    def no_slot_twice_and_each_reads_its_own_tokens(self):
        slots = [self.m.block_table(s)[0] for s in self.running]
        assert len(set(slots)) == len(slots)
        assert not set(slots) & set(self.m.free_slots)
        for seq, slot in zip(self.running, slots):
            n = seq.num_computed_tokens
            assert torch.equal(self.k[:, :, slot, :n, 0], self._values(seq, 0, n).expand(2, 2, n))

    def teardown(self):
        for seq in self.running:
            self.m.free(seq)
        self.m.release_free_memory()
        assert self.m.kernel_resident_bytes() == 0 and self.m.stats().bytes_physical == 0
        if self.m.pool is not None:
            assert self.m.pool.allocated_bytes() == 0 and not self.m.shared_by_key
        self.m.memory.close()


TestVirtualLifecycle = VirtualLifecycle.TestCase
TestVirtualLifecycle.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


def test_allocate_without_room_raises_and_changes_nothing():
    m = make_manager(num_slots=2, budget_chunks=2, lookahead_tokens=0)
    a = make_seq(list(range(1, 129)))
    m.admit(a)
    m.allocate(a, 128)
    b = make_seq(list(range(500, 600)))
    m.admit(b)
    assert not m.can_allocate(b, 1)
    before = m.stats()
    with pytest.raises(NoFreeMemory):
        m.allocate(b, 1)
    assert m.stats() == before
