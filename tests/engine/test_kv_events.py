"""vLLM-format KV events over ZMQ: a subscriber rebuilds, from the events alone, the exact set of
block hashes the engine's prefix cache holds after a workload that evicts."""

from __future__ import annotations

import random
import socket
import time

import msgspec
import pytest
import zmq

from kvmem import LLM, SamplingParams
from kvmem.engine.kv_events import (
    AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, KVEventsConfig, external_block_hash,
)
from tests.oracle import make_tiny_model

WAIT_S = 120  # generous: the wait is for a state, never for speed


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("kv_events") / "llama", "llama-mha")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Subscriber:
    """A router's view: live batches from SUB, gaps (the slow joiner's first ones) filled by replay."""

    def __init__(self, ctx: zmq.Context, endpoint: str, replay_endpoint: str) -> None:
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(endpoint)
        self.replay_endpoint = replay_endpoint
        self.ctx = ctx
        self.batches: dict[int, bytes] = {}
        self.decoder = msgspec.msgpack.Decoder(KVEventBatch)

    def poll(self, timeout_ms: int) -> None:
        while self.sub.poll(timeout_ms):
            topic, seq, payload = self.sub.recv_multipart()
            assert topic == b"" and len(seq) == 8
            self.batches[int.from_bytes(seq, "big")] = payload
            timeout_ms = 0

    def fill_gaps(self) -> None:
        """Ask the replay socket for everything from the first missing batch on (a DEALER, as a
        REQ takes one reply per request and replay answers with many)."""
        missing = [s for s in range(max(self.batches, default=-1)) if s not in self.batches]
        if self.batches and not missing:
            return
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.connect(self.replay_endpoint)
        try:
            dealer.send_multipart((b"", (missing[0] if missing else 0).to_bytes(8, "big")))
            while True:
                assert dealer.poll(WAIT_S * 1000), "no replay answer"
                empty, seq, payload = dealer.recv_multipart()
                seq = int.from_bytes(seq, "big", signed=True)
                if seq == -1:
                    assert empty == payload == b""
                    break
                self.batches.setdefault(seq, payload)
        finally:
            dealer.close(linger=0)

    def cached(self) -> tuple[set[int], int]:
        """The hashes the events say are cached, and how many blocks were removed on the way."""
        cached: set[int] = set()
        removed = 0
        for seq in range(max(self.batches, default=-1) + 1):
            batch = self.decoder.decode(self.batches[seq])
            for e in batch.events:
                if isinstance(e, BlockStored):
                    assert e.medium == "CPU" and len(e.token_ids) == e.block_size * len(e.block_hashes)
                    cached.update(e.block_hashes)
                elif isinstance(e, BlockRemoved):
                    cached.difference_update(e.block_hashes)
                    removed += len(e.block_hashes)
                elif isinstance(e, AllBlocksCleared):
                    cached.clear()
        return cached, removed


def manager_hashes(llm: LLM) -> set[int]:
    manager = llm.engine.manager
    if manager.name == "virtual":  # the chunks its slots hold, from the slots themselves
        from tests.memory.test_events import virtual_held_prefixes

        return {external_block_hash(h) for h in virtual_held_prefixes(manager)}
    pool = manager.device_tier.pool if manager.name == "hybrid" else manager.pool  # hybrid: its device tier
    return {external_block_hash(h) for h in pool.cached_blocks}


def wait_for(sub: Subscriber, expected: set[int]) -> int:
    deadline = time.monotonic() + WAIT_S
    while True:
        sub.poll(200)
        if sub.batches and all(s in sub.batches for s in range(max(sub.batches) + 1)):
            cached, removed = sub.cached()
            if cached == expected:
                return removed
        else:
            sub.fill_gaps()  # the first batches went out before the subscription took (slow joiner)
        assert time.monotonic() < deadline, f"events never rebuilt the cache: {len(expected)} hashes expected"


# 16 blocks of 4 tokens (1 KiB per token in float32): the prefix cache must evict. Hybrid's device
# budget also holds its two staging buffers (one layer's K,V and activations for max_model_len tokens).
BLOCKS_16 = 16 * 4 * 1024


