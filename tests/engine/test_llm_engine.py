"""The engine's request handling on a tiny random model: logprobs, stops, aborts, errors, memory."""

from __future__ import annotations

import pytest
import torch

from kvmem import LLM, SamplingParams
from tests.oracle import hf_logits, make_tiny_model

PROMPT = [5, 17, 42, 99, 3, 250, 8]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("engine") / "llama", "llama3-gqa")


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), dtype="float32", kv_cache_memory="4MiB", block_size=4)


@pytest.fixture(scope="module")
def hf(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def assert_memory_returned(llm: LLM) -> None:
    stats = llm.stats()
    assert stats.num_sequences == 0 and stats.bytes_allocated == 0 and stats.bytes_live == 0, stats


def test_logprobs_equal_log_softmax_of_reference_logits(llm, hf):
    out = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=6, logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    expected = torch.log_softmax(hf_logits(hf, PROMPT + out.token_ids)[len(PROMPT) - 1:-1], dim=-1)
    assert len(out.logprobs) == 6
    for step, (token, top) in enumerate(zip(out.token_ids, out.logprobs)):
        assert len(top) == 3 and top[token].rank == 1  # greedy: the chosen token is the most likely
        best = torch.topk(expected[step], 3)
        assert list(top) == best.indices.tolist()
        for tid, lp in top.items():
            assert lp.logprob == pytest.approx(expected[step, tid].item(), abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(expected[i, t].item() for i, t in enumerate(out.token_ids)),
                                                   abs=1e-3)


def test_stop_string_truncates_text_and_names_the_stop(llm):
    full = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=24),
                        use_tqdm=False)[0].outputs[0]
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    assert len(stop) == 3
    out = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=24, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.index(stop)]
    kept = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=24, stop=[stop],
                                                                         include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]


def test_stop_token_id_ends_the_sample(llm):
    full = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=10),
                        use_tqdm=False)[0].outputs[0]
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    out = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=10,
                                                                        stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_max_tokens_none_runs_to_max_model_len(tiny_dir):
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory="1MiB", max_model_len=20)
    out = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=None,
                                                                        ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 20 - len(PROMPT)
    assert out.outputs[0].finish_reason == "length"


def test_abort_mid_generation_returns_memory(llm):
    engine = llm.engine
    ids = [engine.add_request({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0.8, n=2, max_tokens=50))
           for _ in range(3)]
    for _ in range(4):
        engine.step()
    assert llm.stats().num_sequences > 0
    for request_id in ids:
        out = engine.abort_request(request_id)
        assert out.finished and all(c.finish_reason == "abort" for c in out.outputs)
    assert not engine.has_unfinished_requests()
    assert_memory_returned(llm)


