"""Tiny random HF models for the tensor-parallel tests, each with a tokenizer (tests/server/tiny_qwen.py's
byte-level BPE and Qwen3's chat template) so that the engine and the server can load them."""

from __future__ import annotations

from pathlib import Path

from tests.server.tiny_qwen import make_tiny_qwen


def make_tiny_llama(folder: Path, *, heads: int = 4, kv_heads: int = 2, tied: bool = False, biases: bool = False,
                    layers: int = 2, hidden: int = 128, intermediate: int = 192, seed: int = 0) -> Path:
    """A Llama whose heads split over 2 ranks (4 query / 2 KV heads by default; kv_heads=1 replicates)."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    make_tiny_qwen(folder)  # the tokenizer files (its model files are replaced below)
    vocab = transformers.AutoConfig.from_pretrained(folder).vocab_size
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=1024, initializer_range=0.2, rms_norm_eps=1e-5,
                                   tie_word_embeddings=tied, attention_bias=biases, mlp_bias=biases,
                                   eos_token_id=transformers.AutoConfig.from_pretrained(folder).eos_token_id)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder
