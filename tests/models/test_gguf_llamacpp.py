"""GGUF files made by llama.cpp's own converter (convert_hf_to_gguf.py, tests/llamacpp.py) from tiny
random HF models: loaded by pyserve, they must give transformers' logits and greedy tokens on the HF
folder. Our GGUF writer shares our reading of the format; llama.cpp's converter does not, and it is
what made every GGUF file our users have."""

import math
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

import transformers  # noqa: E402  (the reference implementation)
from pyserve.loader import read_gguf
from pyserve.loader.gguf_model import IGNORED_TENSORS, ROPE_FREQS, ROPE_LONG, ROPE_SHORT
from pyserve.models import load_model
from tests.llamacpp import convert_hf_to_gguf, llama_cpp_dir
from tests.models.reference import DEVICES, assert_first_logits_match, assert_greedy_matches

# The converter wants a real tokenizer whose pre-tokenizer it knows, and transformers gives a Qwen2
# folder Qwen2's pre-tokenizer whatever its files say: the Llama models take the default model's
# vocabulary, the Qwen2 ones llama.cpp's Qwen2 vocabulary file.
VOCABS = {"llama": ("default", 49152), "qwen2": ("ggml-vocab-qwen2.gguf", 151936), "gemma": ("sentencepiece", 512)}
COMMON = dict(hidden_size=128, intermediate_size=192, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              initializer_range=0.2, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 128}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
LINEAR = {"rope_type": "linear", "factor": 2.0}

LLAMA = dict(COMMON, vocab_size=VOCABS["llama"][1])
GEMMA = {k: v for k, v in COMMON.items() if k != "num_hidden_layers"} | dict(vocab_size=VOCABS["gemma"][1], head_dim=64, query_pre_attn_scalar=64)
QWEN2 = dict(COMMON, vocab_size=VOCABS["qwen2"][1])
CASES = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA, tie_word_embeddings=False),
    "llama-tied": lambda: transformers.LlamaConfig(**LLAMA, tie_word_embeddings=True),
    # The issue's reproduction: Llama 3.1/3.2/3.3's rope scaling, which the converter stores only as
    # the rope_freqs tensor.
    "llama3-rope": lambda: transformers.LlamaConfig(**LLAMA, rope_theta=500000.0, rope_scaling=LLAMA3),
    "llama-linear-rope": lambda: transformers.LlamaConfig(**LLAMA, rope_scaling=LINEAR),
    "qwen2": lambda: transformers.Qwen2Config(**QWEN2, tie_word_embeddings=False),
    "qwen2-yarn": lambda: transformers.Qwen2Config(**QWEN2, tie_word_embeddings=True, rope_scaling=YARN),
    # Per-head q/k RMSNorm and a head_dim that is not hidden / heads.
    "qwen3": lambda: transformers.Qwen3Config(**QWEN2, head_dim=96, tie_word_embeddings=True),
    # Norms after attention and MLP, and over the whole q and k projections.
    "olmo2": lambda: transformers.Olmo2Config(**LLAMA, tie_word_embeddings=False),
    # Gemma's converter reads a SentencePiece tokenizer.model (a tiny one is trained below) and does
    # not write query_pre_attn_scalar or which layers are windowed: llama.cpp (and we) take head_dim
    # and Gemma's fixed patterns, so the configs here keep those defaults.
    "gemma2": lambda: transformers.Gemma2Config(**GEMMA, num_hidden_layers=4, sliding_window=12,
                                                attn_logit_softcapping=20.0, final_logit_softcapping=10.0),
    "gemma3": lambda: transformers.Gemma3TextConfig(**GEMMA, num_hidden_layers=6, sliding_window=12, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}}),
    # Mixtures of experts, 8 experts and top 2 (initializer_range 0.1, as tests/models/test_moe.py says
    # why). The converter stores no norm_topk_prob and llama.cpp always renormalises Qwen3-MoE's top-k
    # weights, so this model does too; Mixtral is written as "llama" with llama.expert_count.
    "qwen3moe": lambda: transformers.Qwen3MoeConfig(**QWEN2 | dict(initializer_range=0.1), moe_intermediate_size=64,
                                                    num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "mixtral": lambda: transformers.MixtralConfig(**LLAMA | dict(initializer_range=0.1), num_local_experts=8,
                                                  num_experts_per_tok=2),
    # Fused qkv_proj / gate_up_proj, a window on every layer (which llama.cpp itself leaves off; the
    # converter writes it, transformers applies it, and so do we), and longrope, which the converter
    # stores as two factor tensors and an attention factor. Served at the full 1024 tokens, past the
    # original 128: the long factors, which transformers uses for prompts past 128 (PROMPT_LENGTHS).
    "phi3-longrope": lambda: transformers.Phi3Config(
        **LLAMA | dict(vocab_size=VOCABS["gemma"][1], bos_token_id=2, eos_token_id=1, pad_token_id=0),
        sliding_window=48, original_max_position_embeddings=128, rope_scaling={
            "rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(16)],
            "long_factor": [1.5 + 0.4 * i for i in range(16)]}),
    # Not Mistral with a sliding window: the converter writes it as "llama" without the window (no
    # key says it), so neither llama.cpp nor anyone reading the file can apply it.
}


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory):
    """family -> a folder of HF tokenizer files, made by transformers' own GGUF reading (not ours)."""
    from pyserve.loader.gguf_weights import default_gguf_path

    made = {}

    def get(family: str):
        if family not in made and VOCABS[family][0] == "sentencepiece":
            made[family] = _train_sentencepiece(tmp_path_factory.mktemp(f"tokenizer-{family}"), VOCABS[family][1])
        if family not in made:
            source, size = VOCABS[family]
            path = default_gguf_path() if source == "default" else str(llama_cpp_dir() / "models" / source)
            tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
            assert len(tok) <= size
            made[family] = tmp_path_factory.mktemp(f"tokenizer-{family}")
            tok.save_pretrained(made[family])
        return made[family]

    return get


