"""Which cores each replica gets: disjoint sets, so replicas do not fight over a core (each runs its
own OpenMP team; two teams on one core slow both far more than half)."""

from __future__ import annotations

import os


def available_cores() -> list[int]:
    """The cores this process may run on (its affinity mask, which a container or taskset narrows)."""
    return sorted(os.sched_getaffinity(0))


def split_cores(num_replicas: int, cores_per_replica: int | None = None,
                available: list[int] | None = None) -> list[list[int]]:
    """`num_replicas` disjoint lists of cores, `cores_per_replica` each (default: an equal share of
    `available`, at least 1). A ValueError naming the flag when they do not fit."""
    cores = available_cores() if available is None else list(available)
    if num_replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {num_replicas}")
    share = len(cores) // num_replicas if cores_per_replica is None else cores_per_replica
    if cores_per_replica is not None and cores_per_replica < 1:
        raise ValueError(f"--cores-per-replica must be >= 1, got {cores_per_replica}")
    if share < 1 or share * num_replicas > len(cores):
        raise ValueError(f"--replicas {num_replicas} x {max(share, 1)} cores do not fit in the {len(cores)} cores "
                         f"this process may use ({cores}); use fewer replicas or --no-pin")
    return [cores[i * share:(i + 1) * share] for i in range(num_replicas)]
