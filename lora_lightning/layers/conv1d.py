"""GPT-2's ``Conv1D`` (``transformers.pytorch_utils.Conv1D``): a linear map whose weight is stored
transposed, ``d_in x d_out`` (``y = x @ W + b``, PEFT's ``fan_in_fan_out``); merging adds ``ΔWᵀ``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import LayerKind, LoRALayer, plain_attrs, rebuild, register_layer_kind


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-style ``Conv1D`` (``transformers.pytorch_utils.Conv1D``): a linear layer whose
    weight is stored transposed, ``d_in x d_out`` (``y = x @ W + b``, "fan_in_fan_out")."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and weight.shape[1] == getattr(module, "nf", None)
    )


class LoRAConv1D(LoRALayer, nn.Module):
    """A frozen GPT-2 ``Conv1D`` (weight ``W0ᵀ`` stored ``d_in x d_out``) plus ``(alpha/r)·B·A``.

    ``y = x @ W + b + (alpha/r) · dropout(x) Aᵀ Bᵀ`` with the usual ``A: r x d_in``,
    ``B: d_out x r`` (the same shapes PEFT uses with ``fan_in_fan_out=True``). Merging adds
    ``ΔWᵀ`` to the stored weight. Keys ``weight``/``bias`` are unchanged.
    """

    lora_kind = "conv1d"
    fan_in_fan_out = True
    supports_routing = True

    def __init__(self, base: nn.Module, r: int, alpha: float, **options: Any) -> None:
        """``options``: those of :meth:`LoRALayer._init_lora`."""
        if not is_conv1d(base):
            raise TypeError(f"LoRAConv1D wraps a GPT-style Conv1D (weight d_in x nf), got {type(base).__name__}")
        nn.Module.__init__(self)
        self._base_cls = type(base)
        self._base_attrs = plain_attrs(base)
        d_in, d_out = base.weight.shape
        self.in_features, self.out_features, self.nf = d_in, d_out, d_out
        self.weight = base.weight
        self.bias = base.bias
        self._init_lora(d_in, d_out, base.weight, r, alpha, **options)

    def _base_weight_view(self) -> Tensor:
        return self.weight.T

    def _base_output(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.size(-1))
        out = torch.addmm(self.bias, flat, self.weight) if self.bias is not None else flat @ self.weight
        return out.view(x.size()[:-1] + (self.nf,))

    def forward(self, x: Tensor) -> Tensor:
        # stored d_in x d_out: W0 is its transpose (a view; autograd maps its gradient back)
        return self.adapted_forward(x, self.weight.t(), self.bias, lambda: self._base_output(x))

    def to_base(self) -> nn.Module:
        """The original ``Conv1D`` class sharing this layer's (possibly merged) weight and bias."""
        return rebuild(self._base_cls, self._base_attrs, {"weight": self.weight, "bias": self.bias}, {})

    def extra_repr(self) -> str:
        return f"nx={self.in_features}, nf={self.nf}, fan_in_fan_out=True, " + self.lora_extra_repr()


class Conv1DKind(LayerKind):
    """GPT-2 ``Conv1D``: ``d_out = nf``, ``d_in`` = the weight's rows; fusable (``c_attn = [Wq; Wk; Wv]``)."""

    name, description, layer_class = "conv1d", "GPT-2 Conv1D", LoRAConv1D
    linear = fusable = tieable = routable = True

    def matches(self, module: nn.Module) -> bool:
        return is_conv1d(module)

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return int(module.weight.shape[1]), int(module.weight.shape[0])

    def build(self, base: nn.Module, spec: Any, layer_class: type | None = None, **options: Any) -> LoRALayer:
        return (layer_class or self.layer_class)(base, fused=spec.fused, **options)


register_layer_kind(Conv1DKind())
