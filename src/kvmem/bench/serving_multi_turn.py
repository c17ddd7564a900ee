"""`kvmem bench serve --dataset-name multi_turn`: chat conversations whose every turn resends the whole
history, the workload where a prefix cache that outlives the KV budget pays (and where one that does
not, recomputes the history on every turn).

Each of `--num-prompts` conversations has `--multi-turn-num-turns` user messages of
`--multi-turn-user-len` tokens (random common words sized by the server's `/tokenize`, as the random
workload's prompts). Turn k sends user 1, the server's own answer 1, ..., user k: on
/v1/chat/completions as a message list, on /v1/completions as the same text concatenated. A
conversation's turns run one after another (the next is sent when the answer is in); conversations
start together, or by `--request-rate` (Poisson starts), and `--max-concurrency` caps the conversations
in flight (a client holds its slot for its whole conversation, as SGLang's multi-turn benchmark does).

What it adds to the usual table: time to first token per turn (the first turn has no history to reuse,
the later ones have more and more) and the prompt tokens the servers report as cached
(`usage.prompt_tokens_details.cached_tokens`), i.e. the prefill the cache saved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from kvmem.bench.serving_datasets import TokenCounter, TextPrompt, random_text_prompts


@dataclass
class Conversation:
    user_turns: list[TextPrompt]  # the user's messages, in order; the answers come from the server


@dataclass
class Turn:
    """One request of a conversation: the history so far (as `prompt`) and which turn it is."""
    conversation: int
    index: int  # 0 for the first turn
    prompt: str | list[dict]  # text for /v1/completions, messages for /v1/chat/completions
    prompt_len: int  # the user tokens sent so far; only used if the server reports no usage


def check_sizes(num_conversations: int, num_turns: int, user_len: int, output_len: int) -> None:
    if num_conversations < 1:
        raise ValueError("--num-prompts (conversations, with --dataset-name multi_turn) must be >= 1")
    if num_turns < 1 or user_len < 1 or output_len < 1:
        raise ValueError("--multi-turn-num-turns, --multi-turn-user-len and --multi-turn-output-len must be >= 1")


async def conversations(counter: TokenCounter, num_conversations: int, num_turns: int, user_len: int,
                        seed: int) -> list[Conversation]:
    """Seeded: the same user messages on every server for the same seed."""
    messages = await random_text_prompts(counter, num_conversations * num_turns, user_len, seed)
    return [Conversation(messages[i * num_turns:(i + 1) * num_turns]) for i in range(num_conversations)]


def history_prompt(conv: Conversation, answers: list[str], turn: int, chat: bool) -> str | list[dict]:
    """The request for turn `turn`: every earlier user message and answer, then this turn's message."""
    if chat:
        messages: list[dict] = []
        for user, answer in zip(conv.user_turns[:turn], answers, strict=True):
            messages += [{"role": "user", "content": user.text}, {"role": "assistant", "content": answer}]
        return messages + [{"role": "user", "content": conv.user_turns[turn].text}]
    # A completion continues the text it was given, so the answer is appended verbatim; the next user
    # message starts after a line break so that it never glues onto the answer's last word.
    text = ""
    for user, answer in zip(conv.user_turns[:turn], answers, strict=True):
        text += user.text + answer + "\n"
    return text + conv.user_turns[turn].text


async def run_conversation(index: int, conv: Conversation, chat: bool,
                           send: Callable[[Turn], Awaitable[tuple[bool, str]]]) -> None:
    """Turn after turn; `send` returns (succeeded, the answer's text). A failed turn ends the
    conversation: its history would be missing an answer."""
    answers: list[str] = []
    for turn in range(len(conv.user_turns)):
        prompt_len = sum(u.tokens for u in conv.user_turns[:turn + 1])
        ok, answer = await send(Turn(index, turn, history_prompt(conv, answers, turn, chat), prompt_len))
        if not ok:
            return
        answers.append(answer)


def per_turn_summary(turns: list[int], ttft_s: list[float], prompt_tokens: list[int],
                     cached_tokens: list[int | None]) -> list[dict]:
    """Per turn index over the successful requests: how many, TTFT median and p99 (ms), mean prompt
    tokens, and the cached prompt tokens the server reported (None where it reported none)."""
    rows = []
    for t in sorted(set(turns)):
        pick = [i for i, x in enumerate(turns) if x == t]
        ttft = np.asarray([ttft_s[i] for i in pick]) * 1000.0
        cached = [cached_tokens[i] for i in pick]
        rows.append({"turn": t + 1, "requests": len(pick), "median_ttft_ms": float(np.median(ttft)),
                     "p99_ttft_ms": float(np.percentile(ttft, 99)),
                     "mean_prompt_tokens": float(np.mean([prompt_tokens[i] for i in pick])),
                     "cached_tokens": None if any(c is None for c in cached) else int(sum(cached))})
    return rows
