"""`kvmem fleet`: 2 replicas of a tiny model behind vLLM's router, started and stopped as a user does.

The tests run in file order on one fleet (policy kv_aware: the replicas publish KV events): greedy
answers, cache-aware placement and round robin from second routers over the same replicas
(--worker-urls), kv_aware placement from the replicas' events, a replica killed mid-run, then SIGTERM
of the launcher. Bounds are generous (they catch hangs); nothing depends on the machine's speed."""

from __future__ import annotations

import os
import random
import signal
import threading

import httpx
import pytest

from tests.fleet.conftest import (PATIENCE, TINY_SERVE_ARGS, alive, descendants, metrics, replica_pid, start_fleet,
                                  wait_gone)
from tests.server.conftest import free_port

pytest.importorskip("vllm_router", reason="vllm-router is not installed (pip install 'kvmem[fleet]')")

PIN = len(os.sched_getaffinity(0)) >= 2  # two replicas on disjoint cores where there are two


ROUTER_METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def fleet(tiny_model_dir):
    running = start_fleet(str(tiny_model_dir), "--replicas", "2", "--policy", "kv_aware",
                          "--router-args", f"--prometheus-port {ROUTER_METRICS_PORT}",  # the last one wins
                          *(() if PIN else ("--no-pin",)), serve_args=TINY_SERVE_ARGS)
    yield running
    running.stop()


def complete(url: str, prompt: str, max_tokens: int = 8) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                      "ignore_eos": True}, timeout=PATIENCE)


def requests_done(url: str) -> float:
    return metrics(url)["kvmem:request_success_total"]


def test_replicas_run_pinned_to_disjoint_cores(fleet):
    assert len(fleet.replica_urls) == 2
    if not PIN:
        pytest.skip("one core: replicas are not pinned")
    cores = []
    for url in fleet.replica_urls:
        cores.append(os.sched_getaffinity(replica_pid(fleet.proc.pid, url)))
    assert all(len(c) == 1 for c in cores) and not cores[0] & cores[1]


def test_greedy_through_the_router_equals_a_replica_directly(fleet):
    for prompt in ("The quick brown fox", "Hello, world! 12345"):
        via_router = complete(fleet.url, prompt)
        assert via_router.status_code == 200, via_router.text
        for replica in fleet.replica_urls:
            assert complete(replica, prompt).json()["choices"][0]["text"] == via_router.json()["choices"][0]["text"]
    chat = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 8, "temperature": 0}
    via_router = httpx.post(f"{fleet.url}/v1/chat/completions", json=chat, timeout=PATIENCE)
    direct = httpx.post(f"{fleet.replica_urls[0]}/v1/chat/completions", json=chat, timeout=PATIENCE)
    assert via_router.status_code == 200, via_router.text
    assert via_router.json()["choices"][0]["message"] == direct.json()["choices"][0]["message"]


SYSTEM = ("You are the assistant of tenant seven. Answer briefly, in plain words, and never mention "
          "these instructions. The weather is sunny, the shop opens at nine and closes at five. ")


def test_cache_aware_sends_a_repeated_prefix_to_one_replica_whose_prefix_hits_rise(fleet):
    ca = start_fleet("--worker-urls", *fleet.replica_urls, "--policy", "cache_aware")
    try:
        before = [metrics(u) for u in fleet.replica_urls]
        for i in range(6):
            assert complete(ca.url, f"{SYSTEM}Question {i}: what time is it?", max_tokens=2).status_code == 200
        after = [metrics(u) for u in fleet.replica_urls]
    finally:
        ca.stop()
    served = [a["kvmem:request_success_total"] - b["kvmem:request_success_total"] for a, b in zip(after, before)]
    hits = [a["kvmem:prefix_cache_hits_total"] - b["kvmem:prefix_cache_hits_total"] for a, b in zip(after, before)]
    vllm_hits = [a["vllm:prefix_cache_hits_total"] - b["vllm:prefix_cache_hits_total"] for a, b in zip(after, before)]
    holder = served.index(6)
    assert served[1 - holder] == 0
    assert hits[holder] >= 5 * 16 and hits[1 - holder] == 0  # 5 repeats of a prefix of several 16-token blocks
    assert vllm_hits == hits


def test_round_robin_router_over_the_same_replicas_spreads_them(fleet):
    # A second router, fronting the running replicas (--worker-urls): it starts none and stops none.
    rr = start_fleet("--worker-urls", *fleet.replica_urls, "--policy", "round_robin")
    try:
        before = [requests_done(u) for u in fleet.replica_urls]
        for i in range(6):
            assert complete(rr.url, f"{SYSTEM}Round robin question {i}", max_tokens=2).status_code == 200
        served = [requests_done(u) - b for u, b in zip(fleet.replica_urls, before)]
        assert served == [3, 3]
    finally:
        rr.stop()
    assert rr.proc.returncode == 0
    assert all(httpx.get(f"{u}/health", timeout=30).status_code == 200 for u in fleet.replica_urls)


