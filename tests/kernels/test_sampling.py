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
              freq=0.0, prompt=None, output=None, bias_ids=None, bias_values=None, num_top_logprobs=0, mask=None):
    """The op's positional arguments; scalars broadcast to every row. mask: the
    allowed_token_bitmask (int32 [batch, num_words]) or None."""
    batch = logits.shape[0]

    def col(v, dtype):
        t = v if isinstance(v, torch.Tensor) else torch.full((batch,), v)
        return t.to(dtype).to(logits.device).contiguous()

    opt = lambda t: None if t is None else t.to(logits.device).contiguous()  # noqa: E731
    return (logits, col(temperature, torch.float32), col(top_k, torch.int32), col(top_p, torch.float32),
            col(min_p, torch.float32), col(seeds, torch.int64), col(steps, torch.int64), col(rep, torch.float32),
            col(pres, torch.float32), col(freq, torch.float32), opt(prompt), opt(output), opt(bias_ids),
            opt(bias_values), num_top_logprobs, opt(mask))


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


NUM_TOP, MASK = 14, 15  # positions of num_top_logprobs and allowed_token_bitmask in make_args


def check_against_reference(args, expect_all_tokens=True):
    sampled, logprob, top_ids, top_lps = _ops.sample(*args)
    rows = ref.sample(*args)
    want = torch.tensor([row.token for row in rows])
    mismatches = (sampled.cpu() != want).nonzero().flatten().tolist()
    assert not mismatches, f"rows {mismatches}: kernel {sampled.cpu()[mismatches].tolist()} != reference {want[mismatches].tolist()}"
    lp_raw = torch.log_softmax(args[0].float(), dim=-1).cpu()
    # Step 1's logprobs come from the raw logits whatever the mask; token -1 (nothing allowed) has -inf.
    want_lp = torch.where(want >= 0, lp_raw.gather(1, want.clamp(min=0)[:, None]).squeeze(1), float("-inf"))
    torch.testing.assert_close(logprob.cpu(), want_lp, atol=1e-5, rtol=1e-5)
    n = args[NUM_TOP]
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
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_batch_invariance(device, masked):
    gen = torch.Generator().manual_seed(5)
    vocab = 2053
    batch = 17
    logits = torch.randn(batch, vocab, generator=gen) * 2
    kw = random_params(batch, vocab, gen)
    if masked:
        kw["mask"] = random_mask(logits, gen)
    alone = [_ops.sample(*make_args(logits[b:b + 1].to(device), num_top_logprobs=4, **{
        k: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})) for b in range(batch)]
    for trial in range(3):
        perm = torch.randperm(batch, generator=gen)
        # Pad with random other rows too, so the batch size changes as well.
        extra = torch.randn(trial * 5, vocab, generator=gen)
        extra_kw = random_params(trial * 5, vocab, gen)
        if masked:
            extra_kw["mask"] = random_mask(extra, gen)
        big_kw = {k: torch.cat([v[perm], extra_kw[k]]) for k, v in kw.items()}
        out = _ops.sample(*make_args(torch.cat([logits[perm], extra]).to(device), num_top_logprobs=4, **big_kw))
        for pos, b in enumerate(perm.tolist()):
            for got, want in zip(out, alone[b]):
                assert torch.equal(got[pos].cpu(), want[0].cpu()), f"row {b} changed at batch position {pos}"


# ---- allowed-token bitmask (SAMPLING.md step 5) ----------------------------------------

