"""The engine end to end on the default model: batch invariance, seeded
sampling, preemption, prefix caching, aborts, stops, n > 1."""

import random

import pytest

from pyserve.sampling_params import SamplingParams
from tests.engine.conftest import assert_no_leak, make_llm

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    words = "the cat sat on a mat while seven quick foxes jumped over lazy dogs near the river bank".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 60))) for _ in range(n)]


def texts(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def alone(llm):
    return texts([llm.generate(p, GREEDY)[0] for p in prompts(32)])


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batch_invariance_with_chunked_prefill(alone, prefix_caching):
    # A 64-token budget splits most prompts into chunks and mixes them with decodes.
    llm = make_llm(max_num_batched_tokens=64, enable_prefix_caching=prefix_caching)
    together = texts(llm.generate(prompts(32), GREEDY))
    assert together == alone
    assert_no_leak(llm)


def test_seeded_sampling_is_reproducible_across_batches(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    target = "Tell me a story about a dragon"
    alone = llm.generate(target, params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.7, seed=i, max_tokens=8) for i in range(5)]
    mixed = llm.generate(prompts(5, seed=3) + [target], others + [params])
    assert mixed[-1].outputs[0].token_ids == alone
    unseeded = llm.generate([target] * 2, SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True))
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids
    assert_no_leak(llm)


def test_preemption_under_a_tiny_cache(alone):
    # 24 blocks of 16 tokens cannot hold 32 sequences of up to ~70 tokens at once.
    llm = make_llm(num_gpu_blocks_override=24, max_num_batched_tokens=128)
    out = texts(llm.generate(prompts(32), GREEDY))
    assert out == alone
    assert llm.engine.stats().num_preemptions > 0
    assert_no_leak(llm)


def test_prompt_that_can_never_fit_is_rejected():
    llm = make_llm(num_gpu_blocks_override=4)
    with pytest.raises(ValueError, match="whole cache holds 64"):
        llm.generate(list(range(100, 160)), SamplingParams(max_tokens=10))
    assert_no_leak(llm)


def test_prefix_cache_reuses_a_shared_prefix(llm):
    prefix = "You are a helpful assistant. " * 12
    first = llm.generate(prefix + "Question one?", GREEDY)[0]
    before = llm.engine.stats()
    second = llm.generate(prefix + "Question two?", GREEDY)[0]
    after = llm.engine.stats()
    assert second.num_cached_tokens >= 64
    computed = after.prompt_tokens - before.prompt_tokens
    assert computed <= len(second.prompt_token_ids) - second.num_cached_tokens
    assert after.prefix_cache_hits - before.prefix_cache_hits == second.num_cached_tokens
    fresh = make_llm(enable_prefix_caching=False).generate(prefix + "Question two?", GREEDY)[0]
    assert second.outputs[0].token_ids == fresh.outputs[0].token_ids
    assert first.num_cached_tokens == 0 or first.num_cached_tokens < second.num_cached_tokens
    assert_no_leak(llm)


def test_abort_in_every_state(llm):
    engine = llm.engine
    long_prompt = "word " * 300
    engine.add_request("waiting", "hello", GREEDY)
    engine.add_request("decoding", "hello there", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("prefilling", long_prompt, GREEDY)
    for _ in range(3):
        engine.step()
    assert engine.abort("decoding").outputs[0].finish_reason == "abort"
    assert engine.abort("prefilling").outputs[0].finish_reason == "abort"
    engine.add_request("queued", "never runs", GREEDY)
    assert engine.abort("queued").outputs[0].finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    assert engine.abort("nonexistent") is None
    assert_no_leak(llm)


def test_stop_strings_min_tokens_ignore_eos_and_n(llm):
    # Find what greedy says, then stop on a string that spans tokens in it.
    base = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    words = base.text.split()
    assert len(words) >= 3
    stop = words[1][-2:] + " " + words[2][:2]  # crosses a word (and so a token) boundary
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert stop not in c.text and base.text.startswith(c.text)
    assert c.text == base.text[: base.text.index(stop)]

    chat = [{"role": "user", "content": "Say hi."}]
    short = llm.chat(chat, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert short.finish_reason == "stop"  # EOS
    n = len(short.token_ids)
    longer = llm.chat(chat, SamplingParams(temperature=0, max_tokens=64, min_tokens=n + 5))[0].outputs[0]
    assert len(longer.token_ids) >= n + 5
    no_eos = llm.chat(chat, SamplingParams(temperature=0, max_tokens=n + 8, ignore_eos=True))[0].outputs[0]
    assert no_eos.finish_reason == "length" and len(no_eos.token_ids) == n + 8

    many = llm.generate("Once upon a time", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10,
                                                           ignore_eos=True))[0]
    assert [c.index for c in many.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in many.outputs}) == 3
    assert all(len(c.token_ids) == 10 for c in many.outputs)
    assert_no_leak(llm)


