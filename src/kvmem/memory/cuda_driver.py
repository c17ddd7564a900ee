"""cuda_driver: the few CUDA driver calls under `vmm_cuda`, behind one small interface.

`vmm_cuda.CudaVirtualMemory` never imports the CUDA bindings itself: it talks to a `VmmDriver`,
which is either `CudaDriver` (the real driver through `cuda.bindings.driver`, package
`cuda-bindings`, imported only when one is made) or a fake that tests inject
(`tests/memory/fake_cuda_driver.py`). So importing kvmem never needs the bindings, and every
bookkeeping path of the CUDA backend runs in CI, which has no GPU.

Besides the driver calls proper, the interface holds the two torch-side operations the backend
needs and a fake must replace: `fence()` (a point on torch's current stream that the host can wait
for) and `wrap()` (device memory as a zero-copy torch tensor, through `__cuda_array_interface__`).

Contexts: the driver's current context is per host thread, and torch works in the device's
*primary* context. `CudaDriver` retains that primary context (cuDevicePrimaryCtxRetain) and
`make_current()` sets it on the calling thread (cuCtxSetCurrent); `vmm_cuda` calls it once in
every thread that maps or unmaps (the manager's thread and its mapping worker). vLLM found that
memory mapped from Python in another context is unusable from torch; the primary context is
torch's own, so torch.cuda is initialised first.

Every CUresult is checked: a failure raises `CudaDriverError` naming the call and the error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch


class CudaDriverError(RuntimeError):
    """A driver call returned something other than CUDA_SUCCESS (or the driver is missing)."""


class Fence(Protocol):
    """A point in a device stream's work; torch.cuda.Event has this shape."""

    def query(self) -> bool:
        """Whether all work before the point has finished (never blocks)."""

    def synchronize(self) -> None:
        """Block the calling host thread until that work has finished."""


