"""Greedy float32 tokens are identical to transformers for every KV strategy, batch mix, chunked
prefill, preemption and prefix hit — on the embedded SmolLM2 and on tiny random models."""

from __future__ import annotations

import pytest

from kvmem import LLM, SamplingParams
from tests.oracle import hf_default_model, hf_greedy, make_tiny_model

NEW_TOKENS = 12


def long_text() -> str:
    colours = ["red", "green", "blue", "amber", "violet", "teal", "grey"]
    animals = ["fox", "owl", "otter", "heron", "lynx"]
    return " ".join(f"Entry {i}: the {colours[i % 7]} {animals[i % 5]} counted {i * 7 % 13} stones."
                    for i in range(78)) + " Summarize the entries above."


@pytest.fixture(scope="module")
def smol():
    """One float32 engine on the embedded model with a roomy KV budget."""
    return LLM(dtype="float32", kv_cache_memory="256MiB", max_model_len=2048)


@pytest.fixture(scope="module")
def prompts(smol):
    tok = smol.get_tokenizer()
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
             "1, 2, 3, 4,", long_text()]
    ids = [tok.encode(t) for t in texts] + [tok.encode(chat, add_special_tokens=False)]
    assert max(len(i) for i in ids) > 1000
    return ids


_reference: dict[tuple, list[int]] = {}


def reference(prompt_ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    key = (tuple(prompt_ids), n)
    if key not in _reference:
        _reference[key] = hf_greedy(hf_default_model(), prompt_ids, n)
    return _reference[key]


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)


def generate_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def assert_memory_returned(llm: LLM) -> None:
    stats = llm.stats()
    assert stats.num_sequences == 0 and stats.bytes_allocated == 0 and stats.bytes_live == 0, stats


def test_mixed_batch_matches_transformers(smol, prompts):
    got = generate_ids(smol, prompts)
    assert got == [reference(p) for p in prompts]
    assert_memory_returned(smol)


def test_reference_attention_backend_matches_transformers(prompts):
    llm = LLM(dtype="float32", kv_cache_memory="64MiB", attention_backend="reference", max_model_len=2048)
    assert generate_ids(llm, prompts[:2]) == [reference(p) for p in prompts[:2]]


def test_preemption_and_chunked_prefill_keep_tokens_identical(prompts):
    # KV room for the longest request plus three blocks, 64-token steps: the long prompt is
    # prefilled in chunks, and whatever runs beside it must be preempted and recomputed.
    longest = max(len(p) for p in prompts) + NEW_TOKENS
    bytes_per_token = 30 * 2 * 3 * 64 * 4  # SmolLM2 in float32: layers x (K,V) x kv_heads x head_dim x 4 B
    llm = LLM(dtype="float32", kv_cache_memory=(longest + 48) * bytes_per_token, max_num_batched_tokens=64,
              enable_prefix_caching=False, max_model_len=longest + 16)
    batch = prompts + prompts[:4]
    got = generate_ids(llm, batch)
    counters = llm.engine.scheduler.counters
    assert counters.num_chunked_prefills > 0
    assert counters.num_preemptions > 0
    assert got == [reference(p) for p in batch]
    assert_memory_returned(llm)


def test_prefix_cache_hits_keep_tokens_identical(smol):
    tok = smol.get_tokenizer()
    system = "You are a meticulous assistant. " + long_text()[:1500]
    convs = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
             for q in ("Name a colour.", "Name an animal.", "Count to three.")]
    ids = [tok.encode(tok.apply_chat_template(c), add_special_tokens=False) for c in convs]
    first = generate_ids(smol, ids[:1])
    hits_before = smol.stats().prefix_cache_hits
    outs = smol.generate([{"prompt_token_ids": p} for p in ids[1:]], GREEDY, use_tqdm=False)
    assert smol.stats().prefix_cache_hits > hits_before
    assert all(o.num_cached_tokens > 0 for o in outs)
    assert first + [o.outputs[0].token_ids for o in outs] == [reference(p) for p in ids]
    assert_memory_returned(smol)


def test_static_strategy_matches_transformers(prompts):
    llm = LLM(dtype="float32", kv_cache="static", kv_cache_memory="128MiB", max_model_len=1280)
    assert llm.stats().strategy == "static"
    assert generate_ids(llm, prompts) == [reference(p) for p in prompts]
    assert_memory_returned(llm)


def assert_kernel_agrees(llm: LLM) -> None:
    """virtual: the kernel's count of resident pages is the manager's count of mapped ones."""
    manager = llm.engine.manager
    assert manager.kernel_resident_bytes() == llm.stats().bytes_physical


