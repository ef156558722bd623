"""The startup sequence, phase by phase, each timed: weights, tokenizer,
KV-cache blocks, warm-up (a dummy mixed prefill/decode batch through the real
path), then the async engine. A failing phase raises StartupError naming it."""

from __future__ import annotations

import contextlib
import logging
import os
import time

log = logging.getLogger("pyserve.startup")


class StartupError(RuntimeError):
    def __init__(self, phase: str, cause: BaseException):
        super().__init__(f"startup failed in phase {phase!r}: {type(cause).__name__}: {cause}")
        self.phase = phase


def process_age() -> float | None:
    """Seconds since this process started (Linux), to count the interpreter and torch import."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class Phases:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.current = "init"

    @contextlib.contextmanager
    def phase(self, name: str):
        self.current = name
        t = time.perf_counter()
        try:
            yield
        except StartupError:
            raise
        except BaseException as e:
            raise StartupError(name, e) from e
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
        log.info("startup: %s done in %.2f s", name, self.seconds[name])


def engine_config(args):
    """The engine's settings from the command line (every rank builds the same)."""
    from pyserve.config import EngineConfig

    return EngineConfig(device=args.device, dtype=args.dtype, quantization=args.quantization,
                        max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
                        kv_cache_dtype=args.kv_cache_dtype,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
                        tensor_parallel_size=args.tensor_parallel_size, distributed_timeout=args.distributed_timeout)


def build_engine(args, phases: Phases):
    from pyserve.engine.llm_engine import LLMEngine

    with phases.phase("config"):
        config = engine_config(args)
    try:
        engine = LLMEngine(args.model, config, phase=phases.phase)
    except StartupError:
        raise
    except BaseException as e:  # between the engine's own phases: blame the last one started
        raise StartupError(phases.current, e) from e
    log.info("startup: KV cache of %d blocks of %d tokens in %s", engine.num_blocks, config.block_size,
             str(engine.kv_cache_dtype).removeprefix("torch."))
    return engine


def warm_up(engine) -> None:
    """A short prefill, then a second prefill while the first decodes (a mixed batch),
    greedy and sampled, until both finish."""
    from pyserve.sampling_params import SamplingParams

    vocab = engine.model.cfg.vocab_size
    engine.model.warm_up_matmuls(engine.config.max_num_batched_tokens, engine.config.max_num_seqs)
    engine.encode("Hello")  # the tokenizer's first call, and its prompt-length bound, are slow
    ids_a = [(7 * i + 11) % vocab for i in range(min(24, engine.max_model_len - 8))]
    ids_b = [(13 * i + 5) % vocab for i in range(min(9, engine.max_model_len - 8))]
    engine.add_request("warmup-0", ids_a, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.step()
    engine.add_request("warmup-1", ids_b, SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9, top_k=40,
                                                         seed=0, ignore_eos=True, logprobs=1))
    for _ in range(64):
        if not engine.has_unfinished():
            break
        engine.step()
    for rid in ("warmup-0", "warmup-1"):
        engine.abort(rid)
