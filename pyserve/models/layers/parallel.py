"""How layers split across tensor-parallel ranks (Megatron-LM's scheme, as vLLM runs it).

- Column-parallel (q/k/v, gate/up, the LM head): each rank holds some of the output rows of the weight,
  for a fused layer some rows of each fused part, and computes those outputs; nothing is exchanged.
- Row-parallel (o_proj, down_proj): each rank holds some of the input columns, multiplies the matching
  slice of the activations (which the column-parallel layer before it left on that rank), and the ranks'
  partial outputs are summed (an all-reduce). A bias is added once, by rank 0.
- Vocab-parallel embedding: each rank holds a range of the vocabulary's rows; a token's row comes from
  the rank holding it, the others contribute zeros, and an all-reduce sums them.
- Attention heads split evenly. KV heads split too while there are at least as many as ranks; with
  fewer, each rank holds the one KV head its query heads read (replicated on several ranks).

A Partition tells a Weight which slice of a checkpoint tensor is this rank's, so each rank keeps only its
part (the rest of a memory-mapped checkpoint is never read) and the loader's shape checks still name
the checkpoint's full shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyserve.config import ModelConfig, UnsupportedModelError


@dataclass(frozen=True)
class Partition:
    """dim 0: output rows (column-parallel), 1: input columns (row-parallel). For each shard of the
    weight (None: the whole), its size along dim in the checkpoint and the (start, size) this rank keeps."""

    dim: int
    full: dict[str | None, int]
    take: dict[str | None, tuple[int, int]]

    def checkpoint_shape(self, local: tuple[int, ...], shard: str | None) -> tuple[int, ...]:
        """The shape the checkpoint's tensor for `shard` must have, given this rank's slice of it."""
        if self.dim == 1:
            return (*local[:1], self.full[None], *local[2:])
        rows = self.full[shard] if shard in self.full else sum(self.full.values())
        return (rows, *local[1:])

    def select(self, tensor, shard: str | None):
        """This rank's part of a checkpoint tensor (dense or QuantizedTensor) for `shard`; a tensor
        that fills a fused weight whole (Phi-3's qkv_proj) gives each part's slice, in order."""
        if self.dim == 1:
            start, size = self.take[None]
            return _columns(tensor, start, size)
        if shard in self.take:
            start, size = self.take[shard]
            return _rows(tensor, start, size)
        pieces, offset = [], 0
        for name, full in self.full.items():
            start, size = self.take[name]
            pieces.append(_rows(tensor, offset + start, size))
            offset += full
        return _cat_rows(pieces)


def _rows(tensor, start: int, size: int):
    from pyserve.models.layers.quantized import QuantizedTensor

    if isinstance(tensor, QuantizedTensor):  # blocks never span rows
        return QuantizedTensor(tensor.blocks[start: start + size], tensor.ggml_type, tensor.in_features)
    return tensor.narrow(0, start, size)


def _columns(tensor, start: int, size: int):
    """Columns [start, start + size) of a 2-D weight (or all of a 1-D one); quantized blocks are cut where
    whole blocks allow it, else the weight is dequantized first (and runs dense)."""
    from pyserve.loader.gguf_types import BLOCK_LAYOUT
    from pyserve.models.layers.quantized import QuantizedTensor

    if isinstance(tensor, QuantizedTensor):
        block, block_bytes = BLOCK_LAYOUT[tensor.ggml_type]
        if start % block == 0 and size % block == 0:
            lo, hi = start // block * block_bytes, (start + size) // block * block_bytes
            return QuantizedTensor(tensor.blocks[:, lo:hi].contiguous(), tensor.ggml_type, size)
        tensor = tensor.dequantize()
    return tensor.narrow(-1, start, size)


def _cat_rows(pieces: list):
    from pyserve.models.layers.quantized import QuantizedTensor

    if all(isinstance(p, QuantizedTensor) for p in pieces) and len({p.ggml_type for p in pieces}) == 1:
        return QuantizedTensor(torch.cat([p.blocks for p in pieces]), pieces[0].ggml_type, pieces[0].in_features)
    return torch.cat([p.dequantize() if isinstance(p, QuantizedTensor) else p for p in pieces])


def even_split(total: int, tp, what: str) -> tuple[int, int]:
    """(start, size) of this rank's equal share of `total`."""
    if total % tp.size:
        raise UnsupportedModelError(f"--tensor-parallel-size {tp.size}: the model's {what} ({total}) do not "
                                    f"split evenly over {tp.size} ranks")
    size = total // tp.size
    return tp.rank * size, size


def vocab_range(vocab_size: int, tp) -> tuple[int, int, int]:
    """(first token, tokens held, tokens per rank): ranks hold ceil(V / N) rows each, the last fewer."""
    per = -(-vocab_size // tp.size)
    start = min(tp.rank * per, vocab_size)
    return start, min(per, vocab_size - start), per


@dataclass(frozen=True)
class AttentionSplit:
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank (1 when replicated)
    q_rows: tuple[int, int]  # (start, size) of this rank's q rows in the checkpoint's q_proj
    kv_rows: tuple[int, int]  # the same for k_proj and v_proj


def tensor_parallel_sizes(cfg: ModelConfig) -> list[int]:
    """The sizes the model's heads split over: N dividing the query heads, with the KV heads split or
    replicated evenly."""
    return [n for n in range(1, cfg.num_heads + 1) if cfg.num_heads % n == 0
            and (cfg.num_kv_heads % n == 0 or n % cfg.num_kv_heads == 0)]


def split_attention(cfg: ModelConfig, tp) -> AttentionSplit:
    heads, kv_heads, n, d = cfg.num_heads, cfg.num_kv_heads, tp.size, cfg.head_dim
    if n not in tensor_parallel_sizes(cfg):
        raise UnsupportedModelError(f"--tensor-parallel-size {n}: the model's {heads} attention heads ({kv_heads} "
                                    f"KV heads) do not split evenly over {n} ranks; sizes that do: "
                                    f"{', '.join(map(str, tensor_parallel_sizes(cfg)))}")
    q_start, q_size = even_split(heads, tp, "attention heads")
    if kv_heads % n == 0:
        kv, first = kv_heads // n, tp.rank * (kv_heads // n)
    elif n % kv_heads == 0:  # fewer KV heads than ranks: each rank keeps the one its query heads use
        kv, first = 1, tp.rank * kv_heads // n
    else:  # (excluded by tensor_parallel_sizes)
        raise AssertionError(n)
    return AttentionSplit(q_size, kv, (q_start * d, q_size * d), (first * d, kv * d))
