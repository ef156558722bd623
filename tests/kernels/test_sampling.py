"""pyserve::sample against csrc/SAMPLING.md (tests/kernels/sampling_reference.py)."""

import math

import pytest
import torch

import pyserve._ops  # noqa: F401  (loads the extension)
from pyserve import _ops
from tests.kernels import sampling_reference as ref

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_args(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=0, steps=0, rep=1.0, pres=0.0,
              freq=0.0, prompt=None, output=None, bias_ids=None, bias_values=None, num_top_logprobs=0):
    """The op's positional arguments; scalars broadcast to every row."""
    batch = logits.shape[0]

    def col(v, dtype):
        t = v if isinstance(v, torch.Tensor) else torch.full((batch,), v)
        return t.to(dtype).to(logits.device).contiguous()

    opt = lambda t: None if t is None else t.to(logits.device).contiguous()  # noqa: E731
    return (logits, col(temperature, torch.float32), col(top_k, torch.int32), col(top_p, torch.float32),
            col(min_p, torch.float32), col(seeds, torch.int64), col(steps, torch.int64), col(rep, torch.float32),
            col(pres, torch.float32), col(freq, torch.float32), opt(prompt), opt(output), opt(bias_ids),
            opt(bias_values), num_top_logprobs)


def random_params(batch, vocab, gen, *, lists=True):
    """Mixed per-row parameters: every filter on and off, penalties, bias, padding, out-of-range ids."""
    r = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    ri = lambda lo, hi, *s: torch.randint(lo, hi, s, generator=gen)  # noqa: E731
    temperature = torch.where(r(batch) < 0.15, torch.zeros(batch), 0.05 + 1.5 * r(batch))
    top_k = torch.where(r(batch) < 0.5, ri(1, 80, batch), ri(-2, 1, batch))
    if batch:
        top_k[ri(0, batch, 3)] = vocab  # >= vocab is off
    top_p = torch.where(r(batch) < 0.5, 0.05 + 0.95 * r(batch), torch.ones(batch))
    min_p = torch.where(r(batch) < 0.3, 0.3 * r(batch), torch.zeros(batch))
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
              seeds=ri(-(2**62), 2**62, batch), steps=ri(0, 2**40, batch))
    if lists:
        kw["rep"] = torch.where(r(batch) < 0.4, 0.5 + 1.5 * r(batch), torch.ones(batch))
        kw["pres"] = torch.where(r(batch) < 0.4, 2 * r(batch) - 1, torch.zeros(batch))
        kw["freq"] = torch.where(r(batch) < 0.4, 2 * r(batch) - 1, torch.zeros(batch))
        # Ids cluster in a small range so they repeat; -1 pads, and some fall outside [0, vocab).
        kw["prompt"] = torch.where(r(batch, 24) < 0.2, -1, ri(-3, min(vocab + 3, 60), batch, 24))
        kw["output"] = torch.where(r(batch, 16) < 0.2, -1, ri(-3, min(vocab + 3, 60), batch, 16))
        kw["bias_ids"] = torch.where(r(batch, 6) < 0.3, -1, ri(0, min(vocab + 2, 40), batch, 6))
        kw["bias_values"] = 10 * r(batch, 6) - 5
    return kw


def check_against_reference(args, expect_all_tokens=True):
    sampled, logprob, top_ids, top_lps = _ops.sample(*args)
    rows = ref.sample(*args)
    want = torch.tensor([row.token for row in rows])
    mismatches = (sampled.cpu() != want).nonzero().flatten().tolist()
    assert not mismatches, f"rows {mismatches}: kernel {sampled.cpu()[mismatches].tolist()} != reference {want[mismatches].tolist()}"
    lp_raw = torch.log_softmax(args[0].float(), dim=-1).cpu()
    torch.testing.assert_close(logprob.cpu(), lp_raw.gather(1, want[:, None]).squeeze(1), atol=1e-5, rtol=1e-5)
    n = args[-1]
    assert top_ids.shape == (args[0].shape[0], n) and top_lps.shape == (args[0].shape[0], n)
    if n:
        assert torch.equal(top_ids.cpu(), torch.tensor([row.top_ids for row in rows]))
        torch.testing.assert_close(top_lps.cpu(), torch.tensor([row.top_logprobs for row in rows]), atol=1e-5,
                                   rtol=1e-5)
    return sampled


# ---- the random number ---------------------------------------------------------

def test_splitmix64_known_value():
    # The first output of the canonical SplitMix64 generator seeded with 0.
    assert ref.splitmix64(0) == 0xE220A8397B1DCDAF
    u = ref.uniform(-1, 2**63 - 1)
    assert 0.0 <= u < 1.0 and u == math.ldexp(u, 53) * 2.0**-53


