"""When loading a prefix from a tier beats recomputing it.

Loading a block costs a copy (host tier) or a file read plus a checksum and a copy (disk) per block,
plus, for the disk, the request waiting a step or more for its blocks while others compute.
Recomputing costs a prefill of those tokens. Per token the load is cheaper by far, but the disk's
fixed costs could make a short run of disk blocks not worth waiting for: the crossover measured on this
project's CPU box is in docs/benchmarks.md ("Prefix-cache tiers"), and the defaults below come
from it (on this machine a single block already pays for itself). Runs shorter than the threshold are
recomputed; the device prefix cache is never affected.
"""

from __future__ import annotations

from dataclasses import dataclass

# Measured (docs/benchmarks.md, "Prefix-cache tiers"; benchmarks/tier_crossover.py, SmolLM2-135M float32,
# 16-token blocks of 720 KiB, 2-core shared CPU box, ext4 disk): per block, a host-tier load took 0.03 ms,
# a disk load (read + crc32 + copy) 0.43 ms, prefilling its 16 tokens 10-17 ms. Time to first token with a
# 16-token prefix + 16-token suffix: recomputed 30.1 ms, from host 21.8 ms, from disk 22.0 ms (warm page
# cache) / 22.2 ms (dropped from it): loading already wins at one block, so the crossover is below one
# block and the thresholds are one block. Larger models only move it further down (prefill per token
# grows with all parameters, a block's bytes only with the KV heads); a slower disk (network storage)
# would move it up: set `TierStore.policy` (a LoadPolicy) there.
DEFAULT_MIN_HOST_TOKENS = 16
DEFAULT_MIN_DISK_TOKENS = 16


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
