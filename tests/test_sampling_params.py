import pytest

from llm_engine import SamplingParams


def test_defaults_are_vllm_like():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_k, p.top_p, p.min_p, p.max_tokens) == (1, 1.0, 0, 1.0, 0.0, 16)
    assert p.stop_strings == () and not p.greedy and not p.has_penalties


def test_temperature_zero_is_greedy():
    assert SamplingParams(temperature=0).greedy


def test_stop_accepts_a_string_or_a_list():
    assert SamplingParams(stop="\n\n").stop_strings == ("\n\n",)
    assert SamplingParams(stop=["a", "bc"]).stop_strings == ("a", "bc")


def test_penalties_are_detected():
    assert SamplingParams(presence_penalty=0.5).has_penalties
    assert SamplingParams(frequency_penalty=-0.5).has_penalties
    assert SamplingParams(repetition_penalty=1.2).has_penalties


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"n": 0}, "n"),
    ({"n": 1.5}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**80}, "seed"),
    ({"top_k": 2**80}, "top_k"),
    ({"logprobs": -1}, "logprobs"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop_token_ids": [1, -2]}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
])
def test_bad_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