def _train_sentencepiece(folder, vocab_size: int):
    """A tiny SentencePiece BPE model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3)."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    syllables = ["ka", "to", "ri", "me", "su", "la", "ne", "po", "vi", "da", "ze", "qu", "th", "ing", "er"]
    lines = [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(12))
             for _ in range(3000)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
    return folder


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory, tokenizer_files):
    llama_cpp_dir()  # download llama.cpp's sources once, outside the converter's own error handling
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CASES[request.param](), dtype=torch.float32,
                                                          experts_implementation="eager").eval()  # MoE: float64 too
    with torch.no_grad():  # random but non-zero biases and norm weights (they start as 0 and 1)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.normal_(1, 0.2)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    family = ("qwen2" if request.param.startswith("qwen") else
              "gemma" if request.param.startswith(("gemma", "phi3")) else "llama")
    for f in tokenizer_files(family).iterdir():
        shutil.copy(f, folder / f.name)
    gguf = convert_hf_to_gguf(folder, folder / "model.gguf")
    return request.param, model, gguf


PROMPT_LENGTHS = {"phi3-longrope": (129, 200)}


def prompts(case: str):
    g = torch.Generator().manual_seed(42)
    return [torch.randint(0, VOCABS["gemma"][1], (n,), generator=g).tolist()
            for n in PROMPT_LENGTHS.get(case, (4, 17, 200))]


@pytest.mark.parametrize("device", DEVICES)
def test_last_position_logits_match_transformers(converted, device):
    name, model, gguf = converted
    assert_first_logits_match(model, load_model(gguf, device=device, dtype="float32"), prompts(name), chunk_size=64)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_tokens_match_transformers(converted, device):
    name, model, gguf = converted
    assert_greedy_matches(model, load_model(gguf, device=device, dtype="float32"), prompts(name), 24, chunk_size=64)


def test_every_tensor_is_read(converted):
    """What the converter wrote is either a weight we load or the rope factors; nothing is dropped."""
    name, model, gguf = converted
    with read_gguf(gguf) as f:
        names = set(f.tensors)
    assert not names & set(IGNORED_TENSORS)
    assert (ROPE_FREQS in names) == (name == "llama3-rope")
    assert ({ROPE_LONG, ROPE_SHORT} <= names) == (name == "phi3-longrope")
    assert ("output.weight" in names) == (not name.endswith(("tied", "yarn", "qwen3")) and "gemma" not in name)
    if name == "phi3-longrope":  # the long factors drive the outputs above; the short ones must be read too
        from pyserve.config import ModelConfig

        cfg, want = load_model(gguf, dtype="float32").cfg, ModelConfig.from_hf(model.config.to_dict())
        assert (cfg.rope.type, cfg.rope.factor, cfg.rope.original_max_position_embeddings) == ("longrope", 8.0, 128)
        assert cfg.rope.short_factor == pytest.approx(want.rope.short_factor)
        assert cfg.rope.long_factor == pytest.approx(want.rope.long_factor)
        assert cfg.rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(8) / math.log(128)))
        assert cfg.sliding_layers == want.sliding_layers == (True,) * 3
