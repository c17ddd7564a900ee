"""The embedded SmolLM2-135M-Instruct behind the server, through the `openai` client, exactly as the
README's example uses it: answers equal `LLM.generate` / `LLM.chat` greedy output."""

from __future__ import annotations

import openai
import pytest

from kvmem import LLM, SamplingParams
from kvmem.config import EngineConfig
from tests.server.conftest import start_server

pytestmark = pytest.mark.slow
ENGINE = dict(dtype="float32", kv_cache_memory="256MiB", max_model_len=2048)
GREEDY = SamplingParams(temperature=0, max_tokens=16)


@pytest.fixture(scope="module")
def smol_server():
    server = start_server(EngineConfig(**ENGINE))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def smol():
    return LLM(**ENGINE)


def test_served_under_its_name(smol_server):
    assert smol_server.model == "SmolLM2-135M-Instruct"


def test_chat_streamed_and_not_equal_llm_chat(smol_server, smol):
    client = openai.OpenAI(base_url=f"{smol_server.base_url}/v1", api_key="none", max_retries=0)
    conversations = [[{"role": "user", "content": "Name three colours."}],
                     [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]]
    for messages in conversations:
        expected = smol.chat(messages, GREEDY, use_tqdm=False)[0].outputs[0]
        got = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=16,
                                             temperature=0)
        assert got.choices[0].message.content == expected.text
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=messages, max_tokens=16, temperature=0, stream=True))
        assert streamed == expected.text


def test_completions_streamed_and_not_equal_llm_generate(smol_server, smol):
    client = openai.OpenAI(base_url=f"{smol_server.base_url}/v1", api_key="none", max_retries=0)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
    expected = [o.outputs[0].text for o in smol.generate(prompts, GREEDY, use_tqdm=False)]
    got = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompts, max_tokens=16, temperature=0)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == expected
    for prompt, text in zip(prompts, expected):
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=16, temperature=0, stream=True))
        assert streamed == text
    assert smol_server.wait_kv_free()["kvmem:kv_cache_allocated_bytes"] == 0
