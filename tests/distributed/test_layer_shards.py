"""Each sharded layer against the unsharded one, on real tensor-parallel groups (separate processes, the
shared-memory transport): column-parallel q/k/v and gate/up give exactly their rows of the whole layer's
output, row-parallel o/down summed over ranks give the whole output (fp32 rounding apart), the
vocab-parallel embedding and LM head give the whole one's rows and logits; then whole-model logits."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.ranks import run_ranks
from tests.distributed.tiny_models import make_tiny_llama

CASES = {  # name: (model maker kwargs, ranks)
    "llama-tp2": (dict(heads=4, kv_heads=2), 2),
    "kv-replicated-tp2": (dict(heads=4, kv_heads=1), 2),  # one KV head held by both ranks
    "kv-replicated-tp4": (dict(heads=4, kv_heads=2), 4),  # 2 KV heads over 4 ranks: each held twice
    "biases-tied-tp2": (dict(heads=4, kv_heads=2, biases=True, tied=True), 2),  # row-parallel bias once
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {name: make_tiny_llama(tmp_path_factory.mktemp(name), **kw) for name, (kw, _) in CASES.items()}


def _check_layers(results: list[dict[str, float]], exact_columns: bool = True) -> None:
    for rank, res in enumerate(results):
        for name, diff in res.items():
            if name == "lm_head_none":
                assert diff == 0.0, f"rank {rank}: a rank other than 0 got logits"
            elif name.startswith(("qkv_proj", "gate_up_proj", "embedding", "lm_head")) and exact_columns:
                assert diff == 0.0, f"rank {rank} {name}: {diff}"  # the same rows of the same matmul
            else:
                assert diff < 1e-4, f"rank {rank} {name}: {diff}"  # a sum in another order


@pytest.mark.parametrize("case", list(CASES))
def test_layers_match_the_whole_layer(tiny, case):
    _check_layers(run_ranks(CASES[case][1], "tests.distributed.shard_checks:layers", str(tiny[case])))


def _assert_logits_close(results) -> None:
    """Within 1e-4 (absolute, plus 1e-4 relative: the tolerance the architecture tests hold our model to
    against transformers), every position's logits; the other ranks get none."""
    (sharded, whole), *others = results
    torch.testing.assert_close(sharded, whole, atol=1e-4, rtol=1e-4)
    assert all(o is None for o in others)


@pytest.mark.parametrize("case", ["llama-tp2", "kv-replicated-tp2", "biases-tied-tp2"])
def test_model_logits_within_1e4(tiny, case):
    _assert_logits_close(run_ranks(CASES[case][1], "tests.distributed.shard_checks:logits", str(tiny[case])))


def test_default_model_quantized_layers_tp3():
    """SmolLM2's Q4_1 blocks, sharded without dequantizing: rows split between whole blocks and
    o/down's columns at block boundaries (192 and 512 values: 6 and 16 blocks), and the Q8_0 embedding
    (and the LM head tied to it) by vocabulary range."""
    _check_layers(run_ranks(3, "tests.distributed.shard_checks:layers", None))


def test_default_model_fp32_logits_tp3():
    """9 query / 3 KV heads (no split in 2): TP=3, dequantized to fp32, logits within 1e-4."""
    _assert_logits_close(run_ranks(3, "tests.distributed.shard_checks:logits", None, "none", [23, 5, 40]))


def test_gloo_transport_gives_the_same_layers(tiny):
    """The torch.distributed path (what torchrun-started ranks use) on the same checks."""
    _check_layers(run_ranks(2, "tests.distributed.shard_checks:layers", str(tiny["llama-tp2"]), transport="gloo"))
