"""LoadPolicy: which leading blocks of a tier-hit run are worth loading."""

from __future__ import annotations

from kvmem.memory.tiers.policy import LoadPolicy


def test_plan_keeps_runs_that_reach_their_threshold():
    p = LoadPolicy(min_host_tokens=32, min_disk_tokens=48)
    assert p.plan([], 16) == 0
    assert p.plan(["host"], 16) == 0  # 16 host tokens < 32: recompute, and what follows too
    assert p.plan(["host", "disk", "disk", "disk"], 16) == 0
    assert p.plan(["host", "host"], 16) == 2
    assert p.plan(["host", "host", "disk", "disk"], 16) == 2  # 32 disk tokens < 48
    assert p.plan(["host", "host", "disk", "disk", "disk"], 16) == 5
    assert p.plan(["disk", "disk", "disk"], 16) == 3  # no host part: 0 >= 32 is false, but nothing to skip


def test_defaults_load_any_whole_block():
    p = LoadPolicy()
    assert p.plan(["host"], 16) == 1 and p.plan(["disk"], 16) == 1 and p.plan(["host", "disk"], 16) == 2
