"""vmm_cuda: CUDA driver virtual memory under the `virtual` KV strategy (vAttention on a GPU).

A `CudaVirtualMemory` is one range of device address space (cuMemAddressReserve) that costs no
device memory until pages are mapped into it. KV tensors are zero-copy views of it (through
`__cuda_array_interface__`), so attention reads `cache[:, slot, :len]` with ordinary non-paged
kernels, while the manager decides which pages are backed: `populate_many` maps physical pages
(cuMemMap + cuMemSetAccess), `release_many` gives them back (cuMemUnmap). It implements
`vmm_backend.VirtualMemoryBackend`, as `vmm_cpu.CpuVirtualMemory` does, with three differences the
manager must respect, each a member of that protocol:

- An unmapped page *faults* (an illegal address that kills the CUDA context), where on CPU the
  kernel maps it on first touch. `faults_on_unmapped` says so; the manager then maps a step's
  pages before the step, waiting for any map still queued on its worker.
- The physical page is the device's allocation granularity (2 MiB on current GPUs), or a multiple
  of it (`page_size_for`). The layout that keeps that from wasting a page per region per sequence
  is `megacache.MegacacheLayout`.
- Pages are unmapped only after the device is done with them (below; `settle()`), and idle
  pre-created pages stay allocated until `trim_pool()`.

Handles. Physical pages are driver allocations (cuMemCreate, one per page), pre-created in
batches of `handle_batch` into a pool of idle handles: growing a sequence is a map, not a create,
once the pool is warm. An unmapped page's handle goes back to the pool (its memory stays allocated
to this process); `trim_pool()` releases the idle ones (cuMemRelease). At most `max_pages` handles
exist at once: the manager's physical budget. A new handle is zeroed once (a fresh CPU page reads
zero, and attention may read keys past a sequence's length that it then masks: 0 x NaN is NaN).

The unmap fence. Kernels run asynchronously: when the manager decides to unmap a page, kernels of
the step that last used it may still be queued. `release_many` therefore only *retires* pages: it
records a fence (a torch.cuda.Event) on the caller's current stream and unmaps them once that fence
has passed; until then the handle is neither unmapped nor reused. Retirements whose fence has
passed are reaped whenever pages are populated; one is waited for only when a handle is needed and
none is idle, when its address must show another page, or on `settle()`/`close()`. A retired page that is populated again
before its fence passed is simply kept (no driver call), unless another holder shares its handle.
With this engine's synchronous steps (the sampled tokens are copied to the host at the end of
every step) the fence has always passed by the time the next step is scheduled; it is what keeps
an engine that schedules ahead of the device correct. Maps need no fence: the driver documents no
stream ordering for cuMemMap/cuMemSetAccess, and kernels launched after they return see the
mapping (vLLM's and vAttention's allocators rely on the same; not yet checked here on a GPU).

Sharing (prefix pages of running sequences). The same physical handle is mapped at two virtual
addresses. `CudaSharedPages` (a `vmm_backend.SharedPages`), `copy_to_shared`, `map_shared` and
`unmap_shared` have the names and arguments of their `vmm_cpu` counterparts (and are methods of the
memory, as the protocol asks), so `virtual.py` drives either: on CUDA "copy_to_shared" copies
nothing — the pool adopts the handles already mapped there.

Accounting comes from this object's own record of successful driver calls (`resident_bytes`:
distinct handles mapped or held by a shared pool) and from cuMemGetInfo (`device_used_bytes`: the
drop of free device memory since the reservation was made, which counts idle pooled handles too
and anything else the process allocated meanwhile).

Threads: every method takes the object's lock and first makes the device's primary context
current on the calling thread (the manager's thread and its mapping worker both map).

Lifetime: `close()` waits for the device, unmaps and releases everything; a memory dropped without
it does the same when collected (the engine does not close its manager). The address range itself
is freed only once no tensor views it, so nothing else can be allocated under a stale view.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from kvmem.memory.cuda_driver import CudaDriverError, Fence, VmmDriver
from kvmem.progress import human_bytes

# Larger reservations are refused before the driver is asked. GPUs address 49 bits (512 TiB) and,
# under unified addressing, share the process's 47-bit (128 TiB) user address space with the host;
# 64 TiB is already a thousand times any KV budget of a single GPU.
MAX_RESERVATION_BYTES = 1 << 46
DEFAULT_HANDLE_BATCH = 8  # handles created per cuMemCreate round (16 MiB of 2 MiB pages)


class CudaVmmError(ValueError):
    """A reservation, page size or mapping the device refuses, or a request that makes no sense."""


def open_driver(device: torch.device) -> VmmDriver:
    """The real driver for `device` (needs cuda-bindings and a GPU)."""
    from kvmem.memory.cuda_driver import CudaDriver

    return CudaDriver(device)


def page_size_for(driver: VmmDriver, requested: int | None = None) -> int:
    """The physical page size: `requested`, which must be a multiple of the device's allocation
    granularity, or the granularity itself."""
    driver.make_current()
    granularity = driver.allocation_granularity()
    if requested is None:
        return granularity
    if requested <= 0 or requested % granularity:
        raise CudaVmmError(f"page size {requested} bytes ({human_bytes(requested)}) is not a multiple of the "
                           f"device's allocation granularity, {granularity} bytes ({human_bytes(granularity)}); "
                           f"use a multiple of it, or leave it unset for the granularity")
    return requested


@dataclass(eq=False)
class _Retirement:
    """Pages whose unmap waits for `fence`: still mapped, their handles not reusable yet."""

    fence: Fence | None
    pages: dict[int, int] = field(default_factory=dict)  # page index -> handle


class _Reservation:
    """The address range itself, shared by a `CudaVirtualMemory` and the tensors viewing it: it is
    freed (cuMemAddressFree) only once neither is alive, so that no later allocation lands under a
    tensor that still points there. (Reading such a tensor after `close()` is still an illegal
    address: its pages are unmapped. Only the address is kept.)"""

    def __init__(self, driver: VmmDriver, address: int, size: int) -> None:
        self.address, self.size = address, size
        self.finalizer = weakref.finalize(self, _free_reservation, driver, address, size)
        self.finalizer.atexit = False  # at exit the context goes with the process


class _Ledger:
    """The driver's mappings and handles of one `CudaVirtualMemory`, kept apart from it so that a
    memory dropped without `close()` still gives them back: its finalizer may not reference the
    object. Holds the reservation, so that the range is freed after its pages are unmapped."""

    def __init__(self, reservation: _Reservation) -> None:
        self.reservation: _Reservation | None = reservation
        self.mappings: dict[int, int] = {}  # address -> handle
        self.handles: set[int] = set()  # created, not released


def _release_ledger(driver: VmmDriver, ledger: _Ledger, page_size: int) -> None:
    """Unmap and release what a dropped memory still held (after the device is done with it)."""
    try:
        if ledger.mappings or ledger.handles:
            driver.make_current()
            driver.fence().synchronize()
            for address in list(ledger.mappings):
                driver.unmap(address, page_size)
                del ledger.mappings[address]
            for handle in list(ledger.handles):
                driver.release(handle)
                ledger.handles.discard(handle)
    except CudaDriverError:
        pass  # nothing useful to do on failure inside a finalizer
    ledger.reservation = None


def _free_reservation(driver: VmmDriver, address: int, size: int) -> None:
    try:
        driver.make_current()  # the finalizer may run on any thread
        driver.free_reservation(address, size)
        driver.close()
    except CudaDriverError:
        pass  # nothing useful to do on failure inside a finalizer


class CudaVirtualMemory:
    """One reservation of device address space with pages mapped on demand (see the module
    docstring): a `vmm_backend.VirtualMemoryBackend`. Offsets and lengths are bytes from the start
    of the reservation, multiples of `page_size`."""

    faults_on_unmapped = True  # an unmapped page is an illegal address, not a page fault

    def __init__(self, num_bytes: int, driver: VmmDriver, page_size: int, max_pages: int,
                 handle_batch: int = DEFAULT_HANDLE_BATCH) -> None:
        if num_bytes <= 0:
            raise CudaVmmError(f"a reservation needs a positive size, got {num_bytes} bytes")
        page_size_for(driver, page_size)  # a multiple of the granularity, or a clear error
        size = -(-num_bytes // page_size) * page_size
        if size > MAX_RESERVATION_BYTES:
            raise CudaVmmError(f"cannot reserve {size} bytes ({human_bytes(size)}) of device address space: more than "
                               f"the {human_bytes(MAX_RESERVATION_BYTES)} kvmem allows (GPUs address 49 bits, shared "
                               f"with the host's 47); lower max_num_seqs or max_model_len")
        if max_pages < 1:
            raise CudaVmmError(f"max_pages must be at least 1, got {max_pages}")
        self.driver = driver
        self.page_size = page_size
        self.max_pages = max_pages
        self.handle_batch = max(1, handle_batch)
        self._lock = threading.RLock()
        self._make_current()
        self._baseline_free, self.device_total_bytes = driver.memory_info()
        try:
            address = driver.reserve(size, page_size)
        except CudaDriverError as e:
            raise CudaVmmError(f"cannot reserve {size} bytes ({human_bytes(size)}) of device address space: {e}; "
                               f"lower max_num_seqs or max_model_len") from e
        self.size = size
        self.address = address
        self.num_pages = size // page_size
        self._reservation: _Reservation | None = _Reservation(driver, address, size)
        self._ledger = _Ledger(self._reservation)
        # A memory dropped without close() (an engine is not closed explicitly) still unmaps and
        # releases everything when it is collected.
        self._finalizer = weakref.finalize(self, _release_ledger, driver, self._ledger, page_size)
        self._finalizer.atexit = False  # at exit the context goes with the process

        self._live: dict[int, int] = {}  # page -> handle, mapped and in use
        self._retiring: dict[int, _Retirement] = {}  # page -> its retirement (still mapped)
        self._retirements: list[_Retirement] = []  # in the order they were recorded
        self._holds: Counter[int] = Counter()  # handle -> mappings (live or retiring) + pool entries
        self._driver_maps: Counter[int] = Counter()  # handle -> driver mappings (map minus unmap calls)
        self._pool_held: Counter[int] = Counter()  # handle -> shared-pool entries holding it
        self._idle: list[int] = []  # created handles nobody holds: the pool
        self._zeroed: set[int] = set()  # handles zeroed since they were created
        self._shared_at: dict[int, tuple[CudaSharedPages, int]] = {}  # page -> (pool, index) it shows
        self._pools: list[CudaSharedPages] = []
        self.handles_created = 0  # alive: created and not released
        self.closed = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"at {self.address:#x}, {len(self._live)} pages mapped"
        return f"CudaVirtualMemory({human_bytes(self.size)} {state})"

    # --- views --------------------------------------------------------------------------------
    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...],
               strides: tuple[int, ...] | None = None) -> torch.Tensor:
        """A zero-copy tensor over the reservation with this shape (and element strides; None =
        contiguous). Its pages are whatever is mapped: never read what is not."""
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in shape {tuple(shape)}")
        if strides is None:  # contiguous
            strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        extent = 0 if 0 in shape else (1 + sum((d - 1) * s for d, s in zip(shape, strides))) * dtype.itemsize
        if extent > self.size:
            raise ValueError(f"a {dtype} tensor of shape {tuple(shape)} needs {extent} bytes; "
                             f"the reservation has {self.size}")
        with self._lock:
            self._check_open()
            self._make_current()
            # torch asks the driver which device the pointer is on, which fails on an unmapped
            # address: map the first page for the moment of wrapping (nothing runs on it).
            temporary = 0 not in self._live and 0 not in self._retiring
            if temporary:
                handle = self._take_handle()
                self._driver_map(0, handle)
                self.driver.set_access(self.address, self.page_size)
            try:
                raw = self.driver.wrap(self.address, self.size, owner=self._reservation)
            finally:
                if temporary:
                    self._driver_unmap(0, handle)
        return raw.view(dtype).as_strided(shape, strides)

    # --- physical backing ---------------------------------------------------------------------
    def populate_many(self, offsets: Iterable[int], length: int) -> None:
        """Map a page under every page of [offset, offset + length), at every offset. A page must
        not be mapped already; one retired but not yet unmapped is kept as it is."""
        offsets = _int_list(offsets)
        with self._lock:
            self._check_ranges(offsets, length, "populate")
            self._make_current()
            self._reap()
            fresh: dict[int, tuple[int, int]] = {}  # new handle -> its range, zeroed before returning
            mapped: list[int] = []  # pages mapped by this call, unmapped again if it fails
            try:
                for offset in offsets:
                    first = offset // self.page_size
                    for page in range(first, first + length // self.page_size):
                        if page in self._live:
                            raise CudaVmmError(f"populate: page {page} (offset {page * self.page_size}) "
                                               f"is already mapped")
                        if page in self._retiring and self._revive(page):
                            continue
                        handle = self._take_handle()
                        self._driver_map(page, handle)
                        mapped.append(page)
                        if handle not in self._zeroed:
                            fresh[handle] = (self.address + page * self.page_size, self.page_size)
                    self.driver.set_access(self.address + offset, length)
                if fresh:
                    self.driver.zero(list(fresh.values()))
                    self._zeroed.update(fresh)
            except BaseException:
                for page in mapped:  # nothing has run on them yet: unmap at once
                    self._driver_unmap(page, self._live[page])
                raise

    def release_many(self, offsets: Iterable[int], length: int) -> None:
        """Give back the pages under [offset, offset + length) at every offset, once the work
        queued so far on the caller's stream is done; pages not mapped are skipped (as
        MADV_DONTNEED over an empty range is a no-op)."""
        offsets = _int_list(offsets)
        with self._lock:
            self._check_ranges(offsets, length, "release")
            self._make_current()
            self._retire(page for offset in offsets
                         for page in range(offset // self.page_size, (offset + length) // self.page_size))

    def settle(self) -> None:
        """Unmap every retired page now, waiting for its fence: afterwards the driver's mappings are
        exactly the live pages."""
        with self._lock:
            if self.closed:
                return
            self._make_current()
            while self._retirements:
                self._complete(self._retirements[0], wait=True)

    def trim_pool(self) -> int:
        """Release the idle handles (cuMemRelease), after settling; returns the bytes released."""
        with self._lock:
            if self.closed:
                return 0
            self.settle()
            released = len(self._idle)
            while self._idle:
                self._release_handle(self._idle.pop())
            return released * self.page_size

    # --- accounting ---------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        """Distinct handles the driver has mapped here or a shared pool holds (a shared page
        counts once however many places show it). Retired pages still count until they are
        unmapped: `settle()` first to compare with the manager."""
        with self._lock:
            held = {h for h, n in self._driver_maps.items() if n} | {h for h, n in self._pool_held.items() if n}
            return len(held) * self.page_size

    def physical_bytes(self, pool: CudaSharedPages | None = None) -> int:
        """`resident_bytes()` once retired pages are unmapped (`settle()`): it already counts the
        handles a shared pool holds, each once. cuMemGetInfo agrees in tests on a GPU
        (`device_used_bytes()`), but counts the idle handle pool and every other allocation of the
        process too."""
        self.settle()
        return self.resident_bytes()

    def extra_stats(self) -> dict[str, int]:
        """Device memory held beyond the mapped pages: the idle handle pool, and all handles."""
        return {"page_size": self.page_size, "device_pool_idle_bytes": self.idle_bytes(),
                "device_handles_bytes": self.created_bytes()}

    def mapped_pages(self) -> int:
        """Pages of the reservation in use (mapped and not retired)."""
        return len(self._live)

    def created_bytes(self) -> int:
        """Device memory held in handles: in use, retiring or idle in the pool."""
        return self.handles_created * self.page_size

    def idle_bytes(self) -> int:
        """Handles in the pool that nobody maps."""
        return len(self._idle) * self.page_size

    def device_used_bytes(self) -> int:
        """cuMemGetInfo's free bytes at construction minus now: `created_bytes()` plus whatever
        else the process allocated on the device meanwhile."""
        with self._lock:
            self._make_current()
            free, _ = self.driver.memory_info()
            return self._baseline_free - free

    # --- sharing (vmm_backend.VirtualMemoryBackend's names for the module's functions) ----------
    def shared_pool(self, num_pages: int) -> CudaSharedPages:
        """A new pool of `num_pages` shareable indices over this memory's handles."""
        return CudaSharedPages(self, num_pages)

    def copy_to_shared(self, offset: int, pool: CudaSharedPages, page_index: int, num_pages: int = 1) -> None:
        """See the module function `copy_to_shared` (nothing is copied)."""
        copy_to_shared(self, offset, pool, page_index, num_pages)

    def map_shared(self, offset: int, pool: CudaSharedPages, page_index: int, num_pages: int = 1) -> None:
        """See the module function `map_shared`."""
        map_shared(self, offset, pool, page_index, num_pages)

    def unmap_shared(self, offset: int, num_pages: int = 1) -> None:
        """See the module function `unmap_shared`."""
        unmap_shared(self, offset, num_pages)

    def mapping_limit(self) -> int | None:
        """None: CUDA mappings are the driver's, not the process's VMAs; no limit is known there."""
        return None

    # --- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for the device, unmap everything, release every handle; idempotent. The address
        range is freed once no tensor views it (see `_Reservation`)."""
        with self._lock:
            if self.closed:
                return
            self._make_current()
            self.driver.fence().synchronize()  # nothing queued may still read a page unmapped below
            self.settle()
            for page, handle in list(self._live.items()):
                self._forget_shared(page)
                self._driver_unmap(page, handle)
            for pool in self._pools:
                pool._drop_all()
            while self._idle:
                self._release_handle(self._idle.pop())
            if self._holds or self.handles_created:  # cannot happen: every holder was dropped above
                raise CudaVmmError(f"close: {self.handles_created} handles still held: {dict(self._holds)}")
            self.closed = True
            self._finalizer()  # nothing left in the ledger: lets go of the reservation
            self._reservation = None  # frees the range now if no tensor views it

    def __enter__(self) -> CudaVirtualMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals (callers hold the lock) ----------------------------------------------------
    def _make_current(self) -> None:
        """The driver's current context is per thread (and a thread-local store, so cheap): set it
        on every entry rather than trusting that nothing in this thread changed it."""
        self.driver.make_current()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("CudaVirtualMemory is closed")

    def _check_ranges(self, offsets: Sequence[int], length: int, what: str) -> None:
        self._check_open()
        if length < 0 or length % self.page_size or any(o % self.page_size for o in offsets):
            raise ValueError(f"{what}: offsets and length must be multiples of the page size, {self.page_size}")
        if offsets and (min(offsets) < 0 or max(offsets) + length > self.size):
            raise ValueError(f"{what}: offsets {min(offsets)}..{max(offsets)} + {length} bytes fall outside the "
                             f"{self.size}-byte reservation")

    def _take_handle(self) -> int:
        """An idle handle: from the pool, else a new batch, else the oldest retirement's (waited for)."""
        if not self._idle:
            self._reap()
        if not self._idle and self.handles_created < self.max_pages:
            self._create_batch()
        while not self._idle and self._retirements:
            self._complete(self._retirements[0], wait=True)
        if not self._idle:
            raise CudaVmmError(f"all {self.max_pages} physical pages ({human_bytes(self.max_pages * self.page_size)}) of "
                               f"the KV budget are in use; the manager asked for more than its budget")
        handle = self._idle.pop()
        self._holds[handle] += 1
        return handle

    def _create_batch(self) -> None:
        count = min(self.handle_batch, self.max_pages - self.handles_created)
        for i in range(count):
            try:
                handle = self.driver.create(self.page_size)
            except CudaDriverError as e:
                if i:  # part of a batch is enough for now
                    return
                raise CudaVmmError(f"cannot allocate a {human_bytes(self.page_size)} page of device memory "
                                   f"({self.handles_created} allocated for KV so far): {e}; "
                                   f"lower kv_cache_memory") from e
            self.handles_created += 1
            self._ledger.handles.add(handle)
            self._idle.append(handle)

    def _release_handle(self, handle: int) -> None:
        self.driver.release(handle)
        self._ledger.handles.discard(handle)
        self.handles_created -= 1
        self._zeroed.discard(handle)

    def _drop_hold(self, handle: int) -> None:
        self._holds[handle] -= 1
        if self._holds[handle] == 0:
            del self._holds[handle]
            self._idle.append(handle)

    def _driver_map(self, page: int, handle: int) -> None:
        """Map `handle` (already held by the caller) at `page`; it is live from now on."""
        address = self.address + page * self.page_size
        try:
            self.driver.map(address, self.page_size, handle)
        except BaseException:
            self._drop_hold(handle)
            raise
        self._ledger.mappings[address] = handle
        self._driver_maps[handle] += 1
        self._live[page] = handle

    def _driver_unmap(self, page: int, handle: int) -> None:
        """Unmap `page` now (its mapping of `handle`, live or retiring) and drop that hold."""
        address = self.address + page * self.page_size
        self.driver.unmap(address, self.page_size)
        del self._ledger.mappings[address]
        self._driver_maps[handle] -= 1
        if not self._driver_maps[handle]:
            del self._driver_maps[handle]
        self._live.pop(page, None)
        self._drop_hold(handle)

    def _retire(self, pages: Iterable[int]) -> None:
        """Stop using the live ones among `pages`: they are unmapped once a fence recorded now
        has passed."""
        retirement = _Retirement(fence=None)
        for page in pages:
            handle = self._live.pop(page, None)
            if handle is None:
                continue
            self._forget_shared(page)
            retirement.pages[page] = handle
            self._retiring[page] = retirement
        if retirement.pages:
            retirement.fence = self.driver.fence()
            self._retirements.append(retirement)

    def _revive(self, page: int) -> bool:
        """Take a retired page back into use without unmapping it, if nobody else holds its handle
        (a handle a shared pool still holds must not become someone's private page)."""
        retirement = self._retiring[page]
        handle = retirement.pages[page]
        if self._holds[handle] != 1:
            self._complete(retirement, wait=True)
            return False
        del self._retiring[page], retirement.pages[page]
        self._live[page] = handle
        return True

    def _complete(self, retirement: _Retirement, wait: bool) -> None:
        if wait and retirement.fence is not None:
            retirement.fence.synchronize()
        for page, handle in list(retirement.pages.items()):
            del self._retiring[page], retirement.pages[page]
            self._driver_unmap(page, handle)
        self._retirements.remove(retirement)

    def _reap(self) -> None:
        """Unmap the retired pages whose fence has passed, without waiting for any."""
        for retirement in list(self._retirements):
            if not retirement.pages or retirement.fence is None or retirement.fence.query():
                self._complete(retirement, wait=False)

    def _forget_shared(self, page: int) -> None:
        shown = self._shared_at.pop(page, None)
        if shown is not None:
            pool, index = shown
            pool._map_count[index] -= 1


