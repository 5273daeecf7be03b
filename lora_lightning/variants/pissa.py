"""PiSSA (Meng et al. 2024, arXiv 2404.02948): LoRA initialised from the principal singular vectors of
``W0``, with the residual as the frozen base."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import LoRAConfigError
from ..layers import LoRALinear
from .base import Variant, register_variant


class PiSSALinear(LoRALinear):
    """With ``W0 = U S Vh`` (SVD, in float64), ``A = sqrt(S_r/s)·Vh_r (r x d_in)``,
    ``B = U_r·sqrt(S_r/s) (d_out x r)`` so ``s·B·A = U_r S_r Vh_r``, and the frozen base becomes the
    residual ``W_res = W0 - s·B·A`` (then quantized, if asked: QPiSSA). The initial output equals the
    base's up to fp32 round-off. ``A0, B0`` are kept (not saved: recomputed from ``W0``) so ``to_base()``
    of an unmerged layer restores ``W0`` and :func:`pissa_to_lora` can express the update as a plain
    LoRA on the original base."""

    variant_name = "pissa"

    def __init__(self, base: nn.Linear, *args, quantize: str | None = None, **kwargs) -> None:
        super().__init__(base, *args, quantize=None, **kwargs)
        r = self.r
        with torch.no_grad():
            w = self.weight.detach().double()
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            root = torch.sqrt(S[:r] / self.scaling)
            self.lora_A.copy_((root[:, None] * Vh[:r]).to(self.lora_A.dtype))
            self.lora_B.copy_((U[:, :r] * root[None, :]).to(self.lora_B.dtype))
            residual = w - self.scaling * (self.lora_B.double() @ self.lora_A.double())
        # a new tensor: the wrapped layer's own weight stays W0 (injection swaps layers in only at the end)
        self.weight = nn.Parameter(residual.to(self.base_dtype), requires_grad=False)
        self.register_buffer("pissa_A0", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("pissa_B0", self.lora_B.detach().clone(), persistent=False)
        if quantize is not None:
            self.quantize_(quantize)

    def to_base(self) -> nn.Linear:
        """Unmerged: the original ``W0 = W_res + s·B0·A0``; merged: ``W_res + s·B·A``."""
        linear = super().to_base()
        if not self.merged:
            with torch.no_grad():
                w0 = linear.weight.float() + self.scaling * (self.pissa_B0.float() @ self.pissa_A0.float())
            linear.weight = nn.Parameter(w0.to(self.base_dtype), requires_grad=False)
        return linear


@register_variant("pissa")
class PiSSA(Variant):
    """Trainable ``r·(d_in + d_out)`` per matrix, like LoRA."""

    layer_class = PiSSALinear
    rewrites_base = True


def pissa_to_lora(model: nn.Module) -> dict[str, tuple[Tensor, Tensor, float]]:
    """Each PiSSA layer's update on the ORIGINAL base as a plain rank-2r LoRA (PEFT's conversion):
    ``W_res + s·B·A = W0 + s·[B, B0]·[A; -A0]``. Returns ``{name: (A' (2r x d_in), B' (d_out x 2r), s)}``."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, PiSSALinear):
            A = torch.cat([layer.lora_A.detach(), -layer.pissa_A0], 0)
            B = torch.cat([layer.lora_B.detach(), layer.pissa_B0], 1)
            out[name] = (A, B, layer.scaling)
    if not out:
        raise LoRAConfigError("pissa_to_lora needs a model injected with LoRAConfig(variant='pissa')")
    return out
