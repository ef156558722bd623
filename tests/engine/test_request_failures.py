"""A request whose own values break the engine (here: SamplingParams altered after validation, as a
gap in validation would let through) fails alone: finish_reason "error", its blocks back, the
requests batched with it unchanged, the engine alive (issue 19: a seed out of the 64-bit range
killed the engine for every request until a restart)."""

import asyncio

import pytest

from pyserve.engine.async_engine import AsyncLLMEngine, RequestFailedError
from pyserve.sampling_params import SamplingParams
from tests.engine.conftest import assert_no_leak, make_llm

GOOD = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = ["The sky is", "Once upon a time", "def add(a, b):"]


def bad_params(**fields) -> SamplingParams:
    p = SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True)
    for name, value in fields.items():
        setattr(p, name, value)  # past __post_init__'s checks
    return p


class _Exploding(list):
    """Valid ids, but asking whether the sampled token is one of them raises."""

    def __contains__(self, item):
        raise RuntimeError("injected failure in a stop check")


# Where each breaks: the sampling inputs (before the forward), appending the sampled token (after it).
BREAKERS = {"seed": dict(seed=-2 ** 63 - 1), "stop_token_ids": dict(stop_token_ids=_Exploding([5]))}


@pytest.fixture(scope="module")
def solo(llm):
    return [llm.generate(p, GOOD)[0].outputs[0].token_ids for p in PROMPTS]


@pytest.mark.parametrize("breaker", BREAKERS)
def test_a_broken_request_fails_alone(llm, solo, breaker):
    outs = llm.generate(PROMPTS, [GOOD, bad_params(**BREAKERS[breaker]), GOOD])  # one batch
    bad = outs[1]
    assert bad.finished and bad.error and bad.outputs[0].finish_reason == "error"
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == [solo[0], solo[2]]
    assert all(o.outputs[0].finish_reason == "length" for o in (outs[0], outs[2]))
    assert_no_leak(llm)
    assert llm.generate(PROMPTS[1], GOOD)[0].outputs[0].token_ids == solo[1]  # the engine still serves


def test_seed_overflow_error_names_the_cause(llm):
    out = llm.generate(PROMPTS[0], bad_params(seed=2 ** 64))[0]
    assert "Overflow" in out.error or "overflow" in out.error
    assert_no_leak(llm)


def test_a_request_that_cannot_be_added_leaves_nothing_behind(llm):
    with pytest.raises(TypeError):
        llm.generate(PROMPTS, [GOOD, GOOD, bad_params(stop=5)])  # the detokenizer cannot take it
    assert_no_leak(llm)


def test_async_engine_survives_a_broken_request():
    llm = make_llm()
    eng = AsyncLLMEngine(llm.engine)

    async def run(rid, prompt, params):
        last = None
        async for out in eng.add_request(rid, prompt, params):
            last = out
        return last

    async def main():
        return await asyncio.gather(run("a", PROMPTS[0], GOOD), run("bad", PROMPTS[1], bad_params(seed=2 ** 70)),
                                    run("bad-add", PROMPTS[1], bad_params(stop=5)), run("c", PROMPTS[2], GOOD),
                                    return_exceptions=True)

    try:
        a, bad, bad_add, c = asyncio.run(main())
        assert isinstance(bad, RequestFailedError) and "Overflow" in str(bad)
        assert isinstance(bad_add, RequestFailedError)
        assert a.outputs[0].finish_reason == c.outputs[0].finish_reason == "length"
        assert eng.dead is None
        assert asyncio.run(run("after", PROMPTS[0], GOOD)).outputs[0].token_ids == a.outputs[0].token_ids
        for _ in range(100):
            if not llm.engine.has_unfinished():
                break
            asyncio.run(asyncio.sleep(0.02))
        assert_no_leak(llm)
    finally:
        eng.shutdown()
