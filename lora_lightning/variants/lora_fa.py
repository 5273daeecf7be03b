"""LoRA-FA (Zhang et al. 2023, arXiv 2308.03303): LoRA with ``A`` frozen after its random initialisation.

``ΔW = s·B·A`` as in LoRA, but only ``B (d_out x r)`` trains, so an adapted layer's backward needs
``h = x_d·Aᵀ`` (``r`` values per token) for ``∂B = s·(hᵀ·g)ᵀ`` and nothing of its input:
``∂x = g·W0 + s·(g·B)·A`` reads only parameters. The layer's autograd node keeps ``h`` and no ``x``
(:class:`~lora_lightning.layers.LoRALinearFunction`), which is the memory the method is for; with adapter
dropout autograd still keeps the dropout's keep-mask (one byte per input element).

``lora_fa_projection`` (default on, the paper's current version and PEFT's ``create_lorafa_optimizer``):
before each optimizer step ``∂B`` is replaced by the gradient ``B`` would need to move ``ΔW`` along the
full-rank gradient's projection, ``∂B ← (1/s²)·∂B·(A·Aᵀ + δ·I)⁺`` with ``δ = 1e-8``
(:class:`LoRAFAHooks`; :func:`project_lora_fa_gradients` for loops of your own). Any optimizer then steps
on it; PEFT's ties the projection to its own AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import LoRAConfig
from ..errors import LoRAConfigError
from ..layers import LoRALinear
from ..plan import AdapterSpec
from .base import Variant, register_variant

PROJECTION_DELTA = 1e-8  # PEFT's ridge on A·Aᵀ before its pseudo-inverse


@dataclass
class LoRAFAConfig(LoRAConfig):
    """``lora_fa_projection``: project ``∂B`` through ``(A·Aᵀ)⁻¹/s²`` before each optimizer step (PEFT's
    LoRA-FA optimizer); ``False``: plain gradient descent on ``B`` with ``A`` frozen (the paper's first version)."""

    variant: str = "lora_fa"
    lora_fa_projection: bool = True

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.lora_fa_projection, bool):
            raise LoRAConfigError(f"lora_fa_projection={self.lora_fa_projection!r} must be true or false (a bool)")


class LoRAFALinear(LoRALinear):
    """:class:`~lora_lightning.layers.LoRALinear` whose ``lora_A`` stays frozen: trains ``B`` only and keeps
    ``x·Aᵀ`` (``N x r``) instead of the input for the backward."""

    variant_name = "lora_fa"
    trainable_names = ("lora_B",)


def projected_gradient(grad_b: Tensor, A: Tensor, scaling: float) -> Tensor:
    """One layer's projected gradient ``(1/s²)·∂B·(A·Aᵀ + 1e-8·I)⁺`` in float32 (``∂B: d_out x r``, ``A: r x d_in``)."""
    A = A.detach().float()
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return (grad_b.float() @ torch.linalg.pinv(A @ A.T + PROJECTION_DELTA * eye)) / (scaling * scaling)


@torch.no_grad()
def project_lora_fa_gradients(model: nn.Module) -> int:
    """Replace ``lora_B.grad`` of every LoRA-FA layer that has one by :func:`projected_gradient` (written back in
    its dtype). Returns the number of layers projected. Call it between ``backward()`` and
    ``optimizer.step()`` (after gradient accumulation, before clipping)."""
    n = 0
    for layer in model.modules():
        if isinstance(layer, LoRAFALinear) and layer.lora_B.grad is not None:
            A = layer.lora_A.detach()
            if hasattr(A, "full_tensor"):  # FSDP2: gather A (r x d_in, small); each rank projects its rows of ∂B
                A = A.full_tensor()
            grad = layer.lora_B.grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            local.copy_(projected_gradient(local, A, float(layer.scaling)).to(local.dtype))
            n += 1
    return n


class LoRAFAHooks:
    """The projection as a variant's training hooks (``LoRACallback`` calls ``before_optimizer_step``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.projected = 0

    def before_optimizer_step(self) -> dict[str, float]:
        self.projected = project_lora_fa_gradients(self.model)
        return {}

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        return {}

    def at_end(self) -> dict[str, float]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}


@register_variant("lora_fa")
class LoRAFA(Variant):
    """Trainable ``r·d_out`` per matrix (``B``); ``A`` is frozen but saved with the adapter."""

    config_class = LoRAFAConfig
    layer_class = LoRAFALinear
    peft_lora = True  # a PEFT LoRA adapter (PEFT trains it with create_lorafa_optimizer)
    gradient_edit_switch = "lora_fa_projection=False"

    @classmethod
    def num_params(cls, spec: AdapterSpec, config: LoRAConfig) -> int:
        return spec.r * spec.d_out

    @classmethod
    def edits_gradients(cls, config: LoRAConfig) -> bool:
        return bool(getattr(config, "lora_fa_projection", False))

    @classmethod
    def training_hooks(cls, model: nn.Module, config: LoRAConfig, total_steps: int | None) -> LoRAFAHooks | None:
        assert isinstance(config, LoRAFAConfig)
        return LoRAFAHooks(model) if config.lora_fa_projection else None
