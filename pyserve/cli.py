"""`pyserve` / `python -m pyserve`: arguments and PYSERVE_* environment variables,
validated before anything heavy is loaded, then the Sanic server (which loads the
model in its `before_server_start` hook, see pyserve/server/startup.py)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import socket
import sys
import time

ENV_PREFIX = "PYSERVE_"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _fraction(text: str) -> float:
    v = float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def _non_negative_float(text: str) -> float:
    v = float(text)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _port(text: str) -> int:
    v = int(text)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {text}")
    return v


def _bool_env(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump: `pyserve: error: ...`, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pyserve",
        description="Serve a Llama-family model over an OpenAI-compatible HTTP API. "
                    "Every flag can also be set with an environment variable PYSERVE_<FLAG> "
                    "(e.g. PYSERVE_MAX_MODEL_LEN); the flag wins.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default=None,
      help="an HF model folder (config.json + safetensors) or a .gguf file; "
           "None serves the embedded default model (SmolLM2-135M-Instruct)")
    a("--served-model-name", nargs="+", default=None,
      help="the model name(s) the API answers to; the first is used in responses "
           "(default: the --model argument, or SmolLM2-135M-Instruct)")
    a("--host", default="127.0.0.1", help="address to bind")
    a("--port", type=_port, default=8000, help="port to bind")
    a("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
      help="weight and activation dtype (auto: fp32 on the CPU, the model's dtype on CUDA)")
    a("--quantization", "-q", default=None, choices=("none", "q8_0", "q4_0"),
      help="weights in a block format run by pyserve's CPU kernels: q8_0 / q4_0 quantize an HF "
           "checkpoint's linear weights at load; none dequantizes a GGUF file (default: a GGUF file "
           "keeps its own types, an HF checkpoint stays dense)")
    a("--device", default="auto", help="auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N")
    a("--max-model-len", type=_positive_int, default=None,
      help="the context length (prompt + output); default: the model's")
    a("--max-num-seqs", type=_positive_int, default=64, help="sequences in one batch at most")
    a("--max-num-batched-tokens", type=_positive_int, default=2048, help="tokens in one step at most")
    a("--block-size", type=int, choices=(8, 16, 32), default=16, help="tokens per KV-cache block")
    a("--kv-cache-memory", type=_positive_float, default=2.0, help="GiB of KV cache on the CPU")
    a("--kv-cache-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
      help="KV cache storage dtype (attention math stays fp32). auto: bfloat16 on a CPU with "
           "AVX512_BF16 under a float32 model, else the model's dtype; other values are CPU-only "
           "and need a float32 model unless equal to --dtype")
    a("--gpu-memory-utilization", type=_fraction, default=0.9,
      help="fraction of GPU memory for weights, activations and KV cache (CUDA)")
    a("--tensor-parallel-size", "-tp", type=_positive_int, default=1,
      help="split the model over this many ranks (torch.distributed; shared memory between the ranks "
           "pyserve starts on this host). Started by torchrun, pyserve runs as the rank torchrun says "
           "(README, Scaling out)")
    a("--distributed-timeout", type=_positive_float, default=15.0,
      help="seconds a tensor-parallel rank may wait for the others within a step before the group counts "
           "as failed (a rank hung): the server then answers 503 and exits")
    a("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
      help="reuse the KV cache of shared prompt prefixes")
    a("--seed", type=int, default=0, help="seed for requests that give none")
    a("--api-key", default=None,
      help="require `Authorization: Bearer <key>` on the API (health and metrics stay open)")
    a("--allowed-origins", nargs="+", default=None,
      help="CORS origins allowed to call the API ('*' for any); default: no CORS headers")
    a("--max-queued-requests", type=_positive_int, default=None,
      help="answer 429 when this many requests are already waiting; default: unbounded")
    a("--shutdown-timeout", type=_non_negative_float, default=30.0,
      help="seconds running requests get to finish after SIGTERM")
    a("--log-level", default="info", choices=_LOG_LEVELS, type=str.lower, help="log level")
    a("--chat-template", default=None,
      help="a Jinja chat template file, instead of the tokenizer's")
    a("--enable-auto-tool-choice", action="store_true", default=False,
      help="let the model decide when to call tools (tool_choice \"auto\", the default when a request has "
           "tools); needs --tool-call-parser")
    a("--tool-call-parser", default=None, choices=("hermes", "llama3_json"),
      help="how tool calls are read out of the model's text with tool_choice \"auto\": hermes (Hermes, "
           "Qwen2.5, Qwen3: <tool_call>{...}</tool_call>) or llama3_json (Llama 3.1/3.2 JSON)")
    a("--reasoning-parser", default=None, choices=("deepseek_r1", "qwen3"),
      help="split a reasoning model's <think>...</think> into message.reasoning_content")
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            action.help = f"{action.help} [env: {env_name(action)}]"
    return p


def env_name(action: argparse.Action) -> str:
    return ENV_PREFIX + action.dest.upper()


def apply_env_defaults(parser: argparse.ArgumentParser, environ=os.environ) -> None:
    """A PYSERVE_<FLAG> variable becomes the flag's default, so a flag on the command line wins."""
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = env_name(action)
        if name not in environ:
            continue
        raw = environ[name]
        try:
            if isinstance(action, argparse.BooleanOptionalAction):
                value = _bool_env(raw)
            elif action.nargs == "+":
                value = raw.split()
            elif action.type is not None:
                value = action.type(raw)
            else:
                value = raw
        except (argparse.ArgumentTypeError, ValueError) as e:
            parser.error(f"{name}={raw!r}: {e}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"{name}={raw!r}: invalid choice (choose from {', '.join(map(str, action.choices))})")
        action.default = value


def _port_free(host: str, port: int) -> str | None:
    """None if (host, port) can be bound now, else why not."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"--host {host!r}: {e.strerror}"
    family, _, _, _, addr = infos[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own bind does
        s.bind(addr)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return f"--port {port}: address {host}:{port} is already in use"
        return f"--host {host} --port {port}: cannot bind: {e.strerror}"
    finally:
        s.close()
    return None


def parse_args(argv: list[str] | None = None, environ=os.environ) -> argparse.Namespace:
    parser = build_parser()
    apply_env_defaults(parser, environ)
    args = parser.parse_args(argv)
    if not _DEVICE_RE.match(args.device):
        parser.error(f"--device: unknown device {args.device!r} (choose auto, cpu, cuda or cuda:N)")
    if args.model is not None:
        path = os.path.expanduser(args.model)
        if not os.path.exists(path):
            parser.error(f"--model: {args.model}: no such file or directory")
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            parser.error(f"--model: {args.model}: not an HF model folder (no config.json)")
        if os.path.isfile(path) and not path.endswith(".gguf"):
            parser.error(f"--model: {args.model}: expected an HF model folder or a .gguf file")
        args.model = path
    if args.chat_template is not None:
        try:
            with open(os.path.expanduser(args.chat_template), encoding="utf-8") as f:
                args.chat_template_text = f.read()
        except OSError as e:
            parser.error(f"--chat-template: {args.chat_template}: {e.strerror}")
    else:
        args.chat_template_text = None
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        parser.error("--enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json)")
    args.follower_rank = _follower_rank(args, environ)
    why = None if args.follower_rank else _port_free(args.host, args.port)
    if why:
        parser.error(why)
    # Last: these import torch (~2 s), which the checks above should not wait for.
    args.device = _resolve_device(args.device)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: no CUDA device is available")
    if args.kv_cache_dtype != "auto":  # auto always resolves; only a named dtype can clash with --dtype
        from pyserve.config import EngineConfig  # noqa: PLC0415  (imports torch)

        try:
            EngineConfig(device=args.device, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype)
        except ValueError as e:
            parser.error(f"--kv-cache-dtype {args.kv_cache_dtype}: {e}")
    return args


def _follower_rank(args, environ) -> int:
    """Under torchrun (RANK / WORLD_SIZE set) with --tensor-parallel-size > 1: this process's rank, where
    a rank > 0 serves no HTTP but runs its shard of the model; 0 otherwise."""
    if args.tensor_parallel_size == 1 or "WORLD_SIZE" not in environ:
        return 0
    return int(environ.get("RANK", "0"))


def _resolve_device(device: str) -> str:
    """--device auto: CUDA when torch sees a GPU, as vLLM does, else the CPU (a GPU machine used to serve
    on the CPU unless told otherwise)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.follower_rank:
        from pyserve.distributed.worker import run_rank  # noqa: PLC0415
        from pyserve.server.startup import engine_config  # noqa: PLC0415

        return run_rank(args.model, engine_config(args))
    from pyserve.server.app import serve  # noqa: PLC0415  (sanic only once the arguments are good)

    return serve(args, t_start=t0)


if __name__ == "__main__":
    sys.exit(main())
