"""vmm_backend: what the `virtual` strategy asks of the memory under it, written down.

`VirtualKVCacheManager` drives one reservation of address space whose pages it backs on demand.
Two backends implement that, and this module is their contract:

- `vmm_cpu.CpuVirtualMemory` + `vmm_cpu.SharedPagePool`: Linux mmap / madvise / memfd;
- `vmm_cuda.CudaVirtualMemory` + `vmm_cuda.CudaSharedPages`: CUDA driver VMM (cuMemMap), itself
  over `cuda_driver.VmmDriver`.

Units: offsets and lengths are bytes from the start of the reservation, multiples of `page_size`;
pool indices count pages of `page_size`. "Backed" (or resident) means that physical memory is mapped
under the page now, by the kernel's or the driver's own record, not the manager's.

Where the two differ in a way the manager must respect, the difference is a member here rather
than a test of the device: `faults_on_unmapped` (a page must be mapped before anything reads or
writes it), `settle()` and `trim_pool()` (deferred unmaps and idle pre-created pages: CUDA has
them, on CPU both do nothing), `mapping_limit()` (the kernel's cap on a process's mappings binds
only CPU sharing), `physical_bytes()` (each physical page once, however it is counted) and
`extra_stats()`.

Both are `runtime_checkable`, so a test can say `isinstance(memory, VirtualMemoryBackend)`; that
checks the members' presence, not their signatures.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class SharedPages(Protocol):
    """Physical pages that can be shown at several places of one reservation at once (prefix
    sharing between running sequences). Indices are chosen by the caller (`alloc_at`), who lays the
    pool out; the backend's `copy_to_shared` fills an index, `map_shared` shows it elsewhere."""

    num_pages: int

    def alloc_at(self, index: int, n: int = 1) -> None:
        """Take indices [index, index + n), which must all be free (ValueError otherwise); they hold
        no memory until `copy_to_shared` fills them."""

    def free_run(self, index: int, n: int) -> None:
        """Give indices [index, index + n) and their memory back; ValueError if one is free or is
        still shown somewhere (`unmap_shared` every place first)."""

    def allocated_bytes(self) -> int:
        """Physical bytes the pool holds, mapped anywhere or not, each page once."""

    def close(self) -> None:
        """Let go of the pool's memory; idempotent. Places still showing a page keep it until they
        are unmapped."""


@runtime_checkable
class VirtualMemoryBackend(Protocol):
    """One reservation of address space whose pages are backed on demand, viewed by zero-copy
    tensors. Not thread-safe unless the implementation says so: the manager's mapping worker and
    the manager take turns (`mapping_worker.Mapper` orders their jobs)."""

    size: int  # bytes reserved, a multiple of page_size
    page_size: int  # the unit of backing: the kernel's page on CPU, a driver page on CUDA
    # True where touching an unbacked page is an error (CUDA: an illegal address) rather than a
    # page fault that backs it (CPU). The manager then maps every page before a step uses it.
    faults_on_unmapped: bool

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...],
               strides: tuple[int, ...] | None = None) -> torch.Tensor:
        """A zero-copy view of the reservation from offset 0 (element strides; None: contiguous);
        what it reads where nothing is backed is the backend's (zeros on CPU, a fault on CUDA)."""

    def populate_many(self, offsets: Iterable[int], length: int) -> None:
        """Back [offset, offset + length) at every offset now, keeping what backed pages hold; the
        caller never populates a page it populated and has not released (CUDA refuses that)."""

    def release_many(self, offsets: Iterable[int], length: int) -> None:
        """Give the memory under [offset, offset + length) at every offset back; unbacked pages are
        skipped and a released range reads zero once backed again. May be deferred (CUDA: until
        the device is done with the pages; `settle()` finishes it)."""

    def settle(self) -> None:
        """Finish every deferred release now, waiting for the device if need be (CPU: nothing)."""

    def trim_pool(self) -> int:
        """Give physical memory that is held but backs nothing (pre-created pages) back to the
        system; the bytes released (CPU keeps none: 0)."""

    def resident_bytes(self) -> int:
        """Backed bytes of the reservation by the kernel's or driver's count, deferred releases
        included (CPU: mincore, a shared page once per place it shows; CUDA: distinct pages
        mapped here or held by a shared pool)."""

    def physical_bytes(self, pool: SharedPages | None = None) -> int:
        """Physical bytes under the reservation and `pool` together, each page once however many
        places show it, after `settle()`: the number the manager's own count must equal."""

    def mapping_limit(self) -> int | None:
        """How many mappings sharing may add before the process nears a system limit (CPU: half
        of vm.max_map_count); None where mappings cost no such resource (CUDA)."""

    def shared_pool(self, num_pages: int) -> SharedPages:
        """A new, empty pool of `num_pages` shareable pages for this reservation."""

    def copy_to_shared(self, offset: int, pool: SharedPages, page_index: int, num_pages: int = 1) -> None:
        """Make the backed private pages at [offset, + num_pages pages) the pool's pages
        [page_index, + num_pages) and show those in their place: what a view reads there does not
        change (CPU copies, CUDA adopts the page). Nothing may write the range meanwhile."""

    def map_shared(self, offset: int, pool: SharedPages, page_index: int, num_pages: int = 1) -> None:
        """Show pool pages [page_index, + num_pages) at [offset, + num_pages pages), replacing
        whatever was there (dropped, not copied)."""

    def unmap_shared(self, offset: int, num_pages: int = 1) -> None:
        """Stop showing pool pages at [offset, + num_pages pages): the range is unbacked again;
        the pool keeps its pages."""

    def extra_stats(self) -> dict[str, int]:
        """Backend-specific numbers for `MemoryStats.extra` (CUDA: its page size, idle and created
        handle bytes; CPU: none)."""

    def close(self) -> None:
        """Give every page back; idempotent (a second call does nothing). Views made by `tensor()`
        must not be read afterwards (CPU: they read zeros; CUDA: unmapped, a fault)."""
