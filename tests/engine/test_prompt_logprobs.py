"""Prompt logprobs (vLLM's `prompt_logprobs`) and prompt truncation (`truncate_prompt_tokens`), on the
default model, against transformers' forward pass of the same GGUF file."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

from pyserve.sampling_params import SamplingParams
from tests.engine.conftest import assert_no_leak, make_llm

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type changed how "
        "books were made. Before that, scribes copied every page by hand, which took months for a single "
        "volume. The new machines spread quickly across Europe, and within fifty years millions of books "
        "had been printed in hundreds of towns.")
TOL = 2e-3


@pytest.fixture(scope="module")
def chunked():
    """A 24-token budget: the prompt is scored over several steps. On the weights dequantized to fp32,
    as transformers reads the file, and an fp32 KV cache (auto would pick bf16 on a CPU with
    AVX512_BF16, whose rounding moves logprobs by more than TOL)."""
    return make_llm(max_num_batched_tokens=24, quantization="none", kv_cache_dtype="float32")


@pytest.fixture(scope="module")
def ids(chunked):
    ids = chunked.tokenizer.encode(TEXT)
    assert len(ids) > 2 * 24
    return ids


@pytest.fixture(scope="module")
def reference(ids):
    """[len(ids) - 1, vocab]: transformers' log-probabilities of each next token."""
    transformers = pytest.importorskip("transformers")
    from pyserve.loader import default_gguf_path

    path = Path(default_gguf_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def check_against(ref: torch.Tensor, ids: list[int], prompt_logprobs, top: int) -> None:
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry, want = prompt_logprobs[pos], ref[pos - 1]
        actual = ids[pos]
        assert actual in entry, pos
        for tid, lp in entry.items():
            assert abs(lp.logprob - want[tid].item()) < TOL, (pos, tid, lp, want[tid].item())
        # The rank of the actual token, up to ties within the tolerance.
        a = want[actual].item()
        lo, hi = 1 + int((want > a + TOL).sum()), 1 + int((want > a - TOL).sum())
        assert lo <= entry[actual].rank <= hi, (pos, entry[actual].rank, lo, hi)
        ranked = sorted((lp for tid, lp in entry.items() if lp.rank <= top), key=lambda lp: lp.rank)
        assert [lp.rank for lp in ranked][:top] == list(range(1, top + 1)), pos
        top_want = want.topk(top).values.tolist()
        assert all(abs(lp.logprob - w) < TOL for lp, w in zip(ranked, top_want)), pos
        assert len(entry) in (top, top + 1)  # the top N, plus the actual token when it is not among them


def test_prompt_logprobs_match_transformers_over_chunks(chunked, ids, reference):
    out = chunked.generate(ids, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3))[0]
    check_against(reference, ids, out.prompt_logprobs, 3)
    assert len(out.outputs[0].token_ids) == 2
    assert_no_leak(chunked)


def test_prompt_logprobs_zero_is_the_actual_token_alone(chunked, ids, reference):
    pl = chunked.generate(ids, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs
    assert all(list(pl[i]) == [ids[i]] for i in range(1, len(ids)))
    check_against(reference, ids, pl, 0)


def test_prompt_logprobs_bypass_the_prefix_cache_and_n(chunked, ids, reference):
    """A second identical prompt is in the prefix cache, but its positions still need logits; n > 1
    scores the prompt once."""
    chunked.generate(ids, SamplingParams(max_tokens=1))  # fills the prefix cache
    outs = chunked.generate([ids, ids], [SamplingParams(max_tokens=1, prompt_logprobs=1),
                                         SamplingParams(max_tokens=3, n=3, temperature=1.0, seed=5,
                                                        prompt_logprobs=2)])
    check_against(reference, ids, outs[0].prompt_logprobs, 1)
    check_against(reference, ids, outs[1].prompt_logprobs, 2)
    assert len(outs[1].outputs) == 3
    plain = chunked.generate(ids, SamplingParams(max_tokens=1))[0]
    assert plain.prompt_logprobs is None and plain.num_cached_tokens > 0
    assert_no_leak(chunked)


def test_truncate_prompt_tokens_keeps_the_last_k(chunked, ids):
    greedy = dict(temperature=0, max_tokens=6, ignore_eos=True)
    cut = chunked.generate(TEXT, SamplingParams(truncate_prompt_tokens=20, **greedy))[0]
    assert cut.prompt_token_ids == ids[-20:]
    assert cut.outputs[0].token_ids == chunked.generate(ids[-20:], SamplingParams(**greedy))[0].outputs[0].token_ids
    short = chunked.generate(ids[:5], SamplingParams(truncate_prompt_tokens=20, **greedy))[0]
    assert short.prompt_token_ids == ids[:5]
    whole = chunked.generate(ids, SamplingParams(truncate_prompt_tokens=-1, **greedy))[0]  # -1: max_model_len
    assert whole.prompt_token_ids == ids
    with pytest.raises(ValueError, match="^truncate_prompt_tokens"):
        chunked.generate(ids, SamplingParams(truncate_prompt_tokens=chunked.engine.max_model_len + 1))
    assert_no_leak(chunked)


def test_truncation_lets_a_text_past_the_length_bound_through(chunked):
    """Without truncation a text this long is refused untokenized; with it, its last tokens are served."""
    eng = chunked.engine
    long_text = "word " * (eng.max_model_len * eng.tokenizer.max_bytes_per_token // 5 + 10)
    with pytest.raises(ValueError, match="context_length_exceeded"):
        chunked.generate(long_text, SamplingParams(max_tokens=1))
    out = chunked.generate(long_text, SamplingParams(max_tokens=1, truncate_prompt_tokens=8))[0]
    assert len(out.prompt_token_ids) == 8
    assert_no_leak(chunked)
