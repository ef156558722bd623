"""The synchronous engine: requests in, one scheduled step at a time, outputs
out. The offline `LLM` and the server's async bridge both drive it.

A failure tied to one request (adding it, building its sampling inputs, scoring
its prompt, appending its token, detokenizing, building its output) fails that
request only: it finishes with finish_reason "error" and `RequestOutput.error`
says why, its blocks are freed, and every other request carries on. A failure
of the step as a whole (the forward pass, the sampling kernel) is raised."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pyserve.config import EngineConfig
from pyserve.engine.block_manager import BlockManager
from pyserve.engine.detokenizer import IncrementalDetokenizer
from pyserve.engine.kv_cache_dtype import resolve_kv_cache_dtype
from pyserve.engine.model_runner import ModelRunner, SampledToken, StepResult
from pyserve.engine.scheduler import Scheduler
from pyserve.engine.sequence import Sequence
from pyserve.engine.sequence_grammar import SequenceGrammar
from pyserve.errors import InvalidRequestError
from pyserve.models import LlamaModel, load_model
from pyserve.outputs import CompletionOutput, RequestOutput
from pyserve.sampling_params import SamplingParams

log = logging.getLogger("pyserve.engine")
CONTEXT_LENGTH = "context_length_exceeded"  # OpenAI's error code


class RequestFailedError(RuntimeError):
    """A request failed inside the engine; the engine and the other requests are fine. `param` names
    the request field at fault when the request itself was (its grammar), else None (a bug)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PreparedRequest(NamedTuple):
    """A request tokenized and validated off the engine thread, its grammar compiled."""

    text: str | None
    prompt_ids: list[int]
    params: SamplingParams
    grammar: Any = None  # the backend's compiled grammar, for params.structured_outputs


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    sent_text: list[int] = field(default_factory=list)  # chars of text already reported per sample
    sent_tokens: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks held by live sequences
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int  # computed (not served from the cache)
    generation_tokens: int
    grammar_mask_seconds: float = 0.0  # spent filling structured-output token masks
    num_steps: int = 0  # model steps run
    collective_seconds: float = 0.0  # rank 0's time in tensor-parallel collectives (all-reduce, gather)


def _guard(failed: dict[str, BaseException], request_id: str, fn, *args) -> bool:
    """Run fn(*args); if it raises, record the exception against the request and return False."""
    try:
        fn(*args)
        return True
    except Exception as e:  # noqa: BLE001 - one request's failure, not the engine's
        failed[request_id] = e
        return False


def _copy(items: list | None) -> list | None:
    return None if items is None else list(items)


def load_tokenizer_for(path: str | Path | None, eos_token_ids: tuple[int, ...]):
    from pyserve.loader import default_gguf_path, load_tokenizer
    from pyserve.loader.hf_tokenizer import load_hf_tokenizer

    path = Path(path or default_gguf_path())
    if path.is_dir():
        return load_hf_tokenizer(path, eos_token_ids)
    return load_tokenizer(str(path))


def kv_block_bytes(model: LlamaModel, block_size: int, kv_cache_dtype: torch.dtype | None = None) -> int:
    """Bytes of one block across all layers, K and V, in the cache's dtype (default: the model's), on
    this rank (its KV heads)."""
    cfg = model.cfg
    itemsize = (kv_cache_dtype or model.dtype).itemsize
    return 2 * cfg.num_layers * block_size * model.num_kv_heads * cfg.head_dim * itemsize


