"""What every model shares: its modules by checkpoint name (for the loader), the KV cache it needs,
and warming its matmuls. A model file subclasses CausalLM, builds its layers in `__init__` and
lists them in `named_modules`; load_model fills them (models/loading.py)."""

from __future__ import annotations

import math
import mmap
import re

import torch

from pyserve import _ops
from pyserve.config import ModelConfig
from pyserve.distributed.state import tensor_parallel
from pyserve.models.layers.linear import LinearLayer
from pyserve.models.layers.parallel import split_attention
from pyserve.models.layers.weight import Weight
from pyserve.models.prefault import populate_in_background


class CausalLM:
    # Checkpoint module -> (fused module, shard): separate tensors fused into one layer.
    packed_modules: dict[str, tuple[str, str]] = {}
    # Checkpoint tensors that hold nothing we compute from, and why.
    ignored_weights: dict[re.Pattern, str] = {}

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        # KV heads this rank's cache holds (all of them without tensor parallelism).
        self.num_kv_heads = split_attention(cfg, tensor_parallel()).num_kv_heads

    def named_modules(self) -> dict[str, object]:
        """Checkpoint prefix -> module (anything with `weights()`)."""
        raise NotImplementedError

    def weight_slots(self) -> dict[str, Weight]:
        return {f"{prefix}.{local}": w for prefix, module in self.named_modules().items()
                for local, w in module.weights().items()}

    # A ggml type dense linear weights are quantized to at load (HF checkpoints, --quantization).
    quantize_to: int | None = None

    def finish_loading(self) -> None:
        for module in self.named_modules().values():  # the embedding before a head tied to it
            if isinstance(module, LinearLayer):
                module.finish_loading(self.quantize_to)
            elif hasattr(module, "finish_loading"):
                module.finish_loading()

    def warm_up_matmuls(self, max_tokens: int, max_logit_rows: int) -> None:
        """Build every matmul primitive a step of up to max_tokens tokens and max_logit_rows sampled rows
        can use (models/linear.py), so that serving builds and caches none. A primitive depends on
        shapes, not weights: one layer of each shape warms them all."""
        seen = set()
        for prefix, module in self.named_modules().items():
            if isinstance(module, LinearLayer) and module is not self.lm_head:
                shape = (module.in_features, module.out_features)
                if shape not in seen:
                    seen.add(shape)
                    module.warm_up(max_tokens)
        self.lm_head.warm_up(max_logit_rows)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None
                          ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key_cache, value_cache), each [num_blocks, block_size, num_kv_heads, head_dim] (this
        rank's KV heads), zeroed, in `dtype` (--kv-cache-dtype, engine/kv_cache_dtype.py; default: the
        model's dtype)."""
        dtype = dtype or self.dtype
        shape = (num_blocks, block_size, self.num_kv_heads, self.cfg.head_dim)
        layers = self.cfg.num_layers
        if self.device.type == "cpu":
            # An anonymous mapping is zero-filled by the kernel a page at a time, on first touch, so a
            # cache of gigabytes costs nothing at startup (torch.zeros writes every byte: ~0.3 s/GiB);
            # a background thread then backs it with memory before requests need it (prefault.py).
            nbytes = 2 * layers * math.prod(shape) * dtype.itemsize
            buf = mmap.mmap(-1, nbytes)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                buf.madvise(mmap.MADV_HUGEPAGE)  # fewer, larger faults where the kernel grants them
            caches = torch.frombuffer(buf, dtype=dtype).view(2 * layers, *shape)
            populate_in_background(buf)
        else:
            caches = torch.zeros((2 * layers, *shape), device=self.device, dtype=dtype)
        return [(caches[2 * i], caches[2 * i + 1]) for i in range(layers)]

    def copy_blocks(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], mapping: torch.Tensor) -> None:
        """Copy-on-write of shared prefix blocks: mapping [pairs, 2] int64 (source, destination)."""
        for key_cache, value_cache in kv_caches:
            _ops.copy_blocks(key_cache, value_cache, mapping)
