"""The picture of the KV memory /dashboard draws, as JSON: one state per update.

Two producers make the same states, so that one page draws both: the serving engine, live
(`AsyncLLMEngine` while a page watches; streamed by `kvmem.server.dashboard`), and `kvmem bench
memory --record` (a simulated stream through the real managers, written as a recording that the
page plays back offline).

A state is the engine's numbers (an `EngineSnapshot`) plus the manager's `memory_map()` annotated
with who holds what: `requests` (sequence id -> request id) and `details` (per sequence: prompt,
output, computed and prefix-cache hit tokens, preemptions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from kvmem.memory.base import KVCacheManager


def memory_picture(manager: KVCacheManager, seqs: Iterable) -> dict:
    """The manager's map, with each of `seqs` (the engine's live sequences) named and described."""
    m = manager.memory_map()
    requests, details = {}, {}
    for s in seqs:
        key = str(s.seq_id)
        requests[key] = s.request_id
        details[key] = {"prompt": s.num_prompt_tokens, "output": s.num_output_tokens,
                        "computed": s.num_computed_tokens, "cached": s.num_cached_tokens,
                        "preemptions": s.num_preemptions}
    m["requests"], m["details"] = requests, details
    return m


def dashboard_state(published: dict) -> dict:
    """The JSON one update carries, from a published {"snapshot": EngineSnapshot, "map": picture}."""
    snap, m = published["snapshot"], published["map"]
    mem = snap.memory
    stats = {k: v for k, v in dataclasses.asdict(mem).items() if k != "extra"}
    stats.update(waste=mem.waste, usage=mem.usage,
                 prefix_hit_rate=mem.prefix_cache_hits / mem.prefix_cache_queries if mem.prefix_cache_queries else 0.0,
                 extra={k: v for k, v in mem.extra.items() if isinstance(v, (int, float, str, bool))})
    return {"time": snap.time, "num_running": snap.num_running, "num_waiting": snap.num_waiting,
            "num_requests": snap.num_requests, "num_preemptions": snap.num_preemptions,
            "num_steps": snap.num_steps, "num_prompt_tokens": snap.num_prompt_tokens,
            "num_generation_tokens": snap.num_generation_tokens, "stats": stats, "map": m}
