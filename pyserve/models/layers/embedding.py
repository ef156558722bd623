"""The vocabulary embedding, and the LM head (its own weight, or the embedding's when tied)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyserve.models.layers.linear import LinearLayer
from pyserve.models.layers.quantized import PackedQuantized, QuantizedMethod
from pyserve.models.layers.weight import Weight


class VocabEmbedding:
    """Rows of the embedding matrix: dense, or read from its GGUF blocks (packed once; a tied LM
    head runs its matmul on the same packed tensor, so the matrix is held once)."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype, device: torch.device):
        self.weight = Weight((vocab_size, hidden_size), dtype, device)
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
        if self.packed is not None:
            return self.packed.rows(input_ids).to(self.dtype)
        return F.embedding(input_ids, self.weight.data)


class LMHead(LinearLayer):
    """hidden -> vocabulary logits. Tied: built from the embedding's weight after loading."""

    def __init__(self, vocab_size: int, hidden_size: int, *, tied_to: VocabEmbedding | None,
                 dtype: torch.dtype, device: torch.device):
        super().__init__(hidden_size, vocab_size, dtype=dtype, device=device)
        self.tied_to = tied_to

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
