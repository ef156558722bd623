"""A tiny random Qwen3 model as an HF folder, with Qwen3's real chat template (from llama.cpp's
sources, as tests/llamacpp.py caches them) and a byte-level BPE vocabulary that has Qwen's tool and
thinking tags as single tokens: enough for the server to render tools, tool calls, tool results and
thinking exactly as the real model's template does. Its words are random; what a grammar enforces is
not."""

from __future__ import annotations

import json
from pathlib import Path

from tests.llamacpp import chat_templates

CORPUS = ['{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
          "the quick brown fox jumps over the lazy dog", "hello world, hello server 0123456789",
          '[{"a": 1, "b": [true, false, null]}, "x"]']
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added but not special, as in Qwen's tokenizer: they stay in the decoded text for the parsers to see.
TAGS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"]


def qwen3_template() -> str:
    (path,) = [p for p in chat_templates() if p.name == "Qwen-Qwen3-0.6B.jinja"]
    return path.read_text()


def make_tiny_qwen(folder: Path) -> None:
    import torch
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
         "chat_template": qwen3_template()}))
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                   max_position_embeddings=2048, eos_token_id=tok.token_to_id("<|im_end|>"),
                                   tie_word_embeddings=True)
    transformers.Qwen3ForCausalLM(cfg).eval().save_pretrained(folder)
