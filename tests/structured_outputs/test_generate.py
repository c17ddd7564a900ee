"""Structured outputs end to end through `LLM.generate`: the embedded SmolLM2 and a tiny random model."""

from __future__ import annotations

import json
import re
import threading

import pydantic
import pytest

from kvmem import LLM, SamplingParams, StructuredOutputsParams
from tests.oracle import make_tiny_model


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=24)
    age: int = pydantic.Field(ge=0, le=150)
    city: str = pydantic.Field(max_length=24)


@pytest.fixture(scope="module")
def smol():
    with LLM(dtype="float32", kv_cache_memory="64MiB", max_model_len=1024) as llm:
        yield llm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("structured") / "llama", "llama-mha")


def chat_prompt(llm: LLM, text: str) -> dict:
    rendered = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": text}])
    return {"prompt": rendered, "prompt_token_ids": llm.get_tokenizer().encode(rendered, add_special_tokens=False)}


def assert_memory_returned(llm: LLM) -> None:
    stats = llm.stats()
    assert stats.num_sequences == 0 and stats.bytes_allocated == 0 and stats.bytes_live == 0, stats


def test_embedded_model_json_schema_regex_choice_grammar(smol):
    prompt = chat_prompt(smol, "Describe a person as JSON with name, age and city.")
    cases = [
        (StructuredOutputsParams(json=Person.model_json_schema()), lambda t: Person.model_validate_json(t)),
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict) or 1 / 0),
        (StructuredOutputsParams(regex=r"(19|20)[0-9]{2}-[01][0-9]"), lambda t: re.fullmatch(r"(19|20)[0-9]{2}-[01][0-9]", t)
         or 1 / 0),
        (StructuredOutputsParams(choice=["Paris", "London", "Tokyo"]), lambda t: t in ("Paris", "London", "Tokyo") or 1 / 0),
        (StructuredOutputsParams(grammar='root ::= "The answer is " ("yes" | "no") "."'),
         lambda t: t in ("The answer is yes.", "The answer is no.") or 1 / 0),
    ]
    params = [SamplingParams(temperature=0, max_tokens=200, structured_outputs=so) for so, _ in cases]
    outs = smol.generate([prompt] * len(cases), params, use_tqdm=False)  # one batch, five grammars
    for (so, check), out in zip(cases, outs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (so.kind, completion)
        check(completion.text)
    assert_memory_returned(smol)


def test_unconstrained_rows_are_unchanged_by_constrained_neighbours(smol):
    prompts = [chat_prompt(smol, "Name three colours."), chat_prompt(smol, "What is 2 + 2?")]
    plain = SamplingParams(temperature=0, max_tokens=24)
    alone = smol.generate(prompts, plain, use_tqdm=False)
    constrained = SamplingParams(temperature=0, max_tokens=24, structured_outputs={"regex": "[A-Z][a-z]{2,8}"})
    mixed = smol.generate([prompts[0], prompts[0], prompts[1]], [plain, constrained, plain], use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert mixed[2].outputs[0].token_ids == alone[1].outputs[0].token_ids
    assert re.fullmatch("[A-Z][a-z]{2,8}", mixed[1].outputs[0].text)


def test_n_samples_each_follow_the_schema(smol):
    prompt = chat_prompt(smol, "Invent a person: name, age, city, as JSON.")
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=200,
                            structured_outputs=StructuredOutputsParams(json=Person.model_json_schema(),
                                                                       disable_any_whitespace=True))
    (out,) = smol.generate([prompt], params, use_tqdm=False)
    assert len(out.outputs) == 4
    for c in out.outputs:
        if c.finish_reason == "stop":  # sampling may run a string to max_length: still valid, just long
            Person.model_validate_json(c.text)
        assert "\n" not in c.text and "  " not in c.text.replace('"', "")  # one-line, single-spaced separators
    assert sum(c.finish_reason == "stop" for c in out.outputs) >= 3


def test_a_grammar_that_does_not_compile_is_refused_before_anything_runs(smol):
    with pytest.raises(ValueError, match=r"^structured_outputs\.regex: cannot compile"):
        smol.generate(["hi", "there"], [SamplingParams(max_tokens=2),
                                         SamplingParams(structured_outputs={"regex": "(ab"})], use_tqdm=False)
    assert not smol.engine.has_unfinished_requests()


def test_engine_request_whose_grammar_fails_ends_with_the_error(smol):
    engine = smol.engine
    engine.add_request("hi", SamplingParams(structured_outputs={"grammar": "root ::= ("}), request_id="bad")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    (out,) = outputs
    assert out.finished and out.metrics["error"].startswith("structured_outputs.grammar: cannot compile")
    assert_memory_returned(smol)


def test_tiny_model_schema_under_preemption_and_every_strategy(tiny_dir):
    # Random weights: only a bounded grammar is sure to end, so enums and booleans, no free whitespace.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "colour": {"enum": ["red", "green", "blue"]}},
              "required": ["ok", "colour"], "additionalProperties": False}
    regex = r"[a-z]{4,12}"
    so_json = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    so_regex = StructuredOutputsParams(regex=regex)
    prompts = [{"prompt_token_ids": [5 + i, 17, 42, 99, 3, 250, 8] * 3} for i in range(6)]
    params = [SamplingParams(temperature=t, seed=i, max_tokens=80, structured_outputs=so)
              for i, (t, so) in enumerate([(0, so_json), (1.0, so_json), (0, so_regex), (1.0, so_regex),
                                           (0.7, so_json), (0.7, so_regex)])]
    for kv_cache, memory in (("paged", "128KiB"), ("static", "4MiB"), ("virtual", "4MiB"), ("hybrid", "4MiB")):
        kwargs = dict(block_size=4, max_num_batched_tokens=8) if kv_cache == "paged" else {}
        with LLM(str(tiny_dir), dtype="float32", kv_cache=kv_cache, kv_cache_memory=memory, **kwargs) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
            if kv_cache == "paged":  # 128 tokens of KV (1 KiB each) for six growing sequences
                assert llm.engine.scheduler.counters.num_preemptions > 0
            for p, out in zip(params, outs):
                completion = out.outputs[0]
                assert completion.finish_reason == "stop", (kv_cache, completion)
                if p.structured_outputs is so_json:
                    value = json.loads(completion.text)
                    assert set(value) == {"ok", "colour"} and isinstance(value["ok"], bool), completion.text
                    assert value["colour"] in ("red", "green", "blue")
                else:
                    assert re.fullmatch(regex, completion.text), completion.text
            assert_memory_returned(llm)


