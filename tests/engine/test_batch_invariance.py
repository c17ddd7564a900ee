"""Temperature 0 means the same answer whatever else the engine is running: the embedded model in its
default dtype (bfloat16) gives a prompt the same greedy tokens alone and inside batches of other
prompts. (Found by a held-out load test: oneDNN's single-row linear rounds differently from its GEMM,
so one prompt's continuation changed after ~90 characters inside a batch of 32.)"""

from __future__ import annotations

import pytest

from kvmem.config import EngineConfig
from kvmem.engine.llm_engine import LLMEngine
from kvmem.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

TARGET = "The three most important inventions of the twentieth century are"
OTHERS = [
    "Write a haiku about the sea.", "List the planets of the solar system.", "What is 17 times 23?",
    "Explain photosynthesis to a child.", "Translate 'good morning' into French.", "Why is the sky blue?",
    "Give me a recipe for pancakes.", "Who wrote Pride and Prejudice?", "Describe a cat in one sentence.",
    "How do vaccines work?", "Name three programming languages.", "What causes earthquakes?",
    "Summarize the plot of Hamlet.", "What is the capital of Australia?", "Tell me a joke about computers.",
    "How many legs does a spider have?", "What is the boiling point of water?", "Suggest a name for a dog.",
    "Why do leaves change colour in autumn?", "What is a prime number?", "How does a bicycle stay upright?",
    "Write one line of a love poem.", "What is the speed of light?", "Explain what a database is.",
    "Which ocean is the largest?", "What do bees make?", "How far away is the Moon?",
    "What is the tallest mountain?", "Give a synonym for happy.", "How do airplanes fly?",
    "What year did the Second World War end?",
]
PARAMS = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


def greedy(engine: LLMEngine, prompts: list[str]) -> list[list[int]]:
    ids = [engine.add_request(p, PARAMS) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids]


@pytest.mark.parametrize("kv_cache", ["paged", "static", "virtual"])
def test_greedy_tokens_do_not_depend_on_the_rest_of_the_batch(default_source, kv_cache):
    engine = LLMEngine(EngineConfig(kv_cache=kv_cache, kv_cache_memory="256MiB", max_model_len=512), default_source)
    try:
        assert engine.dtype.is_floating_point and str(engine.dtype) == "torch.bfloat16"
        alone = greedy(engine, [TARGET])[0]
        for size in (1, 2, 7, 32):
            # The target sits at a different place in each batch, among prompts of other lengths.
            batch = OTHERS[: size - 1]
            position = size // 2
            batch = batch[:position] + [TARGET] + batch[position:]
            tokens = greedy(engine, batch)
            assert tokens[position] == alone, f"batch of {size}: {engine.tokenizer.decode(tokens[position])!r} " \
                                              f"!= {engine.tokenizer.decode(alone)!r}"
    finally:
        engine.close()