# ---- greedy ------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32003])
def test_greedy_is_argmax(device, dtype, vocab):
    logits = (torch.randn(24, vocab) * 4).to(dtype)
    # Exact ties at the maximum: the lowest id wins.
    logits[0] = 0
    if vocab > 5:
        logits[1, 3] = logits[1, 5] = 100
    args = make_args(logits.to(device), temperature=torch.tensor([0.0, 1e-5] * 12), seeds=7, num_top_logprobs=1)
    sampled, logprob, top_ids, _ = _ops.sample(*args)
    assert torch.equal(sampled.cpu(), logits.float().argmax(dim=1))
    if vocab > 5:
        assert sampled[1] == 3
    torch.testing.assert_close(logprob.cpu(), torch.log_softmax(logits.float(), 1).max(1).values, atol=1e-5,
                               rtol=1e-5)
    assert torch.equal(top_ids[:, 0].cpu(), sampled.cpu())


# ---- exact agreement with the reference ----------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 5, 1003, 4099])
def test_matches_reference_mixed_rows(device, dtype, vocab):
    gen = torch.Generator().manual_seed(vocab)
    batch = 96
    logits = torch.randn(batch, vocab, generator=gen) * 3
    if vocab > 1:
        # Masked vocabulary (padding ids, grammar masks): -inf logits must never be drawn.
        logits[::4, vocab // 2:] = float("-inf")
    logits = logits.to(dtype)
    args = make_args(logits.to(device), num_top_logprobs=min(vocab, 6), **random_params(batch, vocab, gen))
    sampled = check_against_reference(args)
    assert torch.isfinite(logits.float().gather(1, sampled.cpu()[:, None])).all()


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_ties(device):
    # Logits on a coarse grid: many exact ties at the top-k, top-p and min-p
    # thresholds, and at the top-N boundary.
    gen = torch.Generator().manual_seed(1)
    batch, vocab = 64, 300
    logits = torch.randint(-8, 4, (batch, vocab), generator=gen).float() * 0.5
    kw = random_params(batch, vocab, gen, lists=False)
    check_against_reference(make_args(logits.to(device), num_top_logprobs=20, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 0.3), (0, 0.99), (3000, 0.95), (3000, 1.0), (40, 0.9)])
def test_matches_reference_large_vocab(device, top_k, top_p):
    # Large kept sets take the radix-select top-p path; many steps per row.
    gen = torch.Generator().manual_seed(top_k + int(100 * top_p))
    batch, vocab = 48, 12007
    logits = torch.randn(batch, vocab, generator=gen) * 2
    args = make_args(logits.to(device), temperature=0.9, top_k=top_k, top_p=top_p,
                     seeds=torch.randint(0, 2**63 - 1, (batch,), generator=gen), steps=torch.arange(batch),
                     num_top_logprobs=3)
    check_against_reference(args)


@pytest.mark.parametrize("device", DEVICES)
def test_all_logprobs(device):
    logits = torch.randn(4, 50)
    args = make_args(logits.to(device), temperature=0.0, num_top_logprobs=50)
    _, _, top_ids, top_lps = _ops.sample(*args)
    lp = torch.log_softmax(logits, 1)
    assert torch.equal(top_ids.cpu(), torch.sort(lp, dim=1, descending=True, stable=True).indices)
    torch.testing.assert_close(top_lps.cpu(), torch.sort(lp, 1, descending=True).values, atol=1e-5, rtol=1e-5)


# ---- the distribution ---------------------------------------------------------------

# chi-square critical values at p = 0.001 for df = 1..10; Wilson-Hilferty above.
CHI2_999 = [10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588]


