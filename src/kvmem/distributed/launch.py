"""Starting the ranks of one machine ("node"): which ranks it hosts, their devices and cores, the
worker processes (`python -m kvmem.distributed.worker`), and `run_node` for a machine other than rank 0's.

Ranks are numbered node by node: node k of `nnodes` hosts ranks [k * P, (k + 1) * P) with
P = tensor_parallel_size / nnodes. On CUDA the i-th rank of a node takes cuda:i; on CPU the node's
cores are split into P disjoint groups, in order, and rank i is pinned to group i (rank 0, the
caller's process, is not pinned: only its torch thread count is set).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys

from kvmem.distributed.group import GroupAddress, parse_init_method
from kvmem.distributed.worker import WorkerPlacement, worker_main

logger = logging.getLogger(__name__)


def ranks_per_node(config) -> int:
    return config.tensor_parallel_size // config.nnodes


def node_ranks(config) -> range:
    per = ranks_per_node(config)
    return range(config.node_rank * per, (config.node_rank + 1) * per)


def split_cores(groups: int, cores: list[int] | None = None) -> list[list[int]]:
    """This machine's usable cores in `groups` disjoint, contiguous groups (as even as they go); with
    fewer cores than groups, one core each, round robin (oversubscribed: ranks then share cores)."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    if len(cores) < groups:
        return [[cores[i % len(cores)]] for i in range(groups)]
    size, extra = divmod(len(cores), groups)
    out, at = [], 0
    for g in range(groups):
        n = size + (g < extra)
        out.append(cores[at:at + n])
        at += n
    return out


def placements(config) -> list[WorkerPlacement]:
    """Device and cores of each rank this node hosts, in rank order."""
    per = ranks_per_node(config)
    if config.device != "cpu":
        if config.device.startswith("cuda:"):
            raise ValueError(f"tensor_parallel_size > 1 places ranks on cuda:0..{per - 1}; give device='cuda', "
                             f"not {config.device!r}")
        import torch

        if torch.cuda.device_count() < per:
            raise ValueError(f"tensor_parallel_size {config.tensor_parallel_size} over {config.nnodes} node(s) needs "
                             f"{per} GPUs on this machine, which has {torch.cuda.device_count()}")
        return [WorkerPlacement(f"cuda:{i}") for i in range(per)]
    return [WorkerPlacement("cpu", cores, config.num_threads) for cores in split_cores(per)]


def spawn_workers(config, init_method: str, skip_first: bool = True) -> list[subprocess.Popen]:
    """Start this node's worker processes (all its ranks but the first, which the caller runs).

    A fresh interpreter each (`python -m kvmem.distributed.worker`), not multiprocessing's spawn:
    spawn re-imports the caller's main module, which breaks a script that builds its LLM at top
    level and a notebook alike."""
    procs = []
    ranks, places = list(node_ranks(config)), placements(config)
    for rank, place in list(zip(ranks, places))[1 if skip_first else 0:]:
        address = GroupAddress(init_method, config.tensor_parallel_size, rank)
        args = json.dumps({"address": dataclasses.asdict(address), "placement": dataclasses.asdict(place)})
        procs.append(subprocess.Popen([sys.executable, "-m", "kvmem.distributed.worker", args]))
    return procs


def resolve_init_method(config) -> str | None:
    """The rendezvous address: --distributed-init-method, else torchrun's MASTER_ADDR/MASTER_PORT;
    None when neither is set (one node: the caller picks a free local port)."""
    if config.distributed_init_method:
        return config.distributed_init_method
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        return f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    return None


def run_node(config) -> int:
    """Host this node's ranks of a replica whose rank 0 runs on another machine (node_rank > 0):
    the node's first rank in this process, the others spawned; returns when rank 0 closes the
    engine (0) or when a rank fails (1)."""
    init_method = resolve_init_method(config)
    if init_method is None:
        raise ValueError("node_rank > 0 needs distributed_init_method (tcp://HOST:PORT of node 0), or "
                         "MASTER_ADDR and MASTER_PORT")
    parse_init_method(init_method)
    ranks = node_ranks(config)
    logger.info("node %d of %d: tensor-parallel ranks %d-%d, rank 0 at %s", config.node_rank, config.nnodes,
                ranks.start, ranks.stop - 1, init_method)
    procs = spawn_workers(config, init_method)
    first = GroupAddress(init_method, config.tensor_parallel_size, ranks.start)
    code = 0
    try:
        worker_main(first, placements(config)[0])
    except SystemExit as e:
        code = int(e.code or 0)
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
        code = code or (1 if p.returncode else 0)
    return code
