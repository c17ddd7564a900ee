from __future__ import annotations

import pytest

from kvmem.memory.tiers.fingerprint import KVFingerprint


def make_fingerprint(weights: str = "w0", **overrides) -> KVFingerprint:
    fields = dict(weights=weights, model="m", dtype="torch.float32", kv_cache_dtype="torch.float32", layout="L",
                  block_size=16, num_layers=2, num_kv_heads=1, head_dim=4)
    return KVFingerprint(**{**fields, **overrides})


@pytest.fixture
def fingerprint() -> KVFingerprint:
    return make_fingerprint()
