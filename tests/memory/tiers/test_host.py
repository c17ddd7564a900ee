"""The host tier: what is read back is what was written, the slot budget holds, LRU order."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmem.memory.tiers.host import HostTier

BLOCK = 32


def payload(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (BLOCK,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=60, deadline=None)
@given(num_slots=st.integers(1, 5), ops=st.lists(st.tuples(st.sampled_from(["put", "get"]), st.integers(0, 9)),
                                                  max_size=60))
def test_host_tier_matches_an_lru_model(num_slots, ops):
    tier = HostTier(num_slots * BLOCK + BLOCK - 1, BLOCK)  # a partial slot's bytes are not a slot
    assert tier.num_slots == num_slots
    model: OrderedDict[bytes, int] = OrderedDict()  # key -> seed of its bytes, oldest first
    for op, k in ops:
        key = bytes([k])
        if op == "put":
            if tier.touch(key):
                model.move_to_end(key)
                continue
            slot, evicted = tier.reserve(key)
            slot.copy_(payload(k))
            if len(model) == num_slots:
                old, seed = model.popitem(last=False)
                assert evicted is not None and evicted[0] == old and torch.equal(evicted[1], payload(seed))
            else:
                assert evicted is None
            model[key] = k
        else:
            got = tier.get(key)
            assert (got is None) == (key not in model)
            if got is not None:
                assert torch.equal(got, payload(model[key]))
                model.move_to_end(key)
        assert list(tier.slots) == list(model)
        assert tier.used_bytes == len(model) * BLOCK <= tier.capacity_bytes
    assert sorted(tier.clear()) == sorted(model)
    assert tier.used_bytes == 0 and len(tier.free_slots) == num_slots  # every slot back


def test_pinned_keys_are_not_evicted():
    tier = HostTier(2 * BLOCK, BLOCK)
    for k in (b"a", b"b"):
        tier.reserve(k)[0].copy_(payload(k[0]))
    tier.pinned = {b"a"}
    _, evicted = tier.reserve(b"c")
    assert evicted[0] == b"b" and b"a" in tier
    tier.pinned = {b"a", b"c"}
    assert tier.reserve(b"d") is None and b"d" not in tier


def test_too_small_is_a_value_error_naming_the_flag():
    with pytest.raises(ValueError, match="kv_offload_memory"):
        HostTier(BLOCK - 1, BLOCK)
