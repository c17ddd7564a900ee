"""When loading a prefix from a tier beats recomputing it.

Loading a block costs a copy (host tier) or a file read plus a checksum and a copy (disk) per block,
plus, for the disk, the request waiting a step or more for its blocks while others compute.
Recomputing costs a prefill of those tokens. Per token the load is cheaper by far, but the disk's
fixed costs make a short run of disk blocks not worth waiting for: the crossover measured on this
project's CPU box is in docs/benchmarks.md ("Prefix-cache tiers"), and the defaults below come
from it. Runs shorter than the threshold are recomputed; the device prefix cache is never affected.
"""

from __future__ import annotations

from dataclasses import dataclass

# Measured (docs/benchmarks.md, "Prefix-cache tiers": SmolLM2-135M float32, 2-core shared CPU box):
# a host-tier block loads ~50x faster than its 16 tokens prefill, so any host hit pays.
DEFAULT_MIN_HOST_TOKENS = 16
# Disk: see the measured crossover in docs/benchmarks.md; one block already pays there, but a run
# shorter than this is not worth a wait on the loader thread.
DEFAULT_MIN_DISK_TOKENS = 32


@dataclass(frozen=True)
class LoadPolicy:
    min_host_tokens: int = DEFAULT_MIN_HOST_TOKENS  # fewer contiguous host-tier tokens: recompute
    min_disk_tokens: int = DEFAULT_MIN_DISK_TOKENS  # fewer contiguous disk-tier tokens: recompute

    def plan(self, tiers: list[str], block_size: int) -> int:
        """How many leading blocks of a tier-hit run (each "host" or "disk", in chain order) to load:
        the host part if it reaches `min_host_tokens`, then the disk part after it if that reaches
        `min_disk_tokens` (a host block after a disk block counts with the disk part: it waits too)."""
        n_host = next((i for i, t in enumerate(tiers) if t != "host"), len(tiers))
        take = n_host if n_host * block_size >= self.min_host_tokens else 0
        if take < n_host:
            return take  # a short host run is recomputed, and so is what follows it
        rest = len(tiers) - n_host
        if rest and rest * block_size >= self.min_disk_tokens:
            take = len(tiers)
        return take
