"""What the server holds between requests: its arguments, the engine (through the async facade
only), metrics, startup phases, and the counts that drain and admission read."""

from __future__ import annotations

import time

from pyserve.server.errors import APIError
from pyserve.server.metrics import Metrics
from pyserve.server.reasoning import get_reasoning_parser
from pyserve.server.startup import Phases

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ServerState:
    def __init__(self, args, t_start: float):
        self.args = args
        self.t_start = t_start
        self.names = args.served_model_name or [args.model or DEFAULT_MODEL_NAME]
        self.metrics = Metrics()
        self.phases = Phases()
        self.engine = None  # AsyncLLMEngine, once started
        self.created = int(time.time())
        self.ready_seconds: float | None = None
        self.draining = False
        self.inflight = 0  # API requests being handled (drained on SIGTERM)
        self.request_ids: set[str] = set()  # engine requests added and not yet done
        self.preparing = 0  # prompts past check_queue, being tokenized: they hold their place in the queue
        self.reasoning = get_reasoning_parser(args.reasoning_parser) if args.reasoning_parser else None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def chat_template(self) -> str | None:
        return self.args.chat_template_text or self.engine.tokenizer.chat_template

    def check_model(self, model: str | None) -> str:
        if model is not None and model not in self.names:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return self.names[0]

    def check_live(self) -> None:
        if self.engine is None:
            raise APIError(503, "the server is not ready", type="service_unavailable")
        if self.engine.dead is not None:
            raise APIError(503, f"the engine has died: {self.engine.dead!r}", type="engine_dead")

    def check_queue(self, new_requests: int) -> None:
        """429 if admitting these would leave more than --max-queued-requests waiting: requests beyond
        --max-num-seqs wait (the engine's own count lags a step, so take the larger)."""
        limit = self.args.max_queued_requests
        if limit is None:
            return
        active = len(self.request_ids) + self.preparing
        waiting = max(self.engine.stats().num_waiting, active - self.args.max_num_seqs)
        if max(0, waiting) + new_requests > limit + max(0, self.args.max_num_seqs - active):
            raise APIError(429, f"too many requests waiting (--max-queued-requests {limit}); retry later",
                           type="rate_limit_exceeded", code="queue_full")
