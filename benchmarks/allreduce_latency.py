"""What one all-reduce costs between two local ranks, at the sizes a tensor-parallel step sends
(a row-parallel output: rows x hidden, bfloat16), through the same gloo group kvmem builds.

    python benchmarks/allreduce_latency.py [--hidden 512] [--pin] [--shm]

--shm: through the shared-memory all-reduce kvmem uses between ranks on one machine (else gloo's).

Each decode step of an L-layer model makes 2 L all-reduces, so this x 2 L is what TP adds per step.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from kvmem.distributed.group import GroupAddress, TensorParallelGroup, free_local_init_method


def rank_main(rank: int, init: str, hidden: int, pin: bool, shm: bool) -> None:
    if pin:
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    torch.set_num_threads(1)
    group = TensorParallelGroup(GroupAddress(init, 2, rank), torch.device("cpu"))
    if shm:
        group.enable_shared_memory(512 * hidden * 4 if rank == 0 else None, lambda: None)
    for rows in (1, 32, 512):
        t = torch.randn(rows, hidden).to(torch.bfloat16)
        for _ in range(20):
            group.all_reduce_(t)
        n = 300
        start = time.perf_counter()
        for _ in range(n):
            group.all_reduce_(t)
        if rank == 0:
            print(f"{'shared memory' if shm else 'gloo'} {rows:4d} x {hidden}: "
                  f"{(time.perf_counter() - start) / n * 1e6:,.0f} us per all-reduce", flush=True)
    group.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--pin", action="store_true", help="rank r on core r, as kvmem pins its workers")
    p.add_argument("--shm", action="store_true", help="the shared-memory all-reduce instead of gloo's")
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--init", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank is not None:
        rank_main(args.rank, args.init, args.hidden, args.pin, args.shm)
        return
    init = free_local_init_method()
    other = subprocess.Popen([sys.executable, __file__, "--rank", "1", "--init", init, "--hidden", str(args.hidden)]
                             + (["--pin"] if args.pin else []) + (["--shm"] if args.shm else []))
    rank_main(0, init, args.hidden, args.pin, args.shm)
    other.wait()


if __name__ == "__main__":
    main()
