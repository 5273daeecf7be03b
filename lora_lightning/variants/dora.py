"""DoRA (Liu et al. 2024, arXiv 2402.09353): weight-decomposed LoRA, ``W' = m ⊙ V / ||V||_row``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LoRAConfig
from ..layers import LoRALinear
from ..plan import AdapterSpec
from .base import Variant, register_variant


class DoRALinear(LoRALinear):
    """``W' = m ⊙ V / ||V||_row`` with ``V = W0 + s·B·A`` (``d_out x d_in``), ``||V||_row (d_out)`` the L2
    norm of each output row (PEFT's ``weight_norm``), ``m (d_out)`` trainable, initialised to
    ``||W0||_row`` (of the dequantized base when it is stored quantized) so ``W' = W0`` at step 0.
    ``y = (m/||V||) ⊙ (x W0ᵀ + s·dropout(x) Aᵀ Bᵀ) + b``; the norm is not detached."""

    variant_name = "dora"
    trainable_names = ("lora_A", "lora_B", "lora_magnitude")
    adapter_names = ("lora_A", "lora_B", "lora_magnitude")

    def __init__(self, base: nn.Linear, *args, **kwargs) -> None:
        super().__init__(base, *args, **kwargs)
        with torch.no_grad():
            norm = self.base_weight().detach().float().norm(dim=1)
        self.lora_magnitude = nn.Parameter(norm.to(self.lora_A.dtype))
        self._dora_factor: Tensor | None = None

    def dora_weight(self) -> Tensor:
        """Differentiable ``W' = m ⊙ V/||V||_row`` (``d_out x d_in``, adapter dtype)."""
        dt = self.lora_A.dtype
        v = self.base_weight().to(dt) + self.live_delta_weight(dt)
        return (self.lora_magnitude / v.norm(dim=1))[:, None] * v

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The effective update ``W' - W0`` (what merging adds), detached."""
        with torch.no_grad():
            return self.dora_weight().to(dtype) - self.base_weight().to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``y = base + (m/||V|| - 1) ⊙ (x W0ᵀ) + (m/||V||) ⊙ s·dropout(x) Aᵀ Bᵀ`` with ``base = x W0ᵀ + b`` computed
        as the base layer computes it: the same function as ``(m/||V||) ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ) + b``, written (as in
        PEFT) so that at initialisation (``m = ||W0||``, ``B = 0``) the output is bit-equal to the base layer's."""
        w = self.base_weight()
        base = F.linear(x, w, self.bias)
        if self.adapter_off():
            return base
        dt = self.lora_A.dtype
        v = w.to(dt) + self.live_delta_weight(dt)
        mag_scale = self.lora_magnitude / v.norm(dim=1)
        plain = (base - self.bias if self.bias is not None else base).to(dt)
        out = base.to(dt) + (mag_scale - 1) * plain + mag_scale * self.lora_forward(x)
        return out.to(x.dtype)

    def _add_delta(self, sign: float) -> None:
        """Merge: ``W0 <- (m/||V||) ⊙ V``; unmerge inverts it with the factor saved at merge time."""
        with torch.no_grad():
            dt = self.lora_A.dtype
            if sign > 0:
                v = self.weight.to(dt) + self.live_delta_weight(dt)
                factor = self.lora_magnitude / v.norm(dim=1)
                self._dora_factor = factor.detach().clone()
                self.weight.copy_((factor[:, None] * v).to(self.weight.dtype))
            else:
                factor = (
                    self._dora_factor
                    if self._dora_factor is not None
                    else self.lora_magnitude / self.dora_weight().norm(dim=1)
                )
                w0 = self.weight.to(dt) / factor[:, None] - self.live_delta_weight(dt)
                self.weight.copy_(w0.to(self.weight.dtype))
                self._dora_factor = None


@register_variant("dora")
class DoRA(Variant):
    """Trainable ``r·(d_in + d_out) + d_out`` per matrix (the magnitude vector)."""

    layer_class = DoRALinear

    @classmethod
    def num_params(cls, spec: AdapterSpec, config: LoRAConfig) -> int:
        return super().num_params(spec, config) + spec.d_out
