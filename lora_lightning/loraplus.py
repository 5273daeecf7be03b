"""LoRA+ (Hayou, Ghosh & Yu 2024, arXiv 2402.12354): train ``B`` with a larger learning rate than ``A``,
``lr_B = λ·lr_A`` (``λ ≈ 16`` in the paper; PEFT's ``loraplus_lr_ratio``).

:func:`apply_loraplus` does it to an optimizer that already exists — the user's, with its class and
hyperparameters: every parameter group holding ``B`` tensors (of every named adapter) is split, the ``B``
tensors moving to a new group that copies every setting of the old one with its learning rates times
``λ``. The ratio then holds at **every step under any learning-rate schedule**: before each optimizer step
(a step pre-hook) and after each scheduler step, every ``B`` group's learning rate is set to ``λ`` times
its source group's. Schedulers' per-group lists (``base_lrs``, ``lr_lambdas``, ``max_lrs``, momenta, ...)
get an entry for each new group, so every scheduler in ``torch.optim.lr_scheduler`` keeps working
(``eta_min`` floors and cyclic bounds included: tests/test_loraplus.py checks each one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .errors import LoRAConfigError
from .injection import BANK, lora_layers

SOURCE_KEY = "loraplus_source"  # a B group's key: the index of the group its learning rate follows
RATIO_KEY = "loraplus_ratio"
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")  # per-group learning rates set by optimizers / schedulers
_LR_LISTS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs")  # schedulers' per-group lists of learning rates
_OTHER_LISTS = ("lr_lambdas", "base_momentums", "max_momentums")  # per-group lists copied as they are
_HOOKED = "_loraplus_hooked"


def check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise LoRAConfigError(
            f"loraplus_lr_ratio={ratio!r} must be a positive number (the paper uses 16; 1 is plain LoRA)"
        )
    return float(ratio)


def loraplus_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``lora_B`` tensors of every adapter of ``model``, the active one's and the named ones' in the banks
    (the tensors LoRA+ speeds up; those in an optimizer are moved)."""
    out = []
    for layer in lora_layers(model).values():
        if "lora_B" not in layer.trainable_names:
            continue
        out.append(layer.lora_B)
        for slots in getattr(layer, "_modules", {}).get(BANK, {}).values():
            if isinstance(getattr(slots, "lora_B", None), nn.Parameter):
                out.append(slots.lora_B)
    return out


def _set(group: dict, key: str, value: Any) -> None:
    current = group.get(key)
    if isinstance(current, Tensor) and current.numel() == 1:
        current.fill_(float(value))
    else:
        group[key] = value


def sync_loraplus(optimizer: torch.optim.Optimizer) -> None:
    """Set every LoRA+ group's learning rate to its ratio times its source group's (see module doc)."""
    groups = optimizer.param_groups
    for group in groups:
        source = group.get(SOURCE_KEY)
        if source is not None:
            lr = groups[source]["lr"]
            _set(group, "lr", (float(lr) if isinstance(lr, Tensor) else lr) * group[RATIO_KEY])


def _pre_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    sync_loraplus(optimizer)


_SYNCED: dict[type, type] = {}


def _synced_class(cls: type) -> type:
    """A subclass of the scheduler class ``cls`` whose ``step`` resynchronises the LoRA+ groups right after the
    schedule moved them, so learning rates read between steps (logged, ``get_last_lr()``) already hold the
    ratio. (A subclass, not an instance attribute: the scheduler's ``state_dict`` stays as it was.)"""
    if cls not in _SYNCED:

        def step(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = cls.step(self, *args, **kwargs)
            sync_loraplus(self.optimizer)
            last = getattr(self, "_last_lr", None)
            if isinstance(last, list) and len(last) == len(self.optimizer.param_groups):
                for i, group in enumerate(self.optimizer.param_groups):
                    if group.get(SOURCE_KEY) is not None:
                        last[i] = group["lr"]
            return out

        _SYNCED[cls] = type(
            cls.__name__, (cls,), {"step": step, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        )
    return _SYNCED[cls]


def apply_loraplus(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    ratio: float,
    schedulers: Iterable[Any] = (),
    strict: bool = False,
) -> int:
    """Give ``model``'s ``B`` tensors ``ratio`` times the learning rate of the group they were in, at every step
    (see module doc); ``schedulers`` built on ``optimizer`` are extended to the new groups (a scheduler built
    later sees them anyway). Returns the number of tensors moved (0 when none of them is in ``optimizer``;
    ``strict``: raise instead). Applying it twice to one optimizer raises."""
    ratio = check_ratio(ratio)
    if any(group.get(SOURCE_KEY) is not None for group in optimizer.param_groups):
        raise LoRAConfigError("apply_loraplus: this optimizer already has LoRA+ groups; apply it once per optimizer")
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
            elif isinstance(new.get(key), Tensor):
                new[key] = new[key].clone() * ratio
        new["params"] = bs
        new[SOURCE_KEY], new[RATIO_KEY] = index, ratio
        optimizer.add_param_group(new)
        sources.append(index)
        moved += len(bs)
    if not moved:
        if strict:
            variants = sorted({layer.variant_name for layer in lora_layers(model).values()})
            raise LoRAConfigError(
                f"loraplus_lr_ratio={ratio}: the optimizer holds no lora_B of the model's adapters (variant {variants} "
                "trains no lora_B, or the optimizer was built from other parameters): drop LoRA+ or pass the adapters"
            )
        return 0
    for scheduler in schedulers:
        _extend(scheduler, optimizer, sources, ratio)
    if not getattr(optimizer, _HOOKED, False):
        optimizer.register_step_pre_hook(_pre_step)
        setattr(optimizer, _HOOKED, True)
    return moved


def _extend(scheduler: Any, optimizer: torch.optim.Optimizer, sources: list[int], ratio: float) -> None:
    """Append one entry per new group to the scheduler's per-group lists (copied from the source group's,
    learning rates times ``ratio``), and make its ``step`` resynchronise the LoRA+ groups."""
    for inner in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _extend(inner, optimizer, sources, ratio)
    if getattr(scheduler, "optimizer", None) is not optimizer:
        return
    before = len(optimizer.param_groups) - len(sources)
    for attr in _LR_LISTS + _OTHER_LISTS:
        values = getattr(scheduler, attr, None)
        if isinstance(values, list) and len(values) == before:
            scale = ratio if attr in _LR_LISTS else 1.0
            values.extend(values[i] * scale if scale != 1.0 else values[i] for i in sources)
    if type(scheduler) not in _SYNCED.values():
        scheduler.__class__ = _synced_class(type(scheduler))


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
