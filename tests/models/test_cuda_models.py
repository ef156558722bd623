"""The whole forward pass and the engine loop on an NVIDIA GPU, against
transformers on the same GPU. The kernel tests check each CUDA op alone; these
check them composed: paged KV writes, attention over scattered blocks, the
sampler, block allocation and the scheduler, as a user of `--device cuda` runs
them. Skipped without a GPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
import transformers

from pyserve.llm import LLM
from pyserve.loader import default_gguf_path
from pyserve.models import load_model
from pyserve.sampling_params import SamplingParams
from tests.engine.conftest import assert_no_leak
from tests.models.paged_runner import PagedRunner
from tests.models.test_llama_hf import make_config, prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "def fib(n):"}],
]
NEW_TOKENS = 32


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 would make the fp32 comparisons below loose for both sides alike."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids], device="cuda")
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config("llama"), torch_dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("llama-cuda")
    model.save_pretrained(folder)
    # The engine detokenizes: a word-level tokenizer that spells each of the 512 ids.
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(512)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    model.generation_config.eos_token_id = None
    return model.cuda(), folder


def test_tiny_llama_paged_forward_matches_transformers(tiny_llama):
    hf, folder = tiny_llama
    ours = load_model(folder, device="cuda", dtype="float32")
    new, first_logits = PagedRunner(ours, block_size=8).generate(prompts(), max_new_tokens=24, chunk_size=5)
    for p, got, logits in zip(prompts(), new, first_logits):
        with torch.no_grad():
            ref = hf(torch.tensor([p], device="cuda")).logits[0, -1]
        torch.testing.assert_close(logits.to(ref.device), ref, atol=1e-4, rtol=1e-4)
        assert got == hf_greedy(hf, p, 24)


def test_tiny_llama_engine_matches_transformers(tiny_llama):
    hf, folder = tiny_llama
    llm = LLM(folder, device="cuda", dtype="float32", num_gpu_blocks_override=128, block_size=8,
              max_num_batched_tokens=24)  # forces chunked prefill mixed with decodes
    outs = llm.generate(prompts(), greedy(24))
    for p, o in zip(prompts(), outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 24)
    assert_no_leak(llm)


@pytest.fixture(scope="module")
def smollm2_fp32():
    path = Path(default_gguf_path())
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval().cuda()
    hf.generation_config.eos_token_id = None
    ids = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in CHATS]
    ids = [p["input_ids"] if hasattr(p, "keys") else p for p in ids]
    return hf, ids


def test_default_model_fp32_greedy_matches_transformers(smollm2_fp32):
    hf, ids = smollm2_fp32
    llm = LLM(None, device="cuda", dtype="float32", num_gpu_blocks_override=256)
    outs = llm.generate(ids, greedy(NEW_TOKENS))
    for p, o in zip(ids, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, NEW_TOKENS)
    assert_no_leak(llm)


def test_default_model_bf16_logits_close_to_fp32(smollm2_fp32):
    """bf16 (the CUDA default) rounds differently, so greedy tokens may part
    after a while; the first step's logits must stay close to fp32's, and the
    argmax must agree wherever fp32's top two are clearly apart."""
    hf, ids = smollm2_fp32
    ours = load_model(None, device="cuda")
    assert ours.dtype == torch.bfloat16
    _, first = PagedRunner(ours).generate(ids, max_new_tokens=1)
    for p, logits in zip(ids, first):
        with torch.no_grad():
            ref = hf(torch.tensor([p], device="cuda")).logits[0, -1].float()
        logits = logits.float().to(ref.device)
        assert (logits - ref).abs().max() / ref.abs().max() < 0.05
        top2 = ref.topk(2).values
        if top2[0] - top2[1] > 1.0:
            assert logits.argmax() == ref.argmax()


def test_default_model_bf16_engine_serves_and_frees_blocks():
    llm = LLM(None, device="cuda", num_gpu_blocks_override=64, max_num_seqs=8)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True, logprobs=3),
              SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True),
              greedy(16)]
    texts = ["Once upon a time", "The capital of France is", "def add(a, b):"]
    first = llm.generate(texts, params)
    again = llm.generate(texts, params)
    for a, b in zip(first, again):  # seeded sampling is reproducible on the GPU too
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert [len(c.token_ids) for c in first[1].outputs] == [12, 12, 12]
    lp = first[0].outputs[0]
    assert len(lp.top_logprobs) == 20 and all(len(t) >= 3 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.logprobs)
    # An abort mid-generation returns every block.
    llm.engine.add_request("to-abort", "Tell me a long story.", greedy(200))
    for _ in range(5):
        llm.engine.step()
    llm.engine.abort("to-abort")
    assert_no_leak(llm)
