"""CPU vs CUDA agreement for every pyserve op.

The same random inputs go through ``torch.ops.pyserve.<op>`` on the CPU and on
the GPU. fp32 must agree within 1e-4; fp16/bf16 on CUDA are compared with the
CPU run in fp32 on the same (rounded) values with looser tolerances. Sampling
must pick identical tokens for the same (seed, step) on both devices.
Skipped without an NVIDIA GPU.
"""

from __future__ import annotations

import math

import pyserve._ops  # noqa: F401  (registers torch.ops.pyserve.*)
import pytest
import torch

from tests.kernels.sampling_reference import allowed_from_bitmask, pack_bitmask

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

ops = torch.ops.pyserve
LOW_PRECISION_TOL = {torch.float16: 2e-2, torch.bfloat16: 6e-2}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- batch helpers


def make_batch(seqs, num_padding, block_size, num_blocks_extra=3, generator=None):
    """seqs: list of (cached_len, new_len). Returns block_tables, seq_lens,
    query_start_loc (CPU int32), num_tokens, num_blocks, max_seq_len."""
    seq_lens = [c + n for c, n in seqs]
    blocks_per_seq = [max(1, math.ceil(s / block_size)) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + num_blocks_extra
    perm = torch.randperm(num_blocks, generator=generator).tolist()
    max_blocks = max(blocks_per_seq) if seqs else 1
    tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    k = 0
    for i, nb in enumerate(blocks_per_seq):
        tables[i, :nb] = torch.tensor(perm[k : k + nb], dtype=torch.int32)
        k += nb
    qsl = [0]
    for _, n in seqs:
        qsl.append(qsl[-1] + n)
    num_tokens = qsl[-1] + num_padding
    return (
        tables,
        torch.tensor(seq_lens, dtype=torch.int32),
        torch.tensor(qsl, dtype=torch.int32),
        num_tokens,
        num_blocks,
        max(seq_lens) if seqs else 0,
    )


MIXED = [(0, 7), (37, 1), (20, 13), (0, 1), (5, 0)]  # prefill, decode, chunk on a cached prefix, 1-token prefill, idle


def attention_inputs(seqs, num_padding, block_size, num_heads, num_kv_heads, head_dim, dtype):
    tables, seq_lens, qsl, num_tokens, num_blocks, max_seq_len = make_batch(seqs, num_padding, block_size)
    # Query as a strided view into a fused QKV projection.
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype)
    query = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
    return query, key_cache, value_cache, tables, seq_lens, qsl, max_seq_len


def run_attention(args, device, max_seq_len=None, dtype=None, sliding_window=None, logits_soft_cap=None):
    query, key_cache, value_cache, tables, seq_lens, qsl, msl = args
    head_dim = query.shape[-1]
    conv = (lambda t: t.to(device=device, dtype=dtype)) if dtype is not None else (lambda t: t.to(device))
    return ops.paged_attention(
        conv(query), conv(key_cache), conv(value_cache), tables.to(device), seq_lens.to(device), qsl.to(device),
        1.0 / math.sqrt(head_dim), msl if max_seq_len is None else max_seq_len, sliding_window, logits_soft_cap,
    )


def strided_on(t: torch.Tensor, device: str) -> torch.Tensor:
    """Copy a [T, H, D] tensor to device as a view with a padded token stride."""
    T, H, D = t.shape
    buf = torch.zeros(T, H * D + 3 * D, dtype=t.dtype, device=device)
    view = buf[:, D : D + H * D].view(T, H, D)
    view.copy_(t)
    return view


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_paged_attention_mixed_batch_fp32(head_dim, block_size, num_heads, num_kv_heads):
    args = attention_inputs(MIXED, 3, block_size, num_heads, num_kv_heads, head_dim, torch.float32)
    query = args[0]
    cpu = run_attention(args, "cpu")
    cuda_args = (strided_on(query, "cuda"),) + args[1:]
    out = run_attention(cuda_args, "cuda")
    assert out.is_contiguous() and out.shape == cpu.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), cpu, atol=1e-4, rtol=1e-4)
    num_real = int(args[5][-1])
    assert torch.count_nonzero(out[num_real:]) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 112, 128, 256])
