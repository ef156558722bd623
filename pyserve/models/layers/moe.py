"""Sparse mixture of experts (Mixtral, Qwen3-MoE).

A router scores each token against every expert (softmax in fp32); the token runs through its
top-k experts' gated MLPs, and their outputs are summed weighted by those probabilities,
renormalised over the k when the model says so (`norm_topk_prob`; Mixtral always). This is
transformers' MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock: softmax, top-k, renormalise.

Experts run grouped: the batch's (token, expert) pairs are sorted by expert, each expert that got
tokens runs one gate/up and one down matmul over all of its rows, and the rows are put back in
token order and summed per token. The Python loop is over experts, never over tokens.

Weights: an expert's gate and up projections are fused into one [2I, H] matrix ([gate | up] rows,
as the dense MLP's gate_up_proj) and its down projection is [H, I]; the layer keeps them stacked,
[E, 2I, H] and [E, H, I], in slots a checkpoint fills per expert (HF's `experts.{e}.gate_proj.weight`),
per projection for all experts at once (GGUF's stacked `ffn_gate_exps`, [E, I, H]), or whole
(transformers 5's fused `experts.gate_up_proj`). An ExpertsMethod turns them, once loaded, into what
runs: the default is one oneDNN pre-laid-out matmul per expert and projection (models/linear.py);
quantized experts are further methods.

Tensor parallelism (vLLM's "TP experts", not expert parallelism): every rank holds every expert, and
of each its share of the intermediate dimension I: rows [r*I/N, (r+1)*I/N) of gate and of up
(column-parallel, per expert) and the matching input columns of down (row-parallel). The router stays
whole on every rank, so every rank routes alike; each runs its partial experts for the routed tokens,
weights and sums them per token, and one all-reduce at the end of the block sums the ranks' partial
outputs. The checkpoint's tensors are checked against their full shapes and each rank keeps its slice
(a Partition, layers/parallel.py, as Weight does).

Batch invariance: routing is row by row, an expert's matmul gives a row the same result whatever
other rows share the call (oneDNN; see models/linear.py), and a token sums its k expert outputs in
its own top-k order; so a token's output does not depend on the rest of the batch.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from pyserve.config import UnsupportedModelError
from pyserve.distributed.state import tensor_parallel
from pyserve.models.layers.activation import ACTIVATIONS
from pyserve.models.layers.linear import LinearLayer
from pyserve.models.layers.parallel import Partition
from pyserve.models.layers.weight import MissingWeightError
from pyserve.models.linear import Linear as PackedMatmul


class StackedWeight:
    """A [num_experts, rows, cols] weight whose rows may be named shards (gate/up), filled per
    expert (`expert(e).load`) or for every expert at once (`load`, a [num_experts, ...] tensor).
    partition: which slice of each expert's checkpoint matrix this tensor-parallel rank keeps (rows of
    each shard, or columns: layers/parallel.py); rows, cols and shards are then this rank's."""

    def __init__(self, num_experts: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device,
                 shards: dict[str, int] | None = None, partition: Partition | None = None):
        self.shape = (num_experts, rows, cols)
        self.dtype, self.device = dtype, device
        self.partition = partition
        self.data: torch.Tensor | None = None
        # Row ranges by shard name; None is every row (a fused [gate | up] tensor fills both shards).
        self.shards: dict[str | None, tuple[int, int]] = {None: (0, rows)}
        start = 0
        for name, n in (shards or {}).items():
            self.shards[name] = (start, n)
            start += n
        if shards and start != rows:
            raise ValueError(f"shards of {start} rows for a weight of {rows}")
        self.parts = list(shards) if shards else [None]  # what must be filled, per expert
        self.loaded: set[tuple[int, str | None]] = set()

    def load(self, name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
        """Every expert's weight (or shard) at once: tensor [num_experts, shard rows, cols]."""
        self._fill(name, tensor, shard, None)

    def expert(self, e: int) -> "ExpertSlot":
        return ExpertSlot(self, e)

    def missing(self) -> list[str | None]:
        return []  # reported expert by expert, under the per-expert names (ExpertSlot.missing)

    def missing_of(self, e: int) -> list[str | None]:
        return [s for s in self.parts if (e, s) not in self.loaded]

    def _fill(self, name: str, tensor: torch.Tensor, shard: str | None, expert: int | None) -> None:
        if shard not in self.shards:
            raise MissingWeightError(f"weight {name!r}: no shard {shard!r} here (shards: {self.parts})")
        start, rows = self.shards[shard]
        experts = range(self.shape[0]) if expert is None else (expert,)
        want = (rows, self.shape[2])  # one expert's matrix
        if self.partition is not None:  # the checkpoint's is whole
            want = self.partition.checkpoint_shape(want, shard)
        if expert is None:
            want = (self.shape[0], *want)
        if tuple(tensor.shape) != want:
            raise MissingWeightError(f"weight {name!r} has shape {tuple(tensor.shape)}, the config implies {want}")
        filled = [(e, s) for e in experts for s in (self.parts if shard is None else [shard])]
        if any(pair in self.loaded for pair in filled):
            raise MissingWeightError(f"weight {name!r} appears twice in the checkpoint")
        if self.partition is not None:
            if expert is None:  # [E, rows, cols] seen as [rows, E, cols]: the partition's rows, then columns
                tensor = self.partition.select(tensor.transpose(0, 1), shard).transpose(0, 1)
            else:
                tensor = self.partition.select(tensor, shard)
        tensor = tensor.to(device=self.device, dtype=self.dtype)
        if expert is None and shard is None:  # the whole stack (nothing else can be loaded): adopt it
            self.data = tensor.contiguous()
        else:
            if self.data is None:
                self.data = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            target = self.data if expert is None else self.data[expert]
            target[..., start: start + rows, :].copy_(tensor)
        self.loaded.update(filled)


class ExpertSlot:
    """One expert's [rows, cols] slice of a StackedWeight, under its own checkpoint name."""

    def __init__(self, stacked: StackedWeight, e: int):
        self.stacked, self.e = stacked, e

    def load(self, name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
        self.stacked._fill(name, tensor, shard, self.e)

    def missing(self) -> list[str | None]:
        return self.stacked.missing_of(self.e)


class ExpertsMethod(Protocol):
    def prepare(self, gate_up: torch.Tensor, down: torch.Tensor) -> Any:
        """The loaded stacks [E, 2I, H] and [E, H, I] -> the method's own state."""

    def apply(self, state: Any, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x: [rows, H], the rows routed to `expert` -> its MLP's output [rows, H]."""

    def warm_up(self, state: Any, max_rows: int) -> None:
        """Build whatever the method caches per shape, for calls of up to max_rows rows."""


class DenseExperts:
    """Each expert's two matmuls as dense layers, through oneDNN with pre-reordered weights on the CPU
    (F.linear elsewhere): one PackedMatmul per expert and projection."""

    def __init__(self, act_and_mul: Callable[[torch.Tensor], torch.Tensor]):
        self.act_and_mul = act_and_mul

    def prepare(self, gate_up: torch.Tensor, down: torch.Tensor) -> list[tuple[PackedMatmul, PackedMatmul]]:
        return [(PackedMatmul(gate_up[e]), PackedMatmul(down[e])) for e in range(gate_up.shape[0])]

    def apply(self, state: list[tuple[PackedMatmul, PackedMatmul]], expert: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = state[expert]
        return down(self.act_and_mul(gate_up(x)))

    def warm_up(self, state: list[tuple[PackedMatmul, PackedMatmul]], max_rows: int) -> None:
        for matmul in state[0]:  # primitives depend on shapes, and every expert has the same
            matmul.warm_up_shapes(max_rows)


class Experts:
    """The stacked experts of one MoE layer and their grouped forward."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, dtype: torch.dtype,
                 device: torch.device, act: str = "silu", down_name: str = "down_proj",
                 method: ExpertsMethod | None = None):
        """intermediate_size: the checkpoint's (moe_intermediate_size); under tensor parallelism each rank
        holds an equal share of it (`self.intermediate_size`), and its output is a partial sum."""
        self.num_experts = num_experts
        self.down_name = down_name
        tp = tensor_parallel()
        gate_up_partition = down_partition = None
        if tp.size > 1:
            full = intermediate_size
            if full % tp.size:
                raise UnsupportedModelError(
                    f"--tensor-parallel-size {tp.size}: the experts' intermediate size (moe_intermediate_size "
                    f"{full}) does not split evenly over {tp.size} ranks; use a tensor-parallel size that divides it")
            intermediate_size = full // tp.size
            take = (tp.rank * intermediate_size, intermediate_size)
            gate_up_partition = Partition(0, {"gate": full, "up": full}, {"gate": take, "up": take})
            down_partition = Partition(1, {None: full}, {None: take})
        self.intermediate_size = intermediate_size
        self.gate_up = StackedWeight(num_experts, 2 * intermediate_size, hidden_size, dtype, device,
                                     {"gate": intermediate_size, "up": intermediate_size}, gate_up_partition)
        self.down = StackedWeight(num_experts, hidden_size, intermediate_size, dtype, device,
                                  partition=down_partition)
        self.method = method or DenseExperts(ACTIVATIONS[act])
        self.state: Any = None

    def weights(self) -> dict[str, object]:
        """Stacked (`gate_up_proj`, `down_proj`: GGUF's and transformers 5's fused names) and per expert
        (`{e}.gate_up_proj.weight`, filled from gate_proj/up_proj through the model's packed_modules)."""
        slots: dict[str, object] = {"gate_up_proj": self.gate_up, "down_proj": self.down}
        for e in range(self.num_experts):
            slots[f"{e}.gate_up_proj.weight"] = self.gate_up.expert(e)
            slots[f"{e}.{self.down_name}.weight"] = self.down.expert(e)
        return slots

    def finish_loading(self) -> None:
        self.state = self.method.prepare(self.gate_up.data, self.down.data)
        self.gate_up.data = self.down.data = None  # the method holds what it needs

    def warm_up(self, max_rows: int) -> None:
        self.method.warm_up(self.state, max_rows)

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; topk_ids: [T, k] (int64); topk_weights: [T, k] fp32 -> [T, H] in x's dtype."""
        tokens, k = topk_ids.shape
        flat = topk_ids.reshape(-1)
        # The (token, slot) pairs grouped by expert (stable: in token order within an expert).
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        rows = x.index_select(0, order // k)
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                outs.append(self.method.apply(self.state, e, rows[start: start + n]))
                start += n
        done = torch.cat(outs) if outs else rows
        # Back in (token, slot) order, then each token's k outputs summed in its own top-k order.
        per_pair = torch.empty_like(done).index_copy_(0, order, done).view(tokens, k, x.shape[1])
        out = per_pair[:, 0] * topk_weights[:, :1]
        for j in range(1, k):
            out += per_pair[:, j] * topk_weights[:, j: j + 1]
        return out.to(x.dtype)


class SparseMoE:
    """Router + experts: the feed-forward block of an MoE layer."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *,
                 renormalize: bool, dtype: torch.dtype, device: torch.device, act: str = "silu",
                 down_name: str = "down_proj", method: ExpertsMethod | None = None):
        if not 0 < top_k <= num_experts:
            raise ValueError(f"{top_k} experts per token out of {num_experts}")
        self.top_k, self.renormalize = top_k, renormalize
        # The router, whole on every rank (every rank routes every token alike).
        self.gate = LinearLayer(hidden_size, num_experts, dtype=dtype, device=device)
        self.experts = Experts(num_experts, hidden_size, intermediate_size, dtype=dtype, device=device, act=act,
                               down_name=down_name, method=method)
        tp = tensor_parallel()
        self.reduce_over = tp if tp.size > 1 else None  # the group the experts' partial outputs sum over

    def named_modules(self, prefix: str) -> dict[str, object]:
        return {f"{prefix}.gate": self.gate, f"{prefix}.experts": self.experts}

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (weights [T, k] fp32, expert ids [T, k]), each row's best first."""
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        out = self.experts(x, ids, weights)
        # Tensor parallel: each rank's experts gave partial sums (its share of I); one all-reduce for the block.
        return out if self.reduce_over is None else self.reduce_over.all_reduce(out)
