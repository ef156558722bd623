"""A tiny random Llama as an HF folder (safetensors + tokenizer.json + chat template):
the HF loading path, several served names, CORS, and /health answering while
32 streams generate."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from .conftest import Server, http

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello server", "pack my box with five dozen"]


def make_tiny_model(folder) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=512, bos_token_id=0, eos_token_id=1)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(folder)
    s = Server("--model", str(folder), "--served-model-name", "tiny", "tiny-alias",
               "--allowed-origins", "http://example.com").wait_ready()
    yield s
    s.stop()


def test_served_names(tiny_server):
    status, body = http("GET", tiny_server.url + "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny", "tiny-alias"]
    assert body["data"][0]["max_model_len"] == 512
    status, body = http("POST", tiny_server.url + "/v1/chat/completions",
                        {"model": "tiny-alias", "messages": [{"role": "user", "content": "hello"}],
                         "max_tokens": 5, "ignore_eos": True})
    assert status == 200 and body["model"] == "tiny" and body["usage"]["completion_tokens"] == 5


def test_cors(tiny_server):
    req = urllib.request.Request(tiny_server.url + "/v1/models", headers={"Origin": "http://example.com"})
    with urllib.request.urlopen(req) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "http://example.com"
    req = urllib.request.Request(tiny_server.url + "/v1/models", headers={"Origin": "http://evil.example"})
    with urllib.request.urlopen(req) as r:
        assert r.headers.get("Access-Control-Allow-Origin") is None
    req = urllib.request.Request(tiny_server.url + "/v1/chat/completions", method="OPTIONS",
                                 headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 204 and "POST" in r.headers["Access-Control-Allow-Methods"]


def test_health_answers_while_32_streams_generate(tiny_server):
    results: list = [None] * 32

    def stream(i):
        body = {"model": "tiny", "prompt": f"hello {i}", "max_tokens": 48, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": 1.0, "seed": i}
        req = urllib.request.Request(tiny_server.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            results[i] = r.read().decode()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    health = []
    while any(t.is_alive() for t in threads):
        health.append(http("GET", tiny_server.url + "/health", timeout=10)[0])
    for t in threads:
        t.join()
    assert health and all(s == 200 for s in health)
    for raw in results:
        events = [e[6:] for e in raw.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 48

