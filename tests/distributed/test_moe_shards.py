"""Tensor-parallel experts (vLLM's "TP experts"): every rank holds every expert's share of the
intermediate dimension, the router whole, and one all-reduce sums the MoE block's partial outputs.

In process: the experts' stacks keep the right slice of the checkpoint's tensors in each of the three
forms a checkpoint holds them (per expert, stacked per projection as GGUF, fused as transformers 5),
checked against the full shapes. Across real ranks (run_ranks): a tiny Qwen3-MoE (a dense layer
among the MoE ones), the same with transformers-5 fused experts, and a tiny Mixtral, each loaded
sharded and whole in every rank process: every MoE block's output, and a prefill's logits on rank 0,
agree with the whole model's."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

import transformers
from pyserve.config import UnsupportedModelError
from pyserve.distributed.state import SingleRank, using
from pyserve.models.layers.moe import Experts
from pyserve.models.layers.weight import MissingWeightError
from tests.distributed.ranks import run_ranks

E, H, I = 4, 16, 8  # experts, hidden, intermediate (the checkpoint's) for the in-process tests


class Rank:
    """A rank of a group that is never asked to communicate (building and loading only)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def all_reduce(self, x):
        raise AssertionError("no collective while loading")


def checkpoint():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g))


def fill(experts: Experts, form: str, gate, up, down) -> None:
    slots = experts.weights()
    if form == "per expert":  # HF: experts.{e}.gate_proj.weight [I, H], ..., down [H, I]
        for e in range(E):
            slots[f"{e}.gate_up_proj.weight"].load(f"experts.{e}.gate_proj.weight", gate[e], "gate")
            slots[f"{e}.gate_up_proj.weight"].load(f"experts.{e}.up_proj.weight", up[e], "up")
            slots[f"{e}.down_proj.weight"].load(f"experts.{e}.down_proj.weight", down[e])
    elif form == "stacked":  # GGUF: ffn_gate_exps [E, I, H], ...
        slots["gate_up_proj"].load("experts.gate_proj", gate, "gate")
        slots["gate_up_proj"].load("experts.up_proj", up, "up")
        slots["down_proj"].load("experts.down_proj", down)
    else:  # transformers 5: gate_up_proj [E, 2I, H], down_proj [E, H, I]
        slots["gate_up_proj"].load("experts.gate_up_proj", torch.cat([gate, up], dim=1))
        slots["down_proj"].load("experts.down_proj", down)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("form", ["per expert", "stacked", "fused"])
def test_each_rank_keeps_its_slice_of_every_expert(form, size):
    gate, up, down = checkpoint()
    for rank in range(size):
        with using(Rank(rank, size)):
            experts = Experts(E, H, I, dtype=torch.float32, device=torch.device("cpu"))
        fill(experts, form, gate, up, down)
        rows = slice(rank * I // size, (rank + 1) * I // size)
        assert experts.intermediate_size == I // size
        assert torch.equal(experts.gate_up.data, torch.cat([gate[:, rows], up[:, rows]], dim=1))
        assert torch.equal(experts.down.data, down[:, :, rows])
        assert not experts.gate_up.missing_of(E - 1) and not experts.down.missing_of(0)


def test_single_rank_experts_are_unchanged():
    gate, up, down = checkpoint()
    with using(SingleRank()):
        experts = Experts(E, H, I, dtype=torch.float32, device=torch.device("cpu"))
    fill(experts, "stacked", gate, up, down)
    assert experts.intermediate_size == I
    assert torch.equal(experts.gate_up.data, torch.cat([gate, up], dim=1)) and torch.equal(experts.down.data, down)


@pytest.mark.parametrize("form", ["per expert", "stacked", "fused"])
def test_shapes_are_checked_against_the_full_checkpoint(form):
    """A checkpoint holding only a rank's slice is refused, naming the full shape the config implies."""
    gate, up, down = checkpoint()
    with using(Rank(1, 2)):
        experts = Experts(E, H, I, dtype=torch.float32, device=torch.device("cpu"))
    half = slice(0, I // 2)
    with pytest.raises(MissingWeightError, match=r"the config implies \((4, )?(8|16), 16\)"):
        fill(experts, form, gate[:, half], up[:, half], down[:, :, half])


def test_an_intermediate_size_that_does_not_split_is_refused():
    with using(Rank(0, 3)), pytest.raises(UnsupportedModelError, match=r"--tensor-parallel-size 3.*moe_intermediate_size 8"):
        Experts(E, H, I, dtype=torch.float32, device=torch.device("cpu"))


# ---- real ranks ------------------------------------------------------------------------------------

COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              max_position_embeddings=128, initializer_range=0.1, rms_norm_eps=1e-5, tie_word_embeddings=False)
MODELS = {
    # Layer 1 dense (mlp_only_layers), top-3 not renormalised.
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1]),
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
}
TOKEN_COUNTS = [1, 2, 37]  # most of the 8 experts idle, and (almost) all busy
PROMPT_LEN = 20


def save_fused(folder, to) -> None:
    """The checkpoint with each MoE layer's experts fused as transformers 5 holds them."""
    weights = load_file(folder / "model.safetensors")
    experts = sorted({k.split(".experts.")[0] for k in weights if ".experts.0.gate_proj." in k})
    for p in experts:
        take = lambda part: torch.stack([weights.pop(f"{p}.experts.{e}.{part}.weight") for e in range(8)])  # noqa: E731
        weights[f"{p}.experts.gate_up_proj"] = torch.cat([take("gate_proj"), take("up_proj")], dim=1)
        weights[f"{p}.experts.down_proj"] = take("down_proj")
    to.mkdir()
    save_file(weights, to / "model.safetensors")
    (to / "config.json").write_text((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_shards")
    for name, config in MODELS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config(), dtype=torch.float32)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    p.normal_(1, 0.2)
        model.save_pretrained(root / name)
    save_fused(root / "qwen3_moe", root / "qwen3_moe-fused")
    return [root / "qwen3_moe", root / "qwen3_moe-fused", root / "mixtral"]


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request, folders):
    size = request.param
    return size, run_ranks(size, "tests.distributed.moe_checks:sharded_against_whole", [str(f) for f in folders],
                           TOKEN_COUNTS, PROMPT_LEN)


def test_sharded_moe_blocks_match_the_whole(ranks, folders):
    size, results = ranks
    for rank, result in enumerate(results):
        for folder in folders:
            got = result[str(folder)]
            expected_layers = [0, 2] if folder.name.startswith("qwen3_moe") else [0, 1]
            assert got["moe_layers"] == expected_layers
            whole = 32  # moe_intermediate_size / Mixtral's intermediate_size
            assert got["whole_rows"] == [whole] * len(expected_layers)
            assert got["rows"] == [whole // size] * len(expected_layers)  # really sharded
            assert set(got["diffs"]) == {(i, t) for i in expected_layers for t in TOKEN_COUNTS}
            worst = max(got["diffs"].values())
            assert worst <= 1e-5, f"rank {rank} of {size}, {folder.name}: {got['diffs']}"


def test_sharded_logits_match_the_whole_on_rank_0(ranks, folders):
    size, results = ranks
    for folder in folders:
        first = results[0][str(folder)]
        assert first["logits"].shape == (1, 128)
        torch.testing.assert_close(first["logits"], first["whole_logits"], atol=1e-4, rtol=0)
        for rank in range(1, size):
            assert results[rank][str(folder)]["logits"] is None
            # Every rank's whole model agrees (the same checkpoint, the same prompt).
            assert torch.equal(results[rank][str(folder)]["whole_logits"], first["whole_logits"])
