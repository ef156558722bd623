"""csrc/SAMPLING.md in plain PyTorch: slow, one row at a time, full sorts.

The allowed-token bitmask (step 5) is applied literally: steps 6-7 run on the
sub-row of allowed ids, so the kernels' "w = 0" implementation is checked
against "the other ids do not exist".

Everything the spec computes in float32 is computed here with float32
tensors, step by step in the spec's order; masses (Z_K, the top-p cumulative
sums, the draw's running sum) are summed in float64, which is how the kernels
read "sum" (see the report in the sampler commit: the spec leaves the
accumulation precision open, float64 makes the summation order irrelevant).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

MASK64 = (1 << 64) - 1
GREEDY_TEMPERATURE = 1e-5


def splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def uniform(seed: int, step: int) -> float:
    """u in [0, 1) from (seed, step); int64 seeds/steps are taken as uint64."""
    h = splitmix64((splitmix64(seed & MASK64) + (step & MASK64)) & MASK64)
    return (h >> 11) * 2.0**-53


def allowed_from_bitmask(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """Step 5's A as bool [vocab] from one row of int32 words: bit i % 32 (from the
    least significant) of word i // 32; ids past the words are not allowed."""
    ids = torch.arange(vocab)
    word = ids // 32
    inside = word < words.numel()
    bits = (words.long()[word.clamp(max=max(words.numel() - 1, 0))] >> (ids % 32)) & 1 if words.numel() else ids * 0
    return inside & (bits == 1)


