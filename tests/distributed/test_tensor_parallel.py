"""Tensor parallelism end to end on tiny random models: greedy float32 tokens with 2 and 3 ranks are
those of one rank and of transformers (MHA, GQA, replicated KV heads), through preemption and
prefix hits, for paged, static and virtual; every rank's KV returns; nothing is left after close;
a rank that dies is an error, not a hang. Each engine starts worker interpreters (seconds each)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from kvmem import LLM, SamplingParams
from kvmem.config import EngineConfig
from kvmem.distributed.executor import TensorParallelError
from kvmem.engine.llm_engine import model_bytes
from tests.oracle import hf_greedy, make_tiny_model

# Shared prefixes (prefix hits) and more work than a small cache holds at once (preemption).
BASE = [5, 17, 42, 99, 3, 250, 8, 61, 77, 12, 140, 33]
PROMPTS = [BASE + [i, 200 + i] for i in range(6)] + [[9, 8, 7, 6, 5, 4, 3]]
N_TOKENS = 24
GREEDY = SamplingParams(temperature=0, max_tokens=N_TOKENS, min_tokens=N_TOKENS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {kind: make_tiny_model(root / kind, kind) for kind in ("llama-mha", "llama3-gqa", "qwen2-bias",
                                                                  "llama-mqa6")}


@pytest.fixture(scope="module")
def hf_tokens(models):
    from transformers import AutoModelForCausalLM

    out = {}
    for kind, path in models.items():
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        out[kind] = [hf_greedy(hf, p, N_TOKENS) for p in PROMPTS]
    return out


def child_pids() -> set[int]:
    me = os.getpid()
    pids = set()
    for task in os.listdir(f"/proc/{me}/task"):
        try:
            with open(f"/proc/{me}/task/{task}/children") as f:
                pids |= {int(p) for p in f.read().split()}
        except OSError:
            pass
    return pids


def kv_bytes_for(path, tp: int, tokens: int) -> int:
    """A per-rank KV budget holding `tokens` tokens with `tp` ranks (each holds its KV heads' share)."""
    c = json.loads((path / "config.json").read_text())
    heads = c["num_attention_heads"]
    kv_heads = max(c.get("num_key_value_heads") or heads, tp) // tp
    return tokens * 2 * c["num_hidden_layers"] * kv_heads * (c["hidden_size"] // heads) * 4


def run(path, tp: int, kv_cache: str = "paged", **kwargs) -> tuple[list[list[int]], dict]:
    """Greedy tokens of PROMPTS, and what the engine saw (preemptions, prefix hits, every rank's
    memory after the requests ended); the engine is closed, and it must leave nothing behind.
    By default 3 sequences at a time (later ones find the shared prefix computed) in a cache of 64
    tokens, less than 3 x 38: preemptions."""
    before = child_pids()
    settings = dict(dtype="float32", kv_cache_memory=kv_bytes_for(path, tp, 64), block_size=4, max_num_seqs=3)
    settings.update(kwargs)
    llm = LLM(str(path), tensor_parallel_size=tp, kv_cache=kv_cache, **settings)
    try:
        tokens = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY,
                                                                use_tqdm=False)]
        engine = llm.engine
        seen = {"preemptions": engine.scheduler.counters.num_preemptions,
                "prefix_hits": engine.stats().prefix_cache_hits,
                "bytes_per_token": engine.manager.spec.bytes_per_token,
                # the split parts of the layers (their norms are replicated)
                "layer_bytes": sum(model_bytes(layer.self_attn) + model_bytes(layer.mlp)
                                   for layer in engine.model.layers)}
        if tp > 1:
            seen["ranks"] = engine.tp.rank_stats()
            engine.release_free_memory()
            seen["ranks_released"] = engine.tp.rank_stats()
            seen["workers"] = {p.pid for p in engine.tp.processes}
            seen["shared_memory"] = engine.tp.group.shared_memory is not None
    finally:
        llm.close()
    assert child_pids() <= before, "a worker process outlived close()"
    assert not [t for t in threading.enumerate() if t.name.startswith("kvmem-tp")], "a thread outlived close()"
    return tokens, seen


def assert_ranks_gave_back(seen: dict, tp: int) -> None:
    ranks, released = seen["ranks"], seen["ranks_released"]
    assert len(ranks) == tp
    for stats, _ in ranks:
        assert stats.num_sequences == 0 and stats.bytes_allocated == 0 and stats.bytes_live == 0, stats
    capacities = {stats.bytes_capacity or stats.bytes_reserved for stats, _ in ranks}
    assert len(capacities) == 1  # the same KV budget on every rank
    for stats, resident in released:
        if resident is not None:  # virtual: the kernel's count of backed pages agrees, and is back to none
            assert stats.bytes_physical == 0 and resident == 0, (stats, resident)


