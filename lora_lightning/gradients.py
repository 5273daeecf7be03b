"""Gradients that reach the adapters under activation checkpointing.

Reentrant activation checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``, and Hugging
Face's ``gradient_checkpointing_enable()`` by default) runs each checkpointed block as one autograd
function whose output requires grad only if one of its *inputs* does. With a frozen base the
hidden states entering the first block do not, so the block's adapters get no gradient at all.
:func:`make_inputs_require_grad` (PEFT's ``enable_input_require_grads``, for any model) marks those
inputs as requiring grad; the adapters then get exactly the gradients they get without
checkpointing, at the cost of the input gradients below the first adapter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .injection import lora_layers


def _output_requires_grad(module: nn.Module, inputs: Any, output: Any) -> None:
    if (
        isinstance(output, Tensor)
        and output.is_floating_point()
        and not output.requires_grad
        and torch.is_grad_enabled()
    ):
        output.requires_grad_(True)


def _inputs_require_grad(module: nn.Module, args: tuple) -> tuple | None:
    if not torch.is_grad_enabled():
        return None
    return tuple(
        a.detach().requires_grad_(True)
        if isinstance(a, Tensor) and a.is_floating_point() and not a.requires_grad
        else a
        for a in args
    )


def uses_activation_checkpointing(model: nn.Module) -> bool:
    """True if a Hugging Face submodule has gradient checkpointing switched on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def make_inputs_require_grad(model: nn.Module) -> list[RemovableHandle]:
    """Make the activations entering the adapted blocks require grad (see module doc). Hooks the token
    embeddings (every ``nn.Embedding``); a model without embeddings gets its floating-point inputs
    marked on the outermost submodules that hold adapters. Returns the hook handles."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if embeddings:
        return [m.register_forward_hook(_output_requires_grad) for m in embeddings]
    adapted = list(lora_layers(model))
    handles = []
    for name, child in model.named_children():
        if any(n == name or n.startswith(name + ".") for n in adapted):
            handles.append(child.register_forward_pre_hook(_inputs_require_grad))
    return handles


def adapters_without_grad(model: nn.Module) -> list[str]:
    """Trainable adapter tensors whose ``.grad`` is ``None`` after a backward pass."""
    return [
        f"{n}.{leaf}"
        for n, layer in lora_layers(model).items()
        for leaf in layer.trainable_names
        if getattr(layer, leaf).requires_grad and getattr(layer, leaf).grad is None
    ]
