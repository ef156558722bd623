"""Loading paths and their errors: sharded safetensors, config/weight
mismatches, HF tokenizer files, dtype resolution, progress reporting."""

import io
import json
import re
import logging

import pytest
import torch
import transformers

from pyserve.loader import default_gguf_path, load_tokenizer
from pyserve.loader.hf import ModelLoadError
from pyserve.loader.hf_tokenizer import load_hf_tokenizer
from pyserve.loader.progress import LoadProgress
from pyserve.models import load_model, resolve_dtype
from tests.models.paged_runner import PagedRunner

CONFIG = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    single = tmp_path_factory.mktemp("single")
    sharded = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="100KB")
    return single, sharded


def test_sharded_safetensors_load_like_a_single_file(tiny):
    single, sharded = tiny
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    prompts = [[1, 2, 3, 4, 5], [7] * 20]
    _, a = PagedRunner(load_model(single, dtype="float32")).generate(prompts, max_new_tokens=1)
    _, b = PagedRunner(load_model(sharded, dtype="float32")).generate(prompts, max_new_tokens=1)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_missing_shard_names_the_file(tiny, tmp_path):
    _, sharded = tiny
    for f in sharded.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    victim = sorted(tmp_path.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=f"{victim.name}: shard listed in model.safetensors.index.json not found"):
        load_model(tmp_path)


def test_config_weight_mismatch_is_one_clear_line(tiny, tmp_path):
    single, _ = tiny
    (tmp_path / "model.safetensors").write_bytes((single / "model.safetensors").read_bytes())
    config = json.loads((single / "config.json").read_text())
    config["intermediate_size"] = 512
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path)
    message = str(e.value)
    assert "\n" not in message
    # The first MLP weight the checkpoint lists, with its shape and the one the config implies.
    assert re.search(r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight", message), message
    assert "256" in message and "512" in message


def test_not_a_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_model(tmp_path / "nope")
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a model"):
        load_model(junk)


def test_resolve_dtype():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="dtype must be auto, float32, float16 or bfloat16"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_hf_tokenizer_files(tmp_path):
    gguf_tok = load_tokenizer(default_gguf_path())
    gguf_tok.tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "<|im_end|>"}, "bos_token": "<|im_start|>", "chat_template": gguf_tok.chat_template}))
    tok = load_hf_tokenizer(tmp_path)
    text = "Hello, world! ünïcödé 😀 <|im_start|>user"
    assert tok.encode(text) == gguf_tok.encode(text)
    assert tok.eos_token_id == gguf_tok.tokenizer.token_to_id("<|im_end|>")
    assert tok.bos_token_id == gguf_tok.tokenizer.token_to_id("<|im_start|>")
    assert tok.chat_template == gguf_tok.chat_template
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json: cannot read tokenizer"):
        load_hf_tokenizer(tmp_path)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_a_log_line_otherwise(caplog):
    caplog.set_level(logging.INFO, logger="pyserve.loader")
    term = FakeTerminal()
    p = LoadProgress("loading x", 3, stream=term)
    for _ in range(3):
        p.update()
    p.close()
    assert "\rloading x [" in term.getvalue() and "3/3" in term.getvalue()
    pipe = io.StringIO()
    p = LoadProgress("loading y", 2, stream=pipe)
    p.update()
    p.update()
    p.close()
    assert pipe.getvalue() == ""
    assert any("loading y: 2 tensors in" in r.getMessage() for r in caplog.records)
