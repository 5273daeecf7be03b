"""VeRA (Kopiczko et al. 2024, arXiv 2310.11454): one pair of frozen random projections shared by every
adapted layer; each layer trains only two scaling vectors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import LoRAConfig, check_alpha
from ..errors import LoRAConfigError
from ..layers import LoRALinear, resolve_dtype
from ..plan import AdapterSpec
from .base import Variant, register_variant


@dataclass
class VeRAConfig(LoRAConfig):
    """``vera_seed``: seed of the shared frozen ``A``, ``B`` (regenerated on load, never saved);
    ``vera_d_init``: initial value of every ``d`` vector."""

    variant: str = "vera"
    vera_seed: int = 0
    vera_d_init: float = 0.1

    structural_options = ("vera_seed",)

    def validate(self) -> None:
        super().validate()
        if self.rank_pattern:
            raise LoRAConfigError(
                "variant='vera' shares one r x d_in A across layers: rank_pattern is not supported, drop it"
            )
        if isinstance(self.vera_seed, bool) or not isinstance(self.vera_seed, int):
            raise LoRAConfigError(f"vera_seed={self.vera_seed!r} must be an integer")
        check_alpha(self.vera_d_init, "vera_d_init")


def vera_shared_matrices(
    seed: int, r: int, d_in: int, d_out: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """VeRA's frozen ``A (r x d_in)``, ``B (d_out x r)``: Kaiming-uniform (fan-in, gain sqrt(2))
    from a CPU ``torch.Generator`` seeded with ``seed`` — identical on every machine."""
    g = torch.Generator().manual_seed(int(seed))

    def kaiming(rows: int, cols: int) -> Tensor:
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(cols)
        return (torch.rand(rows, cols, generator=g, dtype=torch.float32) * 2 - 1) * bound

    A = kaiming(r, d_in)
    B = kaiming(d_out, r)
    return A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)


class VeRALinear(LoRALinear):
    """``ΔW = diag(b)·B·diag(d)·A`` with ``A (r x d_in)`` and ``B (d_out x r)`` slices of frozen random
    matrices shared by every layer (``r x d_in_max``, ``d_out_max x r``) and trainable ``d (r)`` (init
    ``vera_d_init``) and ``b (d_out)`` (init 0, so ``ΔW = 0`` at step 0). No ``alpha/r`` scaling.
    As factors: ``A' = d ⊙ A``, ``B' = b ⊙ B``, ``s = 1``."""

    variant_name = "vera"
    trainable_names = ("vera_d", "vera_b")
    adapter_names = ("vera_d", "vera_b")

    def __init__(
        self,
        base: nn.Linear,
        shared_A: nn.Parameter,
        shared_B: nn.Parameter,
        d_init: float = 0.1,
        dropout: float = 0.0,
        name: str = "",
        quantize: str | None = None,
        pin_dtype: bool = False,
    ) -> None:
        r = shared_A.shape[0]
        super().__init__(
            base,
            r,
            1.0,
            scaling=1.0,
            dropout=dropout,
            adapter_dtype=shared_A.dtype,
            name=name,
            quantize=quantize,
            pin_dtype=pin_dtype,
        )
        if shared_A.shape[1] < self.in_features or shared_B.shape[0] < self.out_features:
            raise LoRAConfigError(
                f"VeRA shared matrices {tuple(shared_A.shape)}, {tuple(shared_B.shape)} are too small for {name}"
            )
        self.lora_A = shared_A  # replaces the layer's own A/B by the shared frozen ones
        self.lora_B = shared_B
        self.vera_d = nn.Parameter(torch.full((r,), float(d_init), dtype=shared_A.dtype, device=shared_A.device))
        self.vera_b = nn.Parameter(torch.zeros(self.out_features, dtype=shared_A.dtype, device=shared_A.device))

    def factors(self) -> tuple[Tensor, Tensor, float]:
        A = self.lora_A[:, : self.in_features] * self.vera_d[:, None]
        B = self.lora_B[: self.out_features] * self.vera_b[:, None]
        return A, B, 1.0


@register_variant("vera")
class VeRA(Variant):
    """Trainable ``r + d_out`` per matrix; the shared ``A``, ``B`` are frozen and regenerated from the seed."""

    config_class = VeRAConfig
    layer_class = VeRALinear

    def __init__(self, model: nn.Module, config: VeRAConfig, specs: Sequence[AdapterSpec]) -> None:
        super().__init__(model, config, specs)
        first = model.get_submodule(specs[0].name)
        dtype = resolve_dtype(config.adapter_dtype, first.weight.dtype)
        A, B = vera_shared_matrices(
            config.vera_seed,
            config.r,
            max(s.d_in for s in specs),
            max(s.d_out for s in specs),
            dtype,
            first.weight.device,
        )
        self.shared = (nn.Parameter(A, requires_grad=False), nn.Parameter(B, requires_grad=False))

    def build(self, base: nn.Module, spec: AdapterSpec) -> VeRALinear:
        c = self.config
        return VeRALinear(
            base,
            *self.shared,
            c.vera_d_init,
            dropout=c.dropout,
            name=spec.name,
            quantize=c.quantize_base,
            pin_dtype=c.adapter_dtype is not None,
        )

    @classmethod
    def alpha_and_scaling(cls, config: LoRAConfig, r: int, alpha: float) -> tuple[float, float]:
        return 1.0, 1.0  # no alpha/r: the trained d and b carry the scale

    @classmethod
    def num_params(cls, spec: AdapterSpec, config: LoRAConfig) -> int:
        return spec.r + spec.d_out