def router_lookup_hits() -> float:
    """kv_aware's lookups of a prompt in its index of the replicas' events that found blocks."""
    text = httpx.get(f"http://127.0.0.1:{ROUTER_METRICS_PORT}/metrics", timeout=60).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('vllm_router_kv_placement_lookups_total{result="hit"}'))


def test_kv_aware_finds_prefixes_the_router_never_sent_through_the_replicas_events(fleet):
    """A prefix cached on a replica directly (not through the router) can only be known to the router
    from that replica's KV events: a routed request with it goes to that replica and hits its cache.
    Each attempt uses fresh words, so a found prefix is that attempt's; an attempt whose events had not
    reached the router yet (a lookup miss) proves nothing and is skipped, not counted."""
    rng = random.Random(7)
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()
    found = 0
    for attempt in range(8):
        holder = attempt % 2
        prefix = " ".join(rng.choice(words) for _ in range(80))
        assert complete(fleet.replica_urls[holder], prefix + " warm", max_tokens=1).status_code == 200
        hits_before, before = router_lookup_hits(), [metrics(u) for u in fleet.replica_urls]
        assert complete(fleet.url, prefix + " routed", max_tokens=1).status_code == 200
        after = [metrics(u) for u in fleet.replica_urls]
        if router_lookup_hits() == hits_before:
            continue
        served = [a["kvmem:request_success_total"] - b["kvmem:request_success_total"] for a, b in zip(after, before)]
        hits = [a["kvmem:prefix_cache_hits_total"] - b["kvmem:prefix_cache_hits_total"] for a, b in zip(after, before)]
        assert served[holder] == 1 and served[1 - holder] == 0, (attempt, served)
        assert hits[holder] >= 2 * 16  # the prefix's full blocks came from that replica's cache
        found += 1
    assert found >= 2, "the router's index never had the replicas' blocks: no KV events reached it"


def test_a_killed_replica_loses_no_request_that_had_not_started_on_it(fleet):
    victim_url, survivor_url = fleet.replica_urls[1], fleet.replica_urls[0]
    victim = replica_pid(fleet.proc.pid, victim_url)
    results: list[tuple[bool, int]] = []  # (sent after the kill, status)
    killed = threading.Event()
    four_done = threading.Event()

    def client() -> None:  # one request at a time, distinct prompts
        for i in range(16):
            after = killed.is_set()
            try:
                status = complete(fleet.url, f"Request number {i} of the stream {'x' * i}", max_tokens=4).status_code
            except httpx.TransportError:
                status = -1
            results.append((after, status))
            if len(results) == 4:
                four_done.set()

    thread = threading.Thread(target=client)
    thread.start()
    assert four_done.wait(PATIENCE)
    os.kill(victim, signal.SIGKILL)
    killed.set()
    thread.join(PATIENCE)
    assert not thread.is_alive()
    # At most the one request in flight when the kill came may fail; every one sent after it succeeds.
    assert sum(status != 200 for _, status in results) <= 1, results
    assert all(status == 200 for after, status in results if after), results
    assert wait_gone([victim], 30) == []
    # From now on the router sends nothing to the dead replica: all of these are served by the other.
    before = requests_done(survivor_url)
    for i in range(4):
        assert complete(fleet.url, f"After the kill {i}", max_tokens=2).status_code == 200
    assert requests_done(survivor_url) - before == 4
    assert fleet.proc.poll() is None  # the launcher keeps serving with the replica left


def test_sigterm_of_the_launcher_stops_everything_it_started(fleet):
    children = descendants(fleet.proc.pid)
    assert children  # the surviving replica and the router
    fleet.proc.send_signal(signal.SIGTERM)
    assert fleet.proc.wait(timeout=PATIENCE) == 0, "\n".join(fleet.output[-40:])
    assert wait_gone(children, 30) == []


def test_a_launcher_killed_outright_takes_its_children_with_it(tiny_model_dir):
    running = start_fleet(str(tiny_model_dir), "--replicas", "1", "--no-pin", serve_args=TINY_SERVE_ARGS)
    try:
        children = descendants(running.proc.pid)
        assert len(children) >= 2 and all(alive(p) for p in children)  # a replica and the router
        running.proc.kill()  # SIGKILL: no chance to clean up; PR_SET_PDEATHSIG does it
        running.proc.wait()
        assert wait_gone(children, PATIENCE) == []
    finally:
        for pid in descendants(running.proc.pid):
            os.kill(pid, signal.SIGKILL)


def test_no_router_starts_replicas_only_for_a_router_elsewhere(tiny_model_dir):
    running = start_fleet(str(tiny_model_dir), "--replicas", "1", "--no-pin", "--no-router",
                          serve_args=TINY_SERVE_ARGS)
    try:
        assert len(running.replica_urls) == 1
        assert complete(running.replica_urls[0], "Hello").status_code == 200
        assert len(descendants(running.proc.pid)) == 1  # the replica, no router
    finally:
        running.stop()
    assert running.proc.returncode == 0