def chi2_critical(df):
    if df <= len(CHI2_999):
        return CHI2_999[df - 1]
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + 3.090232 * math.sqrt(a)) ** 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=1.3, top_k=12, top_p=0.9, min_p=0.05),
], ids=["temperature", "top_k", "top_p", "min_p", "combined"])
def test_distribution(device, case):
    draws, vocab = 20000, 40
    gen = torch.Generator().manual_seed(11)
    row = torch.randn(vocab, generator=gen) * 1.5
    logits = row.expand(draws, vocab).contiguous()
    args = make_args(logits.to(device), seeds=1234, steps=torch.arange(draws), **case)
    sampled = _ops.sample(*args)[0].cpu()
    _, kept = ref.filtered_weights(row, case["temperature"], case.get("top_k", 0), case.get("top_p", 1.0),
                                   case.get("min_p", 0.0))
    expected = ref.sample_row(row, case["temperature"], case.get("top_k", 0), case.get("top_p", 1.0),
                              case.get("min_p", 0.0), 1234, 0, 1.0, 0.0, 0.0).probs
    counts = torch.bincount(sampled, minlength=vocab).double()
    assert counts[~kept].sum() == 0, f"drew filtered-out ids {(~kept & (counts > 0)).nonzero().flatten().tolist()}"
    # Bins expected to hold fewer than 5 draws are pooled.
    exp_counts = expected * draws
    big = exp_counts >= 5
    obs = torch.cat([counts[big], counts[~big & kept].sum().reshape(1)])
    exp = torch.cat([exp_counts[big], exp_counts[~big & kept].sum().reshape(1)])
    if exp[-1] < 5:  # nothing (or too little) to pool: fold it into the last bin
        obs, exp = torch.cat([obs[:-2], (obs[-2] + obs[-1]).reshape(1)]), torch.cat([exp[:-2], (exp[-2] + exp[-1]).reshape(1)])
    df = obs.numel() - 1
    assert df >= 1
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert stat < chi2_critical(df), f"chi2 {stat:.1f} >= {chi2_critical(df):.1f} (df={df})"


# ---- batch invariance ---------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_batch_invariance(device):
    gen = torch.Generator().manual_seed(5)
    vocab = 2053
    batch = 17
    logits = torch.randn(batch, vocab, generator=gen) * 2
    kw = random_params(batch, vocab, gen)
    alone = [_ops.sample(*make_args(logits[b:b + 1].to(device), num_top_logprobs=4, **{
        k: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})) for b in range(batch)]
    for trial in range(3):
        perm = torch.randperm(batch, generator=gen)
        # Pad with random other rows too, so the batch size changes as well.
        extra = torch.randn(trial * 5, vocab, generator=gen)
        extra_kw = random_params(trial * 5, vocab, gen)
        big_kw = {k: torch.cat([v[perm], extra_kw[k]]) for k, v in kw.items()}
        out = _ops.sample(*make_args(torch.cat([logits[perm], extra]).to(device), num_top_logprobs=4, **big_kw))
        for pos, b in enumerate(perm.tolist()):
            for got, want in zip(out, alone[b]):
                assert torch.equal(got[pos].cpu(), want[0].cpu()), f"row {b} changed at batch position {pos}"


# ---- validation ------------------------------------------------------------------------

def _valid_args(batch=3, vocab=11):
    return make_args(torch.randn(batch, vocab), top_k=2, prompt=torch.full((batch, 2), -1),
                     output=torch.zeros(batch, 3, dtype=torch.long), bias_ids=torch.zeros(batch, 1, dtype=torch.long),
                     bias_values=torch.ones(batch, 1), num_top_logprobs=2)


def _replace(args, index, value):
    args = list(args)
    args[index] = value
    return tuple(args)


@pytest.mark.parametrize("index,value,name", [
    (0, torch.randn(11), "logits"),
    (0, torch.randint(0, 5, (3, 11)), "logits"),
    (0, torch.randn(11, 3).t(), "logits"),
    (1, torch.ones(3, dtype=torch.float64), "temperature"),
    (2, torch.ones(3, dtype=torch.int64), "top_k"),
    (3, torch.ones(4), "top_p"),
    (4, torch.zeros(3, 1), "min_p"),
    (5, torch.zeros(3, dtype=torch.int32), "seeds"),
    (6, torch.zeros(2, dtype=torch.int64), "steps"),
    (7, torch.ones(3, dtype=torch.float16), "repetition_penalty"),
    (8, torch.zeros(6)[::2], "presence_penalty"),
    (9, torch.zeros(3, dtype=torch.int32), "frequency_penalty"),
    (10, torch.zeros(3, 2, dtype=torch.int32), "prompt_token_ids"),
    (11, torch.zeros(2, 3, dtype=torch.long), "output_token_ids"),
    (12, torch.zeros(3, dtype=torch.long), "logit_bias_ids"),
    (13, torch.ones(3, 2), "logit_bias_values"),
    (13, None, "logit_bias"),
    (14, 12, "num_top_logprobs"),
    (14, -1, "num_top_logprobs"),
])
def test_validation_names_the_argument(index, value, name):
    with pytest.raises(RuntimeError, match=name):
        _ops.sample(*_replace(_valid_args(), index, value))


@pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU")
def test_validation_device_mismatch():
    args = _valid_args()
    with pytest.raises(RuntimeError, match="temperature"):
        _ops.sample(*_replace(tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args), 1, args[1]))


# ---- op registration ---------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in _valid_args())
    torch.library.opcheck(torch.ops.pyserve.sample.default, args)
    no_lists = args[:10] + (None, None, None, None, 0)
    torch.library.opcheck(torch.ops.pyserve.sample.default, no_lists)
