"""SamplingParams: vLLM's defaults, normalisation, and a ValueError naming the field for bad values."""

from __future__ import annotations

import math

import pytest

from pyserve.sampling_params import SamplingParams


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, 0, 0.0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.logit_bias is None
    assert p.stop == [] and p.stop_token_ids == []
    assert p.ignore_eos is False
    assert p.max_tokens == 16 and p.min_tokens == 0 and p.logprobs is None
    assert p.skip_special_tokens is True and p.include_stop_str_in_output is False
    assert not p.greedy


def test_normalisation():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    t = SamplingParams(temperature=1).temperature
    assert t == 1.0 and isinstance(t, float)
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(max_tokens=None, min_tokens=1000).min_tokens == 1000
    assert SamplingParams(logprobs=0).logprobs == 0 and SamplingParams(logprobs=20).logprobs == 20


@pytest.mark.parametrize("t, greedy", [(0.0, True), (1e-6, True), (1e-4, False), (0.7, False)])
def test_greedy(t, greedy):
    assert SamplingParams(temperature=t).greedy is greedy


def test_logit_bias_string_keys_convert():
    p = SamplingParams(logit_bias={"42": 5, "7": -100.0, 3: 100})
    assert p.logit_bias == {42: 5.0, 7: -100.0, 3: 100.0}
    assert all(type(k) is int for k in p.logit_bias)


def test_message_example():
    with pytest.raises(ValueError, match=r"^temperature must be >= 0, got -1$"):
        SamplingParams(temperature=-1)


INVALID = [
    ("n", 0),
    ("n", -3),
    ("n", 1.5),
    ("n", True),
    ("n", "2"),
    ("temperature", -1),
    ("temperature", -0.01),
    ("temperature", math.inf),
    ("temperature", math.nan),
    ("temperature", "hot"),
    ("temperature", None),
    ("top_p", 0.0),
    ("top_p", -0.1),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_p", "1"),
    ("top_k", -2),
    ("top_k", 2.5),
    ("top_k", False),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("min_p", "0"),
    ("seed", 1.0),
    ("seed", "7"),
    ("seed", True),
    ("presence_penalty", 2.1),
    ("presence_penalty", -2.1),
    ("presence_penalty", "x"),
    ("frequency_penalty", 2.5),
    ("frequency_penalty", -3),
    ("frequency_penalty", math.inf),
    ("repetition_penalty", 0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("repetition_penalty", [1.0]),
    ("logit_bias", {1: 101}),
    ("logit_bias", {1: -100.5}),
    ("logit_bias", {"abc": 1}),
    ("logit_bias", {1.5: 1}),
    ("logit_bias", {True: 1}),
    ("logit_bias", {1: "big"}),
    ("logit_bias", {1: math.nan}),
    ("logit_bias", [1, 2]),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", ["ok", 3]),
    ("stop", 5),
    ("stop", [f"s{i}" for i in range(17)]),
    ("stop", ["ok", "x" * 1025]),
    ("stop_token_ids", [1, "2"]),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", 5),
    ("ignore_eos", 1),
    ("ignore_eos", "yes"),
    ("max_tokens", 0),
    ("max_tokens", -1),
    ("max_tokens", 10.0),
    ("max_tokens", True),
    ("min_tokens", -1),
    ("min_tokens", 17),  # > max_tokens (16)
    ("min_tokens", 1.0),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", True),
    ("logprobs", 2.0),
    ("skip_special_tokens", 0),
    ("include_stop_str_in_output", "false"),
    # Integers past int64 reach torch.tensor and raise there, in the engine (issue 19).
    ("seed", 2 ** 63),
    ("seed", -(2 ** 63) - 1),
    ("n", 129),
    ("n", 2 ** 64),
    ("top_k", 2 ** 63),
    ("max_tokens", 2 ** 63),
    ("min_tokens", 2 ** 70),
    ("stop_token_ids", [1, 2 ** 63]),
    ("prompt_logprobs", -1),
    ("prompt_logprobs", 21),
    ("prompt_logprobs", 1.0),
    ("truncate_prompt_tokens", 0),
    ("truncate_prompt_tokens", -2),
    ("truncate_prompt_tokens", 2 ** 64),
]


@pytest.mark.parametrize("field, value", INVALID, ids=[f"{f}={v!r}"[:40] for f, v in INVALID])
def test_invalid_raises_naming_field(field, value):
    with pytest.raises(ValueError) as e:
        SamplingParams(**{field: value})
    assert str(e.value).startswith(field), str(e.value)


def test_valid_edges():
    SamplingParams(temperature=0, top_p=1, top_k=1, min_p=1, presence_penalty=-2, frequency_penalty=2)
    SamplingParams(repetition_penalty=1e-3, max_tokens=1, min_tokens=1, logit_bias={0: -100, 1: 100})
    SamplingParams(stop=[f"s{i}" for i in range(16)], stop_token_ids=[0, 5], seed=0, n=4)
    SamplingParams(seed=-(2 ** 63), n=128, top_k=2 ** 63 - 1, prompt_logprobs=20, truncate_prompt_tokens=-1)
    SamplingParams(seed=2 ** 63 - 1, prompt_logprobs=0, truncate_prompt_tokens=1, stop=["x" * 1024] * 16)


def test_validate_for_vocab():
    SamplingParams(logit_bias={0: 1, 99: 1}, stop_token_ids=[0, 99]).validate_for_vocab(100)
    SamplingParams().validate_for_vocab(100)
    with pytest.raises(ValueError, match="^logit_bias"):
        SamplingParams(logit_bias={100: 1}).validate_for_vocab(100)
    with pytest.raises(ValueError, match="^logit_bias"):
        SamplingParams(logit_bias={"-1": 1}).validate_for_vocab(100)
    with pytest.raises(ValueError, match="^stop_token_ids"):
        SamplingParams(stop_token_ids=[5, 100]).validate_for_vocab(100)
    with pytest.raises(ValueError, match="^stop_token_ids"):
        SamplingParams(stop_token_ids=[-1]).validate_for_vocab(100)
