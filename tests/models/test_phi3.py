"""Phi-3 / Phi-3.5 from HF folders against transformers: fused qkv_proj and gate_up_proj in the
checkpoint, a sliding window on every layer, and longrope scaling with its short factors (the
served context within the original one) and its long factors (beyond it)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers  # the reference implementation

from pyserve.models import load_model
from tests.models.reference import DEVICES, assert_first_logits_match, assert_greedy_matches

HALF_HEAD = 32  # head_dim 64
ORIGINAL = 128  # the longrope models' original context
COMMON = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(HALF_HEAD)],
            "long_factor": [1.5 + 0.4 * i for i in range(HALF_HEAD)]}
CASES = {
    # name: (config, served context, prompt lengths)
    "phi3-window": (dict(sliding_window=12), None, (1, 5, 17, 40, 75)),
    # Prompts and outputs within the original context, served within it: the short factors (and
    # the attention factor of the 512 / 128 stretch), as transformers uses them there.
    "phi3-longrope-short": (dict(rope_scaling=LONGROPE, original_max_position_embeddings=ORIGINAL), ORIGINAL,
                            (1, 5, 17, 40, 75)),
    # Served at 512: the long factors, which transformers uses once a sequence passes 128 tokens.
    "phi3-longrope-long": (dict(rope_scaling=LONGROPE, original_max_position_embeddings=ORIGINAL, sliding_window=100),
                           None, (129, 200)),
}


@pytest.fixture(scope="module", params=list(CASES))
def phi3(request, tmp_path_factory):
    extra, served, lengths = CASES[request.param]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Phi3Config(**COMMON, **extra),
                                                          dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1, 0.2)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    g = torch.Generator().manual_seed(42)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]
    return model, folder, served, prompts


@pytest.mark.parametrize("device", DEVICES)
def test_last_position_logits_match(phi3, device):
    model, folder, served, prompts = phi3
    assert_first_logits_match(model, load_model(folder, device=device, dtype="float32", max_positions=served), prompts)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_tokens_match_generate(phi3, device):
    model, folder, served, prompts = phi3
    ours = load_model(folder, device=device, dtype="float32", max_positions=served)
    assert_greedy_matches(model, ours, prompts, 24, chunk_size=7)


def test_the_checkpoint_keeps_qkv_and_gate_up_fused(phi3, tmp_path):
    """Nothing to pack: the fused tensors fill the layers whole, and one missing is named."""
    from safetensors.torch import load_file, save_file

    from pyserve.models.layers.weight import MissingWeightError

    model = phi3[0]
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert "model.layers.0.self_attn.qkv_proj.weight" in weights and "model.layers.0.mlp.gate_up_proj.weight" in weights
    del weights["model.layers.1.mlp.gate_up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(MissingWeightError, match=r"model.layers.1.mlp.gate_up_proj.weight is missing"):
        load_model(tmp_path, dtype="float32")
