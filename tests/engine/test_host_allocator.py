"""`keep_freed_memory` sets glibc's thresholds once per process.

What the settings buy is measured at the engine level, not asserted here: on workload 1 (64 x 128
-> 128, bf16) the process took 359 minor page faults with them and 6,314 without (docs/performance.md);
a single large allocation in a loop is not a stable test of it, because glibc's own heuristics and
the interpreter's small allocations in between decide where the next large block lands.
"""

import sys

import pytest

from kvmem.engine import host_allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_accepts_both_thresholds(monkeypatch):
    """keep_freed_memory is True only when mallopt accepted both values (it returns 0 for a value
    it rejects, e.g. an mmap threshold above its maximum)."""
    monkeypatch.setattr(host_allocator, "_tuned", False)
    assert host_allocator.keep_freed_memory()