def test_multibyte_characters_stream_whole(llm):
    engine = llm.engine
    engine.add_request("emoji", "Repeat exactly: 😀🎉 日本語 café 😀🎉 日本語 café",
                       SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    pieces, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            pieces.append(out.outputs[0].delta_text)
            final = out
    assert "".join(pieces) == final.outputs[0].text
    assert all("\ufffd" not in p for p in pieces)
    assert_no_leak(llm)


def test_logprobs(llm):
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 4 and len(out.top_logprobs) == 4
    for tok, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert len(top) == 3 and tok in top  # greedy picks the most likely
        assert abs(top[tok] - lp) < 1e-5 and lp <= 0


def test_invalid_requests(llm):
    with pytest.raises(ValueError, match="temperature"):
        llm.generate("x", SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="prompt token ids"):
        llm.generate([[1, 2, 10**9]])
    with pytest.raises(ValueError, match="context_length_exceeded"):
        llm.generate("x", SamplingParams(max_tokens=10**6))
    assert_no_leak(llm)


def test_n_samples_share_the_prompt_blocks():
    llm = make_llm(enable_prefix_caching=False)  # so any sharing comes from the fork
    engine = llm.engine
    engine.add_request("n3", "word " * 100, SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=4,
                                                           ignore_eos=True))
    shared = 0
    while engine.has_unfinished():
        engine.step()
        seqs = engine.requests["n3"].seqs if "n3" in engine.requests else []
        if len(seqs) == 3 and all(s.block_ids for s in seqs):
            first = seqs[0].block_ids[0]
            if all(s.block_ids[0] == first for s in seqs):
                shared = max(shared, engine.block_manager.allocator.ref_count(first))
    assert shared == 3
    assert_no_leak(llm)


def test_n_samples_survive_preemption():
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=20, ignore_eos=True)
    work = prompts(6, seed=5)
    roomy = make_llm(enable_prefix_caching=False)
    want = [[c.token_ids for c in o.outputs] for o in roomy.generate(work, params)]
    tight = make_llm(num_gpu_blocks_override=14, enable_prefix_caching=False, max_num_batched_tokens=96)
    got = [[c.token_ids for c in o.outputs] for o in tight.generate(work, params)]
    assert got == want
    assert tight.engine.stats().num_preemptions > 0
    assert_no_leak(tight)


def test_waiting_sequences_hold_no_blocks_so_preemption_cannot_stall():
    # A shared prefix makes every admission take cached blocks; a cache this small and 2 running at most
    # make sequences preempt. A waiting sequence that kept the prefix blocks of an admission that could
    # not be scheduled starved the preempted one in front of it, with nothing running: the engine stalled.
    prefix = "The quick brown fox jumps over the lazy dog near the river bank. " * 6
    llm = make_llm(num_gpu_blocks_override=14, max_num_seqs=2, max_num_batched_tokens=64)
    engine = llm.engine
    for i in range(10):
        engine.add_request(f"r{i}", prefix + f"Item {i}: " + "word " * (5 * i),
                           SamplingParams(max_tokens=40, ignore_eos=True, temperature=0))
    for _ in range(3000):
        if not engine.has_unfinished():
            break
        engine.step()
    assert not engine.has_unfinished(), (f"stalled: {engine.stats()}")
    assert engine.stats().num_preemptions > 0
    assert_no_leak(llm)
