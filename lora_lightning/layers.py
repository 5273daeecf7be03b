"""LoRA layers: the math of Hu et al. 2021, §4.1.

::

        h (d_out)
          ^
          |  +  <-------------------------------+
          |                                     | (alpha / r) · B·A·dropout(x)
    +-----------+                      +----------------+
    |  W0 frozen |                      | B  (d_out x r) |  zero init -> ΔW = 0 at step 0
    | (d_out x   |                      +----------------+
    |   d_in)    |                      | A  (r x d_in)  |  Kaiming-uniform or N(0, 1/r)
    +-----------+                      +----------------+
          ^                                     ^
          +------------------ x (d_in) ---------+

Only ``A`` and ``B`` are trained. Because ``B = 0`` at initialisation the adapted model
computes exactly what the base computes. ``merge()`` folds ``ΔW = (alpha/r)·B·A`` into ``W0``
(zero extra inference latency, §4.1); ``unmerge()`` subtracts it again to switch tasks.

The forward never materialises ``B·A`` (a ``d_out x d_in`` matrix): it computes
``(dropout(x)·Aᵀ)·(scaling)·Bᵀ``, two thin matmuls costing ``r·(d_in + d_out)`` per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import MergeStateError, RankTooLargeError

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(name: str | None, base_dtype: torch.dtype) -> torch.dtype:
    """Adapter dtype: the named one, else the base's (float32 for non-float bases)."""
    if name is not None:
        return _DTYPES[name]
    return base_dtype if base_dtype.is_floating_point else torch.float32


class LoRAMixin:
    """State and math shared by every LoRA layer: ``lora_A (r x d_in)``, ``lora_B (d_out x r)``.

    Subclasses provide ``_base_weight_view()`` returning the frozen weight as a
    ``d_out x d_in`` view (transposed for weights stored ``d_in x d_out``) that merge/unmerge
    update in place.
    """

    r: int
    alpha: float
    scaling: float
    merged: bool
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def _init_lora(
        self,
        d_in: int,
        d_out: int,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float,
        init: str,
        dtype: torch.dtype,
        device: torch.device,
        name: str = "",
    ) -> None:
        if r > min(d_in, d_out):
            raise RankTooLargeError(
                f"r={r} is larger than min(d_in, d_out)={min(d_in, d_out)} for {name or 'a layer'} "
                f"({d_out}x{d_in}); a rank-{r} update cannot exist there: choose r <= {min(d_in, d_out)} "
                "(or lower it for this module with rank_pattern)"
            )
        self.r = r
        self.alpha = float(alpha)
        self.scaling = float(scaling)
        self.init = init
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, d_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, dtype=dtype, device=device))
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A random (Kaiming-uniform like nn.Linear, or N(0, 1/r)); B = 0 so ΔW = 0."""
        with torch.no_grad():
            if self.init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    # ---------------------------------------------------------------- math
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``ΔW = scaling · B @ A`` as a ``d_out x d_in`` tensor (computed in ``dtype``)."""
        return (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype)) * self.scaling

    def lora_forward(self, x: Tensor) -> Tensor:
        """``scaling · dropout(x) @ Aᵀ @ Bᵀ`` for ``x (..., d_in)`` -> ``(..., d_out)`` in A's dtype."""
        if self.dropout_p > 0:
            x = self.lora_dropout(x)
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        # scale the thin r-wide intermediate rather than the d_out-wide output
        return F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)

    # --------------------------------------------------------- merge/unmerge
    def _base_weight_view(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _add_delta(self, sign: float) -> None:
        weight = self._base_weight_view()
        with torch.no_grad():
            delta = self.delta_weight(torch.float32 if weight.dtype != torch.float64 else torch.float64)
            if weight.dtype in (torch.float32, torch.float64):
                weight.add_(delta.to(weight.device), alpha=sign)
            else:  # low-precision base: do the sum in fp32, round once
                weight.copy_((weight.float() + sign * delta.to(weight.device)).to(weight.dtype))

    def merge(self) -> None:
        """``W0 <- W0 + scaling·B·A``; afterwards forward costs exactly the base layer's."""
        if self.merged:
            raise MergeStateError("this LoRA layer is already merged; call unmerge() first (merging twice would add ΔW twice)")
        self._add_delta(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        """``W0 <- W0 - scaling·B·A`` (exact up to floating-point round-off of the base dtype)."""
        if not self.merged:
            raise MergeStateError("this LoRA layer is not merged; nothing to unmerge (call merge() first)")
        self._add_delta(-1.0)
        self.merged = False

    def lora_extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout_p:g}, merged={self.merged}"


class LoRALinear(nn.Linear, LoRAMixin):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    ``y = x W0ᵀ + b + (alpha/r) · dropout(x) Aᵀ Bᵀ`` with ``W0: d_out x d_in`` (frozen, kept
    in its own dtype), ``A: r x d_in`` and ``B: d_out x r`` (trainable). The module keeps the
    original ``weight`` and ``bias`` Parameter objects (no copy), so the base keys of the
    state dict are unchanged; the adapter adds ``lora_A`` and ``lora_B``.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        scaling: float | None = None,
        dropout: float = 0.0,
        init: str = "kaiming",
        adapter_dtype: torch.dtype | None = None,
        name: str = "",
    ) -> None:
        nn.Module.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self._base_cls = type(base)
        self.weight = base.weight
        self.bias = base.bias
        dtype = adapter_dtype or resolve_dtype(None, base.weight.dtype)
        self._init_lora(
            base.in_features,
            base.out_features,
            r,
            alpha,
            alpha / r if scaling is None else scaling,
            dropout,
            init,
            dtype,
            base.weight.device,
            name,
        )

    def _base_weight_view(self) -> Tensor:
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        return out + self.lora_forward(x).to(out.dtype)

    def to_base(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's (possibly merged) weight and bias."""
        linear = self._base_cls.__new__(self._base_cls)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " + self.lora_extra_repr()


LORA_PARAM_NAMES = ("lora_A", "lora_B")


def is_lora_layer(module: nn.Module) -> bool:
    return isinstance(module, LoRAMixin)
