"""`kvmem chat`: streams answers, keeps the conversation, leaves cleanly on Ctrl-D."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from kvmem import LLM, SamplingParams
from kvmem.chat_repl import PROMPT, run_chat
from kvmem.config import EngineConfig
from kvmem.engine.llm_engine import LLMEngine
from tests.oracle import make_tiny_model

ENGINE = dict(dtype="float32", kv_cache_memory="4MiB")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("chat") / "llama", "llama-mha")


def test_answers_equal_llm_chat_and_the_conversation_is_kept(tiny_dir):
    params = SamplingParams(temperature=0, max_tokens=8)
    lines = iter(["Hello there", "/reset", "Hello there", "And again?"])

    def read(prompt: str) -> str:
        assert prompt == PROMPT
        return next(lines)  # StopIteration would be a bug: EOFError ends the chat below

    def read_or_eof(prompt: str) -> str:
        try:
            return read(prompt)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    engine = LLMEngine(EngineConfig(model=str(tiny_dir), **ENGINE))
    assert run_chat(engine, params, read=read_or_eof, out=out) == 0
    llm = LLM(str(tiny_dir), **ENGINE)
    first = llm.chat([{"role": "user", "content": "Hello there"}], params, use_tqdm=False)[0].outputs[0].text
    second = llm.chat([{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
                       {"role": "user", "content": "And again?"}], params, use_tqdm=False)[0].outputs[0].text
    text = out.getvalue()
    assert text.count(first) >= 2 and "(conversation cleared)" in text
    assert second in text.split("(conversation cleared)")[1].split(first, 1)[1]
    assert engine.stats().bytes_allocated == 0


def test_cli_chat_exits_0_on_end_of_input(tiny_dir):
    proc = subprocess.run([sys.executable, "-m", "kvmem.cli", "chat", "--model", str(tiny_dir), "--max-tokens", "5",
                           "--dtype", "float32", "--kv-cache-memory", "4MiB"], input="Hi\n\n/exit\n",
                          capture_output=True, text=True, timeout=900)  # bounds a hang, not the speed
    assert proc.returncode == 0, proc.stderr
    assert "kvmem chat with" in proc.stdout and proc.stdout.count("[max tokens reached]") == 1
