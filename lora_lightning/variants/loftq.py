"""LoftQ (Li et al. 2024, arXiv 2310.08659, ICLR 2024): LoRA-fine-tuning-aware quantization. The frozen base is
stored quantized and ``A``, ``B`` start from the quantization error, alternating quantization and SVD so that
``Q + s·B·A`` approximates ``W0`` — PEFT's ``init_lora_weights="loftq"`` with any registered ``quantize_base``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import registry
from ..config import LoRAConfig
from ..errors import LoRAConfigError
from ..plan import AdapterSpec
from ..quantization import Quantizer
from .base import Variant, register_variant
from .residual import ResidualBaseLinear


@dataclass
class LoftQConfig(LoRAConfig):
    """``loftq_iter``: alternating steps (PEFT's ``LoftQConfig(loftq_iter=...)``, default 1); the quantization is
    ``quantize_base`` (required: ``nf4`` is PEFT's ``loftq_bits=4``, ``bnb-int8`` its ``loftq_bits=8``)."""

    variant: str = "loftq"
    loftq_iter: int = 1

    # the base and the initial A0, B0 depend on both: an adapter is only valid on the same ones
    structural_options = ("loftq_iter", "quantize_base")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise LoRAConfigError(f"loftq_iter={self.loftq_iter!r} must be a positive integer (PEFT's default: 1)")
        if self.quantize_base is None:
            raise LoRAConfigError(
                "variant='loftq' fits A, B to the error of a quantized base and needs one: set quantize_base to one "
                f"of {list(registry.QUANTIZERS)} ('nf4' is PEFT's loftq_bits=4), or use variant='pissa' or "
                "'olora' on an unquantized base"
            )


@dataclass
class LoftQInit:
    """One weight's LoftQ initialisation (float32): the base is ``quantize(quantized_from)``, whose dequantized
    values are ``base``; ``s·B·A`` is the best rank-``r`` approximation of ``W0 - base``; ``errors[i]`` is
    ``||W0 - (Q_i + s·B_i·A_i)||_F`` after step ``i + 1``; ``quantization_error`` is ``||W0 - Q(W0)||_F``, the
    error of the base quantized alone."""

    quantized_from: Tensor
    base: Tensor
    A: Tensor
    B: Tensor
    errors: list[float]
    quantization_error: float


def loftq_init(
    weight: Tensor, quantize_base: str | Quantizer, r: int, iters: int = 1, scaling: float = 1.0
) -> LoftQInit:
    """LoftQ's alternation on ``weight (d_out x d_in)`` in float32, as PEFT 0.21's ``loftq_init``: ``T_1 = W0``;
    step ``i`` quantizes ``Q_i = quantize(T_i)``, takes the SVD ``W0 - Q_i = U S Vh`` and ``L_i = U_r·sqrt(S_r)``,
    ``R_i = sqrt(S_r)·Vh_r``, then ``T_{i+1} = W0 - L_i·R_i``. The result holds ``A = R/sqrt(s)``,
    ``B = L/sqrt(s)`` so that ``s·B·A = L·R`` (PEFT sets ``A = R``, ``B = L``, which is the same at ``s = 1`` and
    leaves ``Q + s·L·R`` away from ``W0`` otherwise)."""
    fmt = quantize_base if isinstance(quantize_base, Quantizer) else registry.quantizer(quantize_base)
    W = weight.detach().to(torch.float32)
    target, errors, plain = W, [], math.nan
    for i in range(iters):
        stored, state = fmt.quantize(target.contiguous())
        base = fmt.dequantize(stored, state, torch.float32)
        if i == 0:
            plain = float(torch.linalg.norm(W - base))
        U, S, Vh = torch.linalg.svd(W - base, full_matrices=False)
        root = torch.sqrt(S[:r])
        L, R = U[:, :r] * root, root[:, None] * Vh[:r]
        errors.append(float(torch.linalg.norm(W - base - L @ R)))
        quantized_from = target
        if i + 1 < iters:
            target = W - L @ R
    k = 1.0 / math.sqrt(scaling)
    return LoftQInit(quantized_from, base, R * k, L * k, errors, plain)


class LoftQLinear(ResidualBaseLinear):
    """The frozen base is ``Q`` (stored in the ``quantize_base`` format) and ``A``, ``B`` are LoftQ's
    (:func:`loftq_init`), so the initial output is ``Q·x + s·B·A·x ≈ W0·x``: closer to the unquantized model than
    the quantized base alone (``loftq_errors`` holds ``||W0 - (Q + s·B·A)||_F`` after each step,
    ``loftq_quantization_error`` the error without the adapter). ``A0``, ``B0`` are kept (not saved: a loaded
    adapter recomputes them from ``W0``), so ``to_base()`` of an unmerged layer gives ``Q + s·B0·A0``, LoftQ's
    approximation of ``W0`` (``W0`` itself is not kept)."""

    variant_name = "loftq"

    def __init__(self, base: nn.Linear, *args: Any, quantize: str | None = None, loftq_iter: int = 1, **kwargs: Any):
        if quantize is None:
            raise LoRAConfigError(
                "variant='loftq' needs a quantized base: set quantize_base (e.g. 'nf4'), or use variant='pissa'"
            )
        super().__init__(base, *args, quantize=None, **kwargs)
        init = loftq_init(self.weight, quantize, self.r, loftq_iter, self.scaling)
        with torch.no_grad():
            self.lora_A.copy_(init.A)
            self.lora_B.copy_(init.B)
        self.loftq_errors, self.loftq_quantization_error = init.errors, init.quantization_error
        self._set_base(init.quantized_from, quantize)  # quantizing T_N again gives Q_N bit for bit


@register_variant("loftq")
class LoftQ(Variant):
    """Trainable ``r·(d_in + d_out)`` per matrix, like LoRA; nn.Linear layers with a quantized base only."""

    config_class = LoftQConfig
    layer_class = LoftQLinear
    rewrites_base = needs_quantized_base = True

    def build(self, base: nn.Module, spec: AdapterSpec) -> LoftQLinear:
        kind = registry.layer_kind(spec.kind)
        kw = self.layer_kwargs(kind.weight(base), spec)
        kw.update(quantize=self.config.quantize_base, loftq_iter=self.config.loftq_iter)
        return kind.build(base, spec, layer_class=LoftQLinear, **kw)  # type: ignore[return-value]
