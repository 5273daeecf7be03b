"""``nn.Linear``: the layer kind of the paper (Wq, Wk, Wv, Wo and the MLP), and fused q/k/v projections.

``y = x·W0ᵀ + b + (alpha/r)·dropout(x)·Aᵀ·Bᵀ``; ``W0`` may be stored quantized (``quantize_base``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LoRAConfigError
from ..quantization import quantizer
from .base import LayerKind, LoRALayer, plain_attrs, rebuild, register_layer_kind


class LoRALinear(LoRALayer, nn.Linear):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    ``y = x W0ᵀ + b + (alpha/r) · dropout(x) Aᵀ Bᵀ`` with ``W0: d_out x d_in`` (frozen, kept in its
    own dtype, optionally stored quantized: ``quantize="nf4" | "int8"``, dequantized on the fly),
    ``A: r x d_in`` and ``B: d_out x r`` (trainable). The module keeps the original ``weight`` and
    ``bias`` Parameter objects (no copy), so the base keys of the state dict are unchanged; the
    adapter adds ``lora_A`` and ``lora_B``. With ``fused`` only the listed row blocks (e.g. q and v
    of a fused qkv projection) are adapted. Variants subclass it and override :meth:`factors` (or,
    for DoRA, ``forward``).
    """

    supports_routing = True
    lora_shared: Any = None  # the model's SharedInputTracker (shared_input.py); None: always on its own

    def __init__(self, base: nn.Linear, r: int, alpha: float, *, quantize: str | None = None, **options: Any) -> None:
        """``options``: those of :meth:`LoRALayer._init_lora` (scaling, dropout, init, adapter_dtype, name,
        fused, pin_dtype); ``quantize``: store ``W0`` as ``nf4`` or ``int8``."""
        nn.Module.__init__(self)
        if not isinstance(base, nn.Linear):
            raise LoRAConfigError(
                f"{options.get('name') or 'this module'} is a {type(base).__name__}; {type(self).__name__} adapts "
                "nn.Linear"
            )
        self.in_features = base.in_features
        self.out_features = base.out_features
        self._base_cls = type(base)
        self._base_attrs = plain_attrs(base)
        self.weight = base.weight
        self.bias = base.bias
        self.base_dtype = base.weight.dtype
        self.quantize_base: str | None = None
        self.register_buffer("weight_scale", None)
        self._quant_state: Any = None
        self._quant_keys: tuple[str, ...] = ()
        self._init_lora(base.in_features, base.out_features, base.weight, r, alpha, **options)
        if quantize is not None:
            self.quantize_(quantize)

    @property
    def extra_state_names(self) -> tuple[str, ...]:  # type: ignore[override]
        if self.weight_scale is not None:
            return ("weight_scale",)
        return tuple(f"weight_q_{k}" for k in self._quant_keys)

    def _base_weight_view(self) -> Tensor:
        return self.weight

    # ----------------------------------------------------------- quantized base
    def quantize_(self, method: str) -> tuple[int, int]:
        """Store ``W0`` quantized (see :mod:`lora_lightning.quantization`). Returns ``(bytes before, after)``.
        A per-row scale is a buffer (``weight_scale``), a format's tensors are buffers ``weight_q_<name>`` (they
        follow ``.to()`` and copies); a bitsandbytes ``QuantState`` is kept beside the packed weight."""
        before = self.weight.numel() * self.weight.element_size()
        stored, state = quantizer(method).quantize(self.weight.detach().float().contiguous())
        self.weight = nn.Parameter(stored, requires_grad=False)
        self.weight_scale = state if isinstance(state, Tensor) else None
        if isinstance(state, dict):
            for key, value in state.items():
                self.register_buffer(f"weight_q_{key}", value)
            self._quant_keys = tuple(state)
            state = None
        self._quant_state = None if isinstance(state, Tensor) else state
        self.quantize_base = method
        return before, self.base_weight_bytes()

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """A cast of the model (``.to(torch.bfloat16)``, Lightning's ``bf16-true``) leaves a quantized ``W0``'s codes as
        they are; the dtype it is dequantized to follows the cast, as an unquantized weight's would."""
        out = super()._apply(fn, recurse)
        if self.quantize_base is not None:
            probe = fn(torch.empty(0, dtype=self.base_dtype))
            if isinstance(probe, Tensor) and probe.is_floating_point():
                self.base_dtype = probe.dtype
        return out

    def _stored_state(self) -> Any:
        if self.weight_scale is not None:
            return self.weight_scale
        if self._quant_keys:
            return {k: getattr(self, f"weight_q_{k}") for k in self._quant_keys}
        return self._quant_state

    def _drop_quant_state(self) -> None:
        for key in self._quant_keys:
            del self._buffers[f"weight_q_{key}"]
        self.weight_scale, self._quant_state, self._quant_keys = None, None, ()

    def base_weight(self) -> Tensor:
        """Dense ``W0 (d_out x d_in)`` in the base dtype (dequantized if stored quantized)."""
        if self.quantize_base is None:
            return self.weight
        return quantizer(self.quantize_base).dequantize(self.weight, self._stored_state(), self.base_dtype)

    def base_weight_bytes(self) -> int:
        if self.quantize_base is None:
            return self.weight.numel() * self.weight.element_size()
        return quantizer(self.quantize_base).nbytes(self.weight, self._stored_state())

    def forward(self, x: Tensor) -> Tensor:
        shared = self.lora_shared
        if (
            shared is not None and not self.merged
        ):  # siblings reading the same x: one node for the group (shared_input.py)
            out = shared.forward(self, x)
            if out is not None:
                return out
        w = self.base_weight()
        return self.adapted_forward(x, w, self.bias, lambda: F.linear(x, w, self.bias))

    # ------------------------------------------------------------- merging
    def merge(self) -> None:
        """Fold ΔW into ``W0``. A quantized ``W0`` is dequantized first and the merged weight is kept in
        full precision (re-quantizing ``W0 + ΔW`` would lose the update's small values)."""
        if self.quantize_base is not None and not self.merged:
            self.weight = nn.Parameter(self.merged_weight(), requires_grad=False)
            self._drop_quant_state()
            self.quantize_base = None
            self.merged = True
            return
        super().merge()

    def merged_weight(self) -> Tensor:
        if self.quantize_base is None:
            return super().merged_weight()
        with torch.no_grad():
            return (self.base_weight().float() + self.delta_weight(torch.float32)).to(self.base_dtype)

    def to_base(self) -> nn.Linear:
        """A plain ``nn.Linear`` with this layer's (merged or base) weight and bias; a quantized
        weight is dequantized to full precision."""
        weight = self.weight
        if self.quantize_base is not None:
            weight = nn.Parameter(self.base_weight().detach().clone(), requires_grad=False)
        attrs = getattr(self, "_base_attrs", {"in_features": self.in_features, "out_features": self.out_features})
        return rebuild(self._base_cls, attrs, {"weight": weight, "bias": self.bias}, {})  # type: ignore[return-value]

    def extra_repr(self) -> str:
        quant = f", quantize_base={self.quantize_base}" if self.quantize_base else ""
        variant = f"variant={self.variant_name}, " if self.variant_name != "lora" else ""
        return (
            f"{variant}in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            + self.lora_extra_repr()
            + quant
        )


class LinearKind(LayerKind):
    """``nn.Linear`` (and subclasses): ``d_out x d_in``, fusable (GPT-2-style ``c_attn``, ``qkv``), quantizable."""

    name, description, layer_class = "linear", "nn.Linear", LoRALinear
    linear = fusable = quantizable = tieable = routable = True

    def matches(self, module: nn.Module) -> bool:
        # a subclass with a forward of its own (a bitsandbytes layer, a custom op) computes something else
        return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return int(module.out_features), int(module.in_features)

    def build(self, base: nn.Module, spec: Any, layer_class: type | None = None, **options: Any) -> LoRALayer:
        return (layer_class or self.layer_class)(base, fused=spec.fused, **options)


register_layer_kind(LinearKind())
