"""``nn.Conv1d/2d/3d``: ``A`` a convolution with the layer's kernel, stride, padding and dilation
(``r x in x k...``), ``B`` a 1x1 convolution (``out x r x 1...``); ``ΔW = s·B·A`` reshaped to the kernel."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LoRAConfigError
from .base import LayerKind, LoRALayer, plain_attrs, rebuild, register_layer_kind


class _LoRAConvNd(LoRALayer):
    """A frozen ``nn.Conv{1,2,3}d`` (``W0: out x in x k...``) plus ``s·B·A``: ``A`` a convolution with the
    layer's kernel, stride, padding and dilation (``r x in x k...``), ``B`` a 1x1 convolution
    (``out x r x 1...``) — PEFT's and loralib's layout, so ``ΔW = s·B·A`` reshaped to the kernel's shape
    merges exactly. Grouped convolutions are refused (their ΔW is block-diagonal; PEFT cannot merge them)."""

    lora_kind = "conv"
    _conv_fn: Callable[..., Tensor]

    def __init__(self, base: nn.Module, r: int, alpha: float, **options: Any) -> None:
        name = options.get("name") or f"this {type(base).__name__}"
        if base.groups != 1:
            raise LoRAConfigError(
                f"{name} is a grouped convolution (groups={base.groups}): LoRA on grouped convolutions is not "
                "supported (its update would be block-diagonal); target other layers"
            )
        nn.Module.__init__(self)
        self._base_cls = type(base)
        self._base_attrs = plain_attrs(base) | {
            "_reversed_padding_repeated_twice": base._reversed_padding_repeated_twice
        }
        self.__dict__.update(self._base_attrs)
        self.weight, self.bias = base.weight, base.bias
        kernel = math.prod(base.kernel_size)
        self.in_features, self.out_features = base.in_channels * kernel, base.out_channels
        self._init_lora(self.in_features, base.out_channels, base.weight, r, alpha, **options)
        ones = (1,) * len(base.kernel_size)
        self.lora_A = nn.Parameter(self.lora_A.data.view(r, base.in_channels, *base.kernel_size))
        self.lora_B = nn.Parameter(self.lora_B.data.view(base.out_channels, r, *ones))

    def factors(self) -> tuple[Tensor, Tensor, float]:
        return self.lora_A.reshape(self.r, -1), self.lora_B.reshape(self.out_channels, self.r), self.scaling

    def _base_weight_view(self) -> Tensor:
        return self.weight.view(self.out_channels, -1)

    def lora_forward(self, x: Tensor) -> Tensor:
        """``s · conv1x1(conv(dropout(x), A), B)`` in the adapters' dtype."""
        if self.dropout_p > 0:
            x = self.lora_dropout(x)
        h = self._conv_forward(x.to(self.lora_A.dtype), self.lora_A, None)  # type: ignore[attr-defined]
        return type(self)._conv_fn(h, self.lora_B) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_forward(x, self.weight, self.bias)  # type: ignore[attr-defined]
        return out if self.adapter_off() else out + self.lora_forward(x).to(out.dtype)

    def to_base(self) -> nn.Module:
        return rebuild(self._base_cls, self._base_attrs, {"weight": self.weight, "bias": self.bias}, {})

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, " + self.lora_extra_repr()


class LoRAConv1d(_LoRAConvNd, nn.Conv1d):
    __doc__ = _LoRAConvNd.__doc__
    _conv_fn = staticmethod(F.conv1d)


class LoRAConv2d(_LoRAConvNd, nn.Conv2d):
    __doc__ = _LoRAConvNd.__doc__
    _conv_fn = staticmethod(F.conv2d)


class LoRAConv3d(_LoRAConvNd, nn.Conv3d):
    __doc__ = _LoRAConvNd.__doc__
    _conv_fn = staticmethod(F.conv3d)


CONV_LAYERS: dict[type, type[_LoRAConvNd]] = {nn.Conv1d: LoRAConv1d, nn.Conv2d: LoRAConv2d, nn.Conv3d: LoRAConv3d}


class ConvKind(LayerKind):
    """``nn.Conv1d/2d/3d`` (not grouped): ``d_out = out_channels``, ``d_in = in_channels·∏kernel``."""

    name, description, layer_class = "conv", "nn.Conv1d/2d/3d", _LoRAConvNd

    def matches(self, module: nn.Module) -> bool:
        return type(module) in CONV_LAYERS

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return int(module.out_channels), int(module.in_channels * math.prod(module.kernel_size))

    def build(self, base: nn.Module, spec: Any, layer_class: type | None = None, **options: Any) -> LoRALayer:
        return CONV_LAYERS[base._base_cls if isinstance(base, _LoRAConvNd) else type(base)](base, **options)

    def peft_tensors(self, layer: LoRALayer) -> dict[str, Tensor]:
        """PEFT builds its ``lora_A`` convolution with the base's kernel, stride and padding only: dilation 1
        and zero padding. Any other setting would compute another function there: refused."""
        dilated = any(d != 1 for d in layer.dilation)  # type: ignore[attr-defined]
        if dilated or layer.padding_mode != "zeros":  # type: ignore[attr-defined]
            raise LoRAConfigError(
                f"a {type(layer).__name__.replace('LoRA', 'nn.')} with dilation={layer.dilation}, "  # type: ignore[attr-defined]
                f"padding_mode={layer.padding_mode!r} has no exact PEFT LoRA equivalent (PEFT's lora_A convolution "  # type: ignore[attr-defined]
                "uses dilation 1 and zero padding): save with save_adapter(), or merge_and_unload() for a plain model"
            )
        return {"lora_A.weight": layer.lora_A.detach(), "lora_B.weight": layer.lora_B.detach()}

    def check_peft_import(self, module: nn.Module, name: str) -> None:
        if any(d != 1 for d in module.dilation) or module.padding_mode != "zeros":
            raise LoRAConfigError(
                f"{name} has dilation={module.dilation}, padding_mode={module.padding_mode!r}: a PEFT adapter there "
                "ran with dilation 1 and zero padding, which this layer cannot reproduce; import it into a model whose "
                "convolution matches PEFT's"
            )


register_layer_kind(ConvKind())
