"""What the servers behind a benchmark say about it: counters read from their Prometheus `/metrics`
before and after the timed run (`kvmem bench serve --metrics-url URL ...`), so a fleet's prefix hit
rate comes from the replicas themselves, not from the client's guess.

The counters are vLLM's names, which kvmem exports too: `vllm:prefix_cache_queries` and
`vllm:prefix_cache_hits` (prompt tokens looked up / found), `vllm:request_success` (requests ended,
summed over finish reasons), `vllm:prompt_tokens` (prompt tokens computed)."""

from __future__ import annotations

import asyncio
import re

COUNTERS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:request_success")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_counters(text: str) -> dict[str, float]:
    """The COUNTERS' values in a Prometheus exposition (`_total` samples, summed over labels)."""
    wanted = {f"{name}_total": name for name in COUNTERS}
    values = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) in wanted:
            values[wanted[m.group(1)]] += float(m.group(3))
    return values


async def scrape(client, urls: list[str]) -> dict[str, dict[str, float]]:
    async def one(url: str) -> dict[str, float]:
        response = await client.get(url.rstrip("/") + "/metrics")
        response.raise_for_status()
        return parse_counters(response.text)

    return dict(zip(urls, await asyncio.gather(*(one(u) for u in urls))))


def report(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict:
    """Per server the counters' growth during the run, and over all of them the prefix hit rate
    (hits / queries, in prompt tokens; None when nothing was looked up)."""
    servers = {url: {name: after[url][name] - before[url][name] for name in COUNTERS} for url in after}
    queries = sum(s["vllm:prefix_cache_queries"] for s in servers.values())
    hits = sum(s["vllm:prefix_cache_hits"] for s in servers.values())
    return {"prefix_cache_hit_rate": hits / queries if queries else None, "prefix_cache_queries": queries,
            "prefix_cache_hits": hits, "requests_per_server": [s["vllm:request_success"] for s in servers.values()],
            "servers": servers}