def test_chat_applies_the_template(llm):
    tok = llm.get_tokenizer()
    messages = [{"role": "user", "content": "Hello"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert out.prompt_token_ids == tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    assert out.prompt.endswith("<s>assistant:")


@pytest.mark.parametrize("kwargs,match", [
    ({"kv_cache": "bogus"}, "kv_cache"),
    ({"dtype": "int3"}, "dtype"),
    ({"kv_cache_memory": "lots"}, "kv_cache_memory"),
    ({"kv_cache_memory": 1.5}, "kv_cache_memory"),
    ({"block_size": 0}, "block_size"),
    ({"max_num_seqs": -1}, "max_num_seqs"),
    ({"kv_cache_memory": 100}, "kv_cache_memory"),
    ({"max_model_len": 100_000}, "max_model_len"),
])
def test_bad_engine_arguments_raise_value_error(tiny_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(tiny_dir), **kwargs)


def test_unknown_keyword_and_missing_model_are_clear(tmp_path):
    with pytest.raises(TypeError, match="kv_cach"):
        LLM(kv_cach="paged")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LLM(str(tmp_path / "no-such-model"))


def test_bad_prompts_raise_and_leave_nothing_behind(llm):
    params = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([{"prompt_token_ids": [5] * 10_000}], params, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""], params, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([{"prompt_token_ids": [1, 10**9]}], params, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [params], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([{"text": "hi"}], params, use_tqdm=False)
    with pytest.raises(ValueError, match="messages"):
        llm.chat([], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert_memory_returned(llm)


def test_release_free_memory_drops_cached_prefixes(llm):
    llm.generate([{"prompt_token_ids": PROMPT * 4}], SamplingParams(max_tokens=1), use_tqdm=False)
    assert llm.stats().bytes_cached > 0
    released = llm.release_free_memory()
    assert released > 0 and llm.stats().bytes_cached == 0


# --- prompt logprobs (vLLM's SamplingParams.prompt_logprobs) ---------------------------------------
LONG_PROMPT = [5, 17, 42, 99, 3, 250, 8, 61, 7, 123, 44, 9, 200, 31, 77, 2, 150, 18, 64, 90, 11]


def assert_prompt_logprobs_exact(prompt_logprobs, prompt: list[int], hf, k: int) -> None:
    expected = torch.log_softmax(hf_logits(hf, prompt), dim=-1)
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        entry, row, token = prompt_logprobs[pos], expected[pos - 1], prompt[pos]
        best = torch.topk(row, k)
        assert set(entry) == set(best.indices.tolist()) | {token}
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        for tid, lp in entry.items():
            assert lp.logprob == pytest.approx(row[tid].item(), abs=1e-4)
            assert lp.decoded_token is not None
        for rank, tid in enumerate(best.indices.tolist(), start=1):
            if tid != token:
                assert entry[tid].rank == rank


@pytest.mark.parametrize("budget", [None, 5])  # 5: the prompt computed in chunks of 5 tokens
def test_prompt_logprobs_equal_log_softmax_of_reference_logits(tiny_dir, hf, budget):
    extra = {"max_num_batched_tokens": budget} if budget else {}
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory="4MiB", block_size=4, **extra)
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=4)
    outs = llm.generate([{"prompt_token_ids": LONG_PROMPT}, {"prompt_token_ids": PROMPT}], params, use_tqdm=False)
    assert_prompt_logprobs_exact(outs[0].prompt_logprobs, LONG_PROMPT, hf, 4)
    assert_prompt_logprobs_exact(outs[1].prompt_logprobs, PROMPT, hf, 4)
    # The generated tokens are those of a request without prompt logprobs.
    plain = llm.generate([{"prompt_token_ids": LONG_PROMPT}], SamplingParams(temperature=0, max_tokens=3),
                         use_tqdm=False)[0]
    assert plain.prompt_logprobs is None and plain.outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert_memory_returned(llm)


def test_prompt_logprobs_take_no_prefix_cache_hit(llm, hf):
    first = llm.generate([{"prompt_token_ids": LONG_PROMPT}], SamplingParams(temperature=0, max_tokens=2),
                         use_tqdm=False)[0]
    again = llm.generate([{"prompt_token_ids": LONG_PROMPT}], SamplingParams(temperature=0, max_tokens=2),
                         use_tqdm=False)[0]
    assert again.num_cached_tokens > 0  # the prefix is cached ...
    out = llm.generate([{"prompt_token_ids": LONG_PROMPT}],
                       SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0, n=2), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0  # ... but not used by a request asking for prompt logprobs
    assert_prompt_logprobs_exact(out.prompt_logprobs, LONG_PROMPT, hf, 0)
    assert out.outputs[0].token_ids == first.outputs[0].token_ids
    # The cache still serves the others afterwards.
    assert llm.generate([{"prompt_token_ids": LONG_PROMPT}], SamplingParams(temperature=0, max_tokens=2),
                        use_tqdm=False)[0].num_cached_tokens > 0
    assert_memory_returned(llm)


def test_logit_bias_steers_greedy_and_is_checked_against_the_vocabulary(llm):
    plain = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=4),
                         use_tqdm=False)[0].outputs[0].token_ids
    forced = llm.generate([{"prompt_token_ids": PROMPT}],
                          SamplingParams(temperature=0, max_tokens=4, logit_bias={77: 100.0}),
                          use_tqdm=False)[0].outputs[0].token_ids
    assert forced == [77] * 4 != plain
    banned = llm.generate([{"prompt_token_ids": PROMPT}],
                          SamplingParams(temperature=0, max_tokens=4, logit_bias={plain[0]: -100.0}),
                          use_tqdm=False)[0].outputs[0].token_ids
    assert banned[0] != plain[0]
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(logit_bias={vocab: 1.0}), use_tqdm=False)
    assert_memory_returned(llm)


def test_prompt_logprobs_survive_preemption(tiny_dir, hf):
    # ~96 tokens of KV for four 21-token prompts that grow by 16: the newest are preempted and recomputed.
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory="48KiB", block_size=4, max_num_batched_tokens=8)
    prompts = [LONG_PROMPT[i:] + LONG_PROMPT[:i] for i in range(4)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=2),
                        use_tqdm=False)
    assert llm.engine.scheduler.counters.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert_prompt_logprobs_exact(out.prompt_logprobs, prompt, hf, 2)
    assert_memory_returned(llm)


def test_prompt_logprobs_take_no_cached_prefix_in_a_virtual_slot_either(tiny_dir, hf):
    # virtual finds prefixes in free slots' leftovers and in chunks shared with running sequences.
    with LLM(str(tiny_dir), dtype="float32", kv_cache="virtual", kv_cache_memory="4MiB") as llm:
        for _ in range(2):
            cached = llm.generate([{"prompt_token_ids": LONG_PROMPT}], SamplingParams(temperature=0, max_tokens=2),
                                  use_tqdm=False)[0].num_cached_tokens
        assert cached > 0
        out = llm.generate([{"prompt_token_ids": LONG_PROMPT}],
                           SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1), use_tqdm=False)[0]
        assert out.num_cached_tokens == 0
        assert_prompt_logprobs_exact(out.prompt_logprobs, LONG_PROMPT, hf, 1)