def pack_bitmask(allowed: torch.Tensor, num_words: int | None = None) -> torch.Tensor:
    """The inverse: bool [batch, n] -> int32 [batch, num_words] (default ceil(n / 32));
    ids >= n get 0 bits, ids >= 32 * num_words are dropped."""
    batch, n = allowed.shape
    num_words = (n + 31) // 32 if num_words is None else num_words
    bits = torch.zeros(batch, 32 * num_words, dtype=torch.int64)
    m = min(n, 32 * num_words)
    bits[:, :m] = allowed[:, :m].long()
    words = (bits.view(batch, num_words, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _ids(row: torch.Tensor | None, vocab: int) -> list[int]:
    """A padded id list without padding and out-of-range ids."""
    if row is None:
        return []
    return [i for i in row.tolist() if 0 <= i < vocab]


@dataclass
class RowResult:
    token: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]
    kept: torch.Tensor  # bool [V]: the final set M (for greedy: just the token; none for token -1)
    probs: torch.Tensor  # float64 [V]: w renormalized over M, the draw's distribution


def filtered_weights(x: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float,
                     allowed: torch.Tensor | None = None):
    """Step 7 up to the draw: (w float32 [V], M bool [V]). With `allowed` (bool [V],
    step 5's A), the step runs on the sub-row x[A] as if no other id existed;
    w is 0 and M False outside A."""
    if allowed is not None:
        ids = allowed.nonzero().flatten()
        w_a, keep_a = filtered_weights(x[ids], temperature, top_k, top_p, min_p)
        w = torch.zeros_like(x)
        keep = torch.zeros(x.numel(), dtype=torch.bool)
        w[ids], keep[ids] = w_a, keep_a
        return w, keep
    vocab = x.numel()
    z = x / torch.tensor(temperature, dtype=torch.float32)
    w = torch.exp(z - z.max())
    if 1 <= top_k < vocab:
        t_k = torch.sort(w, descending=True).values[top_k - 1]
        keep = w >= t_k
    else:
        keep = torch.ones(vocab, dtype=torch.bool)
    if top_p < 1:
        w_k = w[keep]
        z_k = w_k.double().sum().item()
        vals = torch.sort(w_k, descending=True).values
        cum = torch.cumsum(vals.double(), 0)
        # Mass of everything >= v is the cumsum at the last copy of v.
        last_of_group = torch.ones_like(vals, dtype=torch.bool)
        last_of_group[:-1] = vals[:-1] != vals[1:]
        ok = last_of_group & (cum >= top_p * z_k)
        t_p = vals[ok.nonzero()[0, 0]] if ok.any() else vals[-1]
        keep = keep & (w >= t_p)
    if min_p > 0:
        keep = keep & (w >= torch.tensor(min_p, dtype=torch.float32))
    return w, keep


def sample_row(x_raw: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float, seed: int,
               step: int, repetition_penalty: float, presence_penalty: float, frequency_penalty: float,
               prompt_ids: torch.Tensor | None = None, output_ids: torch.Tensor | None = None,
               bias_ids: torch.Tensor | None = None, bias_values: torch.Tensor | None = None,
               num_top_logprobs: int = 0, allowed_words: torch.Tensor | None = None) -> RowResult:
    """One row of SAMPLING.md. Scalars are float32 values passed as Python floats;
    allowed_words is the row's int32 bitmask words (None = no mask)."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    x = x_raw.float().clone()
    vocab = x.numel()

    # 1. Log-probabilities of the raw logits; top-N descending, ties -> lower id
    # (a stable descending sort keeps equal values in id order).
    lp = torch.log_softmax(x, dim=-1)
    top = torch.sort(lp, descending=True, stable=True)
    top_ids = top.indices[:num_top_logprobs].tolist()
    top_lps = top.values[:num_top_logprobs].tolist()

    # 2. Logit bias, pair by pair.
    if bias_ids is not None:
        for i, v in zip(bias_ids.tolist(), bias_values.tolist()):
            if 0 <= i < vocab:
                x[i] = x[i] + f32(v)
    # 3. Repetition penalty, once per distinct id of prompt + output.
    prompt, output = _ids(prompt_ids, vocab), _ids(output_ids, vocab)
    r = f32(repetition_penalty)
    if repetition_penalty != 1:
        for i in sorted(set(prompt) | set(output)):
            x[i] = x[i] / r if x[i] > 0 else x[i] * r
    # 4. Frequency / presence per distinct output id with its count.
    if frequency_penalty != 0 or presence_penalty != 0:
        for i, c in Counter(output).items():
            x[i] = x[i] - (f32(frequency_penalty) * f32(c) + f32(presence_penalty))

    # 5. Allowed ids: the sub-row A (all ids without a mask).
    allowed = None if allowed_words is None else allowed_from_bitmask(allowed_words, vocab)
    a_ids = torch.arange(vocab) if allowed is None else allowed.nonzero().flatten()
    if a_ids.numel() == 0:
        none = torch.zeros(vocab, dtype=torch.bool)
        return RowResult(-1, float("-inf"), top_ids, top_lps, none, none.double())

    if temperature <= GREEDY_TEMPERATURE:
        token = int(a_ids[torch.argmax(x[a_ids])])  # first maximal index of the sub-row
        kept = torch.zeros(vocab, dtype=torch.bool)
        kept[token] = True
        probs = kept.double()
    else:
        w, kept = filtered_weights(x, temperature, top_k, top_p, min_p, allowed)
        ids = kept.nonzero().flatten()  # increasing id order
        if ids.numel() == 0:  # M empty (e.g. min_p > 1): the last id of A
            token = int(a_ids[-1])
            probs = torch.zeros(vocab, dtype=torch.float64)
            probs[token] = 1.0
        else:
            cum = torch.cumsum(w[ids].double(), 0)
            target = uniform(seed, step) * cum[-1].item()
            above = (cum > target).nonzero()
            token = int(ids[above[0, 0]]) if above.numel() else int(ids[-1])
            probs = torch.where(kept, w.double(), 0.0)
            probs = probs / probs.sum()
    return RowResult(token, float(lp[token]), top_ids, top_lps, kept, probs)


def sample(logits, temperature, top_k, top_p, min_p, seeds, steps, repetition_penalty, presence_penalty,
           frequency_penalty, prompt_token_ids=None, output_token_ids=None, logit_bias_ids=None,
           logit_bias_values=None, num_top_logprobs=0, allowed_token_bitmask=None) -> list[RowResult]:
    """The op's arguments, row by row."""
    logits = logits.cpu()
    row = lambda t, b: None if t is None else t[b].cpu()  # noqa: E731
    return [
        sample_row(logits[b], float(temperature[b]), int(top_k[b]), float(top_p[b]), float(min_p[b]),
                   int(seeds[b]), int(steps[b]), float(repetition_penalty[b]), float(presence_penalty[b]),
                   float(frequency_penalty[b]), row(prompt_token_ids, b), row(output_token_ids, b),
                   row(logit_bias_ids, b), row(logit_bias_values, b), num_top_logprobs,
                   row(allowed_token_bitmask, b))
        for b in range(logits.shape[0])
    ]
