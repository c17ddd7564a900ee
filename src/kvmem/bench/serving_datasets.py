"""Workloads for `kvmem bench serve` that work on any model: prompts sized by the served model's own
tokenizer, through the server's `/tokenize` endpoint, and ShareGPT conversation files.

`/tokenize` has vLLM's shape: POST {"model", "prompt": str} -> {"tokens": [...], "count": n,
"max_model_len": m}. A count includes the special tokens the server adds to a prompt (a BOS), so a
random prompt of `input_len` tokens is what the server's `usage.prompt_tokens` reports for it on
/v1/completions. Where the server has no `/tokenize`, lengths are estimated from words, and the
caller says so.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Short, common words: one token each (with their leading space) in the usual BPE vocabularies, so a
# prompt of n words is close to n tokens even when no tokenizer can be asked.
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much before line right"
).split()

# vLLM's ShareGPT filter (benchmarks' is_valid_sequence): too short to mean anything, or too long.
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048
TOKENS_PER_WORD_ESTIMATE = 1.3  # English text in a BPE vocabulary, used only without /tokenize
TOKENIZE_CONCURRENCY = 16


def root_url(base_url: str) -> str:
    """The server root: /tokenize sits beside /v1, not under it."""
    base = base_url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


def estimate_tokens(text: str) -> int:
    return max(1, round(len(text.split()) * TOKENS_PER_WORD_ESTIMATE))


class TokenCounter:
    """Token counts from the server's `/tokenize`; `available` is False (and `reason` says why) where
    the server has none, after which callers estimate from words."""

    def __init__(self, client, base_url: str, model: str) -> None:
        self.client, self.model = client, model
        self.url = root_url(base_url) + "/tokenize"
        self.available: bool | None = None  # None: not probed yet
        self.reason = ""
        self.max_model_len: int | None = None
        self._sem = asyncio.Semaphore(TOKENIZE_CONCURRENCY)

    async def probe(self) -> bool:
        """Whether the server tokenizes; any failure (no endpoint, no connection) means no."""
        if self.available is None:
            try:
                resp = await self.client.post(self.url, json={"model": self.model, "prompt": "the"})
                if resp.status_code == 200 and isinstance(resp.json().get("count", resp.json().get("tokens")),
                                                          (int, list)):
                    self.available = True
                    mml = resp.json().get("max_model_len")
                    self.max_model_len = mml if isinstance(mml, int) else None
                else:
                    self.available, self.reason = False, f"POST /tokenize: HTTP {resp.status_code}"
            except Exception as e:  # noqa: BLE001 - no tokenizer to ask, whatever the cause
                self.available, self.reason = False, f"POST /tokenize: {type(e).__name__}: {e}".strip()
        return self.available

    async def count(self, text: str) -> int | None:
        """The server's token count for `text` as a prompt; None if it refused this text (e.g. too long)."""
        async with self._sem:
            resp = await self.client.post(self.url, json={"model": self.model, "prompt": text})
        if resp.status_code != 200:
            return None
        body = resp.json()
        n = body.get("count")
        return int(n) if isinstance(n, int) else len(body.get("tokens") or [])


@dataclass
class TextPrompt:
    text: str
    tokens: int  # the server's count, or the word count where there is no /tokenize


async def fit_text_prompt(count: Callable[[str], Awaitable[int | None]], words: list[str], fill: list[str],
                          target: int) -> TextPrompt:
    """The longest prefix of `words` that tokenizes to at most `target` tokens, then topped up with one
    word from `fill` where the next word would overshoot (a word of several tokens). Counts of
    prefixes only grow with their length in word-level tokenizers, so a bisection finds the prefix.
    A prefix the server refuses to tokenize (too long for its caps) counts as over the target."""
    cache: dict[int, int] = {}

    async def f(k: int) -> int:
        if k not in cache:
            n = await count(" ".join(words[:k]))
            if n is None and k == 1:
                raise ValueError("/tokenize refused a one-word prompt")
            cache[k] = n if n is not None else target + 1_000_000
        return cache[k]

    lo, hi = 1, len(words)
    if await f(hi) <= target:
        return TextPrompt(" ".join(words), await f(hi))  # short of the target: the tokenizer packs words
    if await f(lo) > target:
        return TextPrompt(words[0], await f(lo))  # the special tokens alone reach the target
    while hi - lo > 1:  # f(lo) <= target < f(hi)
        mid = (lo + hi) // 2
        if await f(mid) <= target:
            lo = mid
        else:
            hi = mid
    text, n = " ".join(words[:lo]), await f(lo)
    for w in fill[:8]:
        if n == target:
            break
        m = await count(text + " " + w)
        if m is not None and m <= target:
            text, n = text + " " + w, m
    return TextPrompt(text, n)


async def random_text_prompts(counter: TokenCounter, num_prompts: int, input_len: int, seed: int) -> list[TextPrompt]:
    """`num_prompts` prompts of random common words, `input_len` tokens each by the server's tokenizer
    (or `input_len` words without /tokenize). Seeded: the same words for the same seed on every server."""
    rng = np.random.default_rng(seed)
    width = 2 * input_len + 8  # enough words for any tokenizer that gives a common word >= 0.5 tokens
    idx = rng.integers(0, len(WORDS), size=(num_prompts, width))
    fill = [WORDS[i] for i in rng.permutation(len(WORDS))]  # top-up words, most of them one token
    rows = [[WORDS[i] for i in row] for row in idx]
    if not await counter.probe():
        return [TextPrompt(" ".join(row[:input_len]), input_len) for row in rows]
    return list(await asyncio.gather(*(fit_text_prompt(counter.count, row, fill, input_len) for row in rows)))


