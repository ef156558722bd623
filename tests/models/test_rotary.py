"""Our rotary frequencies and cos/sin scale against transformers' own rope initialisers, for every
scaling a config may ask for."""

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pyserve.config import RopeConfig, UnsupportedModelError
from pyserve.models.layers.rotary import rotary_frequencies

BASE = dict(hidden_size=512, num_attention_heads=8, max_position_embeddings=4096, rope_theta=500000.0)
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    "yarn-betas-attention": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512,
                             "beta_fast": 16, "beta_slow": 2, "attention_factor": 0.9},
    "yarn-mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                    "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
    "yarn-untruncated": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                         "truncate": False},
}


@pytest.mark.parametrize("name", list(SCALINGS))
def test_frequencies_and_scale_match_transformers(name):
    hf = transformers.LlamaConfig(**BASE, rope_scaling=SCALINGS[name])
    rope_type = hf.rope_parameters.get("rope_type", "default")
    want_freq, want_scale = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu") if rope_type != "default" else (
        1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)), 1.0)
    got_freq, got_scale = rotary_frequencies(64, RopeConfig.from_hf(hf.to_dict()))
    torch.testing.assert_close(got_freq, want_freq.float(), rtol=1e-6, atol=0)
    assert got_scale == pytest.approx(want_scale, rel=1e-7)


def test_llama_cpp_frequency_factors_divide():
    factors = tuple(float(i + 1) for i in range(32))
    plain, _ = rotary_frequencies(64, RopeConfig(theta=10000.0))
    scaled, _ = rotary_frequencies(64, RopeConfig(theta=10000.0, freq_factors=factors))
    torch.testing.assert_close(scaled, plain / torch.tensor(factors), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="3 rope frequency factors for head_dim 64"):
        rotary_frequencies(64, RopeConfig(freq_factors=(1.0, 1.0, 1.0)))


@pytest.mark.parametrize("scaling, match", [
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
     "longrope scaling needs short_factor, long_factor and original_max_position_embeddings"),
    ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic'"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "extrapolation_factor": 0.5},
     "extrapolation_factor"),
])
def test_unsupported_scalings_are_refused_by_name(scaling, match):
    with pytest.raises(UnsupportedModelError, match=match):
        RopeConfig.from_hf({"rope_theta": 10000.0, "rope_scaling": scaling, "max_position_embeddings": 128})


@pytest.mark.parametrize("served", [4096, 8192])
def test_longrope_matches_transformers_within_and_beyond_the_original_context(served):
    """Phi-3's short factors while the served context fits the original one, the long ones past it,
    and the attention factor of the max / original stretch either way."""
    hf = transformers.Phi3Config(hidden_size=512, num_attention_heads=8, max_position_embeddings=131072,
                                 original_max_position_embeddings=4096, rope_scaling={
                                     "rope_type": "longrope", "short_factor": [1.0 + 0.02 * i for i in range(32)],
                                     "long_factor": [1.0 + 0.5 * i for i in range(32)]})
    want_freq, want_scale = ROPE_INIT_FUNCTIONS["longrope"](hf, "cpu", seq_len=served)
    got_freq, got_scale = rotary_frequencies(64, RopeConfig.from_hf(hf.to_dict()), served)
    torch.testing.assert_close(got_freq, want_freq.float(), rtol=1e-6, atol=0)
    assert got_scale == pytest.approx(want_scale, rel=1e-7) and got_scale > 1.1