def _int_list(offsets: Iterable[int]) -> list[int]:
    return offsets.tolist() if hasattr(offsets, "tolist") else [int(o) for o in offsets]


# --- shared pages ---------------------------------------------------------------------------
class CudaSharedPages:
    """Physical pages that can be shown at two virtual places at once (prefix sharing): the CUDA
    `vmm_backend.SharedPages`, counterpart of `vmm_cpu.SharedPagePool`, with its indices and methods. An index holds a
    handle of `memory` (adopted by `copy_to_shared`), and keeps it from going back to the pool
    until `free_run`; an index still mapped somewhere cannot be freed."""

    def __init__(self, memory: CudaVirtualMemory, num_pages: int) -> None:
        if num_pages <= 0:
            raise CudaVmmError(f"a pool needs a positive number of pages, got {num_pages}")
        self.memory = memory
        self.num_pages = num_pages
        self._handles: list[int | None] = [None] * num_pages
        self._taken = bytearray(num_pages)
        self._map_count = [0] * num_pages  # places each index is shown (kept by map_/unmap_shared)
        self.closed = False
        memory._pools.append(self)

    def __repr__(self) -> str:
        return f"CudaSharedPages({self.num_pages} pages, {self.num_pages - sum(self._taken)} free)"

    def alloc_at(self, index: int, n: int = 1) -> None:
        """Take indices [index, index + n), which must all be free."""
        self._check_open()
        if n < 1 or index < 0 or index + n > self.num_pages:
            raise ValueError(f"pages {index}..{index + n - 1} outside the pool of {self.num_pages}")
        if any(self._taken[index:index + n]):
            raise ValueError(f"pages {index}..{index + n - 1} are not all free")
        self._taken[index:index + n] = b"\x01" * n

    def free_run(self, index: int, n: int) -> None:
        """Give indices [index, index + n) back, and their handles to the memory's pool once no
        retired mapping holds them either."""
        with self.memory._lock:
            self._check_taken(index, n)
            if any(self._map_count[index:index + n]):
                raise ValueError(f"shared pages {index}..{index + n - 1} are still mapped; unmap_shared them first")
            for i in range(index, index + n):
                self._drop(i)
                self._taken[i] = 0

    def allocated_bytes(self) -> int:
        """Device memory the pool's indices hold (distinct handles)."""
        return len({h for h in self._handles if h is not None}) * self.memory.page_size

    def close(self) -> None:
        """Let go of every handle; idempotent (the memory's close does it too)."""
        if self.closed:
            return
        if not self.memory.closed:
            with self.memory._lock:
                self._drop_all()
        self.closed = True

    def _drop(self, index: int) -> None:
        handle, self._handles[index] = self._handles[index], None
        if handle is not None:
            self.memory._pool_held[handle] -= 1
            if not self.memory._pool_held[handle]:
                del self.memory._pool_held[handle]
            self.memory._drop_hold(handle)

    def _drop_all(self) -> None:
        for i in range(self.num_pages):
            self._drop(i)
            self._taken[i] = 0
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("CudaSharedPages is closed")

    def _check_taken(self, index: int, n: int) -> None:
        self._check_open()
        if n < 1 or index < 0 or index + n > self.num_pages:
            raise ValueError(f"pages {index}..{index + n - 1} outside the pool of {self.num_pages}")
        if not all(self._taken[index:index + n]):
            raise ValueError(f"pages {index}..{index + n - 1} include a free page")