async def prefix_repetition_prompts(counter: TokenCounter, num_prompts: int, num_prefixes: int, prefix_len: int,
                                    suffix_len: int, seed: int) -> list[TextPrompt]:
    """vLLM's `prefix_repetition` dataset: `num_prefixes` shared prefixes of `prefix_len` tokens (say
    the system prompts of as many tenants), each request one of them followed by its own suffix of
    `suffix_len` tokens (the user's turn); the same number of requests per prefix (the first ones
    one more where it does not divide), in a seeded shuffle. Lengths by the server's tokenizer as for
    random prompts (words without /tokenize); `tokens` is the whole prompt's count."""
    if num_prefixes < 1 or prefix_len < 1 or suffix_len < 1:
        raise ValueError("--prefix-repetition-num-prefixes, -prefix-len and -suffix-len must be >= 1")
    prefixes = await random_text_prompts(counter, num_prefixes, prefix_len, seed)
    suffixes = await random_text_prompts(counter, num_prompts, suffix_len, seed + 1)
    owners = [i % num_prefixes for i in range(num_prompts)]
    np.random.default_rng(seed).shuffle(owners)
    texts = [prefixes[o].text + " " + s.text for o, s in zip(owners, suffixes)]
    if not counter.available:
        return [TextPrompt(t, prefixes[o].tokens + s.tokens) for t, o, s in zip(texts, owners, suffixes)]
    counts = await asyncio.gather(*(counter.count(t) for t in texts))
    return [TextPrompt(t, n if n is not None else prefixes[o].tokens + s.tokens)
            for t, n, o, s in zip(texts, counts, owners, suffixes)]


# --- ShareGPT --------------------------------------------------------------------------------------------


def read_sharegpt(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from a ShareGPT file (ShareGPT_V3_unfiltered_cleaned_split.json: a
    list of {"id", "conversations": [{"from": "human" | "gpt", "value": str}, ...]}): the first human
    turn and the gpt turn that answers it; conversations without one are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of {{\"id\", \"conversations\"}}")
    pairs: list[tuple[str, str]] = []
    for item in data:
        conv = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(conv, list):
            continue
        for i, turn in enumerate(conv[:-1]):
            nxt = conv[i + 1]
            if (isinstance(turn, dict) and isinstance(nxt, dict) and turn.get("from") == "human"
                    and nxt.get("from") == "gpt" and isinstance(turn.get("value"), str)
                    and isinstance(nxt.get("value"), str)):
                pairs.append((turn["value"], nxt["value"]))
                break
    if not pairs:
        raise ValueError(f"{path}: no conversation with a human turn answered by a gpt turn")
    return pairs


def keep_sharegpt(prompt_len: int, output_len: int, fixed_output_len: bool) -> bool:
    """vLLM's filter: prompt (and, unless the output length is fixed, output) >= 4 tokens, prompt
    <= 1024 and prompt + output <= 2048."""
    if prompt_len < SHAREGPT_MIN_LEN or (not fixed_output_len and output_len < SHAREGPT_MIN_LEN):
        return False
    return prompt_len <= SHAREGPT_MAX_PROMPT_LEN and prompt_len + output_len <= SHAREGPT_MAX_TOTAL_LEN


async def sharegpt_prompts(path: str | Path, num_prompts: int, seed: int, counter: TokenCounter | None,
                           output_len: int | None = None) -> list[tuple[str, int, int]]:
    """(prompt, prompt tokens, output tokens) for `num_prompts` conversations, in a seeded shuffle
    (random.Random(seed), the order vLLM's benchmark draws in), after vLLM's length filter. The output
    length is the gpt answer's token count unless `output_len` fixes it. Token counts come from
    /tokenize, else from words (estimated)."""
    pairs = read_sharegpt(path)
    random.Random(seed).shuffle(pairs)
    use_server = counter is not None and await counter.probe()

    async def lengths(prompt: str, completion: str) -> tuple[int | None, int | None]:
        if not use_server:
            return estimate_tokens(prompt), output_len or estimate_tokens(completion)
        p = await counter.count(prompt)
        c = output_len or (await counter.count(completion) if p is not None else None)
        return p, c

    out: list[tuple[str, int, int]] = []
    batch = max(TOKENIZE_CONCURRENCY, 2 * num_prompts) if use_server else len(pairs)
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        counts = await asyncio.gather(*(lengths(p, c) for p, c in chunk))
        for (prompt, _), (p, c) in zip(chunk, counts, strict=True):
            # None: the server would not tokenize it (too long for its caps), so it could not serve it either.
            if p is not None and c is not None and keep_sharegpt(p, c, output_len is not None):
                out.append((prompt, p, c))
                if len(out) == num_prompts:
                    return out
    if not out:
        raise ValueError(f"{path}: no conversation passes the length filter (prompt {SHAREGPT_MIN_LEN}.."
                         f"{SHAREGPT_MAX_PROMPT_LEN} tokens, prompt + output <= {SHAREGPT_MAX_TOTAL_LEN})")
    print(f"kvmem bench serve: {path} has {len(out)} usable conversations, fewer than --num-prompts "
          f"{num_prompts}; using {len(out)}", file=sys.stderr)
    return out
