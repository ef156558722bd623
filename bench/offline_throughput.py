"""Offline throughput: pyserve `LLM.generate` vs transformers `generate`.

The default model (SmolLM2-135M-Instruct: its Q4_1/Q8_0 blocks on our quantized kernels, or with
--quantization none dequantized to fp32) on the CPU, the same 64 prompts for both, 128 new tokens each (EOS ignored, greedy),
in the same run. transformers gets the whole batch at once with left padding
and its KV cache; pyserve gets the same token ids. Prints output tokens per
second for both, their ratio, and a JSON line.

    python bench/offline_throughput.py [--num-prompts 64] [--max-tokens 128] [--skip-transformers] [--quantization none]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

SUBJECTS = ["the ocean", "a lighthouse", "machine learning", "the Roman empire", "coffee", "a small robot",
            "mountains", "jazz music", "a city at night", "quantum physics", "gardening", "the moon"]
TASKS = ["Write a short poem about {}.", "Explain {} to a child.", "List five facts about {}.",
         "Tell a story that involves {}.", "What are the pros and cons of {}?", "Describe {} in detail."]


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(TASKS).format(rng.choice(SUBJECTS)) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--quantization", default=None, choices=("none",),
                    help="none: pyserve runs the GGUF dequantized to fp32 (default: its own block formats)")
    a = ap.parse_args()

    from pyserve.llm import LLM
    from pyserve.sampling_params import SamplingParams

    llm = LLM(None, max_num_seqs=a.num_prompts, kv_cache_memory=2.0, quantization=a.quantization)
    tok = llm.tokenizer
    chats = [[{"role": "user", "content": p}] for p in make_prompts(a.num_prompts)]
    from pyserve.engine.chat_template import render_chat

    ids = [tok.encode(render_chat(tok.chat_template, c), add_special_tokens=False) for c in chats]
    params = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True)
    llm.generate(ids[:2], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    t = time.perf_counter()
    outs = llm.generate(ids, params)
    ours_s = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {"bench": "offline_throughput", "quantization": a.quantization or "gguf", "num_prompts": a.num_prompts,
              "max_tokens": a.max_tokens,
              "threads": torch.get_num_threads(), "pyserve_s": ours_s, "pyserve_tok_s": n_out / ours_s}
    print(f"pyserve LLM.generate:       {n_out} tokens in {ours_s:.2f} s = {n_out / ours_s:.1f} tok/s")

    if not a.skip_transformers:
        import transformers

        from pyserve.loader import default_gguf_path

        path = default_gguf_path()
        model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                                  dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        width = max(len(i) for i in ids)
        batch = torch.full((len(ids), width), 2, dtype=torch.long)  # left padding
        mask = torch.zeros_like(batch)
        for r, i in enumerate(ids):
            batch[r, width - len(i):] = torch.tensor(i)
            mask[r, width - len(i):] = 1
        with torch.no_grad():
            model.generate(batch[:2], attention_mask=mask[:2], max_new_tokens=4, do_sample=False, pad_token_id=2)
            t = time.perf_counter()
            out = model.generate(batch, attention_mask=mask, max_new_tokens=a.max_tokens, do_sample=False,
                                 pad_token_id=2)
            hf_s = time.perf_counter() - t
        hf_tokens = (out.shape[1] - width) * len(ids)
        result.update(transformers_s=hf_s, transformers_tok_s=hf_tokens / hf_s,
                      ratio=(n_out / ours_s) / (hf_tokens / hf_s))
        print(f"transformers generate:      {hf_tokens} tokens in {hf_s:.2f} s = {hf_tokens / hf_s:.1f} tok/s")
        print(f"pyserve / transformers:     {result['ratio']:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
