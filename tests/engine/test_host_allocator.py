"""After `keep_freed_memory`, a step's large temporaries are reused, not faulted in anew."""

import resource
import sys

import pytest
import torch

from kvmem.engine.host_allocator import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_large_tensor_comes_back_without_page_faults():
    if not keep_freed_memory():
        pytest.skip("not glibc")
    nbytes = 16 << 20  # like a [64, 49152] float32 logits tensor: far above glibc's default mmap threshold

    def faults_for_one_allocation() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(nbytes, dtype=torch.uint8)
        t.fill_(1)  # touch every page
        after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        del t
        return after - before

    faults_for_one_allocation()  # the first time the heap grows: its pages fault in once
    pages = nbytes // 4096
    assert faults_for_one_allocation() < pages // 10  # with glibc's defaults: ~every page, each time
