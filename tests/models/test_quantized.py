"""Weights kept in GGUF block formats and run by our quantized kernels, at the model level: the default
model's Q4_1 / Q8_0 file served as stored, HF checkpoints quantized at load (--quantization), fused
layers whose shards have different types. The references are the same weights dequantized to fp32
(the path tests/models/test_smollm2.py checks against transformers) and the `gguf` package's
quantizer and dequantizer; the only difference allowed is the int8 rounding of the activations."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers

from pyserve.loader import default_gguf_path
from pyserve.loader.gguf_types import GGMLType
from pyserve.models import load_model
from pyserve.models.layers.linear import DenseMethod, LinearLayer
from pyserve.models.layers.quantized import PackedQuantized, QuantizedMethod, QuantizedTensor
from tests.kernels.quant_reference import error_bound, gguf_dequantize, reference_linear, weight_blocks
from tests.models.paged_runner import PagedRunner
from tests.models.test_gguf_llamacpp import CASES as GGUF_CASES
from tests.models.test_gguf_llamacpp import tokenizer_files  # noqa: F401  (a fixture)


K_TYPES = (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)  # activations quantized per 256, not 32


def _linears(model):
    return [m for m in model.named_modules().values() if isinstance(m, LinearLayer)]


def _distribution_gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean KL(a || b) over rows, fraction of rows with the same argmax) of two logit batches."""
    pa, pb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    kl = (pa.exp() * (pa - pb)).sum(-1)
    return float(kl.mean()), float((a.argmax(-1) == b.argmax(-1)).double().mean())


@pytest.fixture(scope="module")
def default_models():
    return load_model(None, dtype="float32"), load_model(None, dtype="float32", quantization="none")


def test_the_default_model_keeps_its_blocks(default_models):
    quantized, dense = default_models
    assert all(isinstance(m.method, QuantizedMethod) for m in _linears(quantized))
    assert all(isinstance(m.method, DenseMethod) for m in _linears(dense))
    # Q4_1 linears and the Q8_0 embedding, held once for the tied head: about the file's size.
    held = sum(s.packed.nbytes for m in _linears(quantized) if m is not quantized.lm_head for s in m.state.shards)
    held += sum(s.packed.nbytes for s in quantized.embed_tokens.packed.shards)
    assert quantized.lm_head.state is quantized.embed_tokens.packed
    assert 0.9 < held / os.path.getsize(default_gguf_path()) < 1.1


def test_the_default_model_agrees_with_its_dequantized_weights(default_models):
    """Next-token distributions at every 8th position of three texts, all prefixes in one batch."""
    quantized, dense = default_models
    g = torch.Generator().manual_seed(3)
    texts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (40, 90, 160)]
    prefixes = [t[:n] for t in texts for n in range(8, len(t) + 1, 8)]
    run = dict(max_new_tokens=1, chunk_size=256, start_every=0)
    _, a = PagedRunner(dense, num_blocks=512).generate(prefixes, **run)
    _, b = PagedRunner(quantized, num_blocks=512).generate(prefixes, **run)
    kl, top1 = _distribution_gap(torch.stack(a), torch.stack(b))
    assert kl < 0.01 and top1 > 0.9, (kl, top1)


def test_a_gguf_file_is_dequantized_on_request_and_refuses_load_time_quantization():
    from pyserve.loader.hf import ModelLoadError

    with pytest.raises(ModelLoadError, match="applies to HF checkpoints"):
        load_model(None, quantization="q8_0")
    with pytest.raises(ValueError, match="quantization must be none, q8_0, q4_0"):
        load_model(None, quantization="int4")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   initializer_range=0.05, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("quantization, kl_bound", [("q8_0", 1e-3), ("q4_0", 0.1)])
def test_an_hf_checkpoint_quantized_at_load(tiny_hf, quantization, kl_bound):
    dense = load_model(tiny_hf, dtype="float32")
    quantized = load_model(tiny_hf, dtype="float32", quantization=quantization)
    assert all(isinstance(m.method, QuantizedMethod) for m in _linears(quantized))
    want = {"q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0}[quantization]
    assert {s.ggml_type for m in _linears(quantized) for s in m.state.shards} == {want}
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 20, 77)]
    _, a = PagedRunner(dense).generate(prompts, max_new_tokens=1)
    _, b = PagedRunner(quantized).generate(prompts, max_new_tokens=1)
    kl, _ = _distribution_gap(torch.stack(a), torch.stack(b))
    assert 0 < kl < kl_bound, kl  # not the dense path, and close to it


def _quantized(rows: int, cols: int, ggml_type: GGMLType, seed: int) -> tuple[QuantizedTensor, torch.Tensor]:
    """Blocks (gguf's quantizer; random valid blocks for the K-quants, which it cannot make) and gguf's
    dequantization of them."""
    blocks = weight_blocks(rows, cols, int(ggml_type), seed)
    return QuantizedTensor(blocks, int(ggml_type), cols), gguf_dequantize(blocks, int(ggml_type))


