"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence as Seq

from pyserve.config import EngineConfig
from pyserve.engine.chat_template import render_chat
from pyserve.engine.llm_engine import LLMEngine
from pyserve.outputs import RequestOutput
from pyserve.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | Path | None = None, **engine_args):
        """model: an HF folder, a .gguf file, or None for the embedded default
        model. engine_args: fields of EngineConfig (device, dtype, max_model_len, tensor_parallel_size, ...).
        With tensor_parallel_size > 1 the other ranks run as child processes until `close()` (or the end
        of a `with` block, or of this process)."""
        self.engine = LLMEngine(model, EngineConfig(**engine_args))
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """One output per prompt, in order. A prompt is text or a list of token ids. A request that
        fails inside the engine comes back finished with finish_reason "error" and `error` set; the
        others are unaffected."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"params: got {len(params_list)} for {len(prompts)} prompts")
        order = []
        try:
            for prompt, p in zip(prompts, params_list):
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(rid, prompt, p)
                order.append(rid)
        except BaseException:  # a bad prompt: none of this call's requests stay behind in the engine
            for rid in order:
                self.engine.abort(rid)
            raise
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in order]

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template (or `chat_template`) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.tokenizer
        template = chat_template or tok.chat_template
        bos = tok.token(tok.bos_token_id) or ""
        eos = tok.token(tok.eos_token_id) or ""
        prompts = []
        for conv in conversations:
            text = render_chat(template, conv, add_generation_prompt, bos_token=bos, eos_token=eos)
            prompts.append(tok.encode(text, add_special_tokens=False))
        return self.generate(prompts, params)
