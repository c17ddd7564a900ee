"""The groups' channels between two processes, and a start-up that ends when a peer cannot come."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from kvmem.distributed.group import GroupAddress, TensorParallelGroup, free_local_init_method, parse_init_method

PEER = """
import sys, torch
from kvmem.distributed.group import GroupAddress, TensorParallelGroup
g = TensorParallelGroup(GroupAddress(sys.argv[1], 2, 1), torch.device("cpu"))
message = g.broadcast_object(idle=True)
t = torch.tensor([1.0, 2.0])
g.all_reduce_(t)
g.gather_objects({"rank": 1, "got": message})
g.close()
"""


def test_plans_sums_and_answers_travel_between_two_processes():
    init = free_local_init_method()
    peer = subprocess.Popen([sys.executable, "-c", PEER, init])
    try:
        group = TensorParallelGroup(GroupAddress(init, 2, 0), torch.device("cpu"))
        group.broadcast_object(("step", [1, 2, 3]))
        t = torch.tensor([10.0, 20.0])
        group.all_reduce_(t)
        assert t.tolist() == [11.0, 22.0]
        assert group.gather_objects({"rank": 0}) == [{"rank": 0}, {"rank": 1, "got": ("step", [1, 2, 3])}]
        group.close()
        assert peer.wait(timeout=60) == 0
    finally:
        if peer.poll() is None:
            peer.kill()


def test_rank0_stops_waiting_when_its_peers_cannot_come():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="did not start: rank 1 exited with code 1"):
        TensorParallelGroup(GroupAddress(free_local_init_method(), 2, 0), torch.device("cpu"),
                            peers_failed=lambda: "rank 1 exited with code 1")
    assert time.monotonic() - start < 60  # not the 600 s timeout


def test_rank0_gives_up_after_the_timeout_naming_the_address():
    with pytest.raises(RuntimeError, match="did not all connect"):
        TensorParallelGroup(GroupAddress(free_local_init_method(), 2, 0), torch.device("cpu"), timeout_s=1)


@pytest.mark.parametrize("bad", ["127.0.0.1:29500", "tcp://:29500", "tcp://host", "tcp://host:port", "env://"])
def test_init_methods_must_be_tcp_host_port(bad):
    with pytest.raises(ValueError, match="distributed_init_method"):
        parse_init_method(bad)


SHM_PEER = """
import sys, torch
from kvmem.distributed.group import GroupAddress, TensorParallelGroup
g = TensorParallelGroup(GroupAddress(sys.argv[1], 2, 1), torch.device("cpu"))
g.enable_shared_memory(None, lambda: None)
out = []
for seed in range(3):
    t = torch.randn(5, 7, generator=torch.Generator().manual_seed(100 + seed))
    out.append(g.all_reduce_(t))
big = torch.ones(64, 64)  # larger than a slot: gloo
out.append(g.all_reduce_(big))
g.gather_objects(out)
g.close()
"""


def test_shared_memory_all_reduce_sums_in_rank_order_and_leaves_no_file(tmp_path):
    import os

    init = free_local_init_method()
    peer = subprocess.Popen([sys.executable, "-c", SHM_PEER, init])
    before = set(os.listdir("/dev/shm"))
    try:
        group = TensorParallelGroup(GroupAddress(init, 2, 0), torch.device("cpu"))
        group.enable_shared_memory(5 * 7 * 4, lambda: None)
        assert set(os.listdir("/dev/shm")) == before  # unlinked once both ranks mapped it
        mine, expected = [], []
        for seed in range(3):
            a = torch.randn(5, 7, generator=torch.Generator().manual_seed(seed))
            b = torch.randn(5, 7, generator=torch.Generator().manual_seed(100 + seed))
            expected.append(a + b)  # rank 0's slot first, then rank 1's: the same bits on both ranks
            mine.append(group.all_reduce_(a))
        mine.append(group.all_reduce_(torch.ones(64, 64)))
        theirs = group.gather_objects(mine)[1]
        group.close()
        for got, other, want in zip(mine, theirs, expected):
            assert torch.equal(got, want) and torch.equal(other, want)
        assert torch.equal(mine[3], torch.full((64, 64), 2.0)) and torch.equal(theirs[3], mine[3])
        assert peer.wait(timeout=60) == 0
    finally:
        if peer.poll() is None:
            peer.kill()


def test_shared_memory_all_reduce_stops_when_a_peer_is_gone(tmp_path):
    from kvmem.distributed.shm_all_reduce import SharedMemoryAllReduce

    path = SharedMemoryAllReduce.create(2, 64)
    try:
        alone = SharedMemoryAllReduce(path, 0, 2, 64, timeout_s=600, peer_failed=lambda: "rank 1 exited with code -9")
        with pytest.raises(RuntimeError, match="rank 1 exited with code -9"):
            alone.all_reduce_(torch.ones(4))
        alone.close()
        late = SharedMemoryAllReduce(path, 0, 2, 64, timeout_s=0.2)
        with pytest.raises(RuntimeError, match="did not arrive"):
            late.all_reduce_(torch.ones(4))
        late.close()
    finally:
        os.unlink(path)


def test_a_dev_shm_too_small_leaves_every_rank_on_gloo():
    from kvmem.distributed.shm_all_reduce import SharedMemoryAllReduce

    before = set(os.listdir("/dev/shm"))
    assert SharedMemoryAllReduce.create(2, 2**42) is None  # 16 TiB: no tmpfs holds it
    assert set(os.listdir("/dev/shm")) == before
    init = free_local_init_method()
    peer = subprocess.Popen([sys.executable, "-c", PEER.replace(
        "message = g.broadcast_object(idle=True)", "g.enable_shared_memory(None, lambda: None)\n"
        "message = g.broadcast_object(idle=True)"), init])
    try:
        group = TensorParallelGroup(GroupAddress(init, 2, 0), torch.device("cpu"))
        group.enable_shared_memory(2**42, lambda: None)
        assert group.shared_memory is None
        group.broadcast_object("plan")
        t = torch.tensor([10.0, 20.0])
        assert group.all_reduce_(t).tolist() == [11.0, 22.0]
        assert group.gather_objects(None)[1] == {"rank": 1, "got": "plan"}
        group.close()
        assert peer.wait(timeout=60) == 0
    finally:
        if peer.poll() is None:
            peer.kill()
