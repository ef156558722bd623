"""The asyncio bridge: concurrent streams, aborts on early exit, a responsive
event loop while the model steps, and a dead engine that fails callers
instead of hanging them."""

import asyncio

import pytest

from pyserve.engine.async_engine import AsyncLLMEngine, EngineDeadError
from pyserve.sampling_params import SamplingParams
from tests.engine.conftest import assert_no_leak, make_llm

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    llm = make_llm()
    eng = AsyncLLMEngine(llm.engine)
    yield llm, eng
    eng.shutdown()


async def collect(eng, rid, prompt, params=PARAMS):
    pieces, last = [], None
    async for out in eng.add_request(rid, prompt, params):
        pieces.append(out.outputs[0].delta_text)
        last = out
    return pieces, last


def test_concurrent_streams_match_offline(engine):
    llm, eng = engine
    prompts = ["The sky is", "Two plus two is", "A haiku about rain:", "def add(a, b):"]
    # A separate engine: the async one's thread owns its engine.
    offline = [o.outputs[0].text for o in make_llm().generate(prompts, PARAMS)]

    async def main():
        return await asyncio.gather(*(collect(eng, f"r{i}", p) for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    for (pieces, last), want in zip(results, offline):
        assert last.finished and last.outputs[0].finish_reason == "length"
        assert "".join(pieces) == last.outputs[0].text == want
    assert_no_leak(llm)


def test_leaving_a_stream_aborts_the_request(engine):
    llm, eng = engine

    async def main():
        stream = eng.add_request("gone", "Tell me everything about", SamplingParams(max_tokens=200, ignore_eos=True))
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await stream.aclose()
        for _ in range(100):  # the abort is processed by the engine thread
            if not llm.engine.has_unfinished():
                break
            await asyncio.sleep(0.05)

    asyncio.run(main())
    assert_no_leak(llm)


def test_event_loop_stays_responsive(engine):
    llm, eng = engine

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def heartbeat():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        hb = asyncio.create_task(heartbeat())
        await collect(eng, "busy", "Write a long story:", SamplingParams(max_tokens=40, ignore_eos=True))
        done.set()
        await hb
        return ticks

    # The model needs many steps for 40 tokens; a loop blocked by them would tick a handful of times.
    assert asyncio.run(main()) >= 20


def test_bad_request_raises_immediately(engine):
    _, eng = engine

    async def main():
        with pytest.raises(ValueError, match="context_length_exceeded"):
            eng.add_request("big", "x", SamplingParams(max_tokens=10**7))

    asyncio.run(main())


def test_a_failing_step_kills_the_engine_without_hanging_callers():
    llm = make_llm()
    eng = AsyncLLMEngine(llm.engine)

    def boom(batch):
        raise RuntimeError("injected failure")

    llm.engine.runner.execute = boom

    async def main():
        with pytest.raises(EngineDeadError, match="injected failure"):
            await asyncio.wait_for(collect(eng, "x", "hello"), timeout=30)
        with pytest.raises(EngineDeadError):
            eng.add_request("y", "hello")

    asyncio.run(main())
    assert isinstance(eng.dead, RuntimeError)
    eng.shutdown()


def test_a_builder_runs_on_the_engine_thread_and_its_failure_reaches_the_caller():
    import threading

    built_on, llms = [], []

    def build():
        built_on.append(threading.current_thread().name)
        llms.append(make_llm())
        return llms[0].engine

    eng = AsyncLLMEngine(build)
    try:
        assert built_on == ["pyserve-engine"]
        pieces, last = asyncio.run(collect(eng, "b0", "The sky is"))
        assert last.finished and len(last.outputs[0].token_ids) == PARAMS.max_tokens
        assert_no_leak(llms[0])
    finally:
        eng.shutdown()

    def broken():
        raise RuntimeError("no weights here")

    with pytest.raises(RuntimeError, match="no weights here"):
        AsyncLLMEngine(broken)
