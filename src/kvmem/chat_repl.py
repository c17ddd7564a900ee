"""`kvmem chat`: an interactive terminal chat that streams the answer as it is generated.

The conversation is kept and re-sent whole each turn (with prefix caching on, the earlier turns'
KV is found in the cache, so only the new turn is computed). Ctrl-C while the model answers stops
that answer and keeps what was said; Ctrl-C or Ctrl-D at the prompt leaves. `/reset` forgets the
conversation, `/exit` leaves.

Ctrl-C is caught as a flag checked between engine steps rather than as a KeyboardInterrupt thrown
into the middle of one, so the engine's state stays consistent and the request is aborted cleanly.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any, TextIO

from kvmem.engine.llm_engine import LLMEngine
from kvmem.sampling_params import SamplingParams

PROMPT = ">>> "


class _InterruptFlag:
    """While active, SIGINT sets `raised` instead of raising KeyboardInterrupt."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> _InterruptFlag:
        self.raised = False
        try:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread (e.g. a test): no signal handling
            self._previous = None
        return self

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def stream_answer(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams, write: Callable[[str], Any],
                  interrupted: Callable[[], bool] = lambda: False) -> tuple[str, str]:
    """Generate one answer, writing text as it comes; returns (text, finish_reason)."""
    request_id = engine.add_request({"prompt_token_ids": prompt_ids}, params)
    text, reason = "", "abort"
    while True:
        if interrupted():
            engine.abort_request(request_id)
            return text, "abort"
        for out in engine.step():
            if out.request_id != request_id:
                continue
            completion = out.outputs[0]
            if completion.text_delta:
                write(completion.text_delta)
                text += completion.text_delta
            if out.finished:
                if "error" in out.metrics:
                    raise ValueError(out.metrics["error"])
                return completion.text, completion.finish_reason or reason
        if not engine.has_unfinished_requests():
            return text, reason


def run_chat(engine: LLMEngine, params: SamplingParams, system: str | None = None,
             read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    tokenizer = engine.tokenizer
    if not tokenizer.chat_template:
        print("kvmem chat: this model has no chat template; use `kvmem generate --raw`", file=sys.stderr)
        return 2
    start = [{"role": "system", "content": system}] if system else []
    conversation = list(start)

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    write(f"kvmem chat with {engine.model_config.name} (kv_cache={engine.kv_cache_strategy}). "
          "Ctrl-C stops an answer; Ctrl-D, Ctrl-C or /exit leaves; /reset forgets.\n")
    while True:
        try:
            line = read(PROMPT)
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            return 0
        if message == "/reset":
            conversation = list(start)
            write("(conversation cleared)\n")
            continue
        conversation.append({"role": "user", "content": line})
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        try:
            engine.check_prompt(prompt_ids)
        except ValueError as e:
            conversation.pop()
            write(f"(the conversation no longer fits: {e}; /reset to start over)\n")
            continue
        with _InterruptFlag() as flag:
            answer, reason = stream_answer(engine, prompt_ids, params, write, lambda: flag.raised)
        if reason == "abort":
            write(" [stopped]")
        elif reason == "length":
            write(" [max tokens reached]")
        write("\n")
        conversation.append({"role": "assistant", "content": answer})
