"""vmm_cpu: Linux virtual memory under the `virtual` KV strategy (vAttention on CPU).

A `CpuVirtualMemory` is one contiguous range of address space that costs no RAM until its pages are
touched. KV tensors are zero-copy views of it, so attention reads `cache[slot, :len]` with ordinary
non-paged kernels, while the manager decides which pages hold RAM: `populate` maps them ahead of use
(`MADV_POPULATE_WRITE`), `release` gives them back (`MADV_DONTNEED`). What is resident is read from
the kernel (`mincore`, `/proc/self/smaps`), never guessed.

Prefix sharing needs one physical page at two virtual places, which private anonymous memory cannot
give. A `SharedPagePool` is a memfd whose pages `map_shared` lays over part of a reservation
(`MAP_SHARED | MAP_FIXED`); `unmap_shared` turns that part back into private demand-paged memory.

The two classes implement `vmm_backend.VirtualMemoryBackend` and `vmm_backend.SharedPages`, the
contract the `virtual` manager relies on (the CUDA backend is the other implementation).

All of it is ctypes on libc with x86_64/aarch64 Linux constants; importing it elsewhere raises
ImportError. `MADV_POPULATE_WRITE` needs Linux 5.14. Nothing here is thread-safe, except that
`populate_many`/`release_many` only read this object's state (madvise is the kernel's to order):
the `virtual` manager's mapping worker runs them beside the manager, and the manager drains the
worker before it remaps shared pages.
"""

from __future__ import annotations

import ctypes
import math
import os
import resource
import sys
import weakref
from collections.abc import Sequence
from functools import reduce
from operator import or_

import numpy as np
import torch

from kvmem.progress import human_bytes

if not sys.platform.startswith("linux"):
    raise ImportError("kvmem.memory.vmm_cpu needs Linux (mmap/madvise/mincore/memfd through libc)")

PAGE_SIZE: int = os.sysconf("SC_PAGE_SIZE")
_PAGE_MASK = PAGE_SIZE - 1

PROT_NONE, PROT_READ, PROT_WRITE = 0x0, 0x1, 0x2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED = 0x01, 0x02, 0x10
MAP_ANONYMOUS, MAP_NORESERVE = 0x20, 0x4000
MADV_DONTNEED = 4
MADV_NOHUGEPAGE = 15
MADV_POPULATE_WRITE = 23
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02

_PRIVATE_FLAGS = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
_RW = PROT_READ | PROT_WRITE

# A private handle: other modules binding the same libc functions with other argtypes can't clash.
_libc = ctypes.CDLL(None, use_errno=True)


def _bind(name: str, restype, *argtypes):
    fn = getattr(_libc, name)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


_c_off_t = ctypes.c_long  # off_t is 64-bit on LP64 Linux
_mmap = _bind("mmap", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
              ctypes.c_int, _c_off_t)
