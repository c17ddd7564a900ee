"""The CUDA backend of `virtual` (vmm_cuda, megacache) against a fake driver, and on a GPU when
there is one.

Without a GPU, `FakeDriver` (fake_cuda_driver.py) stands in for the driver: host memory behind
the same calls, strict about misuse, with its own ground truth (which handle is mapped where,
how many exist) that the backend's bookkeeping is checked against. The tests marked `requires_gpu`
run the real driver through cuda-bindings and skip here.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import threading

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

if not sys.platform.startswith("linux"):
    pytest.skip("the fake driver simulates device memory with Linux mmap/memfd", allow_module_level=True)

from kvmem.memory.base import KVCacheSpec, cdiv  # noqa: E402
from kvmem.memory.cuda_driver import CudaDriver, CudaDriverError, _import_bindings  # noqa: E402
from kvmem.memory.megacache import MegacacheLayout  # noqa: E402
from kvmem.memory.virtual import VirtualKVCacheManager, VirtualOptions  # noqa: E402
from kvmem.memory.vmm_cuda import (  # noqa: E402
    MAX_RESERVATION_BYTES,
    CudaSharedPages,
    CudaVirtualMemory,
    CudaVmmError,
    copy_to_shared,
    map_shared,
    open_driver,
    page_size_for,
    unmap_shared,
)
from kvmem.memory.vmm_backend import SharedPages, VirtualMemoryBackend  # noqa: E402
from tests.memory.fake_cuda_driver import FakeDriver, FakeDriverMisuse  # noqa: E402
from tests.memory.test_virtual import VirtualLifecycle, make_seq  # noqa: E402

MiB = 1 << 20
G = 2 * MiB  # the fake's default granularity, as on current GPUs
F32_PER_PAGE = G // 4

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_memory(pages: int = 16, max_pages: int = 8, batch: int = 4, **fake) -> tuple[FakeDriver, CudaVirtualMemory]:
    driver = FakeDriver(**fake)
    return driver, CudaVirtualMemory(pages * driver.granularity, driver, driver.granularity, max_pages, batch)


# --- the contract `virtual` relies on ------------------------------------------------------------
def test_the_cuda_backend_implements_the_protocols_with_cuda_semantics():
    driver, vm = make_memory()
    pool = vm.shared_pool(2)
    assert isinstance(vm, VirtualMemoryBackend) and isinstance(pool, SharedPages)
    assert vm.page_size == G and vm.faults_on_unmapped  # an unmapped page is an illegal address
    assert vm.mapping_limit() is None
    assert set(vm.extra_stats()) == {"page_size", "device_pool_idle_bytes", "device_handles_bytes"}
    vm.populate_many([0], 2 * G)
    vm.release_many([G], G)  # retired: unmapped once the fence passes
    assert vm.resident_bytes() == 2 * G and vm.physical_bytes() == G  # physical_bytes settles first
    pool.alloc_at(0, 1)
    vm.copy_to_shared(0, pool, 0)  # the pool adopts the handle: nothing copied
    vm.map_shared(2 * G, pool, 0)
    assert vm.physical_bytes(pool) == G and driver.handle_at(vm.address) == driver.handle_at(vm.address + 2 * G)
    vm.unmap_shared(0)
    vm.unmap_shared(2 * G)
    pool.free_run(0, 1)
    assert vm.physical_bytes(pool) == 0 and vm.trim_pool() > 0
    vm.close()
    vm.close()  # idempotent
    pool.close()
    assert driver.live_handles == 0 and not driver.mappings


# --- the reservation and its tensor -----------------------------------------------------------
def test_a_reservation_is_address_space_only_and_its_tensor_a_view():
    driver, vm = make_memory(pages=64)
    assert driver.calls["cuMemAddressReserve"] == 1 and driver.live_handles == 0
    assert vm.address % G == 0 and vm.size == 64 * G and vm.resident_bytes() == 0
    t = vm.tensor(torch.float32, (64, F32_PER_PAGE))
    assert t.data_ptr() == vm.address and t.shape == (64, F32_PER_PAGE)
    # The first page was mapped only while torch wrapped the pointer.
    assert driver.calls["wrap"] == 1 and driver.calls["cuMemMap"] == driver.calls["cuMemUnmap"] == 1
    assert not driver.mappings and vm.mapped_pages() == 0
    strided = vm.tensor(torch.float32, (4, 8), strides=(F32_PER_PAGE, 1))  # a row per page
    assert strided.stride() == (F32_PER_PAGE, 1) and strided.data_ptr() == vm.address
    with pytest.raises(ValueError, match="needs"):
        vm.tensor(torch.float32, (65, F32_PER_PAGE))
    vm.close()


def test_populate_maps_zeroed_pages_and_release_waits_for_the_fence():
    driver, vm = make_memory()
    t = vm.tensor(torch.float32, (16, F32_PER_PAGE))
    vm.populate_many([0, 4 * G], 2 * G)  # pages 0, 1, 4, 5
    assert [driver.handle_at(vm.address + p * G) is not None for p in range(6)] == [True, True, False, False,
                                                                                      True, True]
    assert all(a in driver.accessible for a in driver.mappings)
    assert torch.count_nonzero(t[[0, 1, 4, 5]]) == 0  # the fake fills new handles with NaN bytes
    t[[0, 1]] = 7.0
    vm.release_many([0], 2 * G)
    assert vm.mapped_pages() == 2
    # The step that last used pages 0 and 1 may still run: they stay mapped, handles not reused.
    assert driver.handle_at(vm.address) is not None and driver.calls["cuMemUnmap"] == 1  # (the wrap's)
    vm.populate_many([8 * G], G)
    assert driver.handle_at(vm.address) is not None
    driver.stream.finish()  # the device is done
    vm.populate_many([9 * G], G)  # any later call reaps retirements whose fence passed
    assert driver.handle_at(vm.address) is None and driver.handle_at(vm.address + G) is None
    assert driver.stream.waits == 0  # nobody had to wait for the device
    vm.settle()
    assert vm.resident_bytes() == 4 * G == len(driver.mappings) * G
    vm.close()


def test_grow_costs_a_map_not_a_create_once_the_pool_is_warm():
    driver, vm = make_memory(pages=32, max_pages=16, batch=4)
    vm.populate_many([0], 4 * G)
    assert driver.calls["cuMemCreate"] == 4  # one batch
    zeroings = driver.calls["cuMemsetD8Async"]
    vm.release_many([0], 4 * G)
    driver.stream.finish()
    for i in range(5):  # grow and shrink elsewhere, again and again
        vm.populate_many([(8 + i) * G], G)
    assert driver.calls["cuMemCreate"] == 8  # 4 reused + one more batch for the fifth page
    vm.release_many([8 * G], 5 * G)
    driver.stream.finish()
    vm.populate_many([20 * G], 8 * G)
    assert driver.calls["cuMemCreate"] == 8 and driver.live_handles == 8
    # Zeroed once, when first used: the second batch's handles on the fifth page and the last
    # populate (three still fresh), never the reused ones.
    assert driver.calls["cuMemsetD8Async"] == zeroings + 2 and len(vm._zeroed) == 8
    vm.close()


def test_a_page_populated_again_before_its_fence_keeps_its_mapping():
    driver, vm = make_memory()
    t = vm.tensor(torch.float32, (16, F32_PER_PAGE))
    vm.populate_many([3 * G], G)
    handle = driver.handle_at(vm.address + 3 * G)
    t[3] = 5.0
    maps, unmaps = driver.calls["cuMemMap"], driver.calls["cuMemUnmap"]
    vm.release_many([3 * G], G)
    vm.populate_many([3 * G], G)  # the unmap had not happened yet: it is cancelled
    assert (driver.calls["cuMemMap"], driver.calls["cuMemUnmap"]) == (maps, unmaps)
    assert driver.handle_at(vm.address + 3 * G) == handle and bool((t[3] == 5.0).all())
    driver.stream.finish()
    vm.settle()
    assert driver.handle_at(vm.address + 3 * G) == handle  # still mapped: nothing retired is left
    vm.close()


def test_at_the_budget_a_new_page_waits_for_a_retired_one():
    driver, vm = make_memory(max_pages=2, batch=4)
    vm.populate_many([0], 2 * G)
    assert driver.live_handles == 2  # the batch is cut at the budget
    vm.release_many([0], 2 * G)
    vm.populate_many([4 * G], 2 * G)  # no idle handle and no room for one: wait for the fence
    assert driver.stream.waits == 1 and driver.live_handles == 2
    assert driver.handle_at(vm.address) is None and driver.handle_at(vm.address + 4 * G) is not None
    with pytest.raises(CudaVmmError, match="in use"):
        vm.populate_many([8 * G], G)
    vm.close()


def test_trim_releases_the_idle_pool():
    driver, vm = make_memory(batch=4)
    vm.populate_many([0], 3 * G)
    assert driver.live_handles == 4 and vm.idle_bytes() == G
    vm.release_many([0], 3 * G)
    assert vm.trim_pool() == 4 * G  # waits for the fence, unmaps, releases
    assert driver.live_handles == 0 and vm.created_bytes() == 0 and vm.device_used_bytes() == 0
    vm.close()


# --- sharing -------------------------------------------------------------------------------------
def test_sharing_maps_one_handle_at_two_addresses():
    driver, vm = make_memory()
    t = vm.tensor(torch.float32, (16, F32_PER_PAGE))
    vm.populate_many([0], 2 * G)
    t[0], t[1] = 1.0, 2.0
    pool = CudaSharedPages(vm, 4)
    pool.alloc_at(0, 2)
    maps = driver.calls["cuMemMap"]
    copy_to_shared(vm, 0, pool, 0, 2)  # adopts the pages in place: nothing copied, nothing mapped
    assert driver.calls["cuMemMap"] == maps and pool.allocated_bytes() == 2 * G
    map_shared(vm, 8 * G, pool, 0, 2)
    for p in range(2):
        assert driver.handle_at(vm.address + (8 + p) * G) == driver.handle_at(vm.address + p * G) is not None
    assert torch.equal(t[8:10], t[0:2])
    t[9, 5] = 42.0  # one physical page: a write through one address shows at the other
    assert t[1, 5] == 42.0
    assert vm.resident_bytes() == 2 * G  # counted once
    with pytest.raises(ValueError, match="still mapped"):
        pool.free_run(0, 2)
    unmap_shared(vm, 8 * G, 2)
    vm.release_many([0], 2 * G)
    pool.free_run(0, 2)
    vm.settle()
    assert vm.resident_bytes() == 0 and not driver.mappings
    vm.close()
    assert driver.live_handles == 0


def test_a_retired_shared_page_is_not_taken_back_as_private():
    """A page dropped from sharing and populated again before its fence must get a new handle:
    keeping the old one would let its new owner write into pages others still read."""
    driver, vm = make_memory()
    vm.populate_many([0], G)
    pool = CudaSharedPages(vm, 2)
    pool.alloc_at(0)
    copy_to_shared(vm, 0, pool, 0)
    map_shared(vm, 4 * G, pool, 0)
    unmap_shared(vm, 0)  # page 0 no longer shows the shared page (its unmap waits for the fence)
    vm.populate_many([0], G)
    assert driver.stream.waits == 1  # the shared handle's old mapping had to go first
    assert driver.handle_at(vm.address) != driver.handle_at(vm.address + 4 * G)
    vm.close()
    assert driver.live_handles == 0


# --- lifetime and errors ----------------------------------------------------------------------
def test_close_releases_everything_and_the_range_outlives_its_views():
    driver, vm = make_memory()
    t = vm.tensor(torch.float32, (16, F32_PER_PAGE))
    vm.populate_many([0, 6 * G], 2 * G)
    pool = CudaSharedPages(vm, 2)
    pool.alloc_at(0)
    copy_to_shared(vm, 0, pool, 0)
    map_shared(vm, 12 * G, pool, 0)
    vm.release_many([6 * G], G)  # a retirement still pending
    vm.close()
    vm.close()  # idempotent
    assert driver.live_handles == 0 and not driver.mappings
    assert driver.reservations  # a tensor still points there: no other allocation may land under it
    pool.close()
    del t
    gc.collect()
    driver.assert_clean()
    assert driver.closed == 1


def test_a_memory_dropped_without_close_gives_everything_back():
    driver, vm = make_memory()
    t = vm.tensor(torch.float32, (16, F32_PER_PAGE))
    vm.populate_many([0, 6 * G], 2 * G)
    pool = CudaSharedPages(vm, 2)  # pool and memory refer to each other: a cycle for the collector
    pool.alloc_at(0)
    copy_to_shared(vm, 0, pool, 0)
    map_shared(vm, 12 * G, pool, 0)
    vm.release_many([6 * G], G)
    del vm, pool
    gc.collect()
    assert driver.live_handles == 0 and not driver.mappings and driver.reservations
    del t
    gc.collect()
    driver.assert_clean()


def test_a_page_size_the_device_does_not_support_is_a_clear_error():
    driver = FakeDriver()
    assert page_size_for(driver) == G and page_size_for(driver, 4 * MiB) == 4 * MiB
    for bad in (3 * MiB, MiB, 0):
        with pytest.raises(CudaVmmError, match="granularity"):
            page_size_for(driver, bad)
    with pytest.raises(CudaVmmError, match="granularity"):
        CudaVirtualMemory(8 * G, driver, MiB, max_pages=4)


def test_an_oversized_reservation_is_a_clear_error():
    driver = FakeDriver()
    with pytest.raises(CudaVmmError, match="address space"):
        CudaVirtualMemory(MAX_RESERVATION_BYTES + G, driver, G, max_pages=4)
    small = FakeDriver(address_space=64 * MiB)  # the driver itself refuses
    with pytest.raises(CudaVmmError, match="cuMemAddressReserve failed: CUDA_ERROR_OUT_OF_MEMORY"):
        CudaVirtualMemory(128 * MiB, small, G, max_pages=4)
    assert driver.reservations == {} and small.reservations == {}


def test_running_out_of_device_memory_is_a_clear_error():
    driver, vm = make_memory(max_pages=8, batch=2, device_memory=3 * G)
    vm.populate_many([0], 3 * G)  # the second batch is cut short by the device, which is fine
    with pytest.raises(CudaVmmError, match="cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY.*kv_cache_memory"):
        vm.populate_many([4 * G], G)
    assert vm.mapped_pages() == 3 and driver.live_handles == 3
    vm.close()


def test_strict_fake_refuses_what_the_driver_refuses():
    driver, vm = make_memory()
    vm.populate_many([0], G)
    with pytest.raises(CudaVmmError, match="already mapped"):
        vm.populate_many([0], G)  # the backend's own check
    handle = driver.handle_at(vm.address)
    with pytest.raises(CudaDriverError, match="cuMemMap failed"):
        driver.map(vm.address, G, handle)  # a second map over a mapped range
    with pytest.raises(CudaDriverError, match="cuMemUnmap failed"):
        driver.unmap(vm.address + G, G)  # nothing there
    with pytest.raises(FakeDriverMisuse, match="mapped"):
        driver.release(handle)
    vm.close()


def test_a_thread_maps_only_after_making_the_context_current():
    driver, vm = make_memory()
    errors: list[BaseException] = []

    def grow() -> None:
        try:
            vm.populate_many([5 * G], G)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    worker = threading.Thread(target=grow)
    worker.start()
    worker.join()
    assert not errors and driver.handle_at(vm.address + 5 * G) is not None
    # The fake checks it: a thread that calls the driver directly has no context.
    bare = threading.Thread(target=lambda: errors.append(_raised(driver.create, G)))
    bare.start()
    bare.join()
    assert isinstance(errors[0], CudaDriverError) and "CUDA_ERROR_INVALID_CONTEXT" in str(errors[0])
    vm.close()


def _raised(fn, *args) -> BaseException | None:
    try:
        fn(*args)
    except BaseException as e:
        return e
    return None


def test_real_driver_errors_name_the_call(monkeypatch):
    class Bindings:  # the shape of cuda.bindings.driver's results: (CUresult, values...)
        class CUresult:
            CUDA_SUCCESS = 0

        @staticmethod
        def cuGetErrorName(err):
            return 0, b"CUDA_ERROR_INVALID_VALUE"

        @staticmethod
        def cuGetErrorString(err):
            return 0, b"invalid argument"

    driver = object.__new__(CudaDriver)
    driver._d = Bindings
    assert driver._call("cuMemGetInfo", (0, 5, 7)) == (5, 7) and driver._call("cuMemUnmap", (0,)) is None
    with pytest.raises(CudaDriverError, match=r"cuMemMap failed: CUDA_ERROR_INVALID_VALUE \(invalid argument\)"):
        driver._call("cuMemMap", (1,))
    monkeypatch.setitem(sys.modules, "cuda", None)  # neither layout importable
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(CudaDriverError, match="cuda-bindings"):
        _import_bindings()


# --- random lifecycles against the fake's ground truth ------------------------------------------
class BackendLifecycle(RuleBasedStateMachine):
    """Random populate / release / share / unshare / device progress on a small reservation. The
    model is what the caller believes: which pages it mapped privately, which show which shared
    page, and the value it last wrote in each. After every step: each believed-mapped page is
    mapped in the fake and reads its value; a handle mapped at two addresses only where both
    show the same shared page (or one of them is retired, waiting for its fence); the handles
    that exist are exactly the backend's, within the budget; none is left at the end."""

    PAGES, POOL, BUDGET = 10, 6, 8

    def __init__(self) -> None:
        super().__init__()
        self.driver = FakeDriver(granularity=64 * 1024)
        self.g = self.driver.granularity
        self.vm = CudaVirtualMemory(self.PAGES * self.g, self.driver, self.g, self.BUDGET, handle_batch=3)
        self.t = self.vm.tensor(torch.float32, (self.PAGES, self.g // 4))
        self.pool = CudaSharedPages(self.vm, self.POOL)
        self.private: dict[int, float] = {}  # page -> value
        self.shown: dict[int, int] = {}  # page -> pool index it shows
        self.index_value: dict[int, float] = {}  # pool index holding a page -> its value
        self.stamp = 0.0

    def _handles_in_use(self) -> int:
        return len(self.private) + len(self.index_value)

    def _free_pages(self) -> list[int]:
        return [p for p in range(self.PAGES) if p not in self.private and p not in self.shown]

    def _free_indices(self) -> list[int]:
        return [i for i in range(self.POOL) if not self.pool._taken[i]]

    def _value(self) -> float:
        self.stamp += 1.0
        return self.stamp

    @rule(first=st.integers(0, PAGES - 1), n=st.integers(1, 3))
    def populate(self, first, n):
        pages = range(first, min(first + n, self.PAGES))
        free = self._free_pages()
        if not all(p in free for p in pages) or self._handles_in_use() + len(pages) > self.BUDGET:
            return
        self.vm.populate_many([first * self.g], len(pages) * self.g)
        for p in pages:
            # A new handle reads zero, a reused one what was written before: never the fake's NaNs.
            assert bool(torch.isfinite(self.t[p]).all())
            self.private[p] = self._value()
            self.t[p, 0] = self.private[p]

    @rule(first=st.integers(0, PAGES - 1), n=st.integers(1, 4))
    def release(self, first, n):
        pages = range(first, min(first + n, self.PAGES))
        self.vm.release_many([first * self.g], len(pages) * self.g)
        for p in pages:
            self.private.pop(p, None)
            self.shown.pop(p, None)

    @precondition(lambda self: self.private and self._free_pages() and self._free_indices())
    @rule(data=st.data())
    def share(self, data):
        src = data.draw(st.sampled_from(sorted(self.private)))
        dst = data.draw(st.sampled_from(self._free_pages()))
        index = data.draw(st.sampled_from(self._free_indices()))
        self.pool.alloc_at(index)
        copy_to_shared(self.vm, src * self.g, self.pool, index)
        map_shared(self.vm, dst * self.g, self.pool, index)
        self.index_value[index] = self.private.pop(src)
        self.shown[src] = self.shown[dst] = index

    @precondition(lambda self: self.index_value and self._free_pages())
    @rule(data=st.data())
    def show_again(self, data):
        index = data.draw(st.sampled_from(sorted(self.index_value)))
        dst = data.draw(st.sampled_from(self._free_pages()))
        map_shared(self.vm, dst * self.g, self.pool, index)
        self.shown[dst] = index

    @precondition(lambda self: self.shown)
    @rule(data=st.data())
    def unshare(self, data):
        page = data.draw(st.sampled_from(sorted(self.shown)))
        unmap_shared(self.vm, page * self.g)
        del self.shown[page]

    @precondition(lambda self: set(self.index_value) - set(self.shown.values()))
    @rule(data=st.data())
    def free_shared(self, data):
        index = data.draw(st.sampled_from(sorted(set(self.index_value) - set(self.shown.values()))))
        self.pool.free_run(index, 1)
        del self.index_value[index]

    @precondition(lambda self: self.private or self.shown)
    @rule(data=st.data())
    def write(self, data):
        page = data.draw(st.sampled_from(sorted(set(self.private) | set(self.shown))))
        value = self._value()
        if page in self.private:
            self.private[page] = value
        else:
            self.index_value[self.shown[page]] = value
        self.t[page, 0] = value

    @rule()
    def device_finishes(self):
        self.driver.stream.finish()

    @rule()
    def trim(self):
        self.vm.trim_pool()

    @invariant()
    def every_believed_page_is_mapped_and_reads_its_value(self):
        for page, value in self.private.items():
            assert self.driver.handle_at(self.vm.address + page * self.g) is not None
            assert self.t[page, 0] == value
        for page, index in self.shown.items():
            assert self.driver.handle_at(self.vm.address + page * self.g) is not None
            assert self.t[page, 0] == self.index_value[index]

    @invariant()
    def a_handle_is_mapped_twice_only_when_shared(self):
        by_handle: dict[int, list[int]] = {}
        for address, (_, handle) in self.driver.mappings.items():
            by_handle.setdefault(handle, []).append((address - self.vm.address) // self.g)
        for handle, pages in by_handle.items():
            if len(pages) < 2:
                continue
            live = [p for p in pages if p in self.private or p in self.shown]
            assert not any(p in self.private for p in live), (handle, pages)
            assert len({self.shown[p] for p in live}) <= 1, (handle, pages)
            assert all(p in self.vm._retiring for p in pages if p not in live)

    @invariant()
    def handles_are_the_backends_and_within_budget(self):
        known = set(self.vm._idle) | set(self.vm._holds)
        assert known == set(self.driver.handles) and len(known) == self.vm.handles_created <= self.BUDGET
        assert len(self.vm._idle) == len(set(self.vm._idle))
        assert not set(self.vm._idle) & set(self.vm._holds)
        # What a finalizer would give back if the memory were dropped now: exactly the driver's.
        assert self.vm._ledger.handles == set(self.driver.handles)
        assert self.vm._ledger.mappings == {a: h for a, (_, h) in self.driver.mappings.items()}

    @invariant()
    def resident_counts_each_physical_page_once(self):
        pending = {h for r in self.vm._retirements for h in r.pages.values()}
        in_use = self._handles_in_use()
        assert in_use <= self.vm.resident_bytes() // self.g <= in_use + len(pending)

    def teardown(self):
        self.vm.settle()
        assert self.vm.resident_bytes() == self._handles_in_use() * self.g
        self.vm.close()
        assert self.driver.live_handles == 0 and not self.driver.mappings
        del self.t
        gc.collect()
        self.driver.assert_clean()


TestBackendLifecycle = BackendLifecycle.TestCase
TestBackendLifecycle.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


# --- the manager on CUDA (fake driver) -----------------------------------------------------------
SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32, device=torch.device("cuda"))
SPEC3 = KVCacheSpec(num_layers=2, num_kv_heads=3, head_dim=16, dtype=torch.float32, device=torch.device("cuda"))
# test_virtual's lifecycle writes 2 layers x 2 heads; head_dim 24 makes 768-byte rows, 64 tokens over 3 pages.
SPEC_3_PAGES = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=24, dtype=torch.float32, device=torch.device("cuda"))
SMALL_PAGE = 16 * 1024  # a fake granularity that makes small chunks: SPEC 32 tokens, SPEC3 64 over 3 pages


def make_cuda_manager(spec=SPEC, num_slots=4, max_len=256, budget_chunks=8, granularity=SMALL_PAGE, driver=None,
                      **options) -> tuple[FakeDriver, VirtualKVCacheManager]:
    driver = driver or FakeDriver(granularity=granularity)
    layout = MegacacheLayout.build(spec, num_slots, max_len, granularity)
    return driver, VirtualKVCacheManager(spec, num_slots, max_len, budget_chunks * layout.chunk_bytes,
                                         VirtualOptions(**options), cuda_driver=driver)


def slot_page_addresses(m: VirtualKVCacheManager, slot: int, chunks: int) -> list[int]:
    first = m.memory.address + slot * m.layout.slot_bytes
    return [first + i * m.memory.page_size for i in range(chunks * m.chunk_pages)]


def test_megacache_layout_arithmetic():
    page = 2 * MiB
    smol = MegacacheLayout.build(KVCacheSpec(30, 3, 64, torch.bfloat16, torch.device("cuda")), 8, 2048, page)
    assert smol.token_bytes == 24 * 1024 and smol.page_tokens == 256 and smol.chunk_bytes == 3 * page
    assert abs(smol.padding_fraction - 1 / 16) < 1e-9
    llama3 = MegacacheLayout.build(KVCacheSpec(32, 8, 128, torch.bfloat16, torch.device("cuda")), 8, 2048, page)
    assert llama3.padding_fraction == 0 and llama3.page_tokens == 16 and llama3.chunk_bytes == page
    for layout in (smol, llama3):
        assert layout.chunk_bytes % page == 0 and layout.max_len % layout.page_tokens == 0
        assert layout.slot_bytes % page == 0 and layout.num_regions == 1
    tiny = MegacacheLayout.build(SPEC, 4, 100, page)  # 512-byte rows: one page holds the whole slot
    assert tiny.page_tokens == 4096 and tiny.max_len == 4096 and tiny.padding_fraction == 0


def test_the_layer_cache_is_a_strided_view_of_token_rows():
    driver, m = make_cuda_manager(spec=SPEC3)
    assert m.layout.page_tokens == 64 and m.chunk_pages == 3  # 768-byte rows: 64 tokens fill 3 pages
    k, v = m.layer_cache(1)
    assert k.shape == (3, 4, m.layout.max_len, 16) and k.stride(-1) == 1
    assert k.view(3, -1, 16).shape == (3, 4 * m.layout.max_len, 16)  # what write_kv needs
    seq = make_seq(list(range(1, 41)))
    m.admit(seq)
    m.allocate(seq, 40)
    slot = m.block_table(seq)[0]
    v[2, slot, 39] = torch.arange(16, dtype=torch.float32)
    row = m.layout.token_bytes // 4
    flat = torch.frombuffer((ctypes.c_float * (row * 64)).from_address(
        m.memory.address + slot * m.layout.slot_bytes), dtype=torch.float32)
    # token 39's row: [layer 1][V][head 2] sits at ((1 * 2 + 1) * 3 + 2) * 16 elements
    assert torch.equal(flat[39 * row + ((1 * 2 + 1) * 3 + 2) * 16:][:16], torch.arange(16, dtype=torch.float32))
    m.close()


def test_manager_on_cuda_maps_unmaps_and_agrees_with_the_driver():
    driver, m = make_cuda_manager(budget_chunks=12, lookahead_tokens=0)
    seqs = [make_seq([100 * i + j for j in range(1, 70)]) for i in range(3)]  # 69 tokens: 3 chunks of 32
    for seq in seqs:
        m.admit(seq)
        m.allocate(seq, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
    stats = m.stats()
    assert stats.bytes_physical == 9 * m.chunk_set_bytes == m.kernel_resident_bytes()
    assert len(driver.mappings) * driver.granularity == stats.bytes_physical  # the fake's own count
    assert stats.extra["device_handles_bytes"] >= stats.bytes_physical
    for seq in seqs:
        m.free(seq)
    assert m.kernel_resident_bytes() == m.stats().bytes_physical  # deferred reclamation keeps them
    assert m.release_free_memory() == 9 * m.chunk_set_bytes
    assert m.kernel_resident_bytes() == 0 and driver.live_handles == 0  # the pool was trimmed too
    m.close()
    assert driver.live_handles == 0 and not driver.mappings


def test_allocate_returns_with_every_page_of_the_step_mapped():
    """Background look-ahead is queued on the worker; on CUDA the next step's pages must have
    landed when allocate() returns (a slow fake driver makes the worker visibly late)."""
    driver, m = make_cuda_manager(lookahead_tokens=40, eager_mapping=False,
                                  driver=FakeDriver(granularity=SMALL_PAGE, map_delay_s=0.01))
    seq = make_seq([5])
    m.admit(seq)
    m.allocate(seq, 1)
    for _ in range(150):  # decode
        seq.num_computed_tokens = seq.num_tokens
        seq.token_ids.append(9)
        m.allocate(seq, 1)
        needed = cdiv(seq.num_tokens, m.layout.page_tokens)
        slot = m.block_table(seq)[0]
        assert all(driver.handle_at(a) is not None for a in slot_page_addresses(m, slot, needed))
        assert m.readable_tokens(seq) >= seq.num_tokens
        assert all(driver.handle_at(a) is not None
                   for a in slot_page_addresses(m, slot, m.readable_tokens(seq) // m.layout.page_tokens))
    assert m.stats().extra["map_calls_background"] > 0  # the look-ahead did run on the worker
    m.close()


def test_a_failed_background_map_is_raised_by_the_next_step_not_hung_on():
    # The device has less memory than the budget claims: the look-ahead map on the worker fails.
    driver, m = make_cuda_manager(budget_chunks=8, lookahead_tokens=64, eager_mapping=False,
                                  driver=FakeDriver(granularity=SMALL_PAGE, device_memory=2 * SMALL_PAGE))
    m.memory.handle_batch = 1
    seq = make_seq([5] * 40)  # 2 chunks now (a miss, mapped at once); 2 more queued as look-ahead
    m.admit(seq)
    m.allocate(seq, 40)
    seq.num_computed_tokens = 40
    seq.token_ids += [9] * 30
    with pytest.raises(RuntimeError, match="background map.*cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY"):
        m.allocate(seq, 30)
    m.mapper.close()


def test_running_sequences_share_prompt_pages_as_one_handle_mapped_twice():
    driver, m = make_cuda_manager(num_slots=4, max_len=512, budget_chunks=16, lookahead_tokens=0)
    prefix = list(range(1, 101))  # 100 tokens: 3 full chunks of 32
    a = make_seq(prefix + [900, 901])
    m.admit(a)
    m.allocate(a, a.num_tokens)
    slot_a = m.block_table(a)[0]
    m.kv[:, :, :, slot_a, : a.num_tokens] = torch.arange(a.num_tokens, dtype=torch.float32)[:, None]
    a.num_computed_tokens = a.num_tokens
    m.on_tokens_computed(a)
    alone = m.stats().bytes_physical
    creates = driver.calls["cuMemCreate"]
    b = make_seq(prefix + [5] * 30)
    assert m.admit(b) == 96
    slot_b = m.block_table(b)[0]
    m.allocate(b, b.num_tokens - 96)
    for page_a, page_b in zip(slot_page_addresses(m, slot_a, 3), slot_page_addresses(m, slot_b, 3)):
        assert driver.handle_at(page_a) == driver.handle_at(page_b) is not None
    assert torch.equal(m.kv[:, :, :, slot_b, :96], m.kv[:, :, :, slot_a, :96])
    s = m.stats()
    assert s.extra["shared_chunks"] == 3 and s.bytes_physical == alone + 2 * m.chunk_set_bytes  # b's own 2
    assert m.kernel_resident_bytes() == s.bytes_physical
    assert driver.calls["cuMemCreate"] - creates <= 2  # sharing copied nothing and created nothing for it
    m.free(a)
    m.free(b)
    m.release_free_memory()
    assert m.kernel_resident_bytes() == 0 and m.pool.allocated_bytes() == 0 and driver.live_handles == 0
    m.close()


def test_a_bad_page_size_or_reservation_fails_at_start_up():
    with pytest.raises(CudaVmmError, match="granularity"):
        make_cuda_manager(page_size=SMALL_PAGE + 4096)
    driver, m = make_cuda_manager(page_size=2 * SMALL_PAGE)  # a multiple is fine
    assert m.memory.page_size == 2 * SMALL_PAGE
    m.close()
    with pytest.raises(ValueError, match="address space|reserve"):
        VirtualKVCacheManager(SPEC, num_slots=2**30, max_model_len=2**20, physical_budget_bytes=2**30,
                              cuda_driver=FakeDriver())
    with pytest.raises(ValueError, match="only on CUDA"):
        VirtualKVCacheManager(KVCacheSpec(2, 2, 16, torch.float32, torch.device("cpu")), 2, 64, 2**20,
                              VirtualOptions(page_size=8192))


class CudaVirtualLifecycle(VirtualLifecycle):
    """test_virtual's random lifecycles (sharing, preemption, prefix reuse, values read back) on
    the CUDA backend, with chunks of three pages, a device that finishes steps at random, and the
    fake's ground truth: every computed token's pages are mapped, a handle is mapped twice only
    for a shared chunk, and no handle outlives the manager."""

    def __init__(self) -> None:
        RuleBasedStateMachine.__init__(self)
        self.driver, self.m = make_cuda_manager(spec=SPEC_3_PAGES, num_slots=4, max_len=320, budget_chunks=6,
                                                lookahead_tokens=8)
        self.k = self.m.kv[:, 0]
        self.running = []
        self.stamp = 0

    @rule()
    def device_finishes(self):
        self.driver.stream.finish()

    @invariant()
    def computed_pages_are_mapped_and_handles_shared_only_by_shared_chunks(self):
        m, driver = self.m, self.driver
        for seq in self.running:
            slot = m.block_table(seq)[0]
            addresses = slot_page_addresses(m, slot, cdiv(seq.num_computed_tokens, m.layout.page_tokens))
            assert all(driver.handle_at(a) is not None for a in addresses)
        shared_handles = {driver.handle_at(a) for s in m.slots for position in s.shared
                          for a in slot_page_addresses(m, s.index, position + 1)[-m.chunk_pages:]}
        for handle, count in driver.mapped_handles().items():
            assert count == 1 or handle in shared_handles or handle in {
                h for r in m.memory._retirements for h in r.pages.values()}
        assert driver.live_handles == m.memory.handles_created <= m.max_chunks * m.chunk_pages

    def teardown(self):
        super().teardown()  # frees everything, checks the counts, closes the memory
        assert self.driver.live_handles == 0 and not self.driver.mappings


TestCudaVirtualLifecycle = CudaVirtualLifecycle.TestCase
TestCudaVirtualLifecycle.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                             suppress_health_check=[HealthCheck.too_slow])


# --- on a GPU --------------------------------------------------------------------------------------
def _real_driver():
    pytest.importorskip("cuda.bindings", reason="the CUDA backend needs cuda-bindings: pip install 'kvmem[cuda]'")
    return open_driver(torch.device("cuda"))


@requires_gpu
def test_gpu_pages_map_unmap_and_agree_with_cuMemGetInfo():
    torch.ones(1, device="cuda").add_(1).sum().item()  # load the kernels used below before measuring
    driver = _real_driver()
    page = page_size_for(driver)
    vm = CudaVirtualMemory(64 * page, driver, page, max_pages=16, handle_batch=4)
    reserved = torch.cuda.memory_reserved()
    t = vm.tensor(torch.float32, (64, page // 4))
    assert t.is_cuda and t.data_ptr() == vm.address
    vm.populate_many([0, 8 * page], 4 * page)
    assert vm.resident_bytes() == 8 * page and vm.created_bytes() == 8 * page
    assert abs(vm.device_used_bytes() - vm.created_bytes()) <= page  # cuMemGetInfo agrees
    assert torch.count_nonzero(t[[0, 1, 2, 3, 8, 9, 10, 11]]).item() == 0  # new pages read zero
    t[0:4].fill_(3.0)
    t[8:12].copy_(t[0:4])
    assert t[8:12].sum().item() == 3.0 * 4 * page // 4
    vm.release_many([0], 4 * page)
    vm.settle()
    assert vm.resident_bytes() == 4 * page
    assert vm.trim_pool() == 4 * page
    other = torch.cuda.memory_reserved() - reserved  # what torch itself took meanwhile
    assert abs(vm.device_used_bytes() - other - 4 * page) <= page
    vm.close()
    assert abs(vm.device_used_bytes() - other) <= page


@requires_gpu
def test_gpu_manager_counts_agree_with_the_driver():
    driver = _real_driver()
    spec = KVCacheSpec(4, 2, 64, torch.float16, torch.device("cuda"))
    m = VirtualKVCacheManager(spec, 4, 4096, 64 * MiB, VirtualOptions(lookahead_tokens=0), cuda_driver=driver)
    seqs = [make_seq([7 * i + j for j in range(1, 300 * (i + 1))]) for i in range(3)]
    for seq in seqs:
        m.admit(seq)
        m.allocate(seq, seq.num_tokens)
        k, v = m.layer_cache(3)
        k[:, m.block_table(seq)[0], : seq.num_tokens] = 1.0
        seq.num_computed_tokens = seq.num_tokens
    torch.cuda.synchronize()
    assert m.kernel_resident_bytes() == m.stats().bytes_physical > 0
    assert m.memory.device_used_bytes() >= m.stats().bytes_physical
    for seq in seqs:
        m.free(seq)
    m.release_free_memory()
    assert m.kernel_resident_bytes() == 0 and m.memory.created_bytes() == 0
    m.close()


@requires_gpu
@pytest.mark.parametrize("kind", ["llama3-gqa", "qwen2-bias"])
def test_gpu_greedy_tokens_virtual_equal_paged(tmp_path_factory, kind):
    pytest.importorskip("cuda.bindings", reason="the CUDA backend needs cuda-bindings: pip install 'kvmem[cuda]'")
    from kvmem import LLM, SamplingParams
    from tests.oracle import make_tiny_model

    path = tmp_path_factory.getbasetemp() / f"gpu-{kind}"
    if not path.exists():
        make_tiny_model(path, kind)
    lengths = [1, 5, 17, 40, 130]
    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 300 + 2 for j in range(n)]} for i, n in enumerate(lengths)]
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=20)
    got = {}
    for kv_cache in ("paged", "virtual"):
        llm = LLM(str(path), dtype="float32", device="cuda", kv_cache=kv_cache, kv_cache_memory="64MiB",
                  max_num_batched_tokens=48)
        got[kv_cache] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if kv_cache == "virtual":
            assert llm.engine.manager.kernel_resident_bytes() == llm.stats().bytes_physical
            llm.engine.manager.close()
    assert got["virtual"] == got["paged"]
