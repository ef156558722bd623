"""Tiny random Llama / Qwen2 / Mistral models, saved as HF folders: our paged
forward must give transformers' logits and greedy tokens."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from pyserve.config import ModelConfig, UnsupportedModelError
from pyserve.loader.hf import ModelLoadError
from pyserve.models import load_model
from tests.models.reference import DEVICES, assert_first_logits_match, assert_greedy_matches

import transformers  # noqa: E402  (the reference implementation)

COMMON = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              initializer_range=0.2, rms_norm_eps=1e-5)


def make_config(arch: str):
    if arch == "llama":
        return transformers.LlamaConfig(**COMMON, tie_word_embeddings=False)
    if arch == "llama3-rope":
        return transformers.LlamaConfig(**COMMON, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}, rope_theta=500000.0)
    if arch == "llama-linear-rope":
        return transformers.LlamaConfig(**COMMON, rope_scaling={"rope_type": "linear", "factor": 3.0})
    if arch == "qwen2-yarn":
        return transformers.Qwen2Config(**COMMON, tie_word_embeddings=False, rope_scaling={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    if arch == "llama-tied":
        return transformers.LlamaConfig(**COMMON, tie_word_embeddings=True)
    if arch == "qwen2":
        return transformers.Qwen2Config(**COMMON, tie_word_embeddings=False)
    if arch == "qwen3":
        return transformers.Qwen3Config(**COMMON, head_dim=96, tie_word_embeddings=False)
    if arch == "llama-biases":  # attention_bias puts a bias on q/k/v and o, mlp_bias on gate/up/down
        return transformers.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True)
    if arch == "olmo2":
        return transformers.Olmo2Config(**COMMON, tie_word_embeddings=False)
    if arch == "mistral-window":  # every layer windowed; prompts and decodes run past the window
        return transformers.MistralConfig(**COMMON, sliding_window=12)
    if arch == "qwen2-window":  # layer 0 full, layer 1 windowed (max_window_layers)
        return transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=10, max_window_layers=1)
    if arch == "gemma2":  # alternating sliding/full layers, both soft-caps; window < the longer prompts
        return transformers.Gemma2Config(**GEMMA, sliding_window=12,
                                         attn_logit_softcapping=20.0, final_logit_softcapping=10.0)
    if arch == "gemma3":  # per-head q/k norms, a different rope on the sliding layers, linear on the full ones
        return transformers.Gemma3TextConfig(**GEMMA, sliding_window=12,
                                             layer_types=["sliding_attention", "full_attention"] * 2,
                                             rope_parameters={"sliding_attention": {"rope_type": "default",
                                                                                    "rope_theta": 10000.0},
                                                              "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                                 "rope_theta": 1000000.0}})
    if arch == "mistral":
        return transformers.MistralConfig(**COMMON, sliding_window=None)
    raise ValueError(arch)


GEMMA = dict(COMMON, num_hidden_layers=4, head_dim=64, query_pre_attn_scalar=48)
ARCHS = ["llama", "llama3-rope", "llama-linear-rope", "llama-tied", "qwen2", "qwen2-yarn", "qwen3", "llama-biases", "olmo2", "mistral",
         "mistral-window", "qwen2-window", "gemma2", "gemma3"]


@pytest.fixture(scope="module", params=ARCHS)
def hf_model(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = make_config(request.param)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # random but non-zero biases and norm weights (they start as 0 and 1)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.normal_(1, 0.2)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return model, folder


def prompts(n=6, vocab=512):
    g = torch.Generator().manual_seed(42)
    lengths = [1, 5, 16, 17, 40, 75][:n]
    return [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lengths]


@pytest.mark.parametrize("device", DEVICES)
def test_last_position_logits_match(hf_model, device):
    model, folder = hf_model
    assert_first_logits_match(model, load_model(folder, device=device, dtype="float32"), prompts())


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_tokens_match_generate(hf_model, device):
    model, folder = hf_model
    assert_greedy_matches(model, load_model(folder, device=device, dtype="float32"), prompts(), 32, chunk_size=5)


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*supported: llama, mistral, qwen2, qwen3, olmo2, gemma2, gemma3_text"):
        load_model(tmp_path)


def test_missing_and_corrupt_files(tmp_path, hf_model):
    with pytest.raises(ModelLoadError, match="config.json: file not found"):
        load_model(tmp_path)
    _, folder = hf_model
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors: cannot read safetensors"):
        load_model(tmp_path)


def test_a_weight_the_architecture_does_not_use_is_refused(tmp_path, hf_model):
    """transformers would warn and drop it; we refuse rather than run a different model."""
    from safetensors.torch import load_file, save_file

    from pyserve.models.loading import UnexpectedWeightError

    _, folder = hf_model
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.self_attn.sinks"] = torch.zeros(4)  # gpt-oss's attention sinks
    weights["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # known and ignored
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(UnexpectedWeightError, match=r"model.layers.0.self_attn.sinks is not used"):
        load_model(tmp_path, dtype="float32")
    del weights["model.layers.0.self_attn.sinks"]
    save_file(weights, tmp_path / "model.safetensors")
    load_model(tmp_path, dtype="float32")


def test_a_missing_weight_is_named_as_the_checkpoint_names_it(tmp_path, hf_model):
    from safetensors.torch import load_file, save_file

    from pyserve.models.layers.weight import MissingWeightError

    _, folder = hf_model
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]  # one shard of the fused qkv_proj
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(MissingWeightError, match=r"weight model.layers.1.self_attn.k_proj.weight is missing"):
        load_model(tmp_path, dtype="float32")


def test_every_activation_the_config_accepts_has_a_kernel():
    from pyserve.config import ACTIVATIONS as ACCEPTED
    from pyserve.models.layers.activation import ACTIVATIONS as KERNELS

    assert set(ACCEPTED) == set(KERNELS)
    with pytest.raises(UnsupportedModelError, match="unsupported hidden_act 'relu2'"):
        ModelConfig.from_hf({"model_type": "llama", "hidden_act": "relu2", "num_attention_heads": 4,
                           "hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 8, "intermediate_size": 8})