@pytest.mark.parametrize("kind", ["llama-mha", "llama3-gqa", "qwen2-bias"])
def test_tp2_greedy_tokens_are_tp1s_and_transformers(models, hf_tokens, kind):
    one, seen1 = run(models[kind], 1)
    two, seen2 = run(models[kind], 2)
    assert one == hf_tokens[kind]
    assert two == one
    # Each rank holds half the KV heads (so the same budget holds twice the tokens) and half the layers.
    assert seen2["bytes_per_token"] * 2 == seen1["bytes_per_token"]
    assert seen2["layer_bytes"] * 2 == seen1["layer_bytes"]
    assert seen2["preemptions"] > 0 and seen2["prefix_hits"] > 0, seen2  # the paths the test claims to cover
    assert seen2["shared_memory"]  # ranks on one CPU: the all-reduce went through shared memory
    assert_ranks_gave_back(seen2, 2)


@pytest.mark.parametrize("kv_cache", ["static", "virtual"])
def test_tp2_other_strategies(models, hf_tokens, kv_cache):
    # static: one slot of max_model_len per request; virtual: pages mapped on demand on every rank.
    extra = {"max_model_len": 40} if kv_cache == "static" else {"kv_cache_memory": "1MiB"}
    two, seen = run(models["llama3-gqa"], 2, kv_cache, **extra)
    assert two == hf_tokens["llama3-gqa"]
    assert_ranks_gave_back(seen, 2)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_tp2_quantized_kv_gives_tp1s_tokens(models, kv_cache_dtype):
    """Each rank stores its own heads' K,V quantized (int8: a scale per token and head, so a head's
    values do not depend on the others'): TP = 2 reads exactly what TP = 1 reads."""
    path = models["llama3-gqa"]
    one, _ = run(path, 1, kv_cache_dtype=kv_cache_dtype, kv_cache_memory=kv_bytes_for(path, 1, 128))
    two, seen = run(path, 2, kv_cache_dtype=kv_cache_dtype, kv_cache_memory=kv_bytes_for(path, 2, 128))
    assert two == one
    assert_ranks_gave_back(seen, 2)


@pytest.mark.parametrize("tp,kv_cache", [(2, "paged"), (3, "paged"), (3, "virtual")])
def test_replicated_kv_heads_over_2_and_3_ranks(models, hf_tokens, tp, kv_cache):
    # 6 heads, 1 KV head: every rank holds 6 / tp q heads and a copy of the one KV head.
    extra = {"kv_cache_memory": "1MiB"} if kv_cache == "virtual" else {}
    tokens, seen = run(models["llama-mqa6"], tp, kv_cache, **extra)
    assert tokens == hf_tokens["llama-mqa6"]
    assert_ranks_gave_back(seen, tp)


def test_heads_that_do_not_divide_are_refused_before_anything_starts(models):
    before = child_pids()
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the model's 4 attention heads"):
        LLM(str(models["llama-mha"]), tensor_parallel_size=3, dtype="float32", kv_cache_memory="1MiB")
    assert child_pids() == before


def test_a_failed_start_leaves_no_worker(models):
    before = child_pids()
    with pytest.raises(ValueError, match="kv_cache_memory"):  # too small for one block, found after the ranks start
        LLM(str(models["llama-mha"]), tensor_parallel_size=2, dtype="float32", kv_cache_memory=64)
    assert child_pids() <= before


@pytest.mark.parametrize("settings,words", [
    ({"kv_cache": "hybrid"}, "tensor_parallel_size 2 does not work with kv_cache='hybrid'"),
    ({"nnodes": 3}, "tensor_parallel_size 2 must be a multiple of nnodes"),
    ({"nnodes": 2, "node_rank": 2}, "node_rank must be in"),
    ({"distributed_init_method": "http://x:1"}, "distributed_init_method must look like tcp://HOST:PORT"),
    ({"distributed_init_method": "tcp://x"}, "distributed_init_method must look like tcp://HOST:PORT"),
])
def test_bad_settings_name_the_parameter(settings, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        EngineConfig(tensor_parallel_size=2, **settings)


def test_a_dead_rank_is_an_error_not_a_hang(models):
    llm = LLM(str(models["llama-mha"]), tensor_parallel_size=2, dtype="float32", kv_cache_memory="1MiB")
    try:
        failures = []
        llm.engine.tp.on_failure.append(failures.append)
        worker = llm.engine.tp.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=60)
        deadline = time.monotonic() + 60  # the monitor notices between steps
        while not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert failures and "rank 1 exited with code -9" in failures[0]
        with pytest.raises(TensorParallelError, match="rank 1"):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False)
    finally:
        llm.close()


