"""paged with prefix-cache tiers: greedy float32 tokens identical to transformers for requests whose
prefix came back from the host tier, from disk, and from disk after a restart (a new engine on the
same directory); a corrupted file is detected, deleted and recomputed; memory and threads return."""

from __future__ import annotations

import threading

from kvmem import LLM, SamplingParams
from tests.oracle import hf_default_model, hf_greedy

NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4  # SmolLM2 float32: layers x (K,V) x kv_heads x head_dim x 4 B
# Room for one long prompt and a little: a second long prompt evicts the first one's cached blocks.
BUDGET = 700 * BYTES_PER_TOKEN
BLOCK_BYTES = 16 * BYTES_PER_TOKEN

_reference: dict[tuple, list[int]] = {}


def reference(ids: list[int]) -> list[int]:
    if tuple(ids) not in _reference:
        _reference[tuple(ids)] = hf_greedy(hf_default_model(), ids, NEW_TOKENS)
    return _reference[tuple(ids)]


def text(topic: str, n: int) -> str:
    return " ".join(f"Note {i} on {topic}: item {i * 7 % 11} weighs {i * 3 % 17} grams." for i in range(n))


def ids_of(llm: LLM, topic: str, n: int = 40) -> list[int]:
    tok = llm.get_tokenizer()
    return tok.encode(text(topic, n))


def run(llm: LLM, ids: list[int]):
    out = llm.generate([{"prompt_token_ids": ids}], GREEDY, use_tqdm=False)[0]
    return out.outputs[0].token_ids, out.num_cached_tokens


def offload(llm: LLM) -> dict:
    return llm.stats().extra["kv_offload"]


def assert_memory_returned(llm: LLM) -> None:
    stats = llm.stats()
    assert stats.num_sequences == 0 and stats.bytes_allocated == 0 and stats.bytes_live == 0, stats
    assert not llm.engine.manager.tiers.loading
    llm.engine.manager.pool.check_invariants()


def tier_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kvmem-tier")]


def test_host_tier_hit_after_eviction_matches_transformers():
    with LLM(dtype="float32", kv_cache_memory=BUDGET, max_model_len=1024, kv_offload_memory="64MiB") as llm:
        a, b = ids_of(llm, "apples"), ids_of(llm, "bridges")
        assert 500 < len(a) < 690 and 500 < len(b) < 690
        first, cached = run(llm, a)
        assert cached == 0 and first == reference(a)
        assert run(llm, b)[0] == reference(b)  # evicts a's cached blocks: written back to the host tier
        assert offload(llm)["host"]["stored"] > 0
        hits_before = llm.stats().prefix_cache_hits
        again, cached = run(llm, a)
        assert again == reference(a)
        stats = offload(llm)
        assert stats["host"]["hits"] * 16 == stats["loaded_tokens"]["host"] > 0
        # every full block of a's prompt but the last token's came back from a cache, device or host
        assert cached == (len(a) - 1) // 16 * 16
        assert llm.stats().prefix_cache_hits - hits_before + stats["loaded_tokens"]["host"] >= cached
        assert_memory_returned(llm)
    assert tier_threads() == []


def test_disk_tier_and_restart_match_transformers(tmp_path):
    directory = tmp_path / "kv"
    # A host tier of 2 blocks: almost everything the budget evicts goes on to disk.
    kwargs = dict(dtype="float32", kv_cache_memory=BUDGET, max_model_len=1024, kv_offload_dir=str(directory))
    with LLM(kv_offload_memory=2 * BLOCK_BYTES, **kwargs) as llm:
        a, b = ids_of(llm, "apples"), ids_of(llm, "bridges")
        assert run(llm, a)[0] == reference(a)
        assert run(llm, b)[0] == reference(b)
        store = llm.engine.manager.tiers.store
        assert store.flush(timeout=60)
        assert offload(llm)["disk"]["stored"] > 20
        again, cached = run(llm, a)
        assert again == reference(a)
        stats = offload(llm)
        assert stats["disk"]["hits"] > 20 and stats["loaded_tokens"]["disk"] == stats["disk"]["hits"] * 16
        assert cached == (len(a) - 1) // 16 * 16
        assert_memory_returned(llm)
        assert len(tier_threads()) == 2  # the writer and the loader
    assert tier_threads() == []  # close joined them
    files = sorted(directory.glob("*/*.kv"))
    assert len(files) >= 2 * 30  # close handed the device's cached blocks down too: a's and b's

    # Restart: a new engine indexes the directory and answers both prompts from disk.
    with LLM(**kwargs) as llm:
        stats = offload(llm)
        assert stats["disk"]["indexed_at_start"] == len(files) and "host" not in stats
        for ids in (a, b):
            got, cached = run(llm, ids)
            assert got == reference(ids)
            assert cached == (len(ids) - 1) // 16 * 16
        assert offload(llm)["disk"]["hits"] >= 60
        assert_memory_returned(llm)

    # A corrupted file in the middle of a's chain: detected, deleted, the rest recomputed, tokens exact.
    with LLM(**kwargs) as llm:
        store = llm.engine.manager.tiers.store
        keys = chain_keys(a)
        victim = store.disk.path(keys[10])
        data = bytearray(victim.read_bytes())
        data[-100] ^= 0xFF
        victim.write_bytes(bytes(data))
        truncated = store.disk.path(keys[20])  # not reached: the load stops at the first bad block
        got, cached = run(llm, a)
        assert got == reference(a)
        assert cached == 10 * 16
        assert offload(llm)["disk"]["corrupt"] == 1 and not victim.exists() and truncated.exists()
        assert_memory_returned(llm)


def chain_keys(ids: list[int]) -> list[bytes]:
    from kvmem.memory.block_pool import hash_block

    keys, parent = [], None
    for i in range((len(ids) - 1) // 16):
        parent = hash_block(parent, ids[i * 16:(i + 1) * 16])
        keys.append(parent)
    return keys


def test_quantized_kv_comes_back_from_the_tiers_unchanged(tmp_path):
    # int8 KV is lossy against transformers, but a prefix reloaded from host or disk (scales included)
    # must give exactly the tokens the same engine gave when it computed that prefix.
    int8_bytes_per_token = 30 * 2 * 3 * (64 + 4)  # one byte per element, a float32 scale per token and head
    kwargs = dict(dtype="float32", kv_cache_dtype="int8", kv_cache_memory=700 * int8_bytes_per_token,
                  max_model_len=1024, kv_offload_memory=2 * 16 * int8_bytes_per_token, kv_offload_dir=str(tmp_path))
    with LLM(**kwargs) as llm:
        a, b = ids_of(llm, "apples"), ids_of(llm, "bridges")
        first, _ = run(llm, a)
        run(llm, b)
        assert llm.engine.manager.tiers.store.flush(timeout=60)
        again, cached = run(llm, a)
        assert again == first and cached == (len(a) - 1) // 16 * 16
        stats = offload(llm)
        assert stats["disk"]["hits"] > 0 and stats["host"]["stored"] > 0
        assert_memory_returned(llm)
