"""Cascade attention in the engine: many requests on one long shared prefix (paged: prefix-cache
blocks; virtual: shared pages) are grouped, and every request's greedy tokens are the same as with
--disable-cascade-attn and as alone; in float32 they are transformers' tokens."""

from __future__ import annotations

import pytest

from kvmem.attention import cpu_kernels, metadata
from kvmem.config import EngineConfig
from kvmem.engine.llm_engine import LLMEngine
from kvmem.sampling_params import SamplingParams
from tests.oracle import hf_default_model, hf_greedy

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(cpu_kernels.cascade_attention_kernel() is None, reason="no native CPU kernel")]

PREFIX = ("You are a careful assistant. Answer in one short paragraph, plainly, without lists. "
          "The user is a student preparing for an exam in natural sciences and history; keep every "
          "answer correct, name your sources when you know them, and say so when you are unsure. ") * 5
QUESTIONS = ["Why is the sky blue?", "What is 17 times 23?", "Who wrote Hamlet?", "How do vaccines work?",
             "What causes tides?", "Name a prime number above 50.", "What is photosynthesis?",
             "Why do leaves fall?", "How far is the Moon?", "What is an atom?"]


class GroupSpy:
    """Counts the cascade groups the metadata builds (rows grouped, longest shared prefix)."""

    def __init__(self, monkeypatch):
        self.rows = 0
        self.decode_rows = 0  # grouped in decode-only steps: rows of different sequences
        self.longest = 0
        real = metadata.find_cascade_groups

        def spy(*args, **kwargs):
            groups = real(*args, **kwargs)
            if groups is not None:
                self.rows += groups.rows.numel()
                if all(q == 1 for q in args[3]):
                    self.decode_rows += groups.rows.numel()
                self.longest = max(self.longest, int(groups.prefix_lens.max()))
            return groups

        monkeypatch.setattr(metadata, "find_cascade_groups", spy)


def run(engine: LLMEngine, prompts: list, params: SamplingParams) -> list[list[int]]:
    """The first prompt runs a step alone first, so the others find its prefix computed (a prefix-cache
    hit on paged, shared pages on virtual) and run beside it."""
    ids = [engine.add_request(prompts[0], params)]
    done = {}
    for out in engine.step():
        if out.finished:
            done[out.request_id] = out.outputs[0].token_ids
    ids += [engine.add_request(p, params) for p in prompts[1:]]
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids]


@pytest.mark.parametrize("kv_cache", ["paged", "virtual"])
def test_shared_prefix_requests_get_the_same_tokens_grouped_ungrouped_and_alone(default_source, kv_cache,
                                                                                monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [PREFIX + q for q in QUESTIONS]
    results = {}
    for disable in (False, True):
        spy = GroupSpy(monkeypatch)
        engine = LLMEngine(EngineConfig(kv_cache=kv_cache, kv_cache_memory="256MiB", max_model_len=512,
                                        disable_cascade_attn=disable), default_source)
        try:
            assert str(engine.dtype) == "torch.bfloat16"
            results[disable] = run(engine, prompts, params)
            if not disable:
                alone = [run(engine, [p], params)[0] for p in prompts[1:4]]
        finally:
            engine.close()
        if disable:
            assert spy.rows == 0
        else:  # decode and prompt rows on the shared prefix were grouped, the prefix whole
            assert spy.decode_rows >= len(QUESTIONS) * 10 and spy.longest >= 256
    assert results[False] == results[True]
    assert alone == results[False][1:4]


def test_float32_tokens_are_transformers_tokens_with_cascade(default_source, monkeypatch):
    spy = GroupSpy(monkeypatch)
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=12)
    prompts = [PREFIX + q for q in QUESTIONS[:4]]
    engine = LLMEngine(EngineConfig(dtype="float32", kv_cache_memory="256MiB", max_model_len=512), default_source)
    try:
        prompt_ids = [engine.tokenize_prompt(p)[1] for p in prompts]
        tokens = run(engine, prompt_ids, params)
    finally:
        engine.close()
    assert spy.rows > 0
    hf = hf_default_model()
    assert tokens == [hf_greedy(hf, ids, 12) for ids in prompt_ids]