_munmap = _bind("munmap", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
_madvise = _bind("madvise", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_mincore = _bind("mincore", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_fallocate = _bind("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int, _c_off_t, _c_off_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


class VirtualMemoryError(ValueError):
    """A reservation or a pool page the system refuses, or a request that makes no sense."""


class PoolExhausted(VirtualMemoryError, MemoryError):
    """`SharedPagePool.alloc` with no free page; also a MemoryError, as a full allocator is."""


def _os_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def _round_up(n: int) -> int:
    return (n + _PAGE_MASK) & ~_PAGE_MASK


def _refusal_hint() -> str:
    """Why the kernel may refuse address space, as far as this process can see."""
    hints = []
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            if f.read().strip() == "2":
                hints.append("vm.overcommit_memory=2 (strict accounting) ignores MAP_NORESERVE, so "
                             "the whole reservation counts against CommitLimit")
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        hints.append(f"RLIMIT_AS (ulimit -v) caps this process at {human_bytes(soft)}")
    hints.append("user address space is 128 TiB on x86_64 with 4-level page tables")
    return "; ".join(hints)


def _max_map_count() -> int:
    """The kernel's limit on this process's mappings (vm.max_map_count)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530  # Linux's default


def _map_private(address: int, length: int) -> None:
    """Put fresh demand-paged memory at [address, +length), atomically replacing what was there."""
    got = _mmap(address, length, _RW, _PRIVATE_FLAGS | MAP_FIXED, -1, 0)
    if got == _MAP_FAILED:
        raise _os_error(f"mmap(MAP_FIXED) of {length} bytes at {address:#x}")
    # With THP "always", one touch could back a whole 2 MiB; the manager counts 4 KiB pages.
    # (EINVAL on kernels without THP: nothing to turn off then.)
    _madvise(address, length, MADV_NOHUGEPAGE)


# --- the reservation ------------------------------------------------------------------------
class _Mapping:
    """The address range itself, shared by a `CpuVirtualMemory` and the tensors made from it.

    Each tensor's buffer (a ctypes array) holds a reference to it, so the range is unmapped only
    when neither the `CpuVirtualMemory` nor any tensor view is alive: then CPython drops the last
    reference and the finalizer runs munmap.
    """

    def __init__(self, base: int, total: int, address: int, size: int) -> None:
        self.address, self.size = address, size
        # vm page number -> (pool, pool page) for every page shown from a SharedPagePool, so that a
        # pool never frees a page still mapped here (that page would come back, zero, on next touch).
        self.shared: dict[int, tuple[SharedPagePool, int]] = {}
        self.live_windows = 0  # ctypes buffers under live tensors (unhashable, so no WeakSet)
        self.finalizer = weakref.finalize(self, _unmap, base, total, self.shared)
        # At exit the process goes with its mappings; unmapping earlier could only fault a late reader.
        self.finalizer.atexit = False

    def drop_shared(self, first_page: int, num_pages: int) -> None:
        """Forget the shared pages in [first_page, + num_pages) (their mapping was replaced)."""
        end = first_page + num_pages
        if num_pages > len(self.shared):  # a big range (a whole 64 GiB reset): walk the dict
            pages = [page for page in self.shared if first_page <= page < end]
        else:
            pages = range(first_page, end)
        for page in pages:
            held = self.shared.pop(page, None)
            if held is not None:
                held[0]._map_count[held[1]] -= 1

    def reset(self) -> None:
        """Fresh private memory over the whole range: no RAM, no shared page, reads zero."""
        _map_private(self.address, self.size)
        self.drop_shared(0, self.size // PAGE_SIZE)

    def track(self, window: ctypes.Array) -> None:
        """Count a tensor's buffer until it is freed. The buffer holds this object, so the range
        outlives it; the count only tells `close()` whether a view may still read the range."""
        window._kvmem_mapping = self
        self.live_windows += 1
        weakref.finalize(window, self._window_gone).atexit = False

    def _window_gone(self) -> None:
        self.live_windows -= 1


def _unmap(base: int, total: int, shared: dict) -> None:
    _munmap(base, total)  # nothing useful to do on failure inside a finalizer
    for pool, index in shared.values():
        pool._map_count[index] -= 1
    shared.clear()


class CpuVirtualMemory:
    """One contiguous anonymous reservation: `mmap(NULL, size, PROT_READ|PROT_WRITE,
    MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE)`. Nothing is physically backed until pages are
    touched or populated.

    A PROT_NONE guard page sits on each side. Besides catching overruns, it stops the kernel from
    merging the reservation with a neighbouring mapping of the same kind (two reservations made one
    after the other are adjacent), which keeps its /proc/self/smaps entries its own. Transparent
    huge pages are turned off for it (MADV_NOHUGEPAGE): with THP "always" one touch could back
    2 MiB, and the manager counts PAGE_SIZE pages.

    Lifetime rule: tensors from `tensor()` keep the address range mapped. Dropping this object
    while tensors live changes nothing for them; the range is unmapped once the object and every
    tensor view are gone. An explicit `close()` gives the RAM back at once (the range becomes fresh
    zero memory and its shared pages are unmapped) and unmaps the range too if no tensor view is
    alive; otherwise the unmap waits for the last one, which reads zeros meanwhile. So no tensor
    ever points at unmapped memory, and no other mapping can land under it.

    Implements `vmm_backend.VirtualMemoryBackend`: an untouched page is a page fault that backs it
    (`faults_on_unmapped` False), releases take effect at once (`settle` and `trim_pool` do nothing).
    """

    page_size: int = PAGE_SIZE
    faults_on_unmapped = False  # the kernel backs a page on first touch

    def __init__(self, num_bytes: int) -> None:
        if num_bytes <= 0:
            raise VirtualMemoryError(f"a reservation needs a positive size, got {num_bytes} bytes")
        size = _round_up(num_bytes)
        total = size + 2 * PAGE_SIZE
        if total >= 1 << 63:  # would wrap in size_t arithmetic
            raise VirtualMemoryError(f"cannot reserve {size} bytes ({human_bytes(size)}): larger than "
                                     f"any address space; {_refusal_hint()}")
        base = _mmap(None, total, PROT_NONE, _PRIVATE_FLAGS, -1, 0)
        if base == _MAP_FAILED:
            err = ctypes.get_errno()
            raise VirtualMemoryError(f"cannot reserve {size} bytes ({human_bytes(size)}) of address "
                                     f"space: {os.strerror(err)}; {_refusal_hint()}")
        try:
            _map_private(base + PAGE_SIZE, size)
        except OSError:
            _munmap(base, total)
            raise
        self.size: int = size
        self.address: int = base + PAGE_SIZE
        self._mapping: _Mapping | None = _Mapping(base, total, self.address, size)

    def __repr__(self) -> str:
        state = "closed" if self._mapping is None else f"at {self.address:#x}"
        return f"CpuVirtualMemory({human_bytes(self.size)} {state})"

    # --- views --------------------------------------------------------------------------------
    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...],
               strides: tuple[int, ...] | None = None) -> torch.Tensor:
        """A zero-copy tensor over the start of the reservation: contiguous (the first
        prod(shape) * itemsize bytes), or with these element strides."""
        mapping = self._live()
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in shape {tuple(shape)}")
        contiguous = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        if strides is not None and tuple(strides) == contiguous:
            strides = None
        if strides is None:
            num_bytes = math.prod(shape) * dtype.itemsize
        else:
            num_bytes = 0 if 0 in shape else (1 + sum((d - 1) * s for d, s in zip(shape, strides))) * dtype.itemsize
        if num_bytes > self.size:
            raise ValueError(f"a {dtype} tensor of shape {tuple(shape)} needs {num_bytes} bytes; "
                             f"the reservation has {self.size}")
        if num_bytes == 0:  # torch.frombuffer refuses empty buffers; nothing to alias anyway
            return torch.empty(shape, dtype=dtype)
        window = (ctypes.c_byte * num_bytes).from_address(self.address)
        mapping.track(window)  # the tensor holds the window, the window holds the range
        flat = torch.frombuffer(window, dtype=dtype)
        return flat.view(shape) if strides is None else flat.as_strided(shape, strides)

    # --- physical backing ---------------------------------------------------------------------
    def populate(self, offset: int, length: int) -> None:
        """Back [offset, offset + length) with RAM now (write-faulting it); contents are kept."""
        self._advise(offset, length, MADV_POPULATE_WRITE, "populate")

    def release(self, offset: int, length: int) -> None:
        """Give the RAM under [offset, offset + length) back; the range then reads zero.
        Over a shared page this only drops the mapping's reference: the pool keeps its content."""
        self._advise(offset, length, MADV_DONTNEED, "release")

    def populate_many(self, offsets: Sequence[int], length: int) -> None:
        """`populate(offset, length)` at every offset, e.g. a slot's range in each region."""
        self._advise_many(offsets, length, MADV_POPULATE_WRITE, "populate")

    def release_many(self, offsets: Sequence[int], length: int) -> None:
        """`release(offset, length)` at every offset."""
        self._advise_many(offsets, length, MADV_DONTNEED, "release")

    def _advise(self, offset: int, length: int, advice: int, what: str) -> None:
        self._check_range(offset, length)
        if _madvise(self.address + offset, length, advice):
            raise _os_error(f"{what} {length} bytes at offset {offset}")

    def _advise_many(self, offsets: Sequence[int], length: int, advice: int, what: str) -> None:
        if hasattr(offsets, "tolist"):  # numpy / torch integers are not ctypes-convertible
            offsets = offsets.tolist()
        if not offsets:
            return
        self._live()
        # One C-speed pass each for alignment and bounds; madvise past the range could hit memory
        # that is not ours.
        if reduce(or_, offsets, length) & _PAGE_MASK:
            raise ValueError(f"{what}: offsets and length must be multiples of {PAGE_SIZE}")
        if min(offsets) < 0 or max(offsets) + length > self.size:
            raise ValueError(f"{what}: offsets {min(offsets)}..{max(offsets)} + {length} bytes fall "
                             f"outside the {self.size}-byte reservation")
        madvise, base = _madvise, self.address
        for offset in offsets:
            if madvise(base + offset, length, advice):
                raise _os_error(f"{what} {length} bytes at offset {offset}")

    def settle(self) -> None:
        """Nothing to finish: a release takes effect when madvise returns."""

    def trim_pool(self) -> int:
        """Nothing to trim: released pages went back to the kernel at once."""
        return 0

    # --- sharing (vmm_backend.VirtualMemoryBackend's names for the module's functions) ----------
    def shared_pool(self, num_pages: int) -> SharedPagePool:
        """A new memfd pool of `num_pages` pages."""
        return SharedPagePool(num_pages)

    def copy_to_shared(self, offset: int, pool: SharedPagePool, page_index: int, num_pages: int = 1) -> None:
        """See the module function `copy_to_shared`."""
        copy_to_shared(self, offset, pool, page_index, num_pages)

    def map_shared(self, offset: int, pool: SharedPagePool, page_index: int, num_pages: int = 1) -> None:
        """See the module function `map_shared`."""
        map_shared(self, offset, pool, page_index, num_pages)

    def unmap_shared(self, offset: int, num_pages: int = 1) -> None:
        """See the module function `unmap_shared`."""
        unmap_shared(self, offset, num_pages)

    def mapping_limit(self) -> int | None:
        """Half of vm.max_map_count: the other half is left to the rest of the process (torch,
        libraries, the allocator). Every (slot, region) showing shared pages costs about two."""
        return _max_map_count() // 2

    # --- what the kernel says -----------------------------------------------------------------
    def resident_pages(self, offset: int = 0, length: int | None = None) -> np.ndarray:
        """mincore() over the pages overlapping [offset, offset + length): one bool per page.

        A page counts if a page-table entry maps it (a read of untouched private memory maps the
        shared zero page, which counts here but not in smaps Rss) or, for a shared page, if the
        pool holds data for it even when this mapping has not touched it yet.
        """
        self._live()
        if length is None:
            length = self.size - offset
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} outside the {self.size}-byte reservation")
        start, end = offset & ~_PAGE_MASK, _round_up(offset + length)
        vec = np.zeros((end - start) // PAGE_SIZE, dtype=np.uint8)
        if len(vec) and _mincore(self.address + start, end - start, vec.ctypes.data):
            raise _os_error(f"mincore of {end - start} bytes at offset {start}")
        return np.bitwise_and(vec, 1, out=vec).view(np.bool_)  # the other bits are reserved

    def resident_bytes(self, offset: int = 0, length: int | None = None) -> int:
        """Resident pages in the range (see `resident_pages`) times PAGE_SIZE."""
        return int(np.count_nonzero(self.resident_pages(offset, length))) * PAGE_SIZE

    def physical_bytes(self, pool: SharedPagePool | None = None) -> int:
        """RAM under the reservation and `pool`, each page once. Without a pool: mincore's resident
        pages. With one, mincore would count a shared page once per place it shows, so: the
        reservation's private pages (smaps `Anonymous`) + the pool's (st_blocks)."""
        if pool is None:
            return self.resident_bytes()
        return self.smaps_anonymous_bytes() + pool.allocated_bytes()

    def extra_stats(self) -> dict[str, int]:
        """Nothing beyond the manager's own numbers."""
        return {}

    def smaps_rss_bytes(self) -> int:
        """Rss of the reservation's mappings in /proc/self/smaps. Shared pages count once per
        place they are mapped (Rss is per mapping), so prefix sharing shows up here twice."""
        return self._smaps_sum("Rss:")

    def smaps_anonymous_bytes(self) -> int:
        """The private (anonymous) RAM of the reservation by /proc/self/smaps' `Anonymous:` lines:
        pages mapped from a shared pool are not in it, so this plus the pool's `allocated_bytes()`
        counts every physical page once, however many places it is mapped."""
        return self._smaps_sum("Anonymous:")

    def _smaps_sum(self, field: str) -> int:
        """Sum of one /proc/self/smaps field (kB) over the mappings inside the reservation."""
        self._live()
        lo, hi = self.address, self.address + self.size
        total, inside = 0, False
        with open("/proc/self/smaps") as f:
            for line in f:
                key, _, rest = line.partition(" ")
                if not key.endswith(":"):  # a VMA header: "start-end perms offset dev inode path"
                    start, _, end = key.partition("-")
                    inside = lo <= int(start, 16) and int(end, 16) <= hi
                elif inside and key == field:
                    total += int(rest.split()[0]) * 1024
        return total

    # --- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Give the memory back; idempotent. See the class docstring for when the range is unmapped."""
        mapping, self._mapping = self._mapping, None
        if mapping is None:
            return
        if mapping.live_windows:
            mapping.reset()
        else:
            mapping.finalizer()

    def __enter__(self) -> CpuVirtualMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- checks -------------------------------------------------------------------------------
    def _live(self) -> _Mapping:
        if self._mapping is None:
            raise ValueError("CpuVirtualMemory is closed")
        return self._mapping

    def _check_range(self, offset: int, length: int) -> None:
        self._live()
        if (offset | length) & _PAGE_MASK:
            raise ValueError(f"offset {offset} and length {length} must be multiples of {PAGE_SIZE}")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} outside the {self.size}-byte reservation")


# --- shared pages ---------------------------------------------------------------------------
class SharedPagePool:
    """Physical pages that can be mapped at two virtual places at once (prefix sharing).

    A memfd of `num_pages` pages; pages are handed out by index and cost RAM once written or
    populated through a mapping. `free` punches a hole (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE), so the
    RAM really goes back. A page still mapped into a reservation cannot be freed: punching it would
    zero it under the mapping and the next touch would quietly allocate it again.

    Implements `vmm_backend.SharedPages`.
    """

    def __init__(self, num_pages: int, name: str = "kvmem-kv-pages") -> None:
        if num_pages <= 0:
            raise VirtualMemoryError(f"a pool needs a positive number of pages, got {num_pages}")
        self.fd: int = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, num_pages * PAGE_SIZE)  # mapping past the end would SIGBUS
        except OSError:
            os.close(self.fd)
            raise
        self.num_pages = num_pages
        self.num_free = num_pages
        self._is_free = bytearray(b"\x01") * num_pages
        # LIFO of free indices (low ones first). alloc_run leaves stale entries; alloc skips them.
        self._free_stack = list(range(num_pages - 1, -1, -1))
        self._map_count = [0] * num_pages  # places each page is mapped (kept by map_/unmap_shared)
        self._finalizer = weakref.finalize(self, os.close, self.fd)

    def __repr__(self) -> str:
        return f"SharedPagePool({self.num_pages} pages, {self.num_free} free)"

    def alloc(self) -> int:
        """A free page index; PoolExhausted when none is left."""
        self._check_open()
        while self._free_stack:
            index = self._free_stack.pop()
            if self._is_free[index]:
                self._is_free[index] = 0
                self.num_free -= 1
                return index
        raise PoolExhausted(f"shared page pool full: all {self.num_pages} pages allocated")

    def alloc_run(self, n: int) -> int | None:
        """The first index of n contiguous free pages (lowest such run), or None if there is none."""
        self._check_open()
        if n <= 0:
            raise ValueError(f"alloc_run needs n >= 1, got {n}")
        start = self._is_free.find(b"\x01" * n)
        if start < 0:
            return None
        self._is_free[start:start + n] = bytes(n)
        self.num_free -= n
        return start

    def alloc_at(self, index: int, n: int = 1) -> None:
        """Take pages [index, index + n), which must all be free (callers that lay out the pool
        themselves, e.g. one page range per region, pick the indices)."""
        self._check_open()
        if n < 1 or index < 0 or index + n > self.num_pages:
            raise ValueError(f"pages {index}..{index + n - 1} outside the pool of {self.num_pages}")
        if self._is_free.find(0, index, index + n) >= 0:
            raise ValueError(f"pages {index}..{index + n - 1} are not all free")
        self._is_free[index:index + n] = bytes(n)
        self.num_free -= n

    def free_run(self, index: int, n: int) -> None:
        """`free` pages [index, index + n) with one hole punch."""
        self._check_allocated(index, n)
        if any(self._map_count[index:index + n]):
            raise ValueError(f"shared pages {index}..{index + n - 1} are still mapped; unmap_shared them first")
        if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, index * PAGE_SIZE, n * PAGE_SIZE):
            raise _os_error(f"punching shared pages {index}..{index + n - 1}")
        self._is_free[index:index + n] = b"\x01" * n
        self.num_free += n
        self._free_stack.extend(range(index + n - 1, index - 1, -1))
        if len(self._free_stack) > 2 * self.num_pages:
            self._free_stack = [i for i in range(self.num_pages - 1, -1, -1) if self._is_free[i]]

    def free(self, index: int) -> None:
        """Return a page and its RAM; ValueError on a double free or a page still mapped."""
        self._check_open()
        if not 0 <= index < self.num_pages:
            raise ValueError(f"page {index} outside the pool of {self.num_pages}")
        if self._is_free[index]:
            raise ValueError(f"double free of shared page {index}")
        if self._map_count[index]:
            raise ValueError(f"shared page {index} is still mapped at {self._map_count[index]} "
                             f"place(s); unmap_shared it first")
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if _fallocate(self.fd, mode, index * PAGE_SIZE, PAGE_SIZE):
            raise _os_error(f"punching shared page {index}")
        self._is_free[index] = 1
        self.num_free += 1
        self._free_stack.append(index)
        if len(self._free_stack) > 2 * self.num_pages:  # stale entries piled up after alloc_runs
            self._free_stack = [i for i in range(self.num_pages - 1, -1, -1) if self._is_free[i]]

    def allocated_bytes(self) -> int:
        """RAM the memfd holds, by the kernel's count (st_blocks), mapped or not."""
        self._check_open()
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        """Close the memfd; idempotent. Pages mapped into reservations stay valid until unmapped
        (a mapping holds its own reference to the file)."""
        self._finalizer()
        self.fd = -1

    def __enter__(self) -> SharedPagePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.fd < 0:
            raise ValueError("SharedPagePool is closed")

    def _check_allocated(self, index: int, num_pages: int) -> None:
        self._check_open()
        if num_pages < 1 or index < 0 or index + num_pages > self.num_pages:
            raise ValueError(f"pages {index}..{index + num_pages - 1} outside the pool of "
                             f"{self.num_pages}")
        if self._is_free.find(1, index, index + num_pages) >= 0:
            raise ValueError(f"pages {index}..{index + num_pages - 1} include a free page")


def map_shared(vm: CpuVirtualMemory, offset: int, pool: SharedPagePool, page_index: int,
               num_pages: int = 1) -> None:
    """Show pool pages [page_index, + num_pages) at vm [offset, + num_pages pages). MAP_FIXED
    replaces what was there atomically: private pages there are dropped, not copied."""
    length = num_pages * PAGE_SIZE
    vm._check_range(offset, length)
    pool._check_allocated(page_index, num_pages)
    mapping = vm._live()
    address = vm.address + offset
    got = _mmap(address, length, _RW, MAP_SHARED | MAP_FIXED, pool.fd, page_index * PAGE_SIZE)
    first = offset // PAGE_SIZE
    if got == _MAP_FAILED:
        error = _os_error(f"mapping {num_pages} shared page(s) at offset {offset}")
        # A failed MAP_FIXED may leave a hole; refill it so no foreign mapping lands in our range.
        _map_private(address, length)
        mapping.drop_shared(first, num_pages)
        raise error
    mapping.drop_shared(first, num_pages)
    for i in range(num_pages):
        mapping.shared[first + i] = (pool, page_index + i)
        pool._map_count[page_index + i] += 1


def unmap_shared(vm: CpuVirtualMemory, offset: int, num_pages: int = 1) -> None:
    """Make vm [offset, + num_pages pages) ordinary private demand-paged memory again (reads zero).
    The pool pages keep their content; free them in the pool when no one maps them."""
    length = num_pages * PAGE_SIZE
    vm._check_range(offset, length)
    _map_private(vm.address + offset, length)
    vm._live().drop_shared(offset // PAGE_SIZE, num_pages)


def copy_to_shared(vm: CpuVirtualMemory, offset: int, pool: SharedPagePool, page_index: int,
                   num_pages: int = 1) -> None:
    """Copy what vm [offset, + num_pages pages) holds into the pool pages, then map those in its
    place: private pages become shareable without changing what a tensor reads. Nothing may write
    the range meanwhile (a write between the copy and the map would be lost)."""
    length = num_pages * PAGE_SIZE
    vm._check_range(offset, length)
    pool._check_allocated(page_index, num_pages)
    source = memoryview((ctypes.c_char * length).from_address(vm.address + offset))
    done = 0
    while done < length:  # pwrite may write less than asked
        done += os.pwrite(pool.fd, source[done:], page_index * PAGE_SIZE + done)
    map_shared(vm, offset, pool, page_index, num_pages)
