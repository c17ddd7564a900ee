"""A fake CUDA driver (`kvmem.memory.cuda_driver.VmmDriver`) for the CUDA backend's tests on a
machine without a GPU.

It simulates the driver's VMM with host memory, closely enough that the backend's bookkeeping
runs end to end and reads back what it wrote:
- a reservation is host address space (PROT_NONE, MAP_NORESERVE), aligned to the granularity;
- a physical handle is a range of one memfd (the "device memory"), filled with 0xFF bytes when
  created — a NaN in every float — so that a page the backend forgets to zero shows;
- cuMemMap is mmap(MAP_SHARED | MAP_FIXED) of that range, still PROT_NONE: as on a GPU, a page is
  usable only after cuMemSetAccess (mprotect read/write), and an unmapped or inaccessible page
  faults (here SIGSEGV, which the test run reports as a crash): a read past what the backend
  mapped is not quietly served;
- mapping one handle at two addresses shows the same bytes at both (prefix sharing).

Strict checks raise: the real driver's refusals as `CudaDriverError` with the call's name (an
unaligned or overlapping map, unmapping what is not mapped, a call from a thread whose context is
not current), and misuses the real driver would allow but the backend must never do as
`FakeDriverMisuse` (releasing a handle that is still mapped, zeroing or wrapping unmapped memory,
leaks at the end: `assert_clean`).

Fences come from a `FakeStream`: a fence recorded by `fence()` passes when the test calls
`stream.finish()` (the device finished the step), or when the host waits on it (`synchronize()`,
counted in `stream.waits`).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections import Counter

import torch

from kvmem.memory.cuda_driver import CudaDriverError

MiB = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype, _mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                                  ctypes.c_int, ctypes.c_long]
_munmap = _libc.munmap
_munmap.restype, _munmap.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]
_mprotect = _libc.mprotect
_mprotect.restype, _mprotect.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_fallocate = _libc.fallocate
_fallocate.restype, _fallocate.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_MAP_FAILED = ctypes.c_void_p(-1).value
PROT_NONE, PROT_RW = 0, 0x1 | 0x2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
FALLOC_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


class FakeDriverMisuse(AssertionError):
    """Something the backend must never do, whether or not a real driver would refuse it."""


class FakeStream:
    """The fake device's queue of work, as far as fences see it: `recorded` fences so far, the
    first `completed` of them done."""

    def __init__(self) -> None:
        self.recorded = 0
        self.completed = 0
        self.waits = 0  # host waits on a fence that had not passed yet

    def finish(self) -> None:
        """The device has done everything queued so far (e.g. the step ended)."""
        self.completed = self.recorded


class FakeFence:
    def __init__(self, stream: FakeStream) -> None:
        stream.recorded += 1
        self.stream, self.point = stream, stream.recorded

    def query(self) -> bool:
        return self.stream.completed >= self.point

    def synchronize(self) -> None:
        if not self.query():  # the host waits until the device got here
            self.stream.waits += 1
            self.stream.completed = self.point


def _check_os(result: int, what: str) -> None:
    if result == -1 or result == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"fake driver: {what}: {os.strerror(err)}")


class FakeDriver:
    """See the module docstring. `granularity` is the page unit; `device_memory` caps the handles
    that may exist at once (cuMemCreate then fails with CUDA_ERROR_OUT_OF_MEMORY);
    `address_space` caps reservations (cuMemAddressReserve: CUDA_ERROR_OUT_OF_MEMORY);
    `map_delay_s` slows every map, so that a background worker is visibly late."""

    def __init__(self, granularity: int = 2 * MiB, device_memory: int = 256 * MiB, address_space: int = 1 << 40,
                 map_delay_s: float = 0.0) -> None:
        self.device = torch.device("cuda", 0)  # what the backend is told; its tensors live in host memory
        self.granularity = granularity
        self.device_memory = device_memory
        self.address_space = address_space
        self.map_delay_s = map_delay_s
        self.stream = FakeStream()
        self.calls: Counter[str] = Counter()  # driver calls made, by name
        self.handles: dict[int, tuple[int, int]] = {}  # handle -> (size, memfd offset)
        self.mappings: dict[int, tuple[int, int]] = {}  # address -> (size, handle)
        self.accessible: set[int] = set()  # addresses of mappings with read/write access
        self.reservations: dict[int, tuple[int, int, int]] = {}  # address -> (size, host base, host length)
        self._context = threading.local()  # .current: made current on this thread (as cuCtxSetCurrent)
        self._next_handle = 1001
        self._fd = os.memfd_create("kvmem-fake-device", os.MFD_CLOEXEC)
        self._fd_size = 0
        self._free_offsets: dict[int, list[int]] = {}  # size -> memfd offsets of released handles
        self.closed = 0

    # --- ground truth for the tests ----------------------------------------------------------
    @property
    def live_handles(self) -> int:
        return len(self.handles)

    def handle_at(self, address: int) -> int | None:
        """The handle mapped at exactly this address, if any."""
        held = self.mappings.get(address)
        return None if held is None else held[1]

    def mapped_handles(self) -> Counter[int]:
        """handle -> how many addresses it is mapped at."""
        return Counter(handle for _, handle in self.mappings.values())

    def assert_clean(self) -> None:
        """Nothing left: no handle, mapping or reservation."""
        if self.handles or self.mappings or self.reservations:
            raise FakeDriverMisuse(f"leaked: {len(self.handles)} handles, {len(self.mappings)} mappings, "
                                   f"{len(self.reservations)} reservations")

    # --- the driver --------------------------------------------------------------------------
    def _enter(self, name: str) -> None:
        self.calls[name] += 1
        if not getattr(self._context, "current", False):
            raise CudaDriverError(f"{name} failed: CUDA_ERROR_INVALID_CONTEXT (no context current on this thread)")

    @staticmethod
    def _refuse(name: str, error: str, why: str) -> CudaDriverError:
        return CudaDriverError(f"{name} failed: {error} ({why})")

    def make_current(self) -> None:
        self.calls["cuCtxSetCurrent"] += 1
        self._context.current = True

    def allocation_granularity(self) -> int:
        self._enter("cuMemGetAllocationGranularity")
        return self.granularity

    def memory_info(self) -> tuple[int, int]:
        self._enter("cuMemGetInfo")
        used = sum(size for size, _ in self.handles.values())
        return self.device_memory - used, self.device_memory

    def reserve(self, size: int, alignment: int) -> int:
        name = "cuMemAddressReserve"
        self._enter(name)
        if size <= 0 or size % self.granularity or alignment % self.granularity:
            raise self._refuse(name, "CUDA_ERROR_INVALID_VALUE", f"size {size} / alignment {alignment} not a "
                               f"multiple of the granularity {self.granularity}")
        if sum(s for s, _, _ in self.reservations.values()) + size > self.address_space:
            raise self._refuse(name, "CUDA_ERROR_OUT_OF_MEMORY", "out of device address space")
        align = max(alignment, self.granularity)
        length = size + align
        base = _mmap(None, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if base == _MAP_FAILED:
            raise self._refuse(name, "CUDA_ERROR_OUT_OF_MEMORY", "the host refused the address space")
        address = -(-base // align) * align
        self.reservations[address] = (size, base, length)
        return address

    def free_reservation(self, address: int, size: int) -> None:
        name = "cuMemAddressFree"
        self._enter(name)
        if self.reservations.get(address, (None,))[0] != size:
            raise self._refuse(name, "CUDA_ERROR_INVALID_VALUE", f"no reservation of {size} bytes at {address:#x}")
        if any(address <= a < address + size for a in self.mappings):
            raise FakeDriverMisuse(f"freeing the reservation at {address:#x} while pages are mapped in it")
        _, base, length = self.reservations.pop(address)
        _check_os(_munmap(base, length), "munmap")

    def create(self, size: int) -> int:
        name = "cuMemCreate"
        self._enter(name)
        if size <= 0 or size % self.granularity:
            raise self._refuse(name, "CUDA_ERROR_INVALID_VALUE", f"size {size} not a multiple of {self.granularity}")
        if sum(s for s, _ in self.handles.values()) + size > self.device_memory:
            raise self._refuse(name, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory")
        free = self._free_offsets.get(size)
        if free:
            offset = free.pop()
        else:
            offset = self._fd_size
            self._fd_size += size
            os.ftruncate(self._fd, self._fd_size)
        garbage = b"\xff" * size  # what a real page may hold: anything, NaN included
        done = 0
        while done < size:
            done += os.pwrite(self._fd, garbage[done:], offset + done)
        handle = self._next_handle
        self._next_handle += 1
        self.handles[handle] = (size, offset)
        return handle

    def release(self, handle: int) -> None:
        name = "cuMemRelease"
        self._enter(name)
        if handle not in self.handles:
            raise self._refuse(name, "CUDA_ERROR_INVALID_VALUE", f"unknown handle {handle}")
        if handle in self.mapped_handles():
            raise FakeDriverMisuse(f"releasing handle {handle} while it is mapped")
        size, offset = self.handles.pop(handle)
        _check_os(_fallocate(self._fd, FALLOC_PUNCH_HOLE, offset, size), "punch hole")
        self._free_offsets.setdefault(size, []).append(offset)

    def _reservation_of(self, address: int, size: int) -> int | None:
        for start, (length, _, _) in self.reservations.items():
            if start <= address and address + size <= start + length:
                return start
        return None

    def map(self, address: int, size: int, handle: int) -> None:
        name = "cuMemMap"
        self._enter(name)
        if self.map_delay_s:
            time.sleep(self.map_delay_s)
        if handle not in self.handles:
            raise self._refuse(name, "CUDA_ERROR_INVALID_VALUE", f"unknown handle {handle}")
        if size != self.handles[handle][0]:
            raise self._refuse(name, "CUDA_ERROR_INVALID_VALUE", f"size {size} is not the handle's")
        if address % self.granularity or self._reservation_of(address, size) is None:
            raise self._refuse(name, "CUDA_ERROR_INVALID_VALUE", f"{address:#x}+{size} is not an aligned range "
                               f"of a reservation")
        for start, (length, _) in self.mappings.items():
            if start < address + size and address < start + length:
                raise self._refuse(name, "CUDA_ERROR_INVALID_VALUE", f"{address:#x} is already mapped")
        got = _mmap(address, size, PROT_NONE, MAP_SHARED | MAP_FIXED, self._fd, self.handles[handle][1])
        _check_os(got, "mmap of a handle")
        self.mappings[address] = (size, handle)

    def set_access(self, address: int, size: int) -> None:
        name = "cuMemSetAccess"
        self._enter(name)
        covered, starts = 0, []
        for start, (length, _) in self.mappings.items():
            if start < address + size and address < start + length:
                if start < address or start + length > address + size:
                    raise self._refuse(name, "CUDA_ERROR_INVALID_VALUE", "the range splits a mapping")
                covered += length
                starts.append(start)
        if covered != size:
            raise self._refuse(name, "CUDA_ERROR_INVALID_VALUE", f"{address:#x}+{size} is not fully mapped")
        _check_os(_mprotect(address, size, PROT_RW), "mprotect")
        self.accessible.update(starts)

    def unmap(self, address: int, size: int) -> None:
        name = "cuMemUnmap"
        self._enter(name)
        if self.mappings.get(address, (None,))[0] != size:
            raise self._refuse(name, "CUDA_ERROR_INVALID_VALUE", f"nothing of {size} bytes is mapped at {address:#x}")
        del self.mappings[address]
        self.accessible.discard(address)
        got = _mmap(address, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0)
        _check_os(got, "mmap over an unmapped page")

    def _check_accessible(self, address: int, size: int, what: str) -> None:
        end = address + size
        while address < end:
            held = self.mappings.get(address)
            if held is None or address not in self.accessible:
                raise FakeDriverMisuse(f"{what} at {address:#x}: not mapped with access")
            address += held[0]

    def zero(self, ranges) -> None:
        self._enter("cuMemsetD8Async")
        for address, size in ranges:
            self._check_accessible(address, size, "zeroing")
            ctypes.memset(address, 0, size)

    def fence(self) -> FakeFence:
        return FakeFence(self.stream)

    def wrap(self, address: int, num_bytes: int, owner: object) -> torch.Tensor:
        self.calls["wrap"] += 1
        self._check_accessible(address, self.granularity, "wrapping (the first page must be mapped)")
        window = (ctypes.c_byte * num_bytes).from_address(address)
        window._owner = owner  # the tensor holds the window, the window the reservation
        return torch.frombuffer(window, dtype=torch.uint8)

    def close(self) -> None:
        self.closed += 1
