"""Prometheus metrics in their own registry, named as vLLM's with a `pyserve:` prefix.

Engine-wide figures (queue depths, KV-cache usage, token and prefix-cache counts,
preemptions) are read from the engine's stats snapshot at scrape time, less what
the warm-up ran; per-request figures (finish reasons, latencies) are recorded by
the handlers."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # no `_created` series: vLLM has none either

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                 5.0, 10.0)


# What request routers for model servers read by default (the Kubernetes Gateway API Inference
# Extension's endpoint picker: --total-queued-requests-metric, --total-running-requests-metric,
# --kv-cache-usage-percentage-metric, --cache-info-metric), under vLLM's names; vLLM's older name for
# the cache usage too. The same values as the pyserve: series.
_ROUTER_GAUGES = (("vllm:num_requests_waiting", "num_waiting", "pyserve:num_requests_waiting"),
                  ("vllm:num_requests_running", "num_running", "pyserve:num_requests_running"),
                  ("vllm:kv_cache_usage_perc", "kv_cache_usage", "pyserve:kv_cache_usage_perc"),
                  ("vllm:gpu_cache_usage_perc", "kv_cache_usage", "pyserve:kv_cache_usage_perc"))
_ROUTER_COUNTERS = (("vllm:prefix_cache_queries", "prefix_cache_queries"),
                    ("vllm:prefix_cache_hits", "prefix_cache_hits"))


class _EngineCollector:
    def __init__(self, stats: Callable, baseline: Callable, cache_info: Callable):
        self._stats, self._baseline, self._cache_info = stats, baseline, cache_info

    def collect(self):
        s = self._stats()
        if s is None:
            return
        b = self._baseline()

        def since(name: str) -> float:
            return max(0, getattr(s, name) - (getattr(b, name) if b is not None else 0))

        for name, value, doc in (
                ("pyserve:num_requests_running", s.num_running, "Sequences in the running batch."),
                ("pyserve:num_requests_waiting", s.num_waiting, "Sequences waiting to be scheduled."),
                ("pyserve:kv_cache_usage_perc", s.kv_cache_usage,
                 "Fraction of KV-cache blocks held by live requests (0 to 1).")):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        for name, attr, doc in (
                ("pyserve:prompt_tokens", "prompt_tokens", "Prompt tokens computed (not served from the cache)."),
                ("pyserve:generation_tokens", "generation_tokens", "Tokens generated."),
                ("pyserve:num_preemptions", "num_preemptions", "Sequences preempted for lack of KV cache."),
                ("pyserve:prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
                ("pyserve:prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
                ("pyserve:structured_output_mask_seconds", "grammar_mask_seconds",
                 "Seconds spent filling structured-output (grammar) token masks."),
                ("pyserve:engine_steps", "num_steps", "Model steps run."),
                ("pyserve:tensor_parallel_collective_seconds", "collective_seconds",
                 "Seconds rank 0 spent in tensor-parallel collectives (all-reduce, logits gather).")):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], since(attr))
            yield c
        queries = since("prefix_cache_queries")
        g = GaugeMetricFamily("pyserve:prefix_cache_hit_rate",
                              "Prompt tokens found in the prefix cache / prompt tokens looked up, since startup.")
        g.add_metric([], since("prefix_cache_hits") / queries if queries else 0.0)
        yield g
        for name, attr, ours in _ROUTER_GAUGES:
            g = GaugeMetricFamily(name, f"As {ours} (for request routers).")
            g.add_metric([], getattr(s, attr))
            yield g
        for name, attr in _ROUTER_COUNTERS:
            c = CounterMetricFamily(name, f"As pyserve:{attr} (for request routers).")
            c.add_metric([], since(attr))
            yield c
        info = self._cache_info()
        if info:
            g = GaugeMetricFamily("vllm:cache_config_info", "KV-cache configuration (labels), value 1.",
                                  labels=sorted(info))
            g.add_metric([str(info[k]) for k in sorted(info)], 1)
            yield g


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.request_success = Counter("pyserve:request_success", "Finished requests by finish reason.",
                                       ["finished_reason"], registry=r)
        self.ttft = Histogram("pyserve:time_to_first_token_seconds", "Time to the first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pyserve:time_per_output_token_seconds", "Time per output token after the first.",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("pyserve:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.startup_phase = Gauge("pyserve:startup_phase_seconds", "Duration of each startup phase.",
                                   ["phase"], registry=r)
        self.rank_startup = Gauge("pyserve:startup_rank_phase_seconds",
                                  "Duration of each startup phase on each tensor-parallel rank.", ["phase", "rank"],
                                  registry=r)
        self._engine = None
        self._baseline = None
        self._cache_info: dict = {}
        r.register(_EngineCollector(self._engine_stats, lambda: self._baseline, lambda: self._cache_info))

    def _engine_stats(self):
        return self._engine.stats() if self._engine is not None else None

    def attach(self, engine, baseline, cache_info: dict | None = None) -> None:
        """engine: anything with .stats(); baseline: the stats the warm-up left behind; cache_info: the
        KV cache's block_size and num_gpu_blocks (vLLM's labels, which prefix-aware routers read)."""
        self._engine, self._baseline, self._cache_info = engine, baseline, cache_info or {}

    def set_startup(self, phases: dict[str, float]) -> None:
        for phase, seconds in phases.items():
            self.startup_phase.labels(phase=phase).set(seconds)

    def set_rank_startup(self, reports: list[dict]) -> None:
        for rank, report in enumerate(reports):
            for phase, seconds in report.items():
                self.rank_startup.labels(phase=phase, rank=str(rank)).set(seconds)

    def record_request(self, finish_reason: str | None, arrival: float, first_token: float | None,
                       end: float, num_generated: int) -> None:
        self.request_success.labels(finished_reason=finish_reason or "abort").inc()
        self.e2e.observe(end - arrival)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            if num_generated > 1:
                self.tpot.observe((end - first_token) / (num_generated - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