def _pages(vm: CudaVirtualMemory, offset: int, num_pages: int, what: str) -> range:
    vm._check_ranges([offset], num_pages * vm.page_size, what)
    first = offset // vm.page_size
    return range(first, first + num_pages)


def copy_to_shared(vm: CudaVirtualMemory, offset: int, pool: CudaSharedPages, page_index: int,
                   num_pages: int = 1) -> None:
    """Make the private pages mapped at vm [offset, + num_pages pages) the pool's pages
    [page_index, + num_pages): on CUDA nothing is copied, the pool adopts their handles, and what a
    tensor reads there does not change."""
    with vm._lock:
        pages = _pages(vm, offset, num_pages, "copy_to_shared")
        pool._check_taken(page_index, num_pages)
        for page, index in zip(pages, range(page_index, page_index + num_pages)):
            handle = vm._live.get(page)
            if handle is None or page in vm._shared_at:
                raise ValueError(f"copy_to_shared: page {page} is not a mapped private page")
            if pool._handles[index] is not None:
                raise ValueError(f"copy_to_shared: shared page {index} already holds a page")
            pool._handles[index] = handle
            vm._holds[handle] += 1
            vm._pool_held[handle] += 1
            vm._shared_at[page] = (pool, index)
            pool._map_count[index] += 1


