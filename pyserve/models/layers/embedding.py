"""The vocabulary embedding, and the LM head (its own weight, or the embedding's when tied)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyserve.distributed.state import tensor_parallel
from pyserve.models.layers.linear import LinearLayer
from pyserve.models.layers.parallel import Partition, vocab_range
from pyserve.models.layers.quantized import PackedQuantized, QuantizedMethod
from pyserve.models.layers.weight import Weight


class VocabEmbedding:
    """Rows of the embedding matrix: dense, or read from its GGUF blocks (packed once; a tied LM
    head runs its matmul on the same packed tensor, so the matrix is held once). Under tensor
    parallelism each rank holds a range of the vocabulary (layers/parallel.py)."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype, device: torch.device):
        tp = tensor_parallel()
        self.tp = tp if tp.size > 1 else None
        self.first, rows, _ = vocab_range(vocab_size, tp)
        self.rows_here = rows
        partition = Partition(0, {None: vocab_size}, {None: (self.first, rows)}) if self.tp else None
        self.weight = Weight((rows, hidden_size), dtype, device, partition=partition)
        self.dtype = dtype
        self.packed: PackedQuantized | None = None

    def weights(self) -> dict[str, Weight]:
        return {"weight": self.weight}

    def finish_loading(self) -> None:
        if self.weight.is_quantized:
            self.packed = PackedQuantized(self.weight.quantized_shards(), None)
            self.weight.quantized = {}
        else:
            self.weight.densify()

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [tokens] -> [tokens, hidden]."""
        if self.tp is None:
            return self._rows(input_ids)
        local = input_ids - self.first
        elsewhere = (local < 0) | (local >= self.rows_here)
        rows = self._rows(local.clamp(0, max(0, self.rows_here - 1)))
        rows.masked_fill_(elsewhere[:, None], 0)
        return self.tp.all_reduce(rows)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.rows(ids).to(self.dtype)
        return F.embedding(ids, self.weight.data)


class LMHead(LinearLayer):
    """hidden -> vocabulary logits. Tied: built from the embedding's weight after loading. Under tensor
    parallelism each rank computes its vocabulary range's logits, gathered on rank 0 (which samples);
    the other ranks get None."""

    def __init__(self, vocab_size: int, hidden_size: int, *, tied_to: VocabEmbedding | None,
                 dtype: torch.dtype, device: torch.device):
        tp = tensor_parallel()
        first, rows, self.rows_per_rank = vocab_range(vocab_size, tp)
        super().__init__(hidden_size, vocab_size, dtype=dtype, device=device, parallel="column",
                         shard_ranges={None: (first, rows)})
        self.tp = tp if tp.size > 1 else None
        self.vocab_size = vocab_size
        self.tied_to = tied_to

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """x: [rows, hidden] -> [rows, vocab] (on rank 0; None on the others)."""
        logits = super().__call__(x)
        if self.tp is None:
            return logits
        if logits.shape[1] < self.rows_per_rank:  # the last rank's range is short: pad to gather
            logits = F.pad(logits, (0, self.rows_per_rank - logits.shape[1]))
        parts = self.tp.gather_to_first(logits)
        if parts is None:
            return None
        logits = torch.cat(parts, dim=1)
        return logits if logits.shape[1] == self.vocab_size else logits[:, : self.vocab_size].contiguous()

    def weights(self) -> dict[str, Weight]:
        return {} if self.tied_to is not None else super().weights()

    def finish_loading(self, quantize_to: int | None = None) -> None:
        """Runs after the embedding's own (named_modules lists the embedding first)."""
        if self.tied_to is not None and self.tied_to.packed is not None:
            self.method, self.state = QuantizedMethod(), self.tied_to.packed
            return
        if self.tied_to is not None:
            self.weight.data = self.tied_to.weight.data
        super().finish_loading(quantize_to)
