"""Tests for vmm_cpu: what the kernel reports (mincore, /proc/self/smaps, memfd st_blocks) must match
what was reserved, touched, populated, released and shared.

The state machine keeps a shadow of every page of a small reservation (private and resident or
not, or showing a pool page) and of every pool page (its content, whether it holds RAM); after each
random step, mincore must agree with the shadow page for page.
"""

from __future__ import annotations

import gc
import sys

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("vmm_cpu is Linux only", allow_module_level=True)

import numpy as np
import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvmem.memory.vmm_cpu import (
    PAGE_SIZE as P,
    CpuVirtualMemory,
    PoolExhausted,
    SharedPagePool,
    VirtualMemoryError,
    copy_to_shared,
    map_shared,
    unmap_shared,
)
from kvmem.memory.vmm_backend import SharedPages, VirtualMemoryBackend

GiB = 1 << 30


def is_mapped(address: int) -> bool:
    """Whether any mapping of this process covers `address` (/proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
            if lo <= address < hi:
                return True
    return False


# --- the contract `virtual` relies on ------------------------------------------------------------
def test_the_cpu_backend_implements_the_protocols_with_cpu_semantics():
    with CpuVirtualMemory(4 * P) as vm, SharedPagePool(2) as pool:
        assert isinstance(vm, VirtualMemoryBackend) and isinstance(pool, SharedPages)
        assert vm.page_size == P and not vm.faults_on_unmapped  # a touch backs a page
        assert vm.mapping_limit() > 0 and vm.extra_stats() == {}
        vm.populate_many([0], 2 * P)
        vm.release_many([P], P)
        vm.settle()  # nothing deferred on CPU: released already
        assert vm.trim_pool() == 0 and vm.physical_bytes() == vm.resident_bytes() == P
        pool.alloc_at(0, 1)
        vm.copy_to_shared(0, pool, 0)  # the private page becomes the pool's
        vm.map_shared(2 * P, pool, 0)
        assert vm.physical_bytes(pool) == P  # one page, shown twice
        vm.unmap_shared(0)
        vm.unmap_shared(2 * P)
        pool.free_run(0, 1)
        assert vm.physical_bytes(pool) == 0
        strided = vm.tensor(torch.float32, (2, 4), strides=(P // 4, 1))  # a row per page
        assert strided.stride() == (P // 4, 1) and strided.data_ptr() == vm.address
        assert vm.tensor(torch.float32, (2, 4), strides=(4, 1)).is_contiguous()
    vm.close()  # idempotent
    pool.close()


# --- a reservation -----------------------------------------------------------------------------
def test_huge_reservation_costs_nothing_and_is_a_tensor():
    with CpuVirtualMemory(64 * GiB) as vm:
        assert vm.size == 64 * GiB and vm.address % P == 0
        assert vm.resident_bytes() == 0
        assert vm.smaps_rss_bytes() == 0
        kv = vm.tensor(torch.bfloat16, (1024, 32 * 1024, 1024))  # the whole 64 GiB
        assert kv.data_ptr() == vm.address and kv.shape == (1024, 32 * 1024, 1024)
        prefix = vm.tensor(torch.float32, (3, 5))  # a prefix is fine too
        assert prefix.data_ptr() == vm.address
        assert vm.resident_bytes() == 0


def test_writes_make_exactly_the_touched_pages_resident():
    with CpuVirtualMemory(64 * GiB) as vm:
        t = vm.tensor(torch.uint8, (vm.size,))
        pages = [0, 1, 1000, (1 << 20) + 3, vm.size // P - 1]
        for page in pages:
            t[page * P + 7] = 1
            t[page * P + P - 1] = 2  # a second write to the same page costs nothing more
        assert vm.resident_bytes() == len(pages) * P
        assert vm.smaps_rss_bytes() == len(pages) * P
        assert np.flatnonzero(vm.resident_pages()).tolist() == pages
        assert vm.resident_bytes(1000 * P, P) == P and vm.resident_bytes(2 * P, 998 * P) == 0


def test_populate_keeps_contents_and_release_zeroes():
    with CpuVirtualMemory(64 * P) as vm:
        t = vm.tensor(torch.int32, (64, P // 4))
        t[3, 10] = 1234
        vm.populate(0, 8 * P)
        assert vm.resident_pages(0, 16 * P).tolist() == [True] * 8 + [False] * 8
        assert vm.smaps_rss_bytes() == 8 * P  # populated means real pages, not the zero page
        assert t[3, 10] == 1234  # populate keeps what was there
        vm.release(2 * P, 4 * P)
        assert vm.resident_pages(0, 8 * P).tolist() == [True, True, False, False, False, False, True, True]
        assert vm.smaps_rss_bytes() == 4 * P
        assert t[3, 10] == 0 and int(t[2:6].abs().sum()) == 0
        vm.release_many(np.array([0, P, 6 * P]), P)  # numpy offsets are fine
        vm.populate_many([10 * P, 20 * P, 30 * P], 2 * P)
        # Pages 2-5 were read above: they show the zero page, which mincore counts.
        assert np.flatnonzero(vm.resident_pages()).tolist() == [2, 3, 4, 5, 7, 10, 11, 20, 21, 30, 31]
        assert vm.smaps_rss_bytes() == 7 * P


def test_reads_map_the_zero_page():
    """Kernel fact the manager must know: a read of untouched private memory maps the shared zero
    page. mincore counts it as resident, smaps Rss does not."""
    with CpuVirtualMemory(16 * P) as vm:
        t = vm.tensor(torch.uint8, (16, P))
        assert int(t[:4].sum()) == 0
        assert vm.resident_bytes() == 4 * P and vm.smaps_rss_bytes() == 0
        vm.release(0, 16 * P)
        assert vm.resident_bytes() == 0


def test_bad_ranges_and_sizes_are_refused():
    with CpuVirtualMemory(10 * P + 1) as vm:
        assert vm.size == 11 * P  # rounded up to whole pages
        for call in (lambda: vm.populate(1, P), lambda: vm.release(0, P + 8),
                     lambda: vm.populate_many([0, P, 2 * P + 512], P),
                     lambda: vm.release_many([P], 100), lambda: vm.populate(10 * P, 2 * P),
                     lambda: vm.release_many([-P], P), lambda: vm.resident_bytes(0, 12 * P),
                     lambda: vm.tensor(torch.float64, (P, 12))):
            with pytest.raises(ValueError):
                call()
    with pytest.raises(VirtualMemoryError, match=r"cannot reserve 1152921504606846976 bytes"):
        CpuVirtualMemory(2**60)
    with pytest.raises(VirtualMemoryError, match="positive"):
        CpuVirtualMemory(0)
    with pytest.raises(ValueError, match="closed"):
        vm.populate(0, P)


# --- lifetime ----------------------------------------------------------------------------------
def test_a_tensor_outlives_its_reservation_object():
    vm = CpuVirtualMemory(4 * P)
    address = vm.address
    view = vm.tensor(torch.float32, (4, P // 4))[2:]  # a view of the view keeps it alive too
    view[0, 0] = 3.5
    del vm
    gc.collect()
    assert is_mapped(address)
    view[1, 5] = 7.0
    assert float(view[0, 0]) == 3.5 and float(view[1, 5]) == 7.0
    del view
    gc.collect()
    assert not is_mapped(address)


def test_close_frees_now_and_unmaps_when_no_tensor_is_left():
    vm = CpuVirtualMemory(4 * P)
    vm.populate(0, 4 * P)
    vm.close()
    assert not is_mapped(vm.address)
    vm.close()  # idempotent

    vm = CpuVirtualMemory(4 * P)
    t = vm.tensor(torch.uint8, (4 * P,))
    t.fill_(9)
    vm.close()  # a tensor is still alive: RAM goes back, the range stays mapped, reads zero
    assert is_mapped(vm.address) and int(t.sum()) == 0
    address = vm.address
    del t
    gc.collect()
    assert not is_mapped(address)


# --- shared pages ------------------------------------------------------------------------------
def test_one_pool_page_at_two_places():
    with CpuVirtualMemory(16 * P) as vm, SharedPagePool(4) as pool:
        t = vm.tensor(torch.uint8, (16, P))
        t[2].fill_(5)  # a private page about to be replaced
        page = pool.alloc()
        assert pool.allocated_bytes() == 0  # handed out, not yet backed
        map_shared(vm, 2 * P, pool, page)
        map_shared(vm, 9 * P, pool, page)
        assert int(t[2].sum()) == 0  # MAP_FIXED dropped the private page
        assert pool.allocated_bytes() == P  # the read above faulted the pool page in
        t[2, 100] = 42
        assert t[9, 100] == 42
        t[9, 0] = 7
        assert t[2, 0] == 7
        assert vm.resident_pages(0, 10 * P).tolist() == [False] * 2 + [True] + [False] * 6 + [True]
        assert vm.smaps_rss_bytes() == 2 * P  # Rss counts the page once per place it is mapped
        with pytest.raises(ValueError, match="still mapped"):
            pool.free(page)
        unmap_shared(vm, 2 * P)
        assert int(t[2].sum()) == 0 and t[9, 100] == 42  # private zero page here, shared there
        vm.release(9 * P, P)  # drops this mapping's reference only: the pool keeps the data
        assert t[9, 100] == 42
        unmap_shared(vm, 9 * P)
        pool.free(page)
        assert pool.allocated_bytes() == 0 and pool.num_free == 4  # the hole punched gave RAM back
        with pytest.raises(ValueError, match="double free"):
            pool.free(page)
        with pytest.raises(ValueError, match="free page"):
            map_shared(vm, 0, pool, page)  # free pages cannot be mapped


def test_copy_to_shared_keeps_content():
    with CpuVirtualMemory(16 * P) as vm, SharedPagePool(8) as pool:
        t = vm.tensor(torch.int64, (16, P // 8))
        t[0:3] = torch.arange(3 * (P // 8)).view(3, -1)
        before = t[0:3].clone()
        first = pool.alloc_run(3)
        assert first == 0 and pool.num_free == 5
        copy_to_shared(vm, 0, pool, first, 3)
        assert torch.equal(t[0:3], before)
        assert pool.allocated_bytes() == 3 * P
        map_shared(vm, 10 * P, pool, first, 3)  # the prefix, shared into another slot
        assert torch.equal(t[10:13], before)
        t[11, 4] = -1
        assert t[1, 4] == -1
        unmap_shared(vm, 0, 3)
        unmap_shared(vm, 10 * P, 3)
        for i in range(3):
            pool.free(first + i)
        assert pool.allocated_bytes() == 0


def test_pool_exhaustion_and_runs():
    with SharedPagePool(4) as pool:
        got = [pool.alloc() for _ in range(4)]
        assert sorted(got) == [0, 1, 2, 3]
        with pytest.raises(PoolExhausted) as info:
            pool.alloc()
        assert isinstance(info.value, MemoryError) and isinstance(info.value, VirtualMemoryError)
        assert pool.alloc_run(1) is None
        pool.free(1)
        pool.free(2)
        assert pool.alloc_run(3) is None
        assert pool.alloc_run(2) == 1
        assert pool.num_free == 0
        with pytest.raises(PoolExhausted):
            pool.alloc()  # the stale free-list entries of 1 and 2 are skipped


# --- random operations against a shadow ------------------------------------------------------
NUM_PAGES, POOL_PAGES = 64, 12
pages = st.integers(0, NUM_PAGES - 1)


class VmmMachine(RuleBasedStateMachine):
    """Shadow: a private page is resident or not and holds `value` (whole page filled with it); a
    shared page shows pool page `shared[page]`, whose content is `pool_value`, and which holds RAM
    (counts in mincore wherever it is mapped) once written, populated or read: `pool_data`."""

    def __init__(self) -> None:
        super().__init__()
        self.vm = CpuVirtualMemory(NUM_PAGES * P)
        self.pool = SharedPagePool(POOL_PAGES)
        self.t = self.vm.tensor(torch.uint8, (NUM_PAGES, P))
        self.resident = [False] * NUM_PAGES
        self.value = [0] * NUM_PAGES
        self.shared: dict[int, int] = {}
        self.pool_value: dict[int, int] = {}  # allocated pool pages
        self.pool_data: set[int] = set()

    def expected(self, page: int) -> int:
        return self.pool_value[self.shared[page]] if page in self.shared else self.value[page]

    def backed(self, page: int) -> None:  # the page now holds RAM (a write fault or populate)
        if page in self.shared:
            self.pool_data.add(self.shared[page])
        else:
            self.resident[page] = True

    def to_private(self, page: int) -> None:
        self.shared.pop(page, None)
        self.resident[page], self.value[page] = False, 0

    @rule(page=pages, value=st.integers(1, 255))
    def write(self, page, value):
        self.t[page].fill_(value)
        self.backed(page)
        if page in self.shared:
            self.pool_value[self.shared[page]] = value
        else:
            self.value[page] = value

    @rule(page=pages)
    def read(self, page):
        assert int(self.t[page, 123]) == self.expected(page)
        self.backed(page)  # zero page (private) or a page faulted into the pool (shared)

    @rule(start=pages, n=st.integers(1, 8))
    def populate(self, start, n):
        n = min(n, NUM_PAGES - start)
        self.vm.populate(start * P, n * P)
        for page in range(start, start + n):
            self.backed(page)

    @rule(starts=st.lists(pages, min_size=1, max_size=4, unique=True), many=st.booleans())
    def release(self, starts, many):
        if many:
            self.vm.release_many([s * P for s in starts], P)
        else:
            for s in starts:
                self.vm.release(s * P, P)
        for page in starts:
            if page not in self.shared:  # over a shared page only the mapping's reference goes
                self.resident[page], self.value[page] = False, 0

    @precondition(lambda self: self.pool.num_free > 0)
    @rule(page=pages)
    def map_new(self, page):
        index = self.pool.alloc()
        map_shared(self.vm, page * P, self.pool, index)
        self.to_private(page)
        self.shared[page], self.pool_value[index] = index, 0

    @precondition(lambda self: self.pool_value)
    @rule(page=pages, data=st.data())
    def map_again(self, page, data):
        index = data.draw(st.sampled_from(sorted(self.pool_value)))
        map_shared(self.vm, page * P, self.pool, index)
        self.to_private(page)
        self.shared[page] = index

    @precondition(lambda self: self.pool.num_free > 0)
    @rule(page=pages)
    def copy(self, page):
        content = self.expected(page)
        self.read(page)  # the copy reads the source: over a shared page that faults its pool page in
        index = self.pool.alloc()
        copy_to_shared(self.vm, page * P, self.pool, index)
        self.to_private(page)
        self.shared[page], self.pool_value[index] = index, content
        self.pool_data.add(index)  # pwrite fills the pool page, zeros included

    @rule(page=pages)
    def unmap(self, page):
        unmap_shared(self.vm, page * P)
        self.to_private(page)

    @rule()
    def free_unmapped(self):
        mapped = set(self.shared.values())
        for index in list(self.pool_value):
            if index in mapped:
                with pytest.raises(ValueError):
                    self.pool.free(index)
            else:
                self.pool.free(index)
                del self.pool_value[index]
                self.pool_data.discard(index)

    @invariant()
    def kernel_agrees(self):
        want = [self.shared[p] in self.pool_data if p in self.shared else self.resident[p]
                for p in range(NUM_PAGES)]
        assert self.vm.resident_pages().tolist() == want
        assert self.pool.allocated_bytes() == len(self.pool_data) * P
        # Resident pages read back their content (reading them changes nothing).
        rows = [p for p in range(NUM_PAGES) if want[p]]
        if rows:
            got = self.t[rows][:, ::512]
            assert torch.equal(got, torch.tensor([self.expected(p) for p in rows],
                                                 dtype=torch.uint8)[:, None].expand_as(got))

    def teardown(self):
        try:
            for page in list(self.shared):
                unmap_shared(self.vm, page * P)
            for index in list(self.pool_value):
                self.pool.free(index)
            self.vm.release(0, self.vm.size)
            assert self.vm.resident_bytes() == 0 and self.vm.smaps_rss_bytes() == 0
            assert self.pool.allocated_bytes() == 0 and self.pool.num_free == POOL_PAGES
        finally:
            del self.t
            self.vm.close()
            self.pool.close()


VmmMachine.TestCase.settings = settings(max_examples=20, stateful_step_count=25, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
test_random_operations = VmmMachine.TestCase