def test_a_rank_dying_during_a_step_fails_the_step(models):
    llm = LLM(str(models["llama-mha"]), tensor_parallel_size=2, dtype="float32", kv_cache_memory="1MiB")
    try:
        engine = llm.engine
        engine.tp._stop.set()  # no monitor: only the collectives can notice
        engine.tp._monitor.join()
        os.kill(engine.tp.processes[0].pid, signal.SIGKILL)
        engine.tp.processes[0].wait(timeout=60)
        engine.add_request({"prompt_token_ids": PROMPTS[0]}, GREEDY)
        with pytest.raises(TensorParallelError, match="tensor-parallel (collective|step) failed"):
            for _ in range(N_TOKENS + 1):
                engine.step()
    finally:
        llm.close()


@pytest.mark.slow
def test_embedded_smollm2_over_3_ranks_matches_transformers():
    # SmolLM2-135M: 9 heads, 3 KV heads, MLP 1536: 3 heads and 1 KV head per rank. Two prompts share
    # a 16-token prefix block, run one after the other (max_num_seqs 1): a prefix hit on every rank.
    from kvmem.models.loader import load_model
    from tests.oracle import hf_default_model

    tokenizer = load_model(None).tokenizer
    texts = ["The capital of France is", "def fibonacci(n):",
             "Once upon a time, in a small village, there lived an old clockmaker who",
             "Once upon a time, in a small village, there lived an old clockmaker who never"]
    prompts = [tokenizer.encode(t) for t in texts]
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=8)
    llm = LLM(dtype="float32", tensor_parallel_size=3, kv_cache_memory="4MiB", max_num_seqs=1, max_model_len=256)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                             use_tqdm=False)]
        assert llm.stats().prefix_cache_hits >= 16
        assert all(s.bytes_allocated == 0 for s, _ in llm.engine.tp.rank_stats())
    finally:
        llm.close()
    assert got == [hf_greedy(hf_default_model(), p, 8) for p in prompts]


def test_n_samples_logprobs_and_prompt_logprobs_follow_tp1(models):
    # n > 1 forks share the prompt's blocks (copy-on-write replayed on every rank); rank 0's lm_head
    # gives the logprobs and the prompt logprobs.
    params = SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=8, logprobs=2, prompt_logprobs=2)
    outs = {}
    for tp in (1, 2):
        llm = LLM(str(models["llama-mha"]), tensor_parallel_size=tp, dtype="float32", kv_cache_memory="1MiB",
                  block_size=4)
        try:
            outs[tp] = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)[0]
            if tp == 2:
                assert all(s.bytes_allocated == 0 for s, _ in llm.engine.tp.rank_stats())
        finally:
            llm.close()
    one, two = outs[1], outs[2]
    assert [c.token_ids for c in two.outputs] == [c.token_ids for c in one.outputs]
    assert len({tuple(c.token_ids) for c in one.outputs}) > 1  # the samples differ: a real n = 3
    for a, b in zip(one.outputs, two.outputs):
        for la, lb in zip(a.logprobs, b.logprobs):
            assert list(la) == list(lb)
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 for t in la)
    for pa, pb in zip(one.prompt_logprobs[1:], two.prompt_logprobs[1:]):
        assert list(pa) == list(pb)
        assert all(abs(pa[t].logprob - pb[t].logprob) < 1e-4 for t in pa)


def test_a_model_source_object_is_refused_with_tp(models):
    # The other ranks load the model themselves, from config.model: a ModelSource cannot reach them.
    from kvmem.engine.llm_engine import LLMEngine
    from kvmem.models.loader import load_model

    with pytest.raises(ValueError, match="tensor_parallel_size > 1 loads the model on every rank"):
        LLMEngine(EngineConfig(tensor_parallel_size=2, dtype="float32"), load_model(str(models["llama-mha"])))


def test_tp2_reads_a_checkpoints_fp8_kv_scales_as_tp1(models, tmp_path):
    """Every rank folds the checkpoint's k_scale/v_scale into its slices of the projections
    (kvmem.models.kv_scales), as rank 0 does: TP = 2 gives TP = 1's tokens."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path / "scaled"
    shutil.copytree(models["llama3-gqa"], path)
    tensors = load_file(path / "model.safetensors")
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.013 * (i + 1))
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.021 * (i + 1))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    one, _ = run(path, 1, kv_cache_dtype="fp8", kv_cache_memory=kv_bytes_for(path, 1, 128))
    two, seen = run(path, 2, kv_cache_dtype="fp8", kv_cache_memory=kv_bytes_for(path, 2, 128))
    assert two == one
    assert_ranks_gave_back(seen, 2)