# virtual: a chunk (its block) is one 4 KiB page per (layer, K/V, head): 64 tokens here; 4 slots of
# 256 tokens and a budget of 10 chunks, so that leftovers are trimmed.
@pytest.mark.parametrize("strategy, scale", [
    ({"kv_cache": "paged", "kv_cache_memory": BLOCKS_16}, 1),
    ({"kv_cache": "hybrid", "kv_cache_memory": BLOCKS_16 + 2 * 48 * 768, "max_model_len": 48, "act_ratio": 0.0,
      "host_memory": "256KiB"}, 1),
    ({"kv_cache": "virtual", "kv_cache_memory": 10 * 64 * 1024, "max_model_len": 256}, 16),
], ids=["paged", "hybrid", "virtual"])
def test_subscriber_rebuilds_the_prefix_cache(tiny_dir, strategy, scale):
    port, replay_port = free_port(), free_port()
    config = {"enable_kv_cache_events": True, "endpoint": f"tcp://127.0.0.1:{port}",
              "replay_endpoint": f"tcp://127.0.0.1:{replay_port}", "buffer_steps": 100_000}
    ctx = zmq.Context()
    llm = LLM(str(tiny_dir), dtype="float32", block_size=4, max_num_seqs=3,
              kv_events_config=config, **strategy)
    try:
        sub = Subscriber(ctx, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay_port}")
        rng = random.Random(0)
        prefixes = [[rng.randrange(2, 320) for _ in range(n * scale)] for n in (8, 12, 5, 0)]
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        for _ in range(6):
            prompts = [{"prompt_token_ids": rng.choice(prefixes) + [rng.randrange(2, 320)
                                                                   for _ in range(rng.randrange(1, 14) * max(scale // 4, 1))]}
                       for _ in range(5)]
            llm.generate(prompts, params, use_tqdm=False)
        expected = manager_hashes(llm)
        assert expected, "the workload left nothing cached"
        removed = wait_for(sub, expected)
        assert removed > 0, "the workload evicted nothing: shrink the budget"

        # The wire format is vLLM 0.32's: the batch an array, each event a map tagged by class name
        # (vLLM's router refuses the older tagged arrays), fields at their defaults left out.
        raw = msgspec.msgpack.decode(sub.batches[0])
        assert isinstance(raw[0], float) and raw[1][0]["type"] in ("BlockStored", "BlockRemoved", "AllBlocksCleared")
        stored = next(e for b in sub.batches.values() for e in msgspec.msgpack.decode(b)[1]
                      if e["type"] == "BlockStored")
        assert set(stored) == {"type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                               "medium", "lora_name"}

        llm.engine.release_free_memory()  # nothing is held: the cache empties, and says so
        assert manager_hashes(llm) == set()
        wait_for(sub, set())
        last = msgspec.msgpack.decode(sub.batches[max(sub.batches)], type=KVEventBatch)
        assert last.events == [AllBlocksCleared()]
        publisher = llm.engine.kv_events.publisher
        assert publisher.dropped == 0
    finally:
        llm.close()
        sub.sub.close(linger=0)
        ctx.term()
    assert not publisher._thread.is_alive()


def test_config_parsing_and_errors():
    assert KVEventsConfig.parse(None) is None
    c = KVEventsConfig.parse('{"enable_kv_cache_events": true}')
    assert c.enabled and c.publisher == "zmq" and c.endpoint == "tcp://*:5557"
    assert not KVEventsConfig.parse({"enable_kv_cache_events": True, "publisher": "null"}).enabled
    assert not KVEventsConfig.parse({}).enabled
    for bad, word in [("{", "JSON"), ({"nope": 1}, "nope"), ({"publisher": "kafka"}, "publisher"),
                      ({"buffer_steps": 0}, "buffer_steps")]:
        with pytest.raises(ValueError, match=word):
            KVEventsConfig.parse(bad)
    from kvmem.config import EngineConfig

    with pytest.raises(ValueError, match="kv_events_config"):
        EngineConfig(kv_events_config="not json")


def test_events_off_costs_no_sink(tiny_dir):
    with LLM(str(tiny_dir), dtype="float32", kv_cache_memory=16 * 4 * 1024, block_size=4) as llm:
        assert llm.engine.kv_events is None and llm.engine.manager.events is None


def test_a_full_queue_drops_and_counts_never_blocks():
    import threading

    from kvmem.engine.kv_events import ZmqEventPublisher

    port = free_port()
    publisher = ZmqEventPublisher(KVEventsConfig.parse({"enable_kv_cache_events": True, "max_queue_size": 1,
                                                        "endpoint": f"tcp://127.0.0.1:{port}"}))
    release, encoding = threading.Event(), threading.Event()
    encode = publisher._encoder.encode

    def slow_encode(batch):  # the thread holds the first batch until released
        encoding.set()
        assert release.wait(WAIT_S)
        return encode(batch)

    publisher._encoder = type("Slow", (), {"encode": staticmethod(slow_encode)})()
    try:
        batch = KVEventBatch(ts=0.0, events=[AllBlocksCleared()])
        publisher.publish(batch)
        assert encoding.wait(WAIT_S)  # taken off the queue by the thread
        publisher.publish(batch)  # fills the queue (size 1)
        publisher.publish(batch)  # dropped, at once
        assert publisher.dropped == 1
    finally:
        release.set()
        publisher.close()
    assert not publisher._thread.is_alive() and publisher._seq == 2


def test_an_endpoint_in_use_is_a_clear_error():
    from kvmem.engine.kv_events import ZmqEventPublisher

    config = KVEventsConfig.parse({"enable_kv_cache_events": True, "endpoint": f"tcp://127.0.0.1:{free_port()}"})
    first = ZmqEventPublisher(config)
    try:
        with pytest.raises(ValueError, match="cannot bind"):
            ZmqEventPublisher(config)
    finally:
        first.close()