def test_paged_attention_low_precision(dtype, head_dim):
    args = attention_inputs(MIXED, 2, 16, 6, 2, head_dim, dtype)
    # CPU reference in fp32 on the same rounded values.
    ref = run_attention(args, "cpu", dtype=torch.float32)
    out = run_attention(args, "cuda")
    assert out.dtype == dtype
    tol = LOW_PRECISION_TOL[dtype]
    torch.testing.assert_close(out.cpu().float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("head_dim", [32, 96, 112])
def test_paged_attention_other_head_dims(head_dim):
    args = attention_inputs(MIXED, 1, 16, 4, 2, head_dim, torch.float32)
    torch.testing.assert_close(run_attention(args, "cuda").cpu(), run_attention(args, "cpu"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head_dim,block_size,num_heads,num_kv_heads", [
    (64, 16, 8, 1), (80, 8, 6, 2), (128, 32, 4, 4), (256, 16, 3, 1),
])
def test_paged_attention_split_k_long_context(head_dim, block_size, num_heads, num_kv_heads):
    # An 8192-token decode, a chunked prefill over a long cached prefix and a short
    # sequence: the long rows are split into partitions and merged.
    seqs = [(8191, 1), (6000, 9), (30, 3)]
    args = attention_inputs(seqs, 2, block_size, num_heads, num_kv_heads, head_dim, torch.float32)
    cpu = run_attention(args, "cpu")
    torch.testing.assert_close(run_attention(args, "cuda").cpu(), cpu, atol=1e-4, rtol=1e-4)
    # An underestimated max_seq_len costs speed, never correctness.
    torch.testing.assert_close(run_attention(args, "cuda", max_seq_len=1000).cpu(), cpu, atol=1e-4, rtol=1e-4)
    for dtype in (torch.float16, torch.bfloat16):
        low = tuple(a.to(dtype) if a.is_floating_point() else a for a in args[:3]) + args[3:]
        ref = run_attention(low, "cpu", dtype=torch.float32)
        tol = LOW_PRECISION_TOL[dtype]
        torch.testing.assert_close(run_attention(low, "cuda").cpu().float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("window,cap", [(1, None), (7, None), (16, None), (37, 20.0), (500, None), (None, 5.0)])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(64, 6, 2), (128, 8, 1), (256, 4, 4)])
def test_paged_attention_window_and_soft_cap(window, cap, block_size, head_dim, num_heads, num_kv_heads):
    args = attention_inputs(MIXED + [(90, 40)], 2, block_size, num_heads, num_kv_heads, head_dim, torch.float32)
    args = (args[0] * 4,) + args[1:]  # scores large enough for the cap to matter
    cpu = run_attention(args, "cpu", sliding_window=window, logits_soft_cap=cap)
    out = run_attention(args, "cuda", sliding_window=window, logits_soft_cap=cap)
    torch.testing.assert_close(out.cpu(), cpu, atol=1e-4, rtol=1e-4)
    for dtype in (torch.float16, torch.bfloat16):
        low = tuple(a.to(dtype) if a.is_floating_point() else a for a in args[:3]) + args[3:]
        ref = run_attention(low, "cpu", dtype=torch.float32, sliding_window=window, logits_soft_cap=cap)
        tol = LOW_PRECISION_TOL[dtype]
        got = run_attention(low, "cuda", sliding_window=window, logits_soft_cap=cap).cpu().float()
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("window,cap", [(4096, None), (1000, None), (777, 30.0), (100, None), (None, 50.0)])
def test_paged_attention_window_split_k(window, cap):
    # Long rows: the window's keys are split over partitions that start at the
    # window's first key, and an underestimated max_seq_len still covers them.
    seqs = [(8191, 1), (6000, 9), (30, 3), (3000, 1)]
    args = attention_inputs(seqs, 2, 16, 8, 2, 128, torch.float32)
    cpu = run_attention(args, "cpu", sliding_window=window, logits_soft_cap=cap)
    torch.testing.assert_close(run_attention(args, "cuda", sliding_window=window, logits_soft_cap=cap).cpu(), cpu,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        run_attention(args, "cuda", max_seq_len=300, sliding_window=window, logits_soft_cap=cap).cpu(), cpu,
        atol=1e-4, rtol=1e-4)


def test_paged_attention_only_padding_and_empty():
    args = attention_inputs([], 4, 16, 4, 2, 64, torch.float32)
    out = run_attention(args, "cuda")
    assert out.shape == (4, 4, 64) and torch.count_nonzero(out) == 0
    args = attention_inputs([(3, 0)], 0, 16, 4, 2, 64, torch.float32)
    assert run_attention(args, "cuda").shape == (0, 4, 64)