def map_shared(vm: CudaVirtualMemory, offset: int, pool: CudaSharedPages, page_index: int,
               num_pages: int = 1) -> None:
    """Show pool pages [page_index, + num_pages) at vm [offset, + num_pages pages). Whatever was
    mapped there is replaced, as MAP_FIXED does on CPU (after its fence: the address must be free)."""
    with vm._lock:
        pages = _pages(vm, offset, num_pages, "map_shared")
        pool._check_taken(page_index, num_pages)
        vm._make_current()
        vm._retire(pages)
        for page, index in zip(pages, range(page_index, page_index + num_pages)):
            handle = pool._handles[index]
            if handle is None:
                raise ValueError(f"map_shared: shared page {index} holds no page (copy_to_shared first)")
            retirement = vm._retiring.get(page)
            if retirement is not None:
                if retirement.pages[page] == handle:  # the same page again: keep its mapping
                    del vm._retiring[page], retirement.pages[page]
                    vm._live[page] = handle
                else:
                    vm._complete(retirement, wait=True)
            if page not in vm._live:
                vm._holds[handle] += 1
                vm._driver_map(page, handle)
            vm._shared_at[page] = (pool, index)
            pool._map_count[index] += 1
        vm.driver.set_access(vm.address + offset, num_pages * vm.page_size)


def unmap_shared(vm: CudaVirtualMemory, offset: int, num_pages: int = 1) -> None:
    """Stop showing anything at vm [offset, + num_pages pages) (unmapped once the fence passes).
    The pool keeps its pages; free them in the pool when no one maps them."""
    with vm._lock:
        pages = _pages(vm, offset, num_pages, "unmap_shared")
        vm._make_current()
        vm._retire(pages)

