"""`kvmem bench serve --dataset-name multi_turn`: conversations that resend their whole history each turn."""

from __future__ import annotations

import asyncio

import pytest

from kvmem.bench import serving_multi_turn
from kvmem.bench.serving_datasets import TextPrompt
from tests.bench.test_serving import bench, fake, fake_tokens  # noqa: F401  (fake: the fixture)
from tests.server.conftest import tiny_model_dir, tiny_server  # noqa: F401  (fixtures)

TURN_FLAGS = ("--dataset-name", "multi_turn", "--multi-turn-num-turns", "3", "--multi-turn-user-len", "12",
              "--multi-turn-output-len", "4", "--num-warmups", "0")


def by_conversation(bodies: list[dict], key) -> list[list]:
    """The requests grouped by conversation (each conversation's first user message), in send order."""
    groups: dict[str, list] = {}
    for b in bodies:
        groups.setdefault(key(b), []).append(b)
    return list(groups.values())


def test_chat_turns_resend_the_history_with_the_servers_answers(fake, tmp_path):  # noqa: F811
    fake.state.first_token_delay, fake.state.gap, fake.state.cached_tokens = 0.002, 0.0, 7
    rc, r = bench(fake, tmp_path, *TURN_FLAGS, "--endpoint", "/v1/chat/completions", "--num-prompts", "4",
                  "--max-concurrency", "2", "--seed", "3")
    assert rc == 0 and r["completed"] == 12 and r["failed"] == 0
    convs = by_conversation(fake.state.bodies, lambda b: b["messages"][0]["content"])
    assert len(convs) == 4 and all(len(c) == 3 for c in convs)
    answer = " t0 t1 t2 t3"  # what the fake answers to max_tokens 4
    for conv in convs:
        users = [b["messages"][-1]["content"] for b in conv]
        assert len(set(users)) == 3 and all(len(fake_tokens(fake.state, u)) == 12 for u in users)
        for turn, b in enumerate(conv):
            expected = []
            for u in users[:turn]:
                expected += [{"role": "user", "content": u}, {"role": "assistant", "content": answer}]
            assert b["messages"] == expected + [{"role": "user", "content": users[turn]}]
            assert b["max_tokens"] == 4
    # Per turn: 4 requests each, prompts growing by a user message and an answer (+ the fake's 5 template tokens).
    assert [t["turn"] for t in r["per_turn"]] == [1, 2, 3] and all(t["requests"] == 4 for t in r["per_turn"])
    assert [t["mean_prompt_tokens"] for t in r["per_turn"]] == [12 + 5, 12 + 4 + 12 + 5, 2 * (12 + 4) + 12 + 5]
    assert [t["cached_tokens"] for t in r["per_turn"]] == [28, 28, 28] and r["total_cached_tokens"] == 84
    assert r["settings"]["conversations"] == 4 and r["settings"]["num_turns"] == 3
    assert r["settings"]["prompts"].startswith("multi_turn: 4 conversations x 3 turns")
    # Seeded: the same user messages again.
    first = [c[0]["messages"][0]["content"] for c in convs]
    fake.state.bodies.clear()
    bench(fake, tmp_path, *TURN_FLAGS, "--endpoint", "/v1/chat/completions", "--num-prompts", "4", "--seed", "3")
    assert sorted(b["messages"][0]["content"] for b in fake.state.bodies if len(b["messages"]) == 1) == sorted(first)


def test_completion_turns_continue_the_text(fake, tmp_path):  # noqa: F811
    fake.state.first_token_delay, fake.state.gap = 0.002, 0.0
    rc, r = bench(fake, tmp_path, *TURN_FLAGS, "--num-prompts", "2")
    assert rc == 0 and r["completed"] == 6 and r["total_cached_tokens"] is None  # the fake reports none
    for conv in by_conversation(fake.state.bodies, lambda b: " ".join(b["prompt"].split()[:6])):
        prompts = [b["prompt"] for b in conv]
        assert prompts[1].startswith(prompts[0] + " t0 t1 t2 t3\n")
        assert prompts[2].startswith(prompts[1] + " t0 t1 t2 t3\n")


def test_max_concurrency_counts_conversations(fake, tmp_path):  # noqa: F811
    fake.state.first_token_delay, fake.state.gap = 0.02, 0.0
    rc, r = bench(fake, tmp_path, *TURN_FLAGS, "--num-prompts", "5", "--max-concurrency", "2")
    assert rc == 0 and r["completed"] == 15 and fake.state.peak <= 2


def test_a_failed_turn_ends_its_conversation():
    conv = serving_multi_turn.Conversation([TextPrompt(f"u{i}", 1) for i in range(4)])
    sent: list[int] = []

    async def send(turn: serving_multi_turn.Turn) -> tuple[bool, str]:
        sent.append(turn.index)
        return turn.index != 1, " a"

    asyncio.run(serving_multi_turn.run_conversation(0, conv, True, send))
    assert sent == [0, 1]  # turn 3 would have had no answer to turn 2 in its history


@pytest.mark.parametrize("flag", ["--multi-turn-num-turns", "--multi-turn-user-len", "--multi-turn-output-len"])
def test_bad_sizes_are_errors(fake, tmp_path, flag):  # noqa: F811
    with pytest.raises(ValueError, match=flag):
        bench(fake, tmp_path, *TURN_FLAGS, flag, "0")


def test_later_turns_hit_a_kvmem_servers_prefix_cache(tiny_server, tmp_path):  # noqa: F811
    tiny_server.url = tiny_server.base_url  # what bench() reads
    rc, r = bench(tiny_server, tmp_path, "--dataset-name", "multi_turn", "--endpoint", "/v1/chat/completions",
                  "--num-prompts", "3", "--multi-turn-num-turns", "3", "--multi-turn-user-len", "20",
                  "--multi-turn-output-len", "3", "--max-concurrency", "1", "--input-len", "8", "--output-len", "2")
    assert rc == 0 and r["completed"] == 9
    first, *later = r["per_turn"]
    assert first["cached_tokens"] == 0  # nothing to reuse: every conversation starts with its own words
    # Each later turn starts with the previous turn's prompt, whose full blocks the server has cached.
    assert all(t["cached_tokens"] >= 3 * 16 for t in later)
    assert r["total_cached_tokens"] == sum(t["cached_tokens"] for t in r["per_turn"])
