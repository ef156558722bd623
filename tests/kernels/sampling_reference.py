"""csrc/SAMPLING.md in plain PyTorch: slow, one row at a time, full sorts.

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
    kept: torch.Tensor  # bool [V]: the final set M (all True-free for greedy: just the token)
    probs: torch.Tensor  # float64 [V]: w renormalized over M, the draw's distribution


def filtered_weights(x: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float):
    """Step 6 up to the draw: (w float32 [V], M bool [V])."""
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
               num_top_logprobs: int = 0) -> RowResult:
    """One row of SAMPLING.md. Scalars are float32 values passed as Python floats."""
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

    if temperature <= GREEDY_TEMPERATURE:
        token = int(torch.argmax(x))  # first maximal index
        kept = torch.zeros(vocab, dtype=torch.bool)
        kept[token] = True
        probs = kept.double()
    else:
        w, kept = filtered_weights(x, temperature, top_k, top_p, min_p)
        ids = kept.nonzero().flatten()  # increasing id order
        cum = torch.cumsum(w[ids].double(), 0)
        target = uniform(seed, step) * cum[-1].item()
        above = (cum > target).nonzero()
        token = int(ids[above[0, 0]]) if above.numel() else int(ids[-1])
        probs = torch.where(kept, w.double(), 0.0)
        probs = probs / probs.sum()
    return RowResult(token, float(lp[token]), top_ids, top_lps, kept, probs)


def sample(logits, temperature, top_k, top_p, min_p, seeds, steps, repetition_penalty, presence_penalty,
           frequency_penalty, prompt_token_ids=None, output_token_ids=None, logit_bias_ids=None,
           logit_bias_values=None, num_top_logprobs=0) -> list[RowResult]:
    """The op's arguments, row by row."""
    logits = logits.cpu()
    row = lambda t, b: None if t is None else t[b].cpu()  # noqa: E731
    return [
        sample_row(logits[b], float(temperature[b]), int(top_k[b]), float(top_p[b]), float(min_p[b]),
                   int(seeds[b]), int(steps[b]), float(repetition_penalty[b]), float(presence_penalty[b]),
                   float(frequency_penalty[b]), row(prompt_token_ids, b), row(output_token_ids, b),
                   row(logit_bias_ids, b), row(logit_bias_values, b), num_top_logprobs)
        for b in range(logits.shape[0])
    ]
