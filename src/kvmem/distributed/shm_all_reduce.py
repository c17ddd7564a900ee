"""An all-reduce through shared memory, for ranks on one machine's CPU (what gloo costs there: one
gloo all-reduce of a 32 x 512 bfloat16 tensor between two local processes took ~1.6 ms on the
development box, this ~15 us; vLLM's CPU backend replaces gloo with a shared-memory all-reduce for
the same reason).

One file in /dev/shm, mapped by every rank (and unlinked as soon as all have mapped it, so nothing
is left behind even if a rank is killed): a flag per rank, then two sets (alternating calls) of one
slot per rank. A call: write this rank's tensor into its slot of the call's set, publish the call's
number in its flag, wait (spinning, yielding the core) until every flag has reached it, then sum the
slots *in rank order*, which gives every rank the same bits and, in float32, a result independent of
timing. The set alternates so that a fast rank's next write never lands in a slot a slow rank is
still reading: a rank publishes call c + 1 only after it has read call c, and writes call c + 2's
set only after everyone has published c + 1.

x86-64 only (its stores become visible in program order: data, then the flag; elsewhere gloo is
used). Tensors larger than a slot go through gloo. A peer that dies is noticed by `peer_failed`,
asked every few thousand spins, and a wait longer than the timeout fails.
"""

from __future__ import annotations

import mmap
import os
import platform
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

FLAG_STRIDE = 8  # int64s per flag: one cache line each
CHECK_EVERY = 4096  # spins between two looks at the clock and at the peers


def available() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and os.path.isdir("/dev/shm")


class SharedMemoryAllReduce:
    def __init__(self, path: str, rank: int, world_size: int, slot_bytes: int, timeout_s: float,
                 peer_failed: Callable[[], str | None] | None = None) -> None:
        self.rank, self.world_size, self.slot_bytes = rank, world_size, slot_bytes
        self.timeout_s, self.peer_failed = timeout_s, peer_failed
        size = self.size(world_size, slot_bytes)
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.flags = np.ndarray((world_size, FLAG_STRIDE), dtype=np.int64, buffer=self.map)
        self.calls = 0

    @staticmethod
    def size(world_size: int, slot_bytes: int) -> int:
        return world_size * FLAG_STRIDE * 8 + 2 * world_size * slot_bytes

    @staticmethod
    def create(world_size: int, slot_bytes: int) -> str | None:
        """Rank 0: the zeroed file the ranks map; its path, or None where /dev/shm cannot hold it.
        The pages are allocated now (posix_fallocate): a tmpfs that runs out later would kill the
        ranks with SIGBUS in the middle of a step."""
        fd, path = tempfile.mkstemp(prefix="kvmem-tp-", dir="/dev/shm")
        try:
            os.posix_fallocate(fd, 0, SharedMemoryAllReduce.size(world_size, slot_bytes))
        except OSError:
            os.unlink(path)
            return None
        finally:
            os.close(fd)
        return path

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.is_contiguous() and tensor.numel() * tensor.element_size() <= self.slot_bytes

    def _slot(self, parity: int, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        offset = self.world_size * FLAG_STRIDE * 8 + (parity * self.world_size + rank) * self.slot_bytes
        return torch.frombuffer(self.map, dtype=tensor.dtype, count=tensor.numel(), offset=offset).view(tensor.shape)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        call, parity = self.calls, self.calls % 2
        self._slot(parity, self.rank, tensor).copy_(tensor)
        self.flags[self.rank, 0] = call  # after the data (x86 keeps the stores' order)
        self._wait_for(call)
        torch.add(self._slot(parity, 0, tensor), self._slot(parity, 1, tensor), out=tensor)
        for r in range(2, self.world_size):
            tensor.add_(self._slot(parity, r, tensor))
        return tensor

    def _wait_for(self, call: int) -> None:
        flags = self.flags[:, 0]
        spins, deadline = 0, None
        while flags.min() < call:
            os.sched_yield()
            spins += 1
            if spins % CHECK_EVERY == 0:
                reason = self.peer_failed() if self.peer_failed is not None else None
                if reason:
                    raise RuntimeError(f"shared-memory all-reduce: {reason}")
                now = time.monotonic()
                deadline = deadline or now + self.timeout_s
                if now > deadline:
                    raise RuntimeError(f"shared-memory all-reduce: a peer did not arrive within {self.timeout_s:.0f} s")

    def close(self) -> None:
        self.flags = None
        try:
            self.map.close()
        except BufferError:  # a tensor still views it: the mapping goes with the last view
            pass
