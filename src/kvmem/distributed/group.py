"""The ranks of one tensor-parallel model and the two channels between them (torch.distributed).

- the *device* group carries the activations: one all-reduce after each row-parallel projection.
  NCCL on CUDA, gloo on CPU, chosen from the device.
- the *control* group (always gloo, on CPU) carries rank 0's step plans, a pickled object per
  broadcast, and the answers to rank 0's questions (memory stats).

Both are built straight from a `TCPStore` (`ProcessGroupGloo(store, rank, size)`) rather than
through `init_process_group`: nothing process-global is set, so one process may build, close and
build again a tensor-parallel engine (as tests do), or host other torch.distributed work beside it.

Failure: a rank that dies closes its sockets, and the collectives of the others raise at once
(gloo: "Connection reset by peer"); a rank that hangs makes them raise after `timeout_s`. Only a
worker waiting for rank 0's next plan waits without that limit (`IDLE_TIMEOUT`): an idle server
sends nothing for hours.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# How long an idle worker waits for rank 0's next plan (a dead rank 0 still ends the wait at once).
IDLE_TIMEOUT = datetime.timedelta(days=365)
DEFAULT_TIMEOUT_S = 600.0  # a collective (or the start-up rendezvous) that takes longer fails


def free_local_init_method() -> str:
    """tcp://127.0.0.1:PORT with a port free now (ranks on one machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def parse_init_method(init_method: str) -> tuple[str, int]:
    """(host, port) of a tcp://HOST:PORT init method; ValueError naming distributed_init_method."""
    parts = urlsplit(init_method)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or not parts.hostname or port is None:
        raise ValueError(f"distributed_init_method must look like tcp://HOST:PORT, got {init_method!r}")
    return parts.hostname, port


def uses_shared_memory(config, device: torch.device) -> bool:
    """Whether the activations' all-reduce goes through shared memory: every rank on this machine's
    CPU (one node), on x86-64. The same answer on every rank of a node."""
    from kvmem.distributed.shm_all_reduce import available

    return device.type == "cpu" and config.nnodes == 1 and available()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class GroupAddress:
    """Where the ranks meet: rank 0 listens on `init_method` (a TCPStore), the others connect."""

    init_method: str
    world_size: int
    rank: int


class TensorParallelGroup:
    def __init__(self, address: GroupAddress, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S,
                 peers_failed: Callable[[], str | None] | None = None) -> None:
        """`peers_failed` (rank 0): says why the ranks it started cannot come any more (they exited),
        so that the wait for them ends with that reason instead of the timeout."""
        host, port = parse_init_method(address.init_method)
        self.rank, self.world_size = address.rank, address.world_size
        self.timeout = datetime.timedelta(seconds=timeout_s)
        # Rank 0 serves the store; every other rank checks in, and rank 0 waits for all of them (up to
        # the timeout, a slice at a time so that a worker that died on the way is noticed at once).
        self.store = dist.TCPStore(host, port, self.world_size, self.rank == 0, timeout=self.timeout,
                                   wait_for_workers=False)
        if self.rank == 0:
            self._wait_for_peers(timeout_s, peers_failed)
        else:
            self.store.set(f"joined/{self.rank}", "1")
        self.control = dist.ProcessGroupGloo(dist.PrefixStore("control", self.store), self.rank, self.world_size,
                                             self.timeout)
        self.backend = backend_for(device)
        self.shared_memory = None  # a SharedMemoryAllReduce once enable_shared_memory() ran
        device_store = dist.PrefixStore("device", self.store)
        if self.backend == "nccl":
            torch.cuda.set_device(device)
            self.device_group = dist.ProcessGroupNCCL(device_store, self.rank, self.world_size)
        else:
            self.device_group = dist.ProcessGroupGloo(device_store, self.rank, self.world_size, self.timeout)

    def _wait_for_peers(self, timeout_s: float, peers_failed: Callable[[], str | None] | None) -> None:
        keys = [f"joined/{r}" for r in range(1, self.world_size)]
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.store.wait(keys, datetime.timedelta(seconds=0.5))
                return
            except RuntimeError:  # DistStoreError: not all of them yet
                reason = peers_failed() if peers_failed is not None else None
                if reason:
                    raise RuntimeError(f"tensor-parallel ranks did not start: {reason}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tensor-parallel ranks did not all connect to {self.world_size - 1} "
                                       f"peers within {timeout_s:.0f} s (are the other nodes started, with "
                                       "the same --distributed-init-method?)") from None

    # --- the activations --------------------------------------------------------------------
    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place; every rank ends with the same bits."""
        if self.shared_memory is not None and self.shared_memory.fits(tensor):
            return self.shared_memory.all_reduce_(tensor)
        self.device_group.allreduce([tensor]).wait()
        return tensor

    def enable_shared_memory(self, slot_bytes: int | None, peer_failed: Callable[[], str | None]) -> None:
        """From now on, all-reduce through shared memory (`shm_all_reduce`): every rank calls this at the
        same point, rank 0 with the slot size, which it sends. Only where every rank runs on this
        machine's CPU (`uses_shared_memory`)."""
        from kvmem.distributed.shm_all_reduce import SharedMemoryAllReduce

        if self.rank == 0:
            path = SharedMemoryAllReduce.create(self.world_size, slot_bytes)
            self.broadcast_object((path, slot_bytes))
        else:
            path, slot_bytes = self.broadcast_object()
        if path is None:  # /dev/shm too small: gloo it stays, on every rank
            logger.warning("tensor parallelism: /dev/shm cannot hold %d bytes; all-reduces go through gloo",
                           SharedMemoryAllReduce.size(self.world_size, slot_bytes))
            return
        try:
            self.shared_memory = SharedMemoryAllReduce(path, self.rank, self.world_size, slot_bytes,
                                                       self.timeout.total_seconds(), peer_failed)
            self.gather_objects(None)  # every rank has mapped it: the name can go
        finally:
            if self.rank == 0:
                os.unlink(path)

    # --- the control channel ------------------------------------------------------------------
    def broadcast_object(self, obj: object = None, idle: bool = False) -> object:
        """Rank 0 sends `obj` (pickled); every other rank returns it. `idle`: the receivers may wait
        indefinitely (a worker between steps)."""
        timeout = IDLE_TIMEOUT if idle else self.timeout
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self.control.broadcast(size, 0, timeout).wait()
        if self.rank != 0:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self.control.broadcast(payload, 0, self.timeout).wait()
        return obj if self.rank == 0 else pickle.loads(payload.numpy().tobytes())

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order, on every rank."""
        data = pickle.dumps(obj)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self.control.allgather([sizes], [torch.tensor([len(data)], dtype=torch.int64)]).wait()
        longest = int(max(s.item() for s in sizes))
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        self.control.allgather([out], [mine]).wait()
        return [pickle.loads(t[:int(s.item())].numpy().tobytes()) for t, s in zip(out, sizes)]

    def close(self) -> None:
        """Drop the groups and the store (rank 0's store closes its listening socket)."""
        if self.shared_memory is not None:
            self.shared_memory.close()
            self.shared_memory = None
        for name in ("device_group", "control", "store"):
            if hasattr(self, name):
                delattr(self, name)
