"""OLoRA (Büyükakyüz 2024, arXiv 2406.01775): LoRA initialised from the QR decomposition of ``W0``, with the
rest of ``W0`` as the frozen base — PEFT's ``init_lora_weights="olora"``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Variant, register_variant
from .residual import ResidualBaseLinear, residual_to_lora


class OLoRALinear(ResidualBaseLinear):
    """With ``W0 = Q·R`` (reduced QR in float32): ``A = R[:r] (r x d_in)``, ``B = Q[:, :r] (d_out x r)`` and the
    frozen base becomes ``W_res = W0 - s·B·A`` (then quantized, if asked), so the initial output equals the
    base's up to round-off. As PEFT 0.21's ``olora_init``: the QR and the residual in float32, ``(s·B)·A``
    subtracted, ``W_res`` cast back to the base dtype; ``A``, ``B`` are not divided by ``s``. Where the adapters
    are kept in a narrower dtype than float32 (a bf16 base, default ``adapter_dtype``), the residual is taken with
    the rounded ``A``, ``B`` (PEFT keeps them in float32)."""

    variant_name = "olora"

    def __init__(self, base: nn.Linear, *args, quantize: str | None = None, **kwargs) -> None:
        super().__init__(base, *args, quantize=None, **kwargs)
        r, s = self.r, self.scaling
        with torch.no_grad():
            w = self.weight.detach().to(torch.float32)
            Q, R = torch.linalg.qr(w)
            self.lora_A.copy_(R[:r])
            self.lora_B.copy_(Q[:, :r])
            residual = w - s * self.lora_B.detach().to(torch.float32) @ self.lora_A.detach().to(torch.float32)
        self._set_base(residual.to(self.base_dtype), quantize)


@register_variant("olora")
class OLoRA(Variant):
    """Trainable ``r·(d_in + d_out)`` per matrix, like LoRA; nn.Linear layers only."""

    layer_class = OLoRALinear
    rewrites_base = True


def olora_to_lora(model: nn.Module) -> dict[str, tuple[Tensor, Tensor, float]]:
    """Each OLoRA layer's update on the ORIGINAL base as a plain rank-2r LoRA (PEFT's
    ``path_initial_model_for_weight_conversion``): ``W_res + s·B·A = W0 + s·[B, B0]·[A; -A0]``.
    Returns ``{name: (A' (2r x d_in), B' (d_out x 2r), s)}``."""
    return residual_to_lora(model, OLoRALinear, "olora")