def test_virtual_strategy_matches_transformers(prompts):
    llm = LLM(dtype="float32", kv_cache="virtual", kv_cache_memory="128MiB", max_model_len=2048)
    assert generate_ids(llm, prompts) == [reference(p) for p in prompts]
    assert_memory_returned(llm)
    assert_kernel_agrees(llm)
    # Deferred reclamation kept the finished sequences' pages; release gives them to the OS.
    assert llm.stats().bytes_physical > 0
    assert llm.release_free_memory() > 0
    assert llm.stats().bytes_physical == 0 and llm.engine.manager.kernel_resident_bytes() == 0


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_virtual_preemption_and_chunked_prefill_keep_tokens_identical(prompts, prefix_caching):
    # Physical room for the longest request plus a little: chunked prefill, and preemption of what
    # runs beside it. With prefix caching a preempted sequence resumes from its own slot's pages.
    longest = max(len(p) for p in prompts) + NEW_TOKENS
    bytes_per_token = 30 * 2 * 3 * 64 * 4
    llm = LLM(dtype="float32", kv_cache="virtual", kv_cache_memory=(longest + 96) * bytes_per_token,
              max_num_batched_tokens=64, enable_prefix_caching=prefix_caching, max_model_len=longest + 16)
    batch = prompts + prompts[:4]
    got = generate_ids(llm, batch)
    counters = llm.engine.scheduler.counters
    assert counters.num_chunked_prefills > 0 and counters.num_preemptions > 0
    assert got == [reference(p) for p in batch]
    assert_memory_returned(llm)
    assert_kernel_agrees(llm)
    assert llm.stats().bytes_physical <= llm.stats().bytes_capacity


def test_virtual_prefix_reuse_and_shared_pages_keep_tokens_identical(prompts):
    llm = LLM(dtype="float32", kv_cache="virtual", kv_cache_memory="128MiB", max_model_len=2048)
    tok = llm.get_tokenizer()
    system = "You are a meticulous assistant. " + long_text()[:1500]
    convs = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
             for q in ("Name a colour.", "Name an animal.")]
    ids = [tok.encode(tok.apply_chat_template(c), add_special_tokens=False) for c in convs]
    first = generate_ids(llm, ids[:1])
    second = llm.generate([{"prompt_token_ids": ids[1]}], GREEDY, use_tqdm=False)[0]
    assert second.num_cached_tokens > 300  # the shared system prompt came from the first one's slot
    assert first + [second.outputs[0].token_ids] == [reference(p) for p in ids]
    # n = 2: the second sample is admitted while the first runs, and maps the first's full prompt
    # chunks (physically shared pages) instead of computing them.
    params = SamplingParams(n=2, temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    hits = llm.stats().prefix_cache_hits
    out = llm.generate([{"prompt_token_ids": prompts[4]}], params, use_tqdm=False)[0]  # > 1,000 tokens
    assert all(c.token_ids == reference(prompts[4]) for c in out.outputs)
    assert llm.engine.manager.pool is not None and llm.stats().prefix_cache_hits >= hits + 1000
    assert_memory_returned(llm)
    assert_kernel_agrees(llm)
    assert llm.release_free_memory() > 0 and llm.engine.manager.kernel_resident_bytes() == 0


def test_n_greedy_samples_share_the_prompt_and_match(smol, prompts):
    """n > 1 forks after the prompt; copy-on-write of the shared last block keeps samples apart."""
    params = SamplingParams(n=3, temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    out = smol.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == reference(prompts[0]) for c in out.outputs)
    assert_memory_returned(smol)


def test_seeded_sampling_is_reproducible_across_batches(smol, prompts):
    params = SamplingParams(n=2, temperature=0.9, top_p=0.95, seed=1234, max_tokens=10)
    alone = smol.generate([{"prompt_token_ids": prompts[2]}], params, use_tqdm=False)[0]
    mixed = smol.generate([{"prompt_token_ids": p} for p in prompts[:3]],
                          [GREEDY, GREEDY, params], use_tqdm=False)[2]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in mixed.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids


@pytest.mark.parametrize("kind", ["llama-mha", "llama3-gqa", "qwen2-bias"])
@pytest.mark.parametrize("kv_cache", ["paged", "static", "virtual"])
def test_tiny_random_models_match_transformers(tmp_path_factory, kind, kv_cache):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.getbasetemp() / kind
    if not path.exists():
        make_tiny_model(path, kind)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    llm = LLM(str(path), dtype="float32", kv_cache=kv_cache, kv_cache_memory="8MiB", block_size=4,
              max_num_batched_tokens=48)
    lengths = [1, 5, 17, 40, 130]  # 130 > 64: past llama3's original context, chunked at 48
    prompts = [[(7 * i + 3 * j) % 300 + 2 for j in range(n)] for i, n in enumerate(lengths)]
    got = generate_ids(llm, prompts, SamplingParams(temperature=0, max_tokens=20, min_tokens=20))
    assert got == [hf_greedy(hf, p, 20) for p in prompts]
    assert_memory_returned(llm)
