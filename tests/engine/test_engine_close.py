"""Engines close what they open: after `LLM.close()` (or leaving `with LLM(...)`) no kvmem thread is
left, and once the engine is dropped the process's mappings and RSS are back where they were.

Several engines of every strategy are built and closed in one process, as a notebook or a test
session does; without close() each kept its mapping thread, copy worker and reservation until the
garbage collector happened to find it."""

from __future__ import annotations

import gc
import threading

import pytest

from kvmem import LLM, SamplingParams
from tests.oracle import make_tiny_model

STRATEGIES = {
    "paged": {"kv_cache_memory": "4MiB"},
    "static": {"kv_cache_memory": "4MiB"},
    "virtual": {"kv_cache_memory": "4MiB"},  # background mapping on by default: a mapper thread
    "hybrid": {"device_memory": "2MiB", "host_memory": "4MiB", "act_ratio": 0.5},  # a copy worker
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("close") / "llama", "llama-mha")


def kvmem_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("kvmem"))


def mapping_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def build_and_use(tiny_dir, kv_cache: str) -> LLM:
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache=kv_cache, max_num_seqs=4,
              **STRATEGIES[kv_cache])
    outs = llm.generate([[5, 6, 7, 8], [9, 10, 11]], SamplingParams(temperature=0, min_tokens=8, max_tokens=8),
                        use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
    return llm


@pytest.mark.parametrize("kv_cache", list(STRATEGIES))
def test_close_joins_threads_and_is_idempotent(tiny_dir, kv_cache):
    before = kvmem_threads()
    llm = build_and_use(tiny_dir, kv_cache)
    llm.close()
    assert kvmem_threads() == before
    llm.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate([[5, 6]], SamplingParams(max_tokens=2), use_tqdm=False)


def test_with_block_closes_in_flight_requests_too(tiny_dir):
    with LLM(str(tiny_dir), dtype="float32", kv_cache="virtual", kv_cache_memory="4MiB") as llm:
        llm.engine.add_request([5, 6, 7], SamplingParams(max_tokens=50))
        llm.engine.step()  # a request holds pages and a slot when the block ends
    assert llm.engine.closed and not llm.engine.requests
    assert "kvmem-vmm-mapper" not in kvmem_threads()


def test_many_engines_of_every_strategy_leave_nothing_behind(tiny_dir):
    # One warm-up round first: torch, oneDNN and the allocator keep what they set up once per process.
    for kv_cache in STRATEGIES:
        build_and_use(tiny_dir, kv_cache).close()
    gc.collect()
    threads, maps, rss = kvmem_threads(), mapping_count(), rss_bytes()
    for _ in range(3):
        for kv_cache in STRATEGIES:
            llm = build_and_use(tiny_dir, kv_cache)
            llm.close()
            del llm
    gc.collect()
    assert kvmem_threads() == threads
    # A leaked reservation is one or more mappings per engine (12 engines here): allow a little
    # drift from the libraries (a thread stack, an arena), not one per engine.
    assert mapping_count() <= maps + 4
    # Each engine's KV and weights are a few MiB; twelve of them kept would be far over this.
    assert rss_bytes() <= rss + 16 * 2**20