def test_preempted_greedy_constrained_output_equals_unpreempted(tiny_dir):
    so = StructuredOutputsParams(regex=r"[a-z ]{10,30}\.")
    prompts = [{"prompt_token_ids": [5 + i, 17, 42, 99, 3, 250, 8] * 3} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=so)
    with LLM(str(tiny_dir), dtype="float32", kv_cache_memory="4MiB") as roomy:
        expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    with LLM(str(tiny_dir), dtype="float32", kv_cache_memory="96KiB", block_size=4,
             max_num_batched_tokens=8) as tight:
        got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
        assert tight.engine.scheduler.counters.num_preemptions > 0
    assert got == expected


def test_close_joins_the_compile_thread(tiny_dir):
    before = set(threading.enumerate())
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory="4MiB")
    llm.generate(["hi"], SamplingParams(max_tokens=4, structured_outputs={"choice": ["a", "b"]}), use_tqdm=False)
    mine = [t for t in threading.enumerate() if t not in before and t.name.startswith("kvmem-grammar")]
    assert mine
    llm.close()
    assert not any(t.is_alive() for t in mine)


def test_abort_while_the_grammar_compiles_leaves_nothing_behind(tiny_dir):
    with LLM(str(tiny_dir), dtype="float32", kv_cache_memory="4MiB") as llm:
        engine = llm.engine
        engine.add_request("hi", SamplingParams(max_tokens=4, structured_outputs={"regex": "[a-z]{2,5}x"}),
                           request_id="r")
        assert engine.load().num_waiting == 1  # waiting for its grammar, outside the scheduler
        out = engine.abort_request("r")
        assert out.finished and out.outputs[0].finish_reason == "abort"
        assert not engine.has_unfinished_requests() and engine.load().num_waiting == 0
        assert engine.step() == []
        assert_memory_returned(llm)
