"""The request details a vLLM user's clients send (issue 14): `null` meaning the default, /tokenize
and /detokenize, prompt_logprobs, logit_bias, usage.prompt_tokens_details.cached_tokens, and the
policy for fields kvmem does not implement (a 400 naming them, never silently ignored). Driven
through the real `openai` client where it can send the field (extra_body for vLLM's extras) and
httpx for raw bodies."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from kvmem.config import EngineConfig
from kvmem.sampling_params import MAX_LOGIT_BIAS_ENTRIES
from tests.server.conftest import TINY_ENGINE, start_server

PATIENCE = 120.0
# Long enough to fill a few 16-token blocks of the prefix cache.
LONG_PROMPT = "Paged attention keeps the cache in blocks; the quick brown fox jumps over the lazy dog " * 3


@pytest.fixture
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="none", max_retries=0, timeout=PATIENCE)


def post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=PATIENCE, **kw)


def assert_400_naming(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    # The field, or a part of it (logit_bias.5, messages[0].role).
    assert error["param"] == param or error["param"].startswith((f"{param}.", f"{param}[")), error
    assert param.split(".")[0].split("[")[0] in error["message"], error
    assert error["type"] == "invalid_request_error"


# --- null means the default -------------------------------------------------------------------------
COMMON_NULLS = ["n", "stream", "stop", "temperature", "top_p", "max_tokens", "user", "seed", "stream_options",
                "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "min_p", "repetition_penalty",
                "ignore_eos", "min_tokens", "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens",
                "prompt_logprobs", "response_format", "metadata", "store", "service_tier", "guided_json",
                "structured_outputs", "suffix", "tools", "model"]


@pytest.mark.parametrize("field", COMMON_NULLS + ["logprobs", "echo", "best_of", "add_special_tokens"])
def test_null_is_the_default_on_completions(tiny_server, field):
    body = {"model": tiny_server.model, "prompt": "Hello", "max_tokens": 3, "temperature": 0, field: None}
    r = post(tiny_server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["text"] is not None and choice["logprobs"] is None


@pytest.mark.parametrize("field", COMMON_NULLS + ["logprobs", "top_logprobs", "max_completion_tokens", "tool_choice",
                                                  "add_generation_prompt", "chat_template_kwargs", "echo",
                                                  "parallel_tool_calls"])
def test_null_is_the_default_on_chat(tiny_server, field):
    body = {"model": tiny_server.model, "messages": [{"role": "user", "content": "Hi", "name": None}],
            "max_tokens": 3, "temperature": 0, field: None}
    r = post(tiny_server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


def test_all_nulls_at_once_equal_the_defaults(tiny_server):
    plain = post(tiny_server, "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0}).json()
    nulls = {f: None for f in COMMON_NULLS + ["logprobs", "echo", "best_of"] if f not in ("max_tokens", "temperature")}
    r = post(tiny_server, "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0, **nulls})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == plain["choices"][0]["text"]


# --- unknown and unsupported fields ------------------------------------------------------------------
@pytest.mark.parametrize("path, field, value", [
    ("/v1/completions", "guided_whitespace_pattern", r"\s*"),
    ("/v1/completions", "guided_decoding_backend", "outlines"),
    ("/v1/completions", "suffix", "and the end"),
    ("/v1/completions", "use_beam_search", True),
    ("/v1/completions", "allowed_token_ids", [1, 2]),
    ("/v1/completions", "truncate_prompt_tokens", 8),
    ("/v1/completions", "a_field_nobody_defined", 1),
    ("/v1/completions", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("/v1/chat/completions", "tool_choice", "auto"),
    ("/v1/chat/completions", "response_format", {"type": "json_schema", "json_schema": {"name": "x"}}),
    ("/v1/chat/completions", "response_format", {"type": "xml"}),
    ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/chat/completions", "continue_final_message", True),
    ("/v1/chat/completions", "echo", True),
    ("/v1/chat/completions", "a_field_nobody_defined", "x"),
])
def test_a_field_kvmem_does_not_implement_is_a_400_naming_it(tiny_server, path, field, value):
    body = {"max_tokens": 2, field: value}
    body.update({"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]})
    assert_400_naming(post(tiny_server, path, body), field)


@pytest.mark.parametrize("extra", [
    {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto"},
    {"guided_json": None, "structured_outputs": None, "use_beam_search": False, "length_penalty": 1.0,
     "spaces_between_special_tokens": True, "priority": 0, "suffix": ""},
    {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "parallel_tool_calls": True},
])
def test_harmless_and_neutral_fields_are_accepted(tiny_server, extra):
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
    assert post(tiny_server, "/v1/chat/completions", chat).status_code == 200
    if "tools" not in extra:
        completion = {"prompt": "Hi", "max_tokens": 2, **extra}
        assert post(tiny_server, "/v1/completions", completion).status_code == 200


def test_the_openai_client_extra_body_unknown_field_is_refused(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=None, prompt="Hi", max_tokens=2,
                                  extra_body={"guided_whitespace_pattern": " "})
    assert e.value.body["param"] == "guided_whitespace_pattern"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=None, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert e.value.body["param"] == "response_format.json_schema.schema"


# --- /tokenize and /detokenize -------------------------------------------------------------------------
def test_tokenize_and_detokenize_round_trip(tiny_server):
    engine = tiny_server.engine
    r = post(tiny_server, "/tokenize", {"model": tiny_server.model, "prompt": "Hello, world!"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["tokens"] == engine.tokenizer.encode("Hello, world!") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == engine.max_model_len and body["token_strs"] is None
    plain = post(tiny_server, "/tokenize", {"prompt": "Hello, world!", "add_special_tokens": False,
                                            "return_token_strs": True}).json()
    assert plain["tokens"] == engine.tokenizer.encode("Hello, world!", add_special_tokens=False)
    assert plain["token_strs"] == [engine.tokenizer.id_to_token(t) for t in plain["tokens"]]
    r = post(tiny_server, "/detokenize", {"model": tiny_server.model, "tokens": plain["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": "Hello, world!"}


def test_tokenize_messages_as_chat_completions_render_them(tiny_server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = post(tiny_server, "/tokenize", {"messages": messages})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    chat = post(tiny_server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == len(tokens)
    expected = tiny_server.engine.tokenizer.apply_chat_template(messages, True)
    assert post(tiny_server, "/detokenize", {"tokens": tokens}).json()["prompt"] == expected
    without = post(tiny_server, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    assert without["count"] < len(tokens)


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "messages"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    ("/tokenize", {"messages": [{"role": "function", "content": "b"}]}, 400, "messages[0].role"),
    ("/tokenize", {"prompt": "a", "guided_json": {}}, 400, "guided_json"),
    ("/tokenize", {"prompt": "a", "model": "no-such-model"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens[1]"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
    ("/detokenize", {}, 400, "tokens"),
    ("/detokenize", {"tokens": [1], "model": "no-such-model"}, 404, "model"),
])
def test_tokenizer_routes_refuse_bad_bodies_openai_style(tiny_server, path, body, status, param):
    r = post(tiny_server, path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_tokenizer_routes_are_not_under_v1(tiny_server):
    assert post(tiny_server, "/v1/tokenize", {"prompt": "a"}).status_code == 404
    assert post(tiny_server, "/v1/detokenize", {"tokens": [1]}).status_code == 404


def test_tokenizer_routes_need_the_api_key(tiny_model_dir):
    server = start_server(EngineConfig(model=str(tiny_model_dir), **TINY_ENGINE), api_key="sesame")
    try:
        for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [5]})):
            assert post(server, path, body).status_code == 401
            assert post(server, path, body, headers={"Authorization": "Bearer nope"}).status_code == 401
            assert post(server, path, body, headers={"Authorization": "Bearer sesame"}).status_code == 200
    finally:
        server.stop()


# --- prompt_logprobs -------------------------------------------------------------------------------------
def check_prompt_logprobs(prompt_logprobs: list, prompt_ids: list[int], k: int, decode) -> None:
    assert len(prompt_logprobs) == len(prompt_ids) and prompt_logprobs[0] is None
    for pos in range(1, len(prompt_ids)):
        entry = {int(t): lp for t, lp in prompt_logprobs[pos].items()}
        actual = prompt_ids[pos]
        assert actual in entry and k <= len(entry) <= k + 1
        for tid, lp in entry.items():
            assert set(lp) == {"logprob", "rank", "decoded_token"}
            assert lp["logprob"] <= 0 and lp["rank"] >= 1 and lp["decoded_token"] == decode([tid], False)
        top = sorted((lp["rank"], tid) for tid, lp in entry.items() if tid != actual or lp["rank"] <= k)
        assert [r for r, _ in top][:k] == list(range(1, k + 1))


def test_prompt_logprobs_on_completions(client, tiny_server):
    engine = tiny_server.engine
    prompt_ids = engine.tokenizer.encode("The quick brown fox")
    out = client.completions.create(model=tiny_server.model, prompt="The quick brown fox", max_tokens=2,
                                    temperature=0, extra_body={"prompt_logprobs": 3})
    prompt_logprobs = out.choices[0].model_extra["prompt_logprobs"]
    check_prompt_logprobs(prompt_logprobs, prompt_ids, 3, engine.tokenizer.decode)
    # Without prompt_logprobs: null, as in vLLM.
    plain = post(tiny_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}).json()
    assert plain["choices"][0]["prompt_logprobs"] is None


def test_prompt_logprobs_take_no_cached_prefix_and_match_an_uncached_run(tiny_server):
    first = post(tiny_server, "/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 1, "prompt_logprobs": 1}).json()
    cached = post(tiny_server, "/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 1}).json()
    assert cached["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    again = post(tiny_server, "/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 1, "prompt_logprobs": 1}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["choices"][0]["prompt_logprobs"] == first["choices"][0]["prompt_logprobs"]


def test_prompt_logprobs_streamed_once_per_choice_and_on_chat(client, tiny_server):
    r = post(tiny_server, "/v1/completions", {"prompt": ["Hello there", "Good day"], "max_tokens": 3, "n": 2,
                                              "stream": True, "prompt_logprobs": 2})
    seen: dict[int, list] = {}
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                if "prompt_logprobs" in choice:
                    assert choice["index"] not in seen
                    seen[choice["index"]] = choice["prompt_logprobs"]
    assert sorted(seen) == [0, 1, 2, 3] and seen[0] == seen[1] and seen[2] == seen[3]
    decode = tiny_server.engine.tokenizer.decode
    check_prompt_logprobs(seen[0], tiny_server.engine.tokenizer.encode("Hello there"), 2, decode)
    chat = client.chat.completions.create(model=tiny_server.model, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=1, extra_body={"prompt_logprobs": 0})
    tokens = post(tiny_server, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()["tokens"]
    check_prompt_logprobs(chat.model_extra["prompt_logprobs"], tokens, 0, decode)


@pytest.mark.parametrize("value, param", [(21, "prompt_logprobs"), (-1, "prompt_logprobs"), (1.5, "prompt_logprobs"),
                                          (True, "prompt_logprobs")])
def test_bad_prompt_logprobs_are_400(tiny_server, value, param):
    assert_400_naming(post(tiny_server, "/v1/completions", {"prompt": "Hi", "prompt_logprobs": value}), param)


# --- logit_bias ----------------------------------------------------------------------------------------
def test_logit_bias_steers_greedy_and_sampled_generation(client, tiny_server):
    decode = lambda ids: post(tiny_server, "/detokenize", {"tokens": ids}).json()["prompt"]  # noqa: E731
    plain = client.completions.create(model=tiny_server.model, prompt="Hello", max_tokens=4, temperature=0)
    forced = client.completions.create(model=tiny_server.model, prompt="Hello", max_tokens=4, temperature=0,
                                       logit_bias={"77": 100})
    assert forced.choices[0].text == decode([77] * 4) != plain.choices[0].text
    sampled = client.chat.completions.create(model=tiny_server.model, messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=4, temperature=1.0, seed=3, logit_bias={"77": 100})
    assert sampled.choices[0].message.content == decode([77] * 4)
    # A negative bias takes a token out: of two tokens raised alike, the one also lowered never comes.
    for lowered, kept in ((77, 78), (78, 77)):
        out = client.completions.create(model=tiny_server.model, prompt="Hello", max_tokens=4, temperature=0,
                                        logit_bias={str(lowered): -100, str(kept): 100})
        assert out.choices[0].text == decode([kept] * 4)


@pytest.mark.parametrize("bias", [{"320": 1}, {"99999999": 1}, {"-1": 1}, {"abc": 1}, {"5": 101}, {"5": -100.5},
                                  {"5": "1"}, {str(i): 1 for i in range(MAX_LOGIT_BIAS_ENTRIES + 1)}])
def test_bad_logit_bias_is_a_400_naming_it(tiny_server, bias):
    assert_400_naming(post(tiny_server, "/v1/completions", {"prompt": "Hi", "logit_bias": bias}), "logit_bias")
    chat = {"messages": [{"role": "user", "content": "Hi"}], "logit_bias": bias}
    assert_400_naming(post(tiny_server, "/v1/chat/completions", chat), "logit_bias")


# --- usage.prompt_tokens_details.cached_tokens -----------------------------------------------------------
def test_cached_tokens_in_usage_plain_and_streamed(client, tiny_server):
    messages = [{"role": "user", "content": LONG_PROMPT}]
    client.completions.create(model=tiny_server.model, prompt=LONG_PROMPT, max_tokens=1)
    again = client.completions.create(model=tiny_server.model, prompt=LONG_PROMPT, max_tokens=1)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens and cached % 16 == 0
    fresh = client.completions.create(model=tiny_server.model, prompt="Unrelated words here", max_tokens=1)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0

    client.chat.completions.create(model=tiny_server.model, messages=messages, max_tokens=1)
    chat = client.chat.completions.create(model=tiny_server.model, messages=messages, max_tokens=1)
    assert chat.usage.prompt_tokens_details.cached_tokens > 0
    chunks = list(client.chat.completions.create(model=tiny_server.model, messages=messages, max_tokens=2,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == chat.usage.prompt_tokens_details.cached_tokens
    chunks = list(client.completions.create(model=tiny_server.model, prompt=LONG_PROMPT, max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached


def test_echo_with_logprobs_scores_the_prompt_tokens_too(client, tiny_server):
    out = client.completions.create(model=tiny_server.model, prompt="The quick brown fox", max_tokens=3,
                                    temperature=0, echo=True, logprobs=2)
    choice, usage = out.choices[0], out.usage
    assert choice.text.startswith("The quick brown fox")
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == usage.prompt_tokens + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    prompt_ids = tiny_server.engine.tokenizer.encode("The quick brown fox")
    prompt_logprobs = choice.model_extra["prompt_logprobs"]  # computed for the echo, returned as vLLM does
    for pos in range(1, len(prompt_ids)):
        assert lp.token_logprobs[pos] == prompt_logprobs[pos][str(prompt_ids[pos])]["logprob"]
        assert 1 <= len(lp.top_logprobs[pos]) <= 3
    plain = client.completions.create(model=tiny_server.model, prompt="The quick brown fox", max_tokens=3,
                                      temperature=0, logprobs=2)
    assert lp.token_logprobs[usage.prompt_tokens:] == plain.choices[0].logprobs.token_logprobs
    streamed = post(tiny_server, "/v1/completions", {"prompt": "Hi", "echo": True, "logprobs": 1, "stream": True})
    assert_400_naming(streamed, "echo")


def test_prompt_logprobs_in_a_chat_stream_come_once_per_choice(tiny_server):
    messages = [{"role": "user", "content": "Hi"}]
    r = post(tiny_server, "/v1/chat/completions", {"messages": messages, "max_tokens": 3, "n": 2, "stream": True,
                                                   "prompt_logprobs": 1})
    seen: dict[int, list] = {}
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                if "prompt_logprobs" in choice:
                    assert choice["index"] not in seen
                    seen[choice["index"]] = choice["prompt_logprobs"]
    assert sorted(seen) == [0, 1] and seen[0] == seen[1]
    tokens = post(tiny_server, "/tokenize", {"messages": messages}).json()["tokens"]
    check_prompt_logprobs(seen[0], tokens, 1, tiny_server.engine.tokenizer.decode)