@pytest.mark.parametrize("types", [(GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1),
                                   (GGMLType.Q4_K, GGMLType.Q4_K, GGMLType.Q6_K),
                                   (GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q8_0),
                                   # llama-quantize's Q4_K_M/Q5_K_M where rows are not whole 256-blocks
                                   (GGMLType.Q5_0, GGMLType.Q5_0, GGMLType.Q8_0),
                                   (GGMLType.Q5_1, GGMLType.Q6_K, GGMLType.Q5_0)])
def test_a_fused_layer_whose_shards_have_different_types(types):
    """A Q4_K_M file keeps attn_v in Q6_K beside Q4_K q and k: each run of neighbouring shards of one type
    is one matrix (Q4_K q and k together), and each writes its columns in place, within the int8-activation
    bound of gguf's dequantized weights (tests/kernels/quant_reference.py)."""
    parts = [_quantized(rows, 512, t, seed) for seed, (rows, t) in enumerate(zip((64, 32, 32), types))]
    bias = torch.randn(128)
    layer = PackedQuantized([(q, s) for (q, _), s in zip(parts, (0, 64, 96))], bias)
    runs = 1 + sum(a != b for a, b in zip(types, types[1:]))
    assert [(s.ggml_type, s.start) for s in layer.shards][0] == (types[0], 0) and len(layer.shards) == runs
    x = torch.randn(5, 512)
    got = layer(x)
    for (q, dense), (start, rows) in zip(parts, ((0, 64), (64, 32), (96, 32))):
        want = reference_linear(x, dense, bias[start: start + rows])
        bound = error_bound(x, dense, block=256 if q.ggml_type in K_TYPES else 32)
        assert ((got[:, start: start + rows].double() - want).abs() <= bound).all(), q.ggml_type


def test_shards_of_one_type_run_as_one_matrix():
    one_type = PackedQuantized([(_quantized(64, 96, GGMLType.Q4_1, 7)[0], 0),
                                (_quantized(64, 96, GGMLType.Q4_1, 8)[0], 64)], None)
    assert len(one_type.shards) == 1


@pytest.fixture(scope="module")
def q8_0_file(tmp_path_factory, tokenizer_files):
    """A tiny Llama converted by llama.cpp's converter with --outtype q8_0. Llama's q/k rows are
    permuted by the converter, so this also checks that whole quantized rows are un-permuted."""
    import shutil

    from tests.llamacpp import convert_hf_to_gguf, llama_cpp_dir

    llama_cpp_dir()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(GGUF_CASES["llama"](), dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("q8_0")
    model.save_pretrained(folder)
    for f in tokenizer_files("llama").iterdir():
        shutil.copy(f, folder / f.name)
    return convert_hf_to_gguf(folder, folder / "q8_0.gguf", "q8_0")


def test_a_q8_0_file_made_by_llama_cpp_runs_on_the_quantized_kernels(q8_0_file):
    """Against the same file dequantized (the path checked against transformers): only the int8
    rounding of the activations differs."""
    quantized, dense = load_model(q8_0_file, dtype="float32"), load_model(q8_0_file, dtype="float32", quantization="none")
    assert all(isinstance(m.method, QuantizedMethod) for m in _linears(quantized))
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (4, 17, 120)]
    _, a = PagedRunner(dense).generate(prompts, max_new_tokens=1)
    _, b = PagedRunner(quantized).generate(prompts, max_new_tokens=1)
    kl, top1 = _distribution_gap(torch.stack(a), torch.stack(b))
    print(f"KL {kl:.2e}, top-1 {top1}")
    assert kl < 0.02 and top1 == 1.0, (kl, top1)  # rows left permuted: KL 3.5, top-1 0.33


def test_the_cpu_mlp_in_row_chunks_gives_the_same_bits(monkeypatch):
    """gated_mlp takes a long prefill's MLP a few rows at a time on the CPU (glibc maps and faults in every
    intermediate past 32 MB afresh); every row comes out as it does with all rows at once."""
    from pyserve.models.layers import activation

    gate_up = PackedQuantized([(_quantized(2 * 256, 256, GGMLType.Q4_K, 0)[0], 0)], None)
    down = PackedQuantized([(_quantized(256, 256, GGMLType.Q6_K, 1)[0], 0)], None)
    x = torch.randn(37, 256)
    whole = activation.gated_mlp(x, gate_up, activation.ACTIVATIONS["silu"], down)
    monkeypatch.setattr(activation, "MLP_CHUNK_BYTES", 5 * 2 * 256 * 4)  # 5 rows a chunk: 7 full, 1 of 2
    chunked = activation.gated_mlp(x, gate_up, activation.ACTIVATIONS["silu"], down)
    assert chunked.shape == (37, 256) and torch.equal(chunked, whole)
    assert torch.equal(chunked[:3], activation.gated_mlp(x[:3], gate_up, activation.ACTIVATIONS["silu"], down))
