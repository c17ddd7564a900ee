"""The async engine: outputs stream out of the engine thread, early exits abort and free memory,
bad requests fail without touching the engine, stop() ends what is in flight."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvmem import LLM, SamplingParams
from kvmem.config import EngineConfig
from kvmem.engine.async_engine import AsyncLLMEngine, EngineStoppedError
from kvmem.engine.llm_engine import LLMEngine
from tests.oracle import make_tiny_model

ENGINE = dict(dtype="float32", kv_cache_memory="4MiB")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("async") / "llama", "llama-mha")


@pytest.fixture
def engine(tiny_dir):
    e = AsyncLLMEngine(LLMEngine(EngineConfig(model=str(tiny_dir), **ENGINE)))
    e.start()
    yield e
    e.stop()


def wait_idle(engine: AsyncLLMEngine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.snapshot.num_requests or engine.snapshot.memory.bytes_allocated:
        assert time.monotonic() < deadline, engine.snapshot
        time.sleep(0.01)


def test_outputs_stream_and_match_the_offline_engine(engine, tiny_dir):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    text, ids = engine.check_prompt("Hello, world!")
    expected = LLM(str(tiny_dir), **ENGINE).generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]

    async def run():
        return [out async for out in engine.generate(text, ids, params, "r1")]

    outs = asyncio.run(run())
    assert len(outs) == 10 and outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert "".join(o.outputs[0].text_delta for o in outs) == expected.outputs[0].text
    assert outs[-1].outputs[0].token_ids == expected.outputs[0].token_ids
    wait_idle(engine)


def test_leaving_early_aborts_and_frees_memory(engine):
    _, ids = engine.check_prompt("The quick brown fox")

    async def take_two():
        gen = engine.generate(None, ids, SamplingParams(max_tokens=400, ignore_eos=True, n=4), "r2")
        outs = []
        async for out in gen:
            outs.append(out)
            if len(outs) == 2:
                break
        await gen.aclose()
        return outs

    assert len(asyncio.run(take_two())) == 2
    wait_idle(engine, timeout=1.0)
    assert engine.snapshot.memory.bytes_allocated == 0 and engine.snapshot.num_generation_tokens < 4 * 400


def test_a_duplicate_request_id_fails_that_request_only(engine):
    _, ids = engine.check_prompt("Hi")

    async def run():
        first = engine.generate(None, ids, SamplingParams(max_tokens=300, ignore_eos=True), "same")
        await anext(first)
        with pytest.raises(ValueError, match="already in use"):
            async for _ in engine.generate(None, ids, SamplingParams(max_tokens=3), "same"):
                pass
        return [o async for o in first][-1]

    assert asyncio.run(run()).outputs[0].finish_reason == "length"
    wait_idle(engine)


def test_bad_prompts_are_refused_on_the_callers_thread(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.check_prompt([])
    with pytest.raises(ValueError, match="max_model_len"):
        engine.check_prompt([5] * engine.max_model_len)


def test_stop_aborts_in_flight_requests_and_refuses_new_ones(tiny_dir):
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=str(tiny_dir), **ENGINE)))
    engine.start()
    _, ids = engine.check_prompt("Hello")

    async def run():
        gen = engine.generate(None, ids, SamplingParams(max_tokens=500, ignore_eos=True, n=8), "r")
        await anext(gen)
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
        rest = [o async for o in gen]
        return rest[-1] if rest else None

    last = asyncio.run(run())
    assert last is not None and last.finished and {c.finish_reason for c in last.outputs} == {"abort"}
    assert engine.snapshot.memory.bytes_allocated == 0

    async def after():
        async for _ in engine.generate(None, ids, SamplingParams(max_tokens=2), "late"):
            pass

    with pytest.raises(EngineStoppedError):
        asyncio.run(after())
