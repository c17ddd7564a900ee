"""The disk tier: read back what was written; the byte budget and LRU order hold (across restarts
too); a truncated, torn, corrupted or other-model file is detected, deleted and never used."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmem.memory.tiers.disk import _HEADER, HEADER_BYTES, CorruptBlockFile, DiskTier
from tests.memory.tiers.conftest import make_fingerprint

BLOCK = 64
FILE = HEADER_BYTES + BLOCK


def payload(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (BLOCK,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def key(k: int) -> bytes:
    return k.to_bytes(2, "big") * 16  # 32 bytes, like a sha256 block hash


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(max_files=st.integers(1, 4), ops=st.lists(st.tuples(st.sampled_from(["write", "read"]), st.integers(0, 7)),
                                                  max_size=30))
def test_disk_tier_matches_an_lru_model_and_survives_a_restart(tmp_path_factory, max_files, ops):
    root = tmp_path_factory.mktemp("disk")
    fp = make_fingerprint()
    tier = DiskTier(root, max_files * FILE + FILE - 1, fp, BLOCK)
    model: list[int] = []  # oldest first
    for op, k in ops:
        if op == "write":
            wrote = tier.write(key(k), payload(k))
            assert wrote == (k not in model)
            if k in model:
                model.remove(k)
            model.append(k)
            del model[:-max_files]
        else:
            if k in model:
                assert torch.equal(tier.read(key(k)), payload(k))
                model.remove(k)
                model.append(k)
            else:
                with pytest.raises(KeyError):
                    tier.read(key(k))
        assert list(tier.files) == [key(k) for k in model]
        assert tier.used_bytes == len(model) * FILE <= tier.capacity_bytes
        assert sorted(p.name for p in tier.directory.iterdir()) == sorted(key(k).hex() + ".kv" for k in model)
    # A restart indexes the same blocks (LRU order from mtimes, which a write or a hit sets).
    again = DiskTier(root, max_files * FILE, fp, BLOCK)
    assert sorted(again.files) == sorted(key(k) for k in model)
    for k in model:
        assert torch.equal(again.read(key(k)), payload(k))


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "truncate_payload", "truncate_header", "extend",
                                    "empty"])
def test_a_damaged_file_is_detected_deleted_and_never_used(tmp_path, damage):
    fp = make_fingerprint()
    tier = DiskTier(tmp_path, 10 * FILE, fp, BLOCK)
    tier.write(key(1), payload(1))
    path = tier.path(key(1))
    data = bytearray(path.read_bytes())
    if damage == "flip_payload":
        data[HEADER_BYTES + 5] ^= 0x01
    elif damage == "flip_header":
        data[20] ^= 0x40
    elif damage == "truncate_payload":
        data = data[:HEADER_BYTES + BLOCK // 2]
    elif damage == "truncate_header":
        data = data[:HEADER_BYTES // 2]
    elif damage == "extend":
        data += b"\x00"
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBlockFile):
        tier.read(key(1))
    assert not path.exists() and key(1) not in tier and tier.used_bytes == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, FILE - 1), bit=st.integers(0, 7))
def test_any_single_bit_flip_is_detected(tmp_path_factory, position, bit):
    tier = DiskTier(tmp_path_factory.mktemp("flip"), 10 * FILE, make_fingerprint(), BLOCK)
    tier.write(key(2), payload(2))
    path = tier.path(key(2))
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))
    try:
        got = tier.read(key(2))
    except CorruptBlockFile:
        assert not path.exists()
        return
    # Only the zero padding after the header's checksum may change without consequence, and then the
    # payload read is exactly what was written.
    assert _HEADER.size + 4 <= position < HEADER_BYTES and torch.equal(got, payload(2))


def test_another_models_file_is_never_read(tmp_path):
    ours, theirs = make_fingerprint(), make_fingerprint(weights="w1")
    a = DiskTier(tmp_path, 10 * FILE, theirs, BLOCK)
    a.write(key(3), payload(3))
    b = DiskTier(tmp_path, 10 * FILE, ours, BLOCK)
    assert a.directory != b.directory and key(3) not in b  # each fingerprint its own directory
    shutil.copy(a.path(key(3)), b.path(key(3)))  # copied in by hand: the header still says whose it is
    b = DiskTier(tmp_path, 10 * FILE, ours, BLOCK)
    assert key(3) in b
    with pytest.raises(CorruptBlockFile, match="fingerprint"):
        b.read(key(3))
    assert not b.path(key(3)).exists() and a.path(key(3)).exists()


def test_a_crash_leftover_temporary_is_removed_at_start(tmp_path):
    tier = DiskTier(tmp_path, 10 * FILE, make_fingerprint(), BLOCK)
    tier.write(key(4), payload(4))
    leftover = tier.directory / (key(5).hex() + ".kv.123.456.tmp")
    leftover.write_bytes(b"half a block")
    again = DiskTier(tmp_path, 10 * FILE, make_fingerprint(), BLOCK)
    assert not leftover.exists() and list(again.files) == [key(4)]


def test_a_restart_with_a_smaller_budget_evicts_the_oldest(tmp_path):
    tier = DiskTier(tmp_path, 10 * FILE, make_fingerprint(), BLOCK)
    for k in range(5):
        tier.write(key(k), payload(k))
        os.utime(tier.path(key(k)), (1000 + k, 1000 + k))
    again = DiskTier(tmp_path, 2 * FILE, make_fingerprint(), BLOCK)
    assert list(again.files) == [key(3), key(4)]
    assert sorted(p.name for p in again.directory.iterdir()) == sorted(key(k).hex() + ".kv" for k in (3, 4))


def test_too_small_is_a_value_error_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match="kv_offload_disk_bytes"):
        DiskTier(tmp_path, FILE - 1, make_fingerprint(), BLOCK)
