"""The groups' channels between two processes, and a start-up that ends when a peer cannot come."""

from __future__ import annotations

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
