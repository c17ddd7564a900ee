import pytest

from kvmem.sampling_params import MAX_LOGPROBS, SAMPLING_EPS, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None and p.max_tokens == 16 and p.min_tokens == 0
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.ignore_eos and p.logprobs is None
    assert not p.include_stop_str_in_output and p.skip_special_tokens
    assert not p.greedy and not p.has_penalties and p.max_stop_len == 0


def test_normalization():
    p = SamplingParams(stop="###", stop_token_ids=(3, 4), temperature=0, top_p=1)
    assert p.stop == ["###"] and p.stop_token_ids == [3, 4]
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert p.greedy
    assert SamplingParams(stop=["a", "abc"]).max_stop_len == 3
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(repetition_penalty=1.2).has_penalties


def test_a_temperature_below_the_epsilon_is_greedy():
    # 1e-40 used to reach the sampler, overflow logits / temperature and sample the least likely token.
    for t in (0.0, 1e-40, 1e-30, 5e-324, SAMPLING_EPS / 2):
        assert SamplingParams(temperature=t).greedy, t
    assert not SamplingParams(temperature=SAMPLING_EPS).greedy
    assert not SamplingParams(temperature=0.01).greedy


def test_greedy_with_n_is_allowed():
    p = SamplingParams(n=4, temperature=0.0)
    assert p.greedy and p.n == 4


def test_valid_edges():
    SamplingParams(top_p=1.0, top_k=-1, min_p=1.0, presence_penalty=-2, frequency_penalty=2, logprobs=0)
    SamplingParams(top_k=1, min_p=0.0, logprobs=MAX_LOGPROBS, seed=0, max_tokens=1, min_tokens=1)
    SamplingParams(min_tokens=100, max_tokens=None)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n": 0}, "n"),
        ({"n": 1.0}, "n"),
        ({"n": True}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": None}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.1}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"frequency_penalty": False}, "frequency_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "1"}, "seed"),
        ({"seed": True}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 3.0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"min_tokens": 1.0}, "min_tokens"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
        ({"skip_special_tokens": None}, "skip_special_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ({"logprobs": 2.0}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt_logprobs": MAX_LOGPROBS + 1}, "prompt_logprobs"),
        ({"prompt_logprobs": 1.0}, "prompt_logprobs"),
        ({"prompt_logprobs": False}, "prompt_logprobs"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {True: 1.0}}, "logit_bias"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {5: -101}}, "logit_bias"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias"),
        ({"logit_bias": {5: "1"}}, "logit_bias"),
        ({"logit_bias": {i: 1.0 for i in range(301)}}, "logit_bias"),
    ],
)
def test_invalid_raises_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value).startswith(name + " "), str(info.value)


def test_messages_state_the_range():
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match=r"presence_penalty must be in \[-2, 2\]"):
        SamplingParams(presence_penalty=5)


def test_prompt_logprobs_and_logit_bias_defaults_and_normalization():
    p = SamplingParams()
    assert p.prompt_logprobs is None and p.logit_bias is None
    assert SamplingParams(logit_bias={}).logit_bias is None
    p = SamplingParams(prompt_logprobs=0, logit_bias={5: 100, 7: -100.0, 9: 0.5})
    assert p.prompt_logprobs == 0 and p.logit_bias == {5: 100.0, 7: -100.0, 9: 0.5}
    assert all(type(v) is float for v in p.logit_bias.values())
    assert len(SamplingParams(logit_bias={i: 1.0 for i in range(300)}).logit_bias) == 300
