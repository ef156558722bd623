"""What a GGUF file says that changes the computation is either applied or refused by name: every
metadata key and tensor of a tiny llama file (written with gguf-py, llama.cpp's own writer)."""

import gguf
import numpy as np
import pytest

from pyserve.config import UnsupportedModelError
from pyserve.loader import read_gguf
from pyserve.loader.gguf_model import gguf_model_config
from pyserve.loader.gguf_types import GGUFError
from pyserve.models import load_model

HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB, FFN = 32, 4, 2, 1, 64, 48
HEAD_DIM = HIDDEN // HEADS


def _tensors(rng) -> dict[str, np.ndarray]:
    """llama.cpp's names and numpy (reversed-GGUF) shapes of a llama model."""
    t = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,), "output.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        t |= {f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
              f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN), f"blk.{i}.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
              f"blk.{i}.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
              f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN), f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
              f"blk.{i}.ffn_up.weight": (FFN, HIDDEN), f"blk.{i}.ffn_down.weight": (HIDDEN, FFN)}
    return {name: rng.standard_normal(shape).astype(np.float32) * 0.1 for name, shape in t.items()}


def write_llama(path, extra_kv: dict | None = None, extra_tensors: dict | None = None, drop: tuple = ()):
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    for key, value in (extra_kv or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, value)
    for name, arr in (_tensors(rng) | (extra_tensors or {})).items():
        if name not in drop:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def config_of(path):
    with read_gguf(path) as f:
        return gguf_model_config(f)


def test_plain_file_reads_and_loads(tmp_path):
    cfg = config_of(write_llama(tmp_path / "m.gguf"))
    assert (cfg.num_layers, cfg.head_dim, cfg.rope.type, cfg.rope.freq_factors) == (LAYERS, HEAD_DIM, "default", None)
    load_model(tmp_path / "m.gguf", dtype="float32")


@pytest.mark.parametrize("kv, want", [
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, ("linear", 4.0)),
    ({"llama.rope.scale_linear": 2.0}, ("linear", 2.0)),  # the key older converters wrote
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 1.0}, ("default", 1.0)),
    ({"llama.rope.scaling.type": "none", "llama.rope.scaling.finetuned": True}, ("default", 1.0)),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
      "llama.rope.scaling.original_context_length": 64, "llama.rope.scaling.yarn_beta_fast": 16.0,
      "llama.rope.scaling.yarn_attn_factor": 0.5}, ("yarn", 4.0)),
])
def test_rope_scaling_metadata_is_applied(tmp_path, kv, want):
    rope = config_of(write_llama(tmp_path / "m.gguf", kv)).rope
    assert (rope.type, rope.factor) == want
    if rope.type == "yarn":
        assert (rope.original_max_position_embeddings, rope.beta_fast, rope.beta_slow, rope.attention_factor) == (
            64, 16.0, 1.0, 0.5)


def test_rope_freqs_tensor_becomes_frequency_factors(tmp_path):
    factors = np.linspace(1, 8, HEAD_DIM // 2).astype(np.float32)
    path = write_llama(tmp_path / "m.gguf", extra_tensors={"rope_freqs.weight": factors})
    assert config_of(path).rope.freq_factors == pytest.approx(tuple(factors.tolist()))
    load_model(path, dtype="float32")  # the factors are not a weight the model is missing or left over with


@pytest.mark.parametrize("kv, match", [
    ({"llama.rope.scaling.type": "longrope"}, r"rope scaling 'longrope' \(llama.rope.scaling.type\)"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}, "original_context_length"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
      "llama.rope.scaling.original_context_length": 64, "llama.rope.scaling.yarn_ext_factor": 0.5}, "yarn_ext_factor"),
    ({"llama.rope.scaling.yarn_log_multiplier": 0.1}, "llama.rope.scaling.yarn_log_multiplier"),
    ({"llama.expert_count": 8, "llama.expert_used_count": 2}, "llama.expert_count = 8"),
    ({"llama.attention.causal": False}, "llama.attention.causal"),
    ({"llama.logit_scale": 0.5}, "llama.logit_scale"),
    ({"llama.attention.value_length": 16}, "value heads of 16"),
    ({"llama.rope.dimension_count": 4}, "partial rotary"),
    ({"llama.some_future_key": 1}, "'llama.some_future_key' is not understood"),
    ({"adapter.type": "lora"}, "'adapter.type' is not understood"),
    ({"split.count": 3}, r"split GGUF files \(3 parts\)"),
])
def test_what_we_cannot_reproduce_is_refused_by_name(tmp_path, kv, match):
    path = write_llama(tmp_path / "m.gguf", kv)
    with pytest.raises((UnsupportedModelError, GGUFError), match=match):
        load_model(path, dtype="float32")