class VmmDriver(Protocol):
    """What `vmm_cuda` asks of a device. Addresses, sizes and handles are plain ints."""

    device: torch.device

    def allocation_granularity(self) -> int:
        """cuMemGetAllocationGranularity (minimum) for pinned device memory: the page size unit."""

    def reserve(self, size: int, alignment: int) -> int:
        """cuMemAddressReserve: `size` bytes of device address space, no memory behind it."""

    def free_reservation(self, address: int, size: int) -> None:
        """cuMemAddressFree."""

    def create(self, size: int) -> int:
        """cuMemCreate: a physical allocation of `size` bytes; returns its handle."""

    def release(self, handle: int) -> None:
        """cuMemRelease."""

    def map(self, address: int, size: int, handle: int) -> None:
        """cuMemMap of the whole allocation `handle` at `address`."""

    def set_access(self, address: int, size: int) -> None:
        """cuMemSetAccess read/write for this device over a fully mapped range."""

    def unmap(self, address: int, size: int) -> None:
        """cuMemUnmap of a range mapped by `map`."""

    def zero(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Fill each mapped (address, size) range with zero bytes; returns when that is done
        (only these memsets are waited for, not other work on the device)."""

    def memory_info(self) -> tuple[int, int]:
        """cuMemGetInfo: (free, total) device bytes."""

    def make_current(self) -> None:
        """Make the device's primary context current on the calling thread."""

    def fence(self) -> Fence:
        """A fence recorded now on torch's current stream of the device."""

    def wrap(self, address: int, num_bytes: int, owner: object) -> torch.Tensor:
        """`[address, + num_bytes)` as a 1-D uint8 tensor on the device, without a copy; the
        tensor keeps `owner` alive. The first page must be mapped (torch asks the driver which
        device the pointer belongs to)."""

    def close(self) -> None:
        """Give back what the driver object itself holds; called after the reservation is freed."""


def _import_bindings() -> Any:
    """`cuda.bindings.driver` (cuda-bindings >= 12.6), or the older `cuda.cuda` layout."""
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python < 12.6
        except ImportError as e:
            raise CudaDriverError("kv_cache='virtual' on CUDA maps memory through the CUDA driver API, which needs "
                                  "the 'cuda-bindings' package: pip install 'kvmem[cuda]' (or pip install "
                                  "cuda-bindings)") from e
    return driver


class _CudaArray:
    """Device bytes as `__cuda_array_interface__` (v3) sees them; torch.as_tensor keeps this
    object, and so `owner`, alive for as long as any tensor views the memory."""

    def __init__(self, address: int, num_bytes: int, owner: object) -> None:
        self.owner = owner
        self.__cuda_array_interface__ = {
            "shape": (num_bytes,),
            "typestr": "|u1",  # bytes: the interface has no bfloat16, so the caller views the dtype
            "data": (address, False),
            "version": 3,
            "strides": None,
        }


class CudaDriver:
    """The real driver, on one device (its primary context, torch's own)."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CudaDriver needs a CUDA device, got {device}")
        if not torch.cuda.is_available():
            raise CudaDriverError("kv_cache='virtual' on CUDA: torch sees no CUDA device")
        self._d = _import_bindings()
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        # torch first: it creates (or retains) the primary context; ours is then the same one.
        torch.cuda.init()
        torch.cuda.set_device(index)
        d = self._d
        try:
            result = d.cuInit(0)
        except Exception as e:  # the bindings raise their own error when libcuda cannot be loaded
            raise CudaDriverError(f"cuInit failed: cannot load the CUDA driver ({e})") from e
        self._call("cuInit", result)
        self._cu_device = self._call("cuDeviceGet", d.cuDeviceGet(index))
        self._context = self._call("cuDevicePrimaryCtxRetain", d.cuDevicePrimaryCtxRetain(self._cu_device))
        self.make_current()

        self._prop = d.CUmemAllocationProp()
        self._prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._prop.location.id = index
        self._prop.requestedHandleTypes = d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE
        self._prop.win32HandleMetaData = 0  # an int 0, not a ctypes null (vLLM's finding)
        access = d.CUmemAccessDesc()
        access.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = index
        access.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [access]
        self._handles: dict[int, Any] = {}  # int(handle) -> the bindings' handle object
        self._zero_stream = None  # a private non-blocking stream for zeroing new pages

    def __repr__(self) -> str:
        return f"CudaDriver({self.device})"

    def _call(self, name: str, result: tuple) -> Any:
        """Check a bindings call's CUresult (its first element); return the rest."""
        err, rest = result[0], result[1:]
        if err != self._d.CUresult.CUDA_SUCCESS:
            _, err_name = self._d.cuGetErrorName(err)
            _, err_text = self._d.cuGetErrorString(err)
            decode = lambda s: s.decode() if isinstance(s, bytes) else str(s)  # noqa: E731
            raise CudaDriverError(f"{name} failed: {decode(err_name)} ({decode(err_text)})")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest

    def _ptr(self, address: int) -> Any:
        return self._d.CUdeviceptr(address)

    # --- the calls ------------------------------------------------------------------------
    def allocation_granularity(self) -> int:
        flag = self._d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        return int(self._call("cuMemGetAllocationGranularity", self._d.cuMemGetAllocationGranularity(self._prop, flag)))

    def reserve(self, size: int, alignment: int) -> int:
        return int(self._call("cuMemAddressReserve", self._d.cuMemAddressReserve(size, alignment, 0, 0)))

    def free_reservation(self, address: int, size: int) -> None:
        self._call("cuMemAddressFree", self._d.cuMemAddressFree(self._ptr(address), size))

    def create(self, size: int) -> int:
        handle = self._call("cuMemCreate", self._d.cuMemCreate(size, self._prop, 0))
        self._handles[int(handle)] = handle
        return int(handle)

    def release(self, handle: int) -> None:
        self._call("cuMemRelease", self._d.cuMemRelease(self._handles[handle]))
        del self._handles[handle]

    def map(self, address: int, size: int, handle: int) -> None:
        self._call("cuMemMap", self._d.cuMemMap(self._ptr(address), size, 0, self._handles[handle], 0))

    def set_access(self, address: int, size: int) -> None:
        self._call("cuMemSetAccess", self._d.cuMemSetAccess(self._ptr(address), size, self._access, 1))

    def unmap(self, address: int, size: int) -> None:
        self._call("cuMemUnmap", self._d.cuMemUnmap(self._ptr(address), size))

    def zero(self, ranges: Sequence[tuple[int, int]]) -> None:
        # On a private non-blocking stream, synchronised alone: the memsets neither wait for the
        # model's kernels nor make them wait, and the host knows they are done before it returns.
        d = self._d
        if self._zero_stream is None:
            flags = int(d.CUstream_flags.CU_STREAM_NON_BLOCKING)
            self._zero_stream = self._call("cuStreamCreate", d.cuStreamCreate(flags))
        for address, size in ranges:
            self._call("cuMemsetD8Async", d.cuMemsetD8Async(self._ptr(address), 0, size, self._zero_stream))
        self._call("cuStreamSynchronize", d.cuStreamSynchronize(self._zero_stream))

    def memory_info(self) -> tuple[int, int]:
        free, total = self._call("cuMemGetInfo", self._d.cuMemGetInfo())
        return int(free), int(total)

    def make_current(self) -> None:
        self._call("cuCtxSetCurrent", self._d.cuCtxSetCurrent(self._context))

    def fence(self) -> Fence:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wrap(self, address: int, num_bytes: int, owner: object) -> torch.Tensor:
        return torch.as_tensor(_CudaArray(address, num_bytes, owner), device=self.device)

    def close(self) -> None:
        """Drop the private stream and this object's hold on the primary context (torch keeps its
        own). Called once nothing of the reservation is left."""
        self.make_current()
        if self._zero_stream is not None:
            stream, self._zero_stream = self._zero_stream, None
            self._call("cuStreamDestroy", self._d.cuStreamDestroy(stream))
        if self._context is not None:
            self._context = None
            self._call("cuDevicePrimaryCtxRelease", self._d.cuDevicePrimaryCtxRelease(self._cu_device))
