"""Filling a model's weights from a checkpoint (HF names; the GGUF loader renames to them).

A model says which of its layers' weights exist (`weight_slots`: HF name -> Weight) and how the
checkpoint's separate tensors pack into its fused layers (`packed_modules`, e.g. q_proj -> shard "q"
of qkv_proj). Every checkpoint tensor must land in a slot or match the model's commented ignore list,
and every slot must be filled: anything else is a load error naming the tensor, since a tensor
dropped or a weight left empty silently runs a different model.
"""

from __future__ import annotations

import re
from typing import Protocol

import torch

from pyserve.loader.hf import ModelLoadError
from pyserve.models.layers.weight import MissingWeightError, Weight


class UnexpectedWeightError(ModelLoadError):
    """The checkpoint holds a weight the architecture does not use."""


class Loadable(Protocol):
    packed_modules: dict[str, tuple[str, str]]
    ignored_weights: dict[re.Pattern, str]

    def weight_slots(self) -> dict[str, Weight]: ...

    def finish_loading(self) -> None: ...


def _target(name: str, packed: dict[str, tuple[str, str]]) -> tuple[str, str | None]:
    """'model.layers.3.self_attn.k_proj.weight' -> ('model.layers.3.self_attn.qkv_proj.weight', 'k')."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed:
            fused, shard = packed[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
    return name, None


def _source(name: str, shard: str, sources: dict[tuple[str, str], str]) -> str | None:
    """The checkpoint name that fills shard `shard` of fused weight `name` (None: the model packs none)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if (part, shard) in sources:
            return ".".join(parts[:i] + [sources[(part, shard)]] + parts[i + 1:])
    return None


def _missing_names(name: str, slot: Weight, sources: dict[tuple[str, str], str]) -> list[str]:
    """What the checkpoint lacks for one slot, as the checkpoint would name it: the separate tensors
    the model packs into it, or the weight itself where the checkpoint stores it fused (Phi-3)."""
    missing = slot.missing()
    named = [None if shard is None else _source(name, shard, sources) for shard in missing]
    if None in named and not getattr(slot, "loaded", True):  # (an expert's slot reports per shard)
        return [name] if missing else []
    return [n or (name if shard is None else f"{name} (shard {shard})") for n, shard in zip(named, missing)]


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(sorted(names)[:3]) + more


def load_weights(model: Loadable, weights: dict[str, torch.Tensor]) -> None:
    """Move every tensor of `weights` (emptied as it goes) into the model, then let layers prepare."""
    slots = model.weight_slots()
    leftover = []
    for name in list(weights):
        tensor = weights.pop(name)
        target, shard = _target(name, model.packed_modules)
        slot = slots.get(target)
        if slot is not None:
            slot.load(name, tensor, shard)
        elif not any(p.fullmatch(name) for p in model.ignored_weights):
            leftover.append(name)
    if leftover:
        raise UnexpectedWeightError(f"weight {_listed(leftover)} is not used by this architecture; "
                                    f"refusing to load a model it would change")
    sources = {v: k for k, v in model.packed_modules.items()}  # (fused, shard) -> checkpoint module
    missing = [m for name, slot in slots.items() for m in _missing_names(name, slot, sources)]
    if missing:
        raise MissingWeightError(f"weight {_listed(missing)} is missing")
    model.finish_loading()