@pytest.mark.parametrize("kv", [
    {"llama.expert_count": 0, "llama.expert_used_count": 0},
    {"llama.attention.causal": True, "llama.rope.scaling.attn_factor": 1.0},
    {"general.name": "x", "quantize.imatrix.dataset": "wiki", "split.count": 1},
])
def test_switched_off_features_and_descriptive_keys_are_accepted(tmp_path, kv):
    config_of(write_llama(tmp_path / "m.gguf", kv))


def test_unknown_tensor_is_refused_by_name(tmp_path):
    extra = {"blk.0.ffn_down.bias": np.zeros(HIDDEN, np.float32),
             "blk.0.ffn_gate_inp.weight": np.zeros((4, HIDDEN), np.float32)}
    path = write_llama(tmp_path / "m.gguf", extra_tensors=extra)
    with pytest.raises(UnsupportedModelError, match=r"blk.0.ffn_down.bias, blk.0.ffn_gate_inp.weight is not used"):
        config_of(path)


def test_wrong_number_of_rope_factors(tmp_path):
    path = write_llama(tmp_path / "m.gguf", extra_tensors={"rope_freqs.weight": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="3 rope frequency factors for head_dim 8"):
        load_model(path, dtype="float32")


def test_tokenizer_keys_are_read_ignored_with_reason_or_refused(tmp_path):
    from pyserve.loader import load_tokenizer

    kv = {"tokenizer.ggml.fim_pre_token_id": 1, "tokenizer.chat_template.tool_use": "{{ x }}",
          "tokenizer.ggml.eom_token_id": 5, "tokenizer.ggml.eos_token_id": 4}
    cfg = config_of(write_llama(tmp_path / "a.gguf", kv))
    assert cfg.eos_token_ids == (4, 5)  # end of message stops generation, as in llama.cpp
    with pytest.raises(GGUFError, match="'tokenizer.ggml.some_new_normalizer' is not understood"):
        load_tokenizer(write_llama(tmp_path / "b.gguf", {"tokenizer.ggml.some_new_normalizer": True}),
                       use_cache=False)


@pytest.mark.parametrize("kv, want", [
    ({"llama.attention.sliding_window": 128}, (128, (True,))),  # no pattern: every layer (Mistral)
    ({"llama.attention.sliding_window": 0}, (None, ())),
    ({}, (None, ())),
])
def test_sliding_window_is_read(tmp_path, kv, want):
    cfg = config_of(write_llama(tmp_path / "m.gguf", kv))
    assert (cfg.sliding_window, cfg.sliding_layers) == want


def test_sliding_window_pattern_marks_layers(tmp_path):
    path = tmp_path / "m.gguf"
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch="llama")
    for add, value in [(w.add_block_count, LAYERS), (w.add_context_length, 256), (w.add_embedding_length, HIDDEN),
                       (w.add_feed_forward_length, FFN), (w.add_head_count, HEADS), (w.add_head_count_kv, KV_HEADS),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_sliding_window, 64)]:
        add(value)
    w.add_sliding_window_pattern([True] * LAYERS)
    for name, arr in _tensors(rng).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = config_of(path)
    assert (cfg.sliding_window, cfg.sliding_layers, cfg.layer_window(0)) == (64, (True,), 64)
