"""LoRA+ (Hayou, Ghosh & Yu 2024, arXiv 2402.12354): train ``B`` with a larger learning rate than ``A``,
``lr_B = λ·lr_A`` (``λ ≈ 16`` in the paper; PEFT's ``loraplus_lr_ratio``).

:func:`apply_loraplus` does it to an optimizer that already exists — the user's, with its class and
hyperparameters: every parameter group holding trainable ``lora_B`` tensors is split, the ``B`` tensors
moving to a new group that copies every setting of the old one and multiplies its learning rates
(``lr``, ``initial_lr``, ``max_lr``, ``min_lr``) by ``λ``. Learning-rate schedulers keep one entry per
group (``base_lrs``, ``lr_lambdas``, ...): each scheduler built on the optimizer gets the matching
entry for the new group, so ``lr_B / lr_A = λ`` at every step of any schedule.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from .errors import LoRAConfigError
from .injection import lora_layers

_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")  # per-group learning rates set by optimizers / schedulers
_LIST_ATTRS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs")  # schedulers' per-group lists of learning rates


def check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise LoRAConfigError(f"loraplus_lr_ratio={ratio!r} must be a positive number (the paper uses 16; 1 is plain LoRA)")
    return float(ratio)


def loraplus_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable ``lora_B`` tensors of ``model``'s adapters (the ones LoRA+ speeds up)."""
    return [layer.lora_B for layer in lora_layers(model).values() if "lora_B" in layer.trainable_names and layer.lora_B.requires_grad]


def apply_loraplus(
    optimizer: torch.optim.Optimizer, model: nn.Module, ratio: float, schedulers: Iterable[Any] = ()
) -> int:
    """Give ``model``'s ``B`` tensors ``ratio`` times the learning rate of the group they were in (see
    module doc); ``schedulers`` built on ``optimizer`` are extended to the new groups. Returns the number
    of tensors moved (0 when none of them is in ``optimizer``)."""
    ratio = check_ratio(ratio)
    b_ids = {id(p) for p in loraplus_parameters(model)}
    moved, sources = 0, []
    for index, group in enumerate(list(optimizer.param_groups)):
        bs = [p for p in group["params"] if id(p) in b_ids]
        if not bs:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in b_ids]
        new = {k: v for k, v in group.items() if k != "params"}
        for key in _LR_KEYS:
            if isinstance(new.get(key), (int, float)):
                new[key] = new[key] * ratio
        new["params"] = bs
        optimizer.add_param_group(new)
        sources.append(index)
        moved += len(bs)
    for scheduler in schedulers:
        _extend(scheduler, optimizer, sources, ratio)
    return moved


def _extend(scheduler: Any, optimizer: torch.optim.Optimizer, sources: list[int], ratio: float) -> None:
    """Append one entry per new group (copied from its source group, learning rates times ``ratio``)."""
    for inner in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _extend(inner, optimizer, sources, ratio)
    if getattr(scheduler, "optimizer", None) is not optimizer:
        return
    before = len(optimizer.param_groups) - len(sources)
    for attr in _LIST_ATTRS:
        values = getattr(scheduler, attr, None)
        if isinstance(values, list) and len(values) == before:
            values.extend(values[i] * ratio for i in sources)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if isinstance(lambdas, list) and len(lambdas) == before:
        lambdas.extend(lambdas[i] for i in sources)


def optimizers_and_schedulers(configured: Any) -> tuple[list[torch.optim.Optimizer], list[Any]]:
    """The optimizers and schedulers in whatever ``configure_optimizers`` returned (an optimizer, lists or
    tuples of them, Lightning's ``{"optimizer": ..., "lr_scheduler": ...}`` dicts)."""
    optimizers: list[torch.optim.Optimizer] = []
    schedulers: list[Any] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.optim.Optimizer):
            optimizers.append(obj)
        elif hasattr(obj, "optimizer") and hasattr(obj, "step") and not isinstance(obj, dict):
            schedulers.append(obj)  # an LRScheduler or ReduceLROnPlateau
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    walk(configured)
    return optimizers, schedulers