class LLMEngine:
    def __init__(self, model: str | Path | None = None, config: EngineConfig | None = None,
                 phase: Callable[[str], AbstractContextManager] | None = None):
        """phase: wraps each loading step ("weights", "tokenizer", "kv_cache"),
        e.g. to time it; the server's startup passes its phase timer."""
        self.config = config = config or EngineConfig()
        phase = phase or (lambda name: nullcontext())
        self.tp = self.local_ranks = None  # tensor parallelism: the group, and the ranks started here
        with phase("weights"):
            # Rotary tables (and Phi-3's choice of long or short rope factors) for the context we serve.
            self.model = self._load(model, config)
        try:
            self._build_rest(config, phase, model)
        except BaseException:
            self.close()  # the other tensor-parallel ranks, if any
            raise
        self.requests: dict[str, _Request] = {}
        self._grammar_backend = None  # built by the first request with structured outputs
        self._grammar_lock = threading.Lock()
        self._rng = random.Random(config.seed)
        self._next_seq_id = 0
        self._arrivals = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.num_steps = 0

    def _build_rest(self, config: EngineConfig, phase, model) -> None:
        """Everything after the weights: tokenizer, KV cache, scheduler, runner."""
        cfg = self.model.cfg
        with phase("tokenizer"):
            self.tokenizer = load_tokenizer_for(model, cfg.eos_token_ids)
        eos = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        with phase("kv_cache"):
            self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.model.device, self.model.dtype)
            self.num_blocks = self._num_blocks()
            self.block_manager = BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
            self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
            self.runner = ModelRunner(self.model, self.num_blocks, config.block_size, self.eos_token_ids,
                                      self.kv_cache_dtype)
        capacity = self.num_blocks * config.block_size
        log.info("KV cache: %d blocks of %d tokens = %d tokens in %s (--kv-cache-dtype %s); max concurrency at "
                 "%d tokens: %.1f", self.num_blocks, config.block_size, capacity,
                 str(self.kv_cache_dtype).removeprefix("torch."), config.kv_cache_dtype, self.max_model_len,
                 capacity / self.max_model_len)

    def _load(self, model: str | Path | None, config: EngineConfig):
        """This process's model: the whole of it, or rank 0's shard behind a ShardedModel once every rank
        has loaded its own (the phase then lasts as long as the slowest rank's)."""
        if config.tensor_parallel_size == 1:
            return load_model(model, device=config.device, dtype=config.dtype, max_positions=config.max_model_len,
                              quantization=config.quantization)
        from pyserve.distributed.executor import ShardedModel
        from pyserve.distributed.launch import start_rank0
        from pyserve.distributed.state import using

        self.tp, self.local_ranks = start_rank0(model, config)
        try:
            t = time.perf_counter()
            with using(self.tp):
                shard = load_model(model, device=self.tp.device, dtype=config.dtype,
                                   max_positions=config.max_model_len, quantization=config.quantization)
            self.rank0_report = {"weights": time.perf_counter() - t}
            self.tp.barrier()
        except BaseException:
            self.close()
            raise
        return ShardedModel(shard, self.tp)

    def rank_reports(self) -> list[dict] | None:
        """Under tensor parallelism, each rank's startup seconds by phase (rank order); else None."""
        if self.tp is None:
            return None
        return self.model.rank_reports({**self.rank0_report, **self.model.phase_seconds})

    def idle(self) -> None:
        """Called while no request runs: raises if the tensor-parallel group has lost a rank (one this
        process started, or one whose connection has closed)."""
        if self.local_ranks is not None:
            self.local_ranks.check()
        if self.tp is not None and self.tp.transport != "shm":
            self.model.ping()

    def close(self, graceful: bool = True) -> None:
        """Stop the other tensor-parallel ranks: told to (graceful), or killed where this process started
        them (a failed group). Nothing to do without tensor parallelism."""
        if self.tp is None:
            return
        model = getattr(self, "model", None)
        if graceful and model is not None and (self.local_ranks is None or self.local_ranks.failure is None):
            try:
                model.stop()
            except Exception:  # noqa: BLE001 - a group already broken: the ranks are killed below
                graceful = False
        if self.local_ranks is not None:
            self.local_ranks.stop() if graceful else self.local_ranks.kill()
        self.tp.close()
        self.tp = None

    def _num_blocks(self) -> int:
        c = self.config
        if c.num_gpu_blocks_override is not None:
            return c.num_gpu_blocks_override
        per_block = kv_block_bytes(self.model, c.block_size, self.kv_cache_dtype)
        if self.model.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.model.device)
            budget = total * c.gpu_memory_utilization - (total - free) - self._profile_activation_bytes()
        else:
            budget = c.kv_cache_memory * (1 << 30)
        blocks = int(budget // per_block)
        if blocks < 1:
            raise ValueError("not enough memory for a single KV cache block; raise --kv-cache-memory or "
                             "--gpu-memory-utilization")
        return blocks

    def _profile_activation_bytes(self) -> int:
        """Peak extra GPU memory of one forward at the largest batch."""
        from pyserve.engine.profile import profile_forward_peak

        return profile_forward_peak(self.model, self.config.max_num_batched_tokens, self.config.block_size)

    # ---- requests -------------------------------------------------------------------------------

    def grammar_backend(self):
        """The structured-output backend over this model's vocabulary, built once (any thread)."""
        with self._grammar_lock:
            if self._grammar_backend is None:
                from pyserve.structured import create_backend

                self._grammar_backend = create_backend(self.tokenizer, self.model.cfg.vocab_size,
                                                       self.eos_token_ids)
                self.runner.grammar_backend = self._grammar_backend
            return self._grammar_backend

    def prepare_request(self, prompt: str | list[int], params: SamplingParams | None = None) -> PreparedRequest:
        """Tokenize and validate without touching the engine's mutable state
        (safe from any thread). Raises InvalidRequestError naming what is wrong."""
        params = params or SamplingParams()
        keep = params.truncate_prompt_tokens
        if keep == -1:
            keep = self.max_model_len
        if keep is not None and keep > self.max_model_len:
            raise InvalidRequestError("truncate_prompt_tokens", f"truncate_prompt_tokens ({keep}) is greater than "
                                      f"the maximum context length ({self.max_model_len})")
        if isinstance(prompt, str):
            text, ids = prompt, self.encode(prompt, bounded=keep is None)
        else:
            text, ids = None, list(prompt)
        if keep is not None and len(ids) > keep:
            text, ids = None, ids[-keep:]  # the last k tokens (vLLM); the text no longer matches them
        vocab = self.model.cfg.vocab_size
        if not ids:
            raise InvalidRequestError("prompt", "prompt must not be empty")
        if len(ids) > self.max_model_len:  # before the per-id checks: a huge list costs seconds to walk
            raise InvalidRequestError("prompt", f"context_length_exceeded: the prompt has {len(ids)} tokens, more "
                                      f"than the maximum context length of {self.max_model_len}", CONTEXT_LENGTH)
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 or t >= vocab for t in ids):
            raise InvalidRequestError("prompt", f"prompt token ids must be integers in [0, {vocab})")
        params.validate_for_vocab(vocab)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        if len(ids) + max(max_tokens, 1) > self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"context_length_exceeded: the prompt has {len(ids)} tokens and max_tokens is "
                f"{max_tokens}, {len(ids) + max_tokens} in all, but the maximum context length is "
                f"{self.max_model_len}", CONTEXT_LENGTH)
        if self.block_manager.blocks_needed(len(ids) + max_tokens) > self.num_blocks:
            raise InvalidRequestError("prompt", f"the request needs {len(ids) + max_tokens} tokens of KV cache but the "
                                      f"whole cache holds {self.num_blocks * self.config.block_size}")
        grammar = None
        if params.structured_outputs is not None:
            from pyserve.structured import GrammarError

            try:
                grammar = self.grammar_backend().compile(params.structured_outputs)
            except GrammarError as e:
                raise InvalidRequestError(e.param, str(e)) from None
        return PreparedRequest(text, ids, params, grammar)

    def encode(self, text: str, add_special_tokens: bool = True, bounded: bool = True) -> list[int]:
        """Tokenize, refusing (ValueError) a text so long that it cannot fit the context whatever
        its tokens, without spending the seconds it would take to tokenize it (bounded=False: the
        caller truncates). The tokenizer releases the GIL (encode_batch does, encode does not), so
        that a server tokenizing on a worker thread keeps its event loop running."""
        limit = self.max_model_len * self.tokenizer.max_bytes_per_token
        if bounded and len(text) > limit:  # characters: a lower bound on its UTF-8 bytes
            raise InvalidRequestError("prompt", f"context_length_exceeded: the prompt has {len(text)} characters; "
                                      f"at most {self.tokenizer.max_bytes_per_token} bytes per token, that is more "
                                      f"than the maximum context length of {self.max_model_len} tokens",
                                      CONTEXT_LENGTH)
        return self.tokenizer.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    prepared: PreparedRequest | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids, params, grammar = prepared or self.prepare_request(prompt, params)
        # Everything that can fail is built before the engine's state changes: nothing to undo.
        seqs, detoks = [], []
        for i in range(params.n):
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
            if params.seed is not None and i > 0:
                seed = hash((params.seed, i)) & ((1 << 63) - 1)
            seq = Sequence(self._next_seq_id + i, request_id, i, ids, params, seed, self._arrivals + 1)
            if grammar is not None:
                seq.grammar = SequenceGrammar(self._grammar_backend.new_matcher(grammar),
                                              params.structured_outputs_after, params.structured_outputs.param)
            if i > 0:
                seq.fork_from = seqs[0]
            elif params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None]
            seqs.append(seq)
            detoks.append(IncrementalDetokenizer(self.tokenizer.tokenizer, ids, params.skip_special_tokens,
                                                 params.stop or [], params.include_stop_str_in_output))
        self._arrivals += 1
        self._next_seq_id += params.n
        for seq in seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = _Request(request_id, text, ids, params, seqs, detoks,
                                             [0] * params.n, [0] * params.n)

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        try:
            return self._output(req)
        except Exception as e:  # noqa: BLE001 - one request's failure, not the engine's
            return self._fail(request_id, e)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            prompt_part = max(0, min(seq.num_computed + n, len(seq.prompt_ids)) - seq.num_computed)
            self.prompt_tokens += prompt_part
        result: StepResult = self.runner.execute(batch)  # raises only for the step as a whole
        self.num_steps += 1
        failed: dict[str, BaseException] = {seq.request_id: e for seq, e in result.failed}
        touched: dict[str, _Request] = {}
        for seq in batch.seqs:
            if seq.request_id not in failed:
                _guard(failed, seq.request_id, self.block_manager.cache_full_blocks, seq)
        for s in result.sampled:
            rid = s.seq.request_id
            if rid not in failed and _guard(failed, rid, self._append, s):
                touched[rid] = self.requests[rid]
        outputs = []
        for rid, req in touched.items():
            if rid not in failed:
                _guard(failed, rid, lambda r: outputs.append(self._output(r)), req)
        for rid, e in failed.items():
            outputs.append(self._fail(rid, e))
        return outputs

    def _fail(self, request_id: str, error: BaseException) -> RequestOutput:
        """End a request that failed in the engine: every block back, finish_reason "error"."""
        invalid = isinstance(error, InvalidRequestError)
        if invalid:
            log.info("request %s refused in the engine: %s", request_id, error)
        else:
            log.error("request %s failed in the engine: %s: %s", request_id, type(error).__name__, error,
                      exc_info=error)
        req = self.requests.pop(request_id)
        outs = []
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = "error"
                self.scheduler.finish(seq)
            outs.append(CompletionOutput(index=seq.index, text="", token_ids=list(seq.output_ids),
                                         finish_reason="error"))
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, True, req.num_cached_tokens,
                             error=str(error) if invalid else f"{type(error).__name__}: {error}",
                             error_param=error.param if invalid else None)

    def _append(self, s: SampledToken) -> None:
        seq = s.seq
        req = self.requests[seq.request_id]
        p = seq.params
        if seq.grammar is not None:  # -1: the sampler's answer when the grammar allows no token at all
            seq.grammar.accept(s.token_id)
        seq.output_ids.append(s.token_id)
        seq.sampled_logprobs.append(s.logprob)
        if s.top_logprobs is not None:
            seq.logprobs.append(s.top_logprobs)
        self.generation_tokens += 1
        if seq.index == 0 and len(seq.output_ids) == 1:
            req.num_cached_tokens = seq.prefix_hit_tokens
        detok = req.detoks[seq.index]
        detok.push(s.token_id)
        n_out = len(seq.output_ids)
        reason, stop_reason = None, None
        # (min_tokens already kept EOS and stop tokens from being sampled.)
        if not p.ignore_eos and s.token_id in self.eos_token_ids:
            reason = "stop"
        elif p.stop_token_ids and s.token_id in p.stop_token_ids:
            reason, stop_reason = "stop", s.token_id
        elif detok.stop_matched is not None:
            reason, stop_reason = "stop", detok.stop_matched
        elif seq.grammar is not None and seq.grammar.terminated:
            reason = "stop"
        elif p.max_tokens is not None and n_out >= p.max_tokens:
            reason = "length"
        elif seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            if detok.stop_matched is None:
                detok.finish()
            seq.finish_reason, seq.stop_reason = reason, stop_reason
            self.scheduler.finish(seq)

    def _output(self, req: _Request) -> RequestOutput:
        outs = []
        for i, seq in enumerate(req.seqs):
            detok = req.detoks[i]
            text = detok.text
            delta_text = text[req.sent_text[i]:]
            sent = req.sent_tokens[i]
            req.sent_text[i], req.sent_tokens[i] = len(text), len(seq.output_ids)
            want_top = req.params.logprobs is not None
            outs.append(CompletionOutput(
                index=i, text=text, token_ids=list(seq.output_ids), finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason, logprobs=list(seq.sampled_logprobs),
                top_logprobs=list(seq.logprobs) if want_top else None,
                delta_text=delta_text, delta_token_ids=seq.output_ids[sent:],
                delta_logprobs=seq.sampled_logprobs[sent:],
                delta_top_logprobs=seq.logprobs[sent:] if want_top else None))
        finished = all(s.finished for s in req.seqs)
        if finished:
            del self.requests[req.request_id]
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished, req.num_cached_tokens,
                             prompt_logprobs=_copy(req.seqs[0].prompt_logprobs))

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.block_manager.usage(),
            prefix_cache_queries=self.block_manager.prefix_queries,
            prefix_cache_hits=self.block_manager.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            grammar_mask_seconds=self.runner.grammar_mask_seconds,
            num_steps=self.num_steps,
            collective_seconds=self.tp.collective_seconds if self.tp is not None else 0.0,
        )
