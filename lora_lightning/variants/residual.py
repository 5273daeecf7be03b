"""What the initialisations that rewrite the frozen base share (OLoRA, LoftQ): the layer keeps its initial
``A0``, ``B0`` so the update can be stated on the original base, and ``to_base()`` of an unmerged layer gives
``base + s·B0·A0`` back instead of the rewritten base."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import LoRAConfigError
from ..layers import LoRALinear


class ResidualBaseLinear(LoRALinear):
    """A :class:`~lora_lightning.layers.LoRALinear` whose initialisation replaced the frozen weight by
    ``W_base = W0 - s·B0·A0`` (OLoRA: exactly; LoftQ: a quantized ``Q ≈ W0 - s·B0·A0``). ``A0``, ``B0`` are kept
    as non-saved buffers (``init_A0``, ``init_B0``): a loaded adapter recomputes them from ``W0``."""

    def _set_base(self, weight: Tensor, quantize: str | None) -> None:
        """Make ``weight`` the frozen base (a new tensor: the wrapped layer's own weight stays ``W0``), stored in
        ``quantize``'s format if given, and keep the current ``A``, ``B`` as ``A0``, ``B0``."""
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        self.register_buffer("init_A0", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("init_B0", self.lora_B.detach().clone(), persistent=False)
        if quantize is not None:
            self.quantize_(quantize)
        elif self.weight.dtype != self.base_dtype:
            self.weight = nn.Parameter(self.weight.detach().to(self.base_dtype), requires_grad=False)

    def to_base(self) -> nn.Linear:
        """Unmerged: ``W_base + s·B0·A0`` (OLoRA: ``W0`` to round-off; LoftQ: its approximation of ``W0``);
        merged: ``W_base + s·B·A``."""
        linear = super().to_base()
        if not self.merged:
            with torch.no_grad():
                w0 = linear.weight.float() + self.scaling * (self.init_B0.float() @ self.init_A0.float())
            linear.weight = nn.Parameter(w0.to(self.base_dtype), requires_grad=False)
        return linear


def residual_to_lora(model: nn.Module, layer_class: type[ResidualBaseLinear], variant: str) -> dict:
    """Each ``layer_class`` layer's update on the original base as a plain rank-``2r`` LoRA:
    ``W_base + s·B·A = W0 + s·[B, B0]·[A; -A0]`` (exact where ``W_base = W0 - s·B0·A0``)."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, layer_class):
            A = torch.cat([layer.lora_A.detach(), -layer.init_A0], 0)
            B = torch.cat([layer.lora_B.detach(), layer.init_B0], 1)
            out[name] = (A, B, layer.scaling)
    if not out:
        raise LoRAConfigError(f"{variant}_to_lora needs a model injected with LoRAConfig(variant={variant!r})")
    return out
