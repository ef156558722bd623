"""Our paged forward against transformers' model on the same weights: the two comparisons every
architecture test makes."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.models.paged_runner import PagedRunner

# The architecture tests run on the CPU, and on CUDA when a GPU is there (weights in fp32 on both).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs an NVIDIA GPU"))]


def assert_first_logits_match(reference_model, ours, prompts: list[list[int]], **runner) -> None:
    """Last-position logits within 1e-4 of transformers run in float64 (its own fp32 is up to ~1e-4
    off on these models, as far as ours, so fp32 against fp32 would spend the tolerance twice)."""
    _, first_logits = PagedRunner(ours).generate(prompts, max_new_tokens=1, **runner)
    reference = copy.deepcopy(reference_model).double()
    for p, logits in zip(prompts, first_logits):
        with torch.no_grad():
            ref = reference(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(logits.double(), ref, atol=1e-4, rtol=1e-4)


def assert_greedy_matches(reference_model, ours, prompts: list[list[int]], max_new_tokens: int, **runner) -> None:
    """Greedy tokens identical to transformers' generate, through the paged runner (block size 8)."""
    new, _ = PagedRunner(ours, block_size=8).generate(prompts, max_new_tokens=max_new_tokens, **runner)
    # Our runner never stops at EOS; neither may the reference (min_new_tokens would instead mask EOS
    # out and change the argmax).
    reference_model.generation_config.eos_token_id = None
    for p, got in zip(prompts, new):
        with torch.no_grad():
            ref = reference_model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=0)[0, len(p):].tolist()
        assert got == ref
