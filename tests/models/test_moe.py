"""Tiny random Qwen3-MoE and Mixtral models, saved as HF folders: our paged forward with the sparse
MoE block (models/layers/moe.py) must give transformers' logits and greedy tokens, also on batches
where most experts get no token, and a token's output must not depend on its batch."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

import transformers  # noqa: E402  (the reference implementation)
from pyserve.config import ModelConfig
from pyserve.models import load_model
from pyserve.models.layers.moe import SparseMoE
from pyserve.models.layers.weight import MissingWeightError
from tests.models.paged_runner import PagedRunner
from tests.models.reference import DEVICES, assert_first_logits_match, assert_greedy_matches
from tests.models.test_llama_hf import prompts

# initializer_range 0.1: at 0.2 (test_llama_hf's) the random experts' outputs reach ~65, and the fp32
# noise of the logits against float64 reaches 5e-5 for transformers' own and 2e-4 for ours on one
# Mixtral prompt (our MoE block alone is within 2x of transformers' fp32 one); at 0.1 both are ~1e-5.
COMMON = dict(vocab_size=512, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, initializer_range=0.1, rms_norm_eps=1e-5, tie_word_embeddings=False)
CASES = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, num_hidden_layers=2, intermediate_size=512, moe_intermediate_size=128, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True),
    # A dense MLP on layer 1 (mlp_only_layers), top-3 weights not renormalised.
    "qwen3_moe-dense-layer": lambda: transformers.Qwen3MoeConfig(
        **COMMON, num_hidden_layers=3, intermediate_size=384, moe_intermediate_size=96, num_experts=8,
        num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1]),
    # Mistral's attention (a window shorter than the longer prompts) with experts; always renormalised.
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, num_hidden_layers=2, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=12),
}
# The checkpoint names of one expert's up and down projections, per architecture.
EXPERT_NAMES = {"qwen3_moe": ("mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight"),
                "mixtral": ("block_sparse_moe.experts.{e}.w3.weight", "block_sparse_moe.experts.{e}.w2.weight")}


@pytest.fixture(scope="module", params=list(CASES))
def hf_model(request, tmp_path_factory):
    torch.manual_seed(0)
    # "eager" is transformers' own loop over experts (its default grouped_mm has no float64).
    model = transformers.AutoModelForCausalLM.from_config(CASES[request.param](), dtype=torch.float32,
                                                          experts_implementation="eager").eval()
    with torch.no_grad():  # random but non-unit norm weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1, 0.2)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder


def moe_layers(ours) -> list[tuple[int, SparseMoE]]:
    return [(i, layer.moe) for i, layer in enumerate(ours.layers) if layer.moe is not None]


def test_config_fields(hf_model):
    name, model, folder = hf_model
    cfg = load_model(folder, dtype="float32").cfg
    assert cfg.num_experts == 8 and cfg.num_experts_per_tok == model.config.num_experts_per_tok
    assert cfg.moe_layers == ((True, False, True) if name == "qwen3_moe-dense-layer" else (True, True))
    assert cfg.norm_topk_prob == (name != "qwen3_moe-dense-layer")
    assert cfg.sliding_layers == ((True, True) if name == "mixtral" else ())


@pytest.mark.parametrize("device", DEVICES)
def test_last_position_logits_match(hf_model, device):
    _, model, folder = hf_model
    assert_first_logits_match(model, load_model(folder, device=device, dtype="float32"), prompts())


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_tokens_match_generate(hf_model, device):
    _, model, folder = hf_model
    assert_greedy_matches(model, load_model(folder, device=device, dtype="float32"), prompts(), 32, chunk_size=5)


@pytest.mark.parametrize("tokens", [1, 2, 37])
def test_moe_block_matches_transformers_with_idle_experts(hf_model, tokens):
    """The MoE block alone against transformers' (float64) on batches of 1 and 2 tokens, where most of
    the 8 experts get none, and of 37, where (almost) every expert gets some."""
    _, model, folder = hf_model
    ours = load_model(folder, dtype="float32")
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(tokens))
    for i, moe in moe_layers(ours):
        _, ids = moe.route(x)
        used = len(set(ids.flatten().tolist()))
        assert used <= tokens * moe.top_k and (tokens > 2 or used < 8)
        reference = copy.deepcopy(model.model.layers[i].mlp).double()
        with torch.no_grad():
            ref = reference(x.double()[None])[0]
        torch.testing.assert_close(moe(x).double(), ref, atol=1e-4, rtol=1e-4)


def test_a_token_does_not_depend_on_its_batch(hf_model):
    """A prompt's first logits, run alone, are bit for bit those of the mixed, chunked batch; so are a
    token's MoE outputs alone and among 23."""
    _, _, folder = hf_model
    ours = load_model(folder, dtype="float32")
    _, together = PagedRunner(ours).generate(prompts(), max_new_tokens=1, chunk_size=7)
    for i in (0, 3, 5):  # 1, 17 and 75 tokens
        _, (alone,) = PagedRunner(ours).generate([prompts()[i]], max_new_tokens=1, chunk_size=7)
        assert torch.equal(alone, together[i])
    x = torch.randn(23, ours.cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    for _, moe in moe_layers(ours):
        rows = moe(x)
        for t in (0, 11, 22):
            assert torch.equal(moe(x[t: t + 1])[0], rows[t])


def test_transformers5_fused_experts_load_alike(hf_model, tmp_path):
    """Experts stored fused as transformers 5 holds them in memory (`mlp.experts.gate_up_proj`
    [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) fill the same slots as per-expert tensors."""
    name, _, folder = hf_model
    if not name.startswith("qwen3_moe"):
        pytest.skip("transformers names Mixtral's fused experts under mlp., not its checkpoints' block_sparse_moe.")
    weights = load_file(folder / "model.safetensors")
    for i in range(len(load_model(folder, dtype="float32").layers)):
        p = f"model.layers.{i}.mlp.experts"
        if f"{p}.0.gate_proj.weight" not in weights:
            continue  # a dense layer
        take = lambda part: [weights.pop(f"{p}.{e}.{part}.weight") for e in range(8)]  # noqa: E731
        gate, up, down = take("gate_proj"), take("up_proj"), take("down_proj")
        weights[f"{p}.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
        weights[f"{p}.down_proj"] = torch.stack(down)
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    _, fused = PagedRunner(load_model(tmp_path, dtype="float32")).generate(prompts(3), max_new_tokens=1)
    _, split = PagedRunner(load_model(folder, dtype="float32")).generate(prompts(3), max_new_tokens=1)
    for a, b in zip(fused, split):
        assert torch.equal(a, b)


def test_a_missing_expert_weight_is_named_as_the_checkpoint_names_it(hf_model, tmp_path):
    name, _, folder = hf_model
    up, down = (f"model.layers.0.{n}" for n in EXPERT_NAMES[name.split("-")[0]])
    for missing in (up.format(e=3), down.format(e=5)):
        weights = load_file(folder / "model.safetensors")
        del weights[missing]
        save_file(weights, tmp_path / "model.safetensors")
        (tmp_path / "config.json").write_text((folder / "config.json").read_text())
        with pytest.raises(MissingWeightError, match=rf"weight {missing.replace('.', '[.]')} is missing"):
            load_model(tmp_path, dtype="float32")


def test_qwen3_moe_sparse_layers_from_config():
    """decoder_sparse_step and mlp_only_layers as transformers' Qwen3MoeDecoderLayer reads them;
    `num_experts` as the Qwen3-MoE checkpoints spell it (transformers 5 writes num_local_experts)."""
    cfg = dict(model_type="qwen3_moe", vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=6,
               num_attention_heads=2, moe_intermediate_size=4, num_experts=4, num_experts_per_tok=2,
               decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True)
    m = ModelConfig.from_hf(cfg)
    assert m.moe_layers == (False, True, False, False, False, True)
    assert (m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size, m.norm_topk_prob) == (4, 2, 4, True)
    assert m.qk_norm and m.sliding_window is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_matches_cpu(hf_model):
    """The same grouped experts on CUDA (F.linear per expert), fp32 on both devices."""
    _, _, folder = hf_model
    _, cpu = PagedRunner(load_model(folder, dtype="float32")).generate(prompts(), max_new_tokens=1)
    _, gpu = PagedRunner(load_model(folder, device="cuda", dtype="float32")).generate(prompts(), max_new_tokens=1)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
