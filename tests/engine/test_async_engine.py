"""The async engine: outputs stream out of the engine thread, early exits abort and free memory,
bad requests fail without touching the engine, stop() ends what is in flight."""

from __future__ import annotations

import asyncio
import logging
import threading
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
    # Up to one output per step: outputs the consumer had not taken yet are merged (see below).
    assert 1 <= len(outs) <= 10 and outs[-1].finished and not any(o.finished for o in outs[:-1])
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


def test_outputs_a_slow_consumer_has_not_taken_are_merged(engine):
    """A consumer that reads nothing until the request ended finds one output, not one per step
    (each a snapshot of the whole state: a stalled client would hold memory quadratic in the
    length), and its text delta is the whole text."""
    _, ids = engine.check_prompt("Hello, world!")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2)

    async def run():
        gen = engine.generate(None, ids, params, "slow")
        first = await anext(gen)  # the request is in; now let it finish unread
        deadline = time.monotonic() + 120
        while engine.snapshot.num_requests or engine.snapshot.num_generation_tokens < 24:
            assert time.monotonic() < deadline, engine.snapshot
            await asyncio.sleep(0.01)
        return first, [out async for out in gen]

    first, rest = asyncio.run(run())
    assert len(rest) == 1 and rest[0].finished
    for a, b in zip(first.outputs, rest[0].outputs):
        assert a.text_delta + b.text_delta == b.text and len(b.token_ids) == 12


def test_step_elapsed_shows_a_step_in_progress(engine, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real_step = engine.engine.step

    def stuck_step():
        entered.set()
        assert release.wait(120)
        return real_step()

    monkeypatch.setattr(engine.engine, "step", stuck_step)
    assert engine.step_elapsed() is None
    _, ids = engine.check_prompt("Hi")

    async def run():
        gen = engine.generate(None, ids, SamplingParams(max_tokens=2), "stuck")
        task = asyncio.ensure_future(anext(gen))
        assert await asyncio.to_thread(entered.wait, 120)
        first = engine.step_elapsed()
        await asyncio.sleep(0.05)
        assert first is not None and engine.step_elapsed() >= first + 0.05
        release.set()
        await task
        async for _ in gen:
            pass

    asyncio.run(run())
    wait_idle(engine)
    assert engine.step_elapsed() is None


def test_stop_closes_the_engine_on_its_thread(tiny_dir):
    engine = AsyncLLMEngine(lambda: LLMEngine(EngineConfig(model=str(tiny_dir), **ENGINE)))
    engine.start()
    closed_on: list[str] = []
    real_close = engine.engine.close
    engine.engine.close = lambda: (closed_on.append(threading.current_thread().name), real_close())
    engine.stop()
    assert closed_on == ["kvmem-engine"] and engine.engine.closed and not engine.is_running


def test_stop_warns_when_the_engine_thread_does_not_end(tiny_dir, caplog):
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=str(tiny_dir), **ENGINE)))
    engine.start()
    entered, release = threading.Event(), threading.Event()
    real_step = engine.engine.step

    def stuck_step():
        entered.set()
        release.wait(120)
        return real_step()

    engine.engine.step = stuck_step
    _, ids = engine.check_prompt("Hi")

    async def run():
        gen = engine.generate(None, ids, SamplingParams(max_tokens=2), "stuck")
        task = asyncio.ensure_future(anext(gen))
        assert await asyncio.to_thread(entered.wait, 120)
        with caplog.at_level(logging.WARNING, logger="kvmem.engine.async_engine"):
            await asyncio.to_thread(engine.stop, 0.1)
        assert "did not end" in caplog.text
        release.set()  # the step returns; the thread then ends (and its stream with an abort)
        task.cancel()

    asyncio.run(run())


def test_a_failure_outside_the_step_ends_every_stream_instead_of_hanging(tiny_dir):
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=str(tiny_dir), **ENGINE)))
    engine.start()
    _, ids = engine.check_prompt("Hi")

    class Bug(BaseException):
        pass

    def broken_deliver(outputs):
        raise Bug("a bug in the engine thread's loop")

    engine._deliver = broken_deliver

    async def run():
        with pytest.raises(EngineStoppedError):
            async for _ in engine.generate(None, ids, SamplingParams(max_tokens=5), "r"):
                pass

    asyncio.run(asyncio.wait_for(run(), 120))
    engine._thread.join(120)
    assert not engine.is_running
    asyncio.run(asyncio.wait_for(run(), 120))  # later requests are refused too, not left waiting
    engine.stop()
