"""virtual with prefix-cache tiers: a free slot's cached prefix goes down to the tiers when its pages
are reused or trimmed, and comes back into a slot's pages on a hit; greedy float32 tokens identical
to transformers from the host tier, from disk, after a restart, and from blocks paged wrote (the
tiers' blocks are the same for both strategies)."""

from __future__ import annotations

from kvmem import LLM
from tests.memory.tiers.test_paged_link import BUDGET, ids_of, offload, reference, run, tier_threads

VIRTUAL = dict(kv_cache="virtual", dtype="float32", kv_cache_memory=BUDGET, max_model_len=1024)


def assert_memory_returned(llm: LLM) -> None:
    stats = llm.stats()
    assert stats.num_sequences == 0 and stats.bytes_allocated == 0 and stats.bytes_live == 0, stats
    assert not llm.engine.manager.tiers.loading


def test_host_tier_hit_after_the_slot_is_reused_matches_transformers():
    with LLM(kv_offload_memory="64MiB", **VIRTUAL) as llm:
        a, b = ids_of(llm, "apples"), ids_of(llm, "bridges")
        first, cached = run(llm, a)
        assert cached == 0 and first == reference(a)
        assert run(llm, b)[0] == reference(b)  # the budget holds one prompt: a's slot is reused or trimmed
        assert offload(llm)["host"]["stored"] >= (len(a) - 1) // 16
        again, cached = run(llm, a)
        assert again == reference(a)
        stats = offload(llm)
        assert stats["host"]["hits"] * 16 == stats["loaded_tokens"]["host"] > 0
        assert cached == (len(a) - 1) // 16 * 16  # every full block but the last token's, from the tier
        assert_memory_returned(llm)
    assert tier_threads() == []


def test_disk_tier_restart_and_paged_blocks_match_transformers(tmp_path):
    directory = str(tmp_path / "kv")
    with LLM(kv_offload_dir=directory, **VIRTUAL) as llm:
        a, b = ids_of(llm, "apples"), ids_of(llm, "bridges")
        assert run(llm, a)[0] == reference(a)
        assert run(llm, b)[0] == reference(b)
        assert llm.engine.manager.tiers.store.flush(timeout=60)
        again, cached = run(llm, a)  # a's blocks read back from disk while the sequence waits
        assert again == reference(a)
        assert cached == (len(a) - 1) // 16 * 16
        assert offload(llm)["disk"]["hits"] > 20
        assert_memory_returned(llm)
    assert tier_threads() == []

    # Restart: close handed the free slots' prefixes down; a new engine answers both from disk.
    with LLM(kv_offload_dir=directory, **VIRTUAL) as llm:
        for ids in (a, b):
            got, cached = run(llm, ids)
            assert got == reference(ids)
            assert cached == (len(ids) - 1) // 16 * 16
        assert_memory_returned(llm)

    # Blocks written by paged are read by virtual (same model, dtype, block size: same fingerprint).
    shared = str(tmp_path / "shared")
    paged = {**VIRTUAL, "kv_cache": "paged"}
    with LLM(kv_offload_dir=shared, **paged) as llm:
        c = ids_of(llm, "candles")
        assert run(llm, c)[0] == reference(c)
    with LLM(kv_offload_dir=shared, **VIRTUAL) as llm:
        got, cached = run(llm, c)
        assert got == reference(c) and cached == (len(c) - 1) // 16 * 16
        assert offload(llm)["disk"]["hits"] == (len(c) - 1) // 16


def test_int8_kv_and_its_scales_come_back_into_a_slot_unchanged():
    # int8 is lossy against transformers; a prefix reloaded from the host tier (scales included) must
    # give exactly the tokens the same engine gave when it computed that prefix.
    int8_bytes_per_token = 30 * 2 * 3 * (64 + 4)
    with LLM(kv_cache="virtual", dtype="float32", kv_cache_dtype="int8", kv_cache_memory=700 * int8_bytes_per_token,
             max_model_len=1024, kv_offload_memory="64MiB") as llm:
        a, b = ids_of(llm, "apples"), ids_of(llm, "bridges")
        computed, _ = run(llm, a)
        run(llm, b)
        again, cached = run(llm, a)
        assert again == computed and cached == (len(a) - 1) // 16 * 16
        assert offload(llm)["loaded_tokens"]["host"] == cached
        assert_memory_returned(llm)