def random_mask(logits, gen, *, num_words=None, empty_rows=True):
    """A mixed allowed_token_bitmask for these logits: per row unconstrained (-1 words),
    dense or sparse random, one token, everything but the raw argmax, a contiguous
    range, or (empty_rows) nothing. Bits of ids >= vocab are random garbage. A row
    whose allowed ids all have -inf logits (where the spec's w is NaN) gets one
    finite id added, or nothing allowed at all."""
    batch, vocab = logits.shape
    nw = (vocab + 31) // 32 if num_words is None else num_words
    ri = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
    width = max(32 * nw, vocab)
    allowed = torch.zeros(batch, width, dtype=torch.bool)
    allowed[:, vocab:] = torch.rand(batch, width - vocab, generator=gen) < 0.5  # ignored bits
    unconstrained = torch.zeros(batch, dtype=torch.bool)
    argmax = logits.float().argmax(1)
    for b in range(batch):
        kind = ri(0, 7 if empty_rows else 6)
        if kind == 0:
            unconstrained[b] = True
        elif kind == 1:
            allowed[b, :vocab] = torch.rand(vocab, generator=gen) < 0.5
        elif kind == 2:
            allowed[b, :vocab] = torch.rand(vocab, generator=gen) < 0.02
            allowed[b, ri(0, vocab)] = True
        elif kind == 3:
            allowed[b, ri(0, vocab)] = True
        elif kind == 4:
            allowed[b, :vocab] = True
            allowed[b, argmax[b]] = False
        elif kind == 5:
            lo = ri(0, vocab)
            allowed[b, lo:ri(lo + 1, vocab + 1)] = True
        # kind 6: nothing in [0, vocab) is allowed (maybe garbage bits past it)
        limit = min(vocab, 32 * nw)  # ids past the words are not allowed
        finite = torch.isfinite(logits[b, :limit].float())
        if not unconstrained[b] and allowed[b, :limit].any() and not (allowed[b, :limit] & finite).any():
            if finite.any():
                ids = finite.nonzero().flatten()
                allowed[b, int(ids[ri(0, ids.numel())])] = True
            else:
                allowed[b, :vocab] = False
    words = ref.pack_bitmask(allowed, nw)
    words[unconstrained] = -1
    return words


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 5, 1003, 4099])
@pytest.mark.parametrize("width", ["exact", "narrow", "wide"])
def test_mask_matches_reference_mixed_rows(device, dtype, vocab, width):
    # Every filter, penalties and logit bias on top of random masks; masks exactly
    # ceil(V / 32) words, narrower than V (the ids past them are not allowed) or
    # wider (garbage bits past V are ignored).
    gen = torch.Generator().manual_seed(vocab + len(width))
    batch = 96
    logits = torch.randn(batch, vocab, generator=gen) * 3
    if vocab > 1:
        logits[::4, vocab // 2:] = float("-inf")
    logits = logits.to(dtype)
    nw = {"exact": (vocab + 31) // 32, "narrow": (vocab + 31) // 64, "wide": (vocab + 31) // 32 + 3}[width]
    mask = random_mask(logits, gen, num_words=nw)
    args = make_args(logits.to(device), num_top_logprobs=min(vocab, 6), mask=mask,
                     **random_params(batch, vocab, gen))
    sampled = check_against_reference(args).cpu()
    for b, token in enumerate(sampled.tolist()):
        allowed = ref.allowed_from_bitmask(mask[b], vocab)
        assert (token == -1) == (not allowed.any()), f"row {b}"
        assert token == -1 or allowed[token], f"row {b} drew disallowed id {token}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 0.99), (3000, 0.95), (40, 1.0), (0, 1.0)])
def test_mask_matches_reference_large_vocab(device, top_k, top_p):
    # Dense masks keep thousands of ids: the radix-select top-p path and the long draw walk.
    gen = torch.Generator().manual_seed(top_k + int(100 * top_p) + 7)
    batch, vocab = 32, 12007
    logits = torch.randn(batch, vocab, generator=gen) * 2
    allowed = torch.rand(batch, vocab, generator=gen) < 0.7
    allowed[0::3, logits[0::3].argmax(1)] = False
    mask = ref.pack_bitmask(allowed)
    mask[1::8] = -1
    args = make_args(logits.to(device), temperature=0.9, top_k=top_k, top_p=top_p,
                     seeds=torch.randint(0, 2**63 - 1, (batch,), generator=gen), steps=torch.arange(batch),
                     num_top_logprobs=3, mask=mask)
    check_against_reference(args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [7, 1000, 32003])
def test_mask_all_ones_is_unconstrained(device, vocab):
    # -1 words (the engine's unconstrained rows) and exactly-V-bit masks change nothing, bit for bit.
    gen = torch.Generator().manual_seed(vocab)
    batch = 24
    logits = torch.randn(batch, vocab, generator=gen) * 3
    kw = random_params(batch, vocab, gen)
    plain = _ops.sample(*make_args(logits.to(device), num_top_logprobs=5, **kw))
    nw = (vocab + 31) // 32
    for mask in (torch.full((batch, nw), -1, dtype=torch.int32), torch.full((batch, nw + 2), -1, dtype=torch.int32),
                 ref.pack_bitmask(torch.ones(batch, vocab, dtype=torch.bool))):
        out = _ops.sample(*make_args(logits.to(device), num_top_logprobs=5, mask=mask, **kw))
        for got, want in zip(out, plain):
            assert torch.equal(got.cpu(), want.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_greedy(device, dtype):
    vocab = 300
    logits = (torch.randn(8, vocab) * 4).to(dtype)
    allowed = torch.ones(8, vocab, dtype=torch.bool)
    lf = logits.float()
    allowed[0, lf[0].argmax()] = False  # the argmax excluded: the best allowed id
    logits[1, 7] = logits[1, 9] = logits[1, 11] = 100  # ties: the lowest allowed id holding the max
    allowed[1, 7] = False
    allowed[2] = False  # one allowed id
    allowed[2, 123] = True
    logits[3, 40:] = float("-inf")  # every allowed logit -inf: the lowest allowed id
    allowed[3, :50] = False
    allowed[4] = torch.arange(vocab) % 3 == 1  # a sparse pattern
    allowed[5] = False  # nothing allowed
    allowed[6, :vocab // 2] = False
    mask = ref.pack_bitmask(allowed)
    mask[7] = -1
    bias_ids = torch.tensor([[int(lf[b].argmin()), 5, -1] for b in range(8)])
    bias_values = torch.tensor([[1000.0, 30.0, 0.0]] * 8)  # the disallowed-or-not min id pushed to the top
    for kw in (dict(), dict(bias_ids=bias_ids, bias_values=bias_values, rep=1.5,
                            output=torch.randint(0, vocab, (8, 10)), pres=0.5, freq=0.3)):
        args = make_args(logits.to(device), temperature=0.0, mask=mask, num_top_logprobs=2, **kw)
        sampled = check_against_reference(args).cpu()
        assert sampled[5] == -1
        assert sampled[2] == 123 and sampled[3] == 50
        for b in range(8):
            assert b == 5 or allowed[b, sampled[b]] or b == 7
        if not kw:
            assert sampled[1] == 9
            masked = torch.where(allowed, lf, float("-inf"))
            for b in (0, 4, 6):
                assert sampled[b] == masked[b].argmax()


@pytest.mark.parametrize("device", DEVICES)
def test_mask_empty_rows_and_logprobs(device):
    # Rows that allow nothing sample -1 with logprob -inf; top logprobs and every other
    # row are what they are without the mask's row; logprobs are the raw logits' throughout.
    gen = torch.Generator().manual_seed(3)
    batch, vocab = 12, 1000
    logits = torch.randn(batch, vocab, generator=gen) * 3
    kw = random_params(batch, vocab, gen)
    mask = torch.full((batch, 40), -1, dtype=torch.int32)  # 1280 bits: past V for ids 1000..1279
    mask[0] = 0
    mask[1, :32] = 0
    mask[1, 31] = 0xFF000000 - 2**32  # ids 1016..1023, then 1024..1279: all past V
    mask[2, :] = 0
    mask[2, 35] = -1  # ids 1120..1151 only: past V
    allowed = torch.rand(batch, vocab, generator=gen) < 0.3
    mask[3:6, :32] = ref.pack_bitmask(allowed[3:6])
    mask[3:6, 32:] = 0
    out = _ops.sample(*make_args(logits.to(device), num_top_logprobs=7, mask=mask, **kw))
    plain = _ops.sample(*make_args(logits.to(device), num_top_logprobs=7, **kw))
    assert out[0][:3].tolist() == [-1, -1, -1]
    assert torch.isneginf(out[1][:3].cpu()).all()
    assert torch.equal(out[2].cpu(), plain[2].cpu()) and torch.equal(out[3].cpu(), plain[3].cpu())
    assert torch.equal(out[0][6:].cpu(), plain[0][6:].cpu()) and torch.equal(out[1][6:].cpu(), plain[1][6:].cpu())
    lp = torch.log_softmax(logits, 1)
    tok = out[0][3:].cpu()
    assert allowed[torch.arange(3, 6), tok[:3]].all()
    torch.testing.assert_close(out[1][3:].cpu(), lp[torch.arange(3, batch), tok], atol=1e-5, rtol=1e-5)
    # num_words == 0: nothing is allowed anywhere.
    empty = _ops.sample(*make_args(logits.to(device), num_top_logprobs=7, mask=mask[:, :0], **kw))
    assert (empty[0] == -1).all() and torch.isneginf(empty[1]).all()
    assert torch.equal(empty[2].cpu(), plain[2].cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_mask_filters_count_only_allowed_ids(device):
    # ids 0 and 1 (the two most likely) are disallowed. Over allowed ids only:
    # w(2) = 1, w(3) = e^-0.1, w(4) = e^-0.5, the rest <= e^-2.
    vocab, draws = 64, 400
    row = torch.full((vocab,), -4.0)
    row[:5] = torch.tensor([8.0, 7.0, 2.0, 1.9, 1.5])
    allowed = torch.ones(1, vocab, dtype=torch.bool)
    allowed[0, :2] = False
    mask = ref.pack_bitmask(allowed).expand(draws, -1).contiguous()
    logits = row.expand(draws, vocab).contiguous().to(device)
    for case in (dict(top_k=2), dict(min_p=0.8), dict(top_p=0.5), dict(top_k=3, top_p=0.5, min_p=0.1)):
        args = make_args(logits, seeds=99, steps=torch.arange(draws), mask=mask, **case)
        drawn = set(_ops.sample(*args)[0].tolist())
        assert drawn == {2, 3}, (case, drawn)
    # top-k counts allowed ids only: k = 3 keeps ids 2, 3 and 4.
    args = make_args(logits, seeds=5, steps=torch.arange(draws), mask=mask, top_k=3, temperature=0.5)
    assert set(_ops.sample(*args)[0].tolist()) == {2, 3, 4}
    # One allowed id is drawn whatever the filters.
    one = torch.zeros(draws, 2, dtype=torch.int32)
    one[:, 1] = 1 << 7  # id 39
    args = make_args(logits, seeds=5, steps=torch.arange(draws), mask=one, top_k=1, top_p=0.1, min_p=0.9)
    assert (_ops.sample(*args)[0] == 39).all()


@pytest.mark.parametrize("device", DEVICES)
def test_mask_degenerate_rows(device):
    # M empty (min_p > 1): the last allowed id, with and without top-k (V - 1 without a mask).
    vocab = 100
    logits = torch.randn(4, vocab)
    allowed = torch.zeros(4, vocab, dtype=torch.bool)
    allowed[:, [3, 17, 58]] = True
    mask = ref.pack_bitmask(allowed)
    mask[3] = -1
    for top_k in (0, 5):
        args = make_args(logits.to(device), min_p=1.5, top_k=top_k, mask=mask)
        assert check_against_reference(args).tolist() == [58, 58, 58, vocab - 1]
    # Every allowed logit -inf: still an allowed id (greedy: the lowest, checked above).
    logits[:, [3, 17, 58]] = float("-inf")
    for min_p in (0.0, 0.5):
        for top_k in (0, 2):
            args = make_args(logits[:3].to(device), min_p=min_p, top_k=top_k, seeds=torch.arange(3), mask=mask[:3])
            assert set(_ops.sample(*args)[0].tolist()) <= {3, 17, 58}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=1.3, top_k=12, top_p=0.9, min_p=0.05),
], ids=["temperature", "top_k", "top_p", "min_p", "combined"])
def test_mask_distribution(device, case):
    # The draws follow the renormalised distribution over the allowed ids (and the filters on them).
    draws, vocab = 20000, 40
    gen = torch.Generator().manual_seed(12)
    row = torch.randn(vocab, generator=gen) * 1.5
    allowed = torch.rand(vocab, generator=gen) < 0.65
    allowed[row.topk(3).indices] = False  # the three most likely ids are out
    words = ref.pack_bitmask(allowed[None], 3)[0]  # wider than V
    logits = row.expand(draws, vocab).contiguous()
    mask = words.expand(draws, -1).contiguous()
    args = make_args(logits.to(device), seeds=4321, steps=torch.arange(draws), mask=mask, **case)
    sampled = _ops.sample(*args)[0].cpu()
    filt = (case["temperature"], case.get("top_k", 0), case.get("top_p", 1.0), case.get("min_p", 0.0))
    _, kept = ref.filtered_weights(row, *filt, allowed)
    expected = ref.sample_row(row, *filt, 4321, 0, 1.0, 0.0, 0.0, allowed_words=words).probs
    assert torch.equal(kept, expected > 0) and not (kept & ~allowed).any()
    counts = torch.bincount(sampled, minlength=vocab).double()
    assert counts[~kept].sum() == 0, f"drew filtered-out ids {(~kept & (counts > 0)).nonzero().flatten().tolist()}"
    exp_counts = expected * draws
    big = exp_counts >= 5
    obs = torch.cat([counts[big], counts[~big & kept].sum().reshape(1)])
    exp = torch.cat([exp_counts[big], exp_counts[~big & kept].sum().reshape(1)])
    if exp[-1] < 5:  # fold a small pool into the last bin
        obs = torch.cat([obs[:-2], (obs[-2] + obs[-1]).reshape(1)])
        exp = torch.cat([exp[:-2], (exp[-2] + exp[-1]).reshape(1)])
    df = obs.numel() - 1
    assert df >= 1
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert stat < chi2_critical(df), f"chi2 {stat:.1f} >= {chi2_critical(df):.1f} (df={df})"


def test_mask_wrapper_positional_and_keyword():
    # model_runner's positional call (15 arguments) still works; the mask is a keyword.
    args = _valid_args()
    plain = _ops.sample(*args[:MASK])
    masked = _ops.sample(*args[:MASK], allowed_token_bitmask=torch.tensor([[4], [4], [4]], dtype=torch.int32))
    assert masked.token_ids.tolist() == [2, 2, 2]
    assert torch.equal(masked.top_ids, plain.top_ids) and torch.equal(masked.top_logprobs, plain.top_logprobs)
    assert torch.ops.pyserve.sample.default._schema.arguments[-1].name == "allowed_token_bitmask"


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
    (15, torch.zeros(3, 1, dtype=torch.int64), "allowed_token_bitmask"),
    (15, torch.zeros(3, 1, dtype=torch.uint8), "allowed_token_bitmask"),
    (15, torch.zeros(3, dtype=torch.int32), "allowed_token_bitmask"),
    (15, torch.zeros(3, 1, 1, dtype=torch.int32), "allowed_token_bitmask"),
    (15, torch.zeros(2, 1, dtype=torch.int32), "allowed_token_bitmask"),
    (15, torch.zeros(4, 1, dtype=torch.int32), "allowed_token_bitmask"),
    (15, torch.zeros(3, 4, dtype=torch.int32)[:, ::2], "allowed_token_bitmask"),
])
def test_validation_names_the_argument(index, value, name):
    with pytest.raises(RuntimeError, match=name):
        _ops.sample(*_replace(_valid_args(), index, value))


@pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU")
def test_validation_device_mismatch():
    args = _valid_args()
    with pytest.raises(RuntimeError, match="temperature"):
        _ops.sample(*_replace(tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args), 1, args[1]))
    on_cuda = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(RuntimeError, match="allowed_token_bitmask"):
        _ops.sample(*_replace(on_cuda, MASK, torch.full((3, 1), -1, dtype=torch.int32)))


# ---- op registration ---------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in _valid_args())
    torch.library.opcheck(torch.ops.pyserve.sample.default, args)
    no_lists = args[:10] + (None, None, None, None, 0)
    torch.library.opcheck(torch.ops.pyserve.sample.default, no_lists)
    masked = args[:MASK] + (torch.tensor([[0x5A5], [-1], [0]], dtype=torch.int32, device=device),)
    torch.library.opcheck(torch.ops.pyserve.sample.default, masked)
