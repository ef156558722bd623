"""The embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF): pyserve's
loader and paged forward against transformers' own GGUF loader, on the weights dequantized to fp32
as transformers reads them (quantization="none"; the quantized kernels' path is compared with this
one in tests/models/test_quantized.py)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
import transformers

from pyserve.loader import default_gguf_path
from pyserve.models import load_model
from tests.models.paged_runner import PagedRunner

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain what a hash map is in one paragraph."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish and German."}],
    [{"role": "user", "content": "def fib(n):"}],
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def reference():
    path = Path(default_gguf_path())
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    # Run all NEW_TOKENS, past EOS, like our runner does.
    model.generation_config.eos_token_id = None
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in CHATS]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
    expected = []
    with torch.no_grad():
        for p in prompts:
            # An explicit mask: the pad id (2) is also <|im_end|>, which chat
            # prompts contain, and must not be masked out as padding.
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=2)
            expected.append(out[0, len(p):].tolist())
    return model, prompts, expected


@pytest.fixture(scope="module")
def ours():
    return load_model(None, dtype="float32", quantization="none")


def test_greedy_matches_transformers_one_at_a_time(reference, ours):
    _, prompts, expected = reference
    runner = PagedRunner(ours, block_size=16, num_blocks=512)
    for i, (p, want) in enumerate(zip(prompts, expected)):
        got, _ = runner.generate([p], max_new_tokens=NEW_TOKENS, chunk_size=16)
        assert got[0] == want, f"prompt {i}"


def test_greedy_matches_transformers_batched(reference, ours):
    _, prompts, expected = reference
    runner = PagedRunner(ours, block_size=16, num_blocks=512)
    got, first_logits = runner.generate(prompts, max_new_tokens=NEW_TOKENS, chunk_size=9, start_every=3)
    assert got == expected
    model = reference[0]
    with torch.no_grad():
        ref = model(torch.tensor([prompts[0]])).logits[0, -1]
    torch.testing.assert_close(first_logits[0], ref, atol=2e-3, rtol=1e-3)


def test_hf_folder_and_gguf_give_the_same_logits(reference, ours, tmp_path):
    model, prompts, _ = reference
    # transformers' own conversion of the GGUF weights to the HF layout,
    # written as a plain HF folder (save_pretrained refuses GGUF-loaded models).
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "model.safetensors")
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp_path / "config.json").write_text(__import__("json").dumps(config))
    from_hf = load_model(tmp_path, dtype="float32")
    _, a = PagedRunner(ours).generate(prompts[:3], max_new_tokens=1)
    _, b = PagedRunner(from_hf).generate(prompts[:3], max_new_tokens=1)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
