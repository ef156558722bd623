"""What request routers read from /metrics (issue 18's replica signals): the Kubernetes Gateway API
Inference Extension's endpoint picker scrapes, by default, vllm:num_requests_waiting,
vllm:num_requests_running, vllm:kv_cache_usage_perc and vllm:cache_config_info (block_size,
num_gpu_blocks); prefix-aware routing is judged by the prefix-cache hit rate."""

from __future__ import annotations

import re

from .conftest import http


def _series(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_router_gauges_mirror_ours(server):
    m = _series(http("GET", server.url + "/metrics")[1])
    for theirs, ours in (("vllm:num_requests_waiting", "pyserve:num_requests_waiting"),
                         ("vllm:num_requests_running", "pyserve:num_requests_running"),
                         ("vllm:kv_cache_usage_perc", "pyserve:kv_cache_usage_perc"),
                         ("vllm:gpu_cache_usage_perc", "pyserve:kv_cache_usage_perc"),
                         ("vllm:prefix_cache_queries_total", "pyserve:prefix_cache_queries_total"),
                         ("vllm:prefix_cache_hits_total", "pyserve:prefix_cache_hits_total")):
        assert m[theirs] == m[ours], (theirs, m)


def test_cache_config_info(server):
    text = http("GET", server.url + "/metrics")[1]
    (labels,) = re.findall(r"^vllm:cache_config_info\{(.*)\} 1\.0$", text, re.M)
    info = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    tokens = http("GET", server.url + "/v1/models")[1]  # the cache holds at least one full context here
    assert int(info["block_size"]) == 16 and int(info["num_gpu_blocks"]) * 16 >= tokens["data"][0]["max_model_len"]


def test_prefix_cache_hit_rate(server):
    """A second request with the same long prompt is served mostly from the prefix cache: the hit
    rate, hits / queries since startup, moves up by what the counters say."""
    prompt = "The same long shared system prompt, repeated for the cache. " * 20
    before = _series(http("GET", server.url + "/metrics")[1])
    for _ in range(2):
        assert http("POST", server.url + "/v1/completions", {"prompt": prompt, "max_tokens": 1})[0] == 200
    after = _series(http("GET", server.url + "/metrics")[1])
    hits = after["pyserve:prefix_cache_hits_total"] - before["pyserve:prefix_cache_hits_total"]
    queries = after["pyserve:prefix_cache_queries_total"] - before["pyserve:prefix_cache_queries_total"]
    assert queries > 0 and hits >= 0.4 * queries
    rate = after["pyserve:prefix_cache_hit_rate"]
    assert rate == after["pyserve:prefix_cache_hits_total"] / after["pyserve:prefix_cache_queries_total"]