def test_paged_attention_end_to_end_with_cache_writes():
    # Fill the cache through compute_slot_mapping + reshape_and_cache on both devices.
    block_size, H, Hkv, D = 16, 8, 2, 128
    tables, seq_lens, qsl, num_tokens, num_blocks, max_seq_len = make_batch(MIXED, 2, block_size)
    kc = torch.randn(num_blocks, block_size, Hkv, D)
    vc = torch.randn(num_blocks, block_size, Hkv, D)
    qkv = torch.randn(num_tokens, (H + 2 * Hkv) * D)
    outs = {}
    for dev in ("cpu", "cuda"):
        x = qkv.to(dev)
        q = x[:, : H * D].view(num_tokens, H, D)
        k = x[:, H * D : (H + Hkv) * D].view(num_tokens, Hkv, D)
        v = x[:, (H + Hkv) * D :].view(num_tokens, Hkv, D)
        slots, _ = ops.compute_slot_mapping(tables.to(dev), seq_lens.to(dev), qsl.to(dev), block_size, num_tokens)
        key_cache, value_cache = kc.to(dev), vc.to(dev)
        ops.reshape_and_cache(k, v, key_cache, value_cache, slots)
        outs[dev] = ops.paged_attention(q, key_cache, value_cache, tables.to(dev), seq_lens.to(dev), qsl.to(dev),
                                        D**-0.5, max_seq_len).cpu()
    torch.testing.assert_close(outs["cuda"], outs["cpu"], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- layer ops (issue 15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,d", [(1, 1536), (7, 13), (64, 9216)])
def test_gelu_tanh_and_mul(dtype, rows, d):
    x = (torch.randn(rows, 2 * d) * 4).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else LOW_PRECISION_TOL[dtype]
    torch.testing.assert_close(ops.gelu_tanh_and_mul(x.cuda()).cpu().float(), ops.gelu_tanh_and_mul(x).float(),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim,offset", [(64, 0.0), (128, 1.0), (256, 0.0), (2048, 1.0)])
def test_rms_norm_inplace_on_fused_qkv(dtype, head_dim, offset):
    # head_dim 2048 takes the block-per-row kernel, the others a warp per row.
    T, H, KVH = 13, 6, 2
    qkv = (torch.randn(T, (H + 2 * KVH) * head_dim) * 2).to(dtype)
    w = (torch.randn(head_dim) * 0.5).to(dtype)
    results = {}
    for dev in ("cpu", "cuda"):
        x = qkv.to(dev)
        k = x[:, H * head_dim : (H + KVH) * head_dim].view(T, KVH, head_dim)
        ops.rms_norm_inplace(k, w.to(dev), 1e-6, offset)
        results[dev] = x.cpu().float()
    tol = 1e-5 if dtype == torch.float32 else LOW_PRECISION_TOL[dtype]
    torch.testing.assert_close(results["cuda"], results["cpu"], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_weight_offset(dtype):
    x = (torch.randn(9, 2304) * 2).to(dtype)
    res = torch.randn(9, 2304).to(dtype)
    w = (torch.randn(2304) * 0.3).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else LOW_PRECISION_TOL[dtype]
    torch.testing.assert_close(ops.rms_norm(x.cuda(), w.cuda(), 1e-6, 1.0).cpu().float(),
                               ops.rms_norm(x, w, 1e-6, 1.0).float(), atol=tol, rtol=tol)
    outs = {}
    for dev in ("cpu", "cuda"):
        a, b = x.to(dev), res.to(dev)
        ops.fused_add_rms_norm(a, b, w.to(dev), 1e-6, 1.0)
        outs[dev] = (a.cpu().float(), b.cpu().float())
    torch.testing.assert_close(outs["cuda"][0], outs["cpu"][0], atol=tol, rtol=tol)
    assert torch.equal(outs["cuda"][1], outs["cpu"][1])


# --------------------------------------------------------------------------- cache ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_reshape_and_cache(dtype, block_size):
    num_blocks, Hkv, D, T = 12, 2, 80, 40
    num_slots = num_blocks * block_size
    slots = torch.randperm(num_slots)[:T]
    slots[::7] = -1
    kc = torch.randn(num_blocks, block_size, Hkv, D).to(dtype)
    vc = torch.randn(num_blocks, block_size, Hkv, D).to(dtype)
    kv = torch.randn(T, 3 * Hkv * D).to(dtype)  # strided rows
    results = {}
    for dev in ("cpu", "cuda"):
        x = kv.to(dev)
        k = x[:, : Hkv * D].view(T, Hkv, D)
        v = x[:, 2 * Hkv * D :].view(T, Hkv, D)
        key_cache, value_cache = kc.to(dev), vc.to(dev)
        ops.reshape_and_cache(k, v, key_cache, value_cache, slots.to(dev))
        results[dev] = (key_cache.cpu(), value_cache.cpu())
    assert torch.equal(results["cuda"][0], results["cpu"][0])
    assert torch.equal(results["cuda"][1], results["cpu"][1])


def test_reshape_and_cache_skips_out_of_range_and_empty():
    kc = torch.zeros(2, 8, 1, 32, device="cuda")
    vc = torch.zeros_like(kc)
    k = torch.ones(3, 1, 32, device="cuda")
    ops.reshape_and_cache(k, k, kc, vc, torch.tensor([100, -5, 3], device="cuda"))
    torch.cuda.synchronize()
    assert kc.sum().item() == 32 and kc[0, 3].sum().item() == 32
    ops.reshape_and_cache(k[:0], k[:0], kc, vc, torch.empty(0, dtype=torch.long, device="cuda"))


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_compute_slot_mapping(block_size):
    tables, seq_lens, qsl, num_tokens, _, _ = make_batch(MIXED + [(100, 20)], 5, block_size)
    cpu = ops.compute_slot_mapping(tables, seq_lens, qsl, block_size, num_tokens)
    cuda = ops.compute_slot_mapping(tables.cuda(), seq_lens.cuda(), qsl.cuda(), block_size, num_tokens)
    assert torch.equal(cuda[0].cpu(), cpu[0]) and torch.equal(cuda[1].cpu(), cpu[1])
    assert cuda[0].dtype == torch.int64 and cuda[1].dtype == torch.int64
    assert (cuda[0][-5:] == -1).all() and (cuda[1][-5:] == 0).all()


def test_compute_slot_mapping_no_sequences():
    tables = torch.zeros(0, 4, dtype=torch.int32, device="cuda")
    seq_lens = torch.zeros(0, dtype=torch.int32, device="cuda")
    qsl = torch.zeros(1, dtype=torch.int32, device="cuda")
    slots, pos = ops.compute_slot_mapping(tables, seq_lens, qsl, 16, 3)
    assert slots.tolist() == [-1, -1, -1] and pos.tolist() == [0, 0, 0]
    slots, pos = ops.compute_slot_mapping(tables, seq_lens, qsl, 16, 0)
    assert slots.numel() == 0 and pos.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_copy_blocks(dtype):
    kc = torch.randn(10, 16, 2, 64).to(dtype)
    vc = torch.randn(10, 16, 2, 64).to(dtype)
    mapping = torch.tensor([[0, 5], [3, 7], [2, 2], [9, 1]], dtype=torch.int64)
    results = {}
    for dev in ("cpu", "cuda"):
        key_cache, value_cache = kc.to(dev), vc.to(dev)
        ops.copy_blocks(key_cache, value_cache, mapping.to(dev))
        results[dev] = (key_cache.cpu(), value_cache.cpu())
    assert torch.equal(results["cuda"][0], results["cpu"][0])
    assert torch.equal(results["cuda"][1], results["cpu"][1])
    key_cache, value_cache = kc.cuda(), vc.cuda()
    ops.copy_blocks(key_cache, value_cache, torch.tensor([[0, 99], [-1, 2]], device="cuda"))  # skipped
    ops.copy_blocks(key_cache, value_cache, torch.empty(0, 2, dtype=torch.int64, device="cuda"))
    assert torch.equal(key_cache.cpu(), kc) and torch.equal(value_cache.cpu(), vc)


# --------------------------------------------------------------------------- sampling


def sampling_mask(batch, vocab, g, width="exact"):
    """A mixed allowed_token_bitmask: -1 (unconstrained), dense and sparse random,
    one id, a range, and one row that allows nothing; num_words ceil(V / 32)
    ("exact"), half of it ("narrow") or 3 more with garbage bits past V ("wide")."""
    nw = {"exact": (vocab + 31) // 32, "narrow": (vocab + 31) // 64, "wide": (vocab + 31) // 32 + 3}[width]
    n = max(32 * nw, vocab)
    allowed = torch.rand(batch, n, generator=g) < 0.5
    for b in range(batch):
        kind = b % 6
        if kind == 1:
            allowed[b, :vocab] = torch.rand(vocab, generator=g) < 0.01
        elif kind == 2:
            allowed[b, :vocab] = False
            allowed[b, int(torch.randint(0, min(vocab, 32 * nw) or 1, (1,), generator=g))] = True
        elif kind == 3:
            allowed[b, :vocab] = False
            allowed[b, vocab // 3: vocab // 3 + 40] = True
        elif kind == 4 and b == 4:
            allowed[b, :vocab] = False  # nothing allowed: token -1 on both devices
    mask = pack_bitmask(allowed, nw)
    mask[5::6] = -1
    return mask


def sampling_args(batch, vocab, dtype=torch.float32, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                  penalties=False, bias=False, steps=None, mask=None):
    g = torch.Generator().manual_seed(1234)
    logits = (torch.randn(batch, vocab, generator=g) * 3).to(dtype)
    full = lambda v, dt=torch.float32: torch.full((batch,), v, dtype=dt)  # noqa: E731
    args = dict(
        logits=logits,
        temperature=full(temperature),
        top_k=full(top_k, torch.int32),
        top_p=full(top_p),
        min_p=full(min_p),
        seeds=torch.randint(-(2**62), 2**62, (batch,), generator=g, dtype=torch.int64),
        steps=(torch.arange(batch, dtype=torch.int64) * 3 if steps is None else steps),
        repetition_penalty=full(1.3 if penalties else 1.0),
        presence_penalty=full(0.4 if penalties else 0.0),
        frequency_penalty=full(0.25 if penalties else 0.0),
        prompt_token_ids=None,
        output_token_ids=None,
        logit_bias_ids=None,
        logit_bias_values=None,
        allowed_token_bitmask=None if mask is None else sampling_mask(batch, vocab, g, mask),
    )
    if penalties:
        prompt = torch.randint(0, vocab, (batch, 30), generator=g)
        prompt[:, -4:] = -1
        prompt[:, 0] = vocab + 5  # out of range: ignored
        output = torch.randint(0, vocab // 10, (batch, 25), generator=g)  # many repeats
        output[:, -3:] = -1
        args["prompt_token_ids"], args["output_token_ids"] = prompt, output
    if bias:
        ids = torch.randint(0, vocab, (batch, 6), generator=g)
        ids[:, 1] = ids[:, 0]  # duplicates add up
        ids[:, -1] = -1
        args["logit_bias_ids"] = ids
        args["logit_bias_values"] = torch.randn(batch, 6, generator=g) * 5
    return args


def run_sample(args, device, num_top):
    a = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    out = ops.sample(
        a["logits"], a["temperature"], a["top_k"], a["top_p"], a["min_p"], a["seeds"], a["steps"],
        a["repetition_penalty"], a["presence_penalty"], a["frequency_penalty"], a["prompt_token_ids"],
        a["output_token_ids"], a["logit_bias_ids"], a["logit_bias_values"], num_top,
        a.get("allowed_token_bitmask"),
    )
    return [t.cpu() for t in out]


def assert_sample_agree(args, num_top=5, lp_tol=1e-4):
    cpu = run_sample(args, "cpu", num_top)
    cuda = run_sample(args, "cuda", num_top)
    assert cuda[0].dtype == torch.int64 and cuda[1].dtype == torch.float32
    assert cuda[2].shape == cpu[2].shape and cuda[3].shape == cpu[3].shape
    assert torch.equal(cuda[0], cpu[0])
    torch.testing.assert_close(cuda[1], cpu[1], atol=lp_tol, rtol=lp_tol)
    assert torch.equal(cuda[2], cpu[2])
    torch.testing.assert_close(cuda[3], cpu[3], atol=lp_tol, rtol=lp_tol)
    return cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("penalties,bias", [(False, False), (True, True)])
def test_sample_greedy(dtype, penalties, bias):
    args = sampling_args(16, 3000, dtype, temperature=0.0, penalties=penalties, bias=bias)
    args["logits"][3, 10] = args["logits"][3, 20] = args["logits"][3].max() + 1  # tie -> lower id
    out = assert_sample_agree(args, num_top=8)
    if not penalties and not bias:
        assert out[0][3] == 10
        assert torch.equal(out[0], args["logits"].float().argmax(dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("settings", [
    dict(),
    dict(temperature=0.7, top_k=20),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.9, top_k=50, top_p=0.9, min_p=0.01),
    dict(temperature=1.1, top_k=1),
    dict(temperature=1.0, top_p=0.9, penalties=True, bias=True),
])
def test_sample_seeded_identical(dtype, settings):
    for step in range(4):
        args = sampling_args(12, 5000, dtype, steps=torch.full((12,), step, dtype=torch.int64), **settings)
        assert_sample_agree(args, num_top=3)


def test_sample_large_vocab_and_many_top_logprobs():
    args = sampling_args(4, 152_064, temperature=0.8, top_k=40, top_p=0.95)
    assert_sample_agree(args, num_top=20)
    args = sampling_args(2, 4000, temperature=1.0)
    assert_sample_agree(args, num_top=2000)  # beyond the in-kernel top-N limit
    args = sampling_args(2, 300, temperature=1.0)
    assert_sample_agree(args, num_top=300)


def test_sample_top_logprobs_ties():
    args = sampling_args(3, 1000, temperature=0.0)
    args["logits"][:, 100:110] = 50.0  # ten-way tie straddling the top-N boundary
    out = assert_sample_agree(args, num_top=6)
    assert out[2][0].tolist() == list(range(100, 106))


def test_sample_empty_batch():
    args = sampling_args(1, 100)
    args = {k: (v[:0] if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    out = run_sample(args, "cuda", 2)
    assert out[0].shape == (0,) and out[2].shape == (0, 2)


# --------------------------------------------------------------------------- sampling with a token bitmask


def assert_tokens_allowed(tokens, mask, vocab):
    for b, t in enumerate(tokens.tolist()):
        allowed = allowed_from_bitmask(mask[b], vocab)
        assert (t == -1) == (not allowed.any()) and (t == -1 or allowed[t]), (b, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", ["exact", "narrow", "wide"])
@pytest.mark.parametrize("penalties,bias", [(False, False), (True, True)])
def test_sample_masked_greedy(dtype, width, penalties, bias):
    args = sampling_args(18, 3000, dtype, temperature=0.0, penalties=penalties, bias=bias, mask=width)
    out = assert_sample_agree(args, num_top=8)
    assert_tokens_allowed(out[0], args["allowed_token_bitmask"], 3000)
    assert out[0][4] == -1 and torch.isneginf(out[1][4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", ["exact", "narrow", "wide"])
@pytest.mark.parametrize("settings", [
    dict(),
    dict(temperature=0.7, top_k=20),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.9, top_k=50, top_p=0.9, min_p=0.01),
    dict(temperature=1.1, top_k=1),
    dict(temperature=1.0, top_p=0.9, penalties=True, bias=True),
    dict(temperature=1.0, min_p=1.5),  # M empty: the last allowed id
])
def test_sample_masked_seeded_identical(dtype, width, settings):
    for step in range(3):
        args = sampling_args(12, 5000, dtype, steps=torch.full((12,), step, dtype=torch.int64), mask=width,
                             **settings)
        out = assert_sample_agree(args, num_top=3)
        assert_tokens_allowed(out[0], args["allowed_token_bitmask"], 5000)


def test_sample_masked_large_vocab():
    args = sampling_args(6, 152_064, temperature=0.8, top_k=40, top_p=0.95, mask="wide")
    assert_sample_agree(args, num_top=20)
    args = sampling_args(6, 152_064, temperature=1.0, top_p=0.9, mask="exact")
    assert_sample_agree(args, num_top=2000)  # the host-side top-N path


def test_sample_all_ones_mask_is_unconstrained():
    args = sampling_args(8, 4000, temperature=0.9, top_k=30, top_p=0.9, penalties=True, bias=True)
    plain = run_sample(args, "cuda", 4)
    args["allowed_token_bitmask"] = torch.full((8, 126), -1, dtype=torch.int32)
    for got, want in zip(run_sample(args, "cuda", 4), plain):
        assert torch.equal(got, want)
    assert_sample_agree(args, num_top=4)
