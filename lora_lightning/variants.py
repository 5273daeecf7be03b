"""LoRA variants selected with ``LoRAConfig(variant=...)``: DoRA, VeRA, PiSSA, AdaLoRA, rsLoRA and a
QLoRA-style quantized base. ``docs/variants.md`` gives the formulas and citations.

Every variant layer is a :class:`~lora_lightning.layers.LoRALinear` (so merging, saving, loading and
removal work through the same functions) with ``W0: d_out x d_in`` frozen and

* ``lora`` / ``rslora`` / ``qlora``: ``ΔW = s·B·A`` (``s = alpha/r``, or ``alpha/sqrt(r)`` for rsLoRA);
* ``pissa``: the same, with ``A, B`` from the top-r SVD of ``W0`` and ``W0`` replaced by the residual;
* ``dora``: ``W' = m ⊙ (W0 + s·B·A) / ||W0 + s·B·A||_row`` with a trainable magnitude ``m (d_out)``;
* ``vera``: ``ΔW = diag(b)·B·diag(d)·A`` with frozen random ``A, B`` shared by all layers;
* ``adalora``: ``ΔW = s·P·diag(λ)·Q`` with entries of ``λ`` pruned to a rank budget (:mod:`.adalora`).

Class attributes name the tensors each layer adds: ``lora_trainable_names`` (trained),
``lora_adapter_names`` (saved in adapter files) and ``lora_state_names`` (every state-dict entry that
is not part of the base layer; dropped from merged exports).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LoRAConfig
from .errors import LoRAConfigError, MergeStateError
from .layers import LoRALinear, resolve_dtype
from .quantization import dequantize, quantize, storage_bytes

LAYER_KINDS = {"lora": "lora", "rslora": "lora", "qlora": "lora", "pissa": "pissa", "dora": "dora", "vera": "vera", "adalora": "adalora"}


def layer_kind(config: LoRAConfig) -> str:
    """The layer class a config needs: ``lora`` | ``pissa`` | ``dora`` | ``vera`` | ``adalora``."""
    return LAYER_KINDS[config.variant]


def uses_variant_layers(config: LoRAConfig) -> bool:
    """True when the adapters must be built by :func:`build_variant_layer` (not plain LoRA layers)."""
    return layer_kind(config) != "lora" or config.quantize_base is not None


# --------------------------------------------------------------------------- layers
class VariantLinear(LoRALinear):
    """``LoRALinear`` whose frozen ``W0`` may be stored quantized (``nf4``/``int8``) and is read through
    :meth:`base_weight` (dequantized on the fly). Math otherwise that of plain LoRA."""

    variant = "lora"
    lora_trainable_names: tuple[str, ...] = ("lora_A", "lora_B")
    lora_adapter_names: tuple[str, ...] = ("lora_A", "lora_B")

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        adapter_dtype: torch.dtype | None = None,
        name: str = "",
    ) -> None:
        if type(base) is not nn.Linear and not isinstance(base, nn.Linear):
            raise LoRAConfigError(f"{name or 'this module'} is a {type(base).__name__}; LoRA variants adapt nn.Linear only")
        super().__init__(base, r, alpha, scaling, dropout, init, adapter_dtype, name)
        self.base_dtype = base.weight.dtype
        self.quantize_base: str | None = None
        self.register_buffer("weight_scale", None)

    @property
    def lora_state_names(self) -> tuple[str, ...]:
        extra = ("weight_scale",) if self.weight_scale is not None else ()
        return tuple(dict.fromkeys(self.lora_trainable_names + self.lora_adapter_names + ("lora_A", "lora_B") + extra))

    # -------------------------------------------------------------- quantized base
    def quantize_(self, method: str) -> tuple[int, int]:
        """Store ``W0`` quantized (``nf4`` | ``int8``). Returns ``(bytes before, bytes after)``."""
        before = self.weight.numel() * self.weight.element_size()
        stored, scale = quantize(self.weight.detach(), method)
        self.weight = nn.Parameter(stored, requires_grad=False)
        self.weight_scale = scale
        self.quantize_base = method
        return before, storage_bytes(stored, scale)

    def base_weight(self) -> Tensor:
        """Dense ``W0 (d_out x d_in)`` in the base dtype (dequantized if stored quantized)."""
        if self.quantize_base is None:
            return self.weight
        return dequantize(self.weight, self.weight_scale, self.base_dtype)

    def base_weight_bytes(self) -> int:
        return storage_bytes(self.weight, self.weight_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.add_lora(F.linear(x, self.base_weight(), self.bias), x)

    # -------------------------------------------------------------- merging
    def merged_base_weight(self) -> Tensor:
        """``W0 + ΔW`` (the effective weight) as a dense tensor in the base dtype, detached."""
        with torch.no_grad():
            if self.merged:
                return self.base_weight().detach()
            return (self.base_weight().float() + self.delta_weight(torch.float32)).to(self.base_dtype)

    def merge(self) -> None:
        """Fold ΔW into ``W0``. A quantized ``W0`` is dequantized first and the merged weight is kept in
        full precision (re-quantizing ``W0 + ΔW`` would lose the update's small values)."""
        if self.merged:
            raise MergeStateError("this LoRA layer is already merged; call unmerge() first (merging twice would add ΔW twice)")
        if self.quantize_base is not None:
            dense = self.merged_base_weight()
            self.weight = nn.Parameter(dense, requires_grad=False)
            self.weight_scale = None
            self.quantize_base = None
            self.merged = True
            return
        self._merge_dense()
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ΔW again (a base that was quantized stays in full precision afterwards)."""
        if not self.merged:
            raise MergeStateError("this LoRA layer is not merged; nothing to unmerge (call merge() first)")
        self._unmerge_dense()
        self.merged = False

    def _merge_dense(self) -> None:
        self._add_delta(+1.0)

    def _unmerge_dense(self) -> None:
        self._add_delta(-1.0)

    def to_base(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the (merged or base) weight, dequantized to full precision."""
        linear = super().to_base()
        if self.quantize_base is not None:
            linear.weight = nn.Parameter(self.base_weight().detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        quant = f", quantize_base={self.quantize_base}" if self.quantize_base else ""
        return f"variant={self.variant}{quant}, " + super().extra_repr()


class PiSSALinear(VariantLinear):
    """PiSSA (Meng et al. 2024, arXiv 2404.02948): with ``W0 = U S Vh`` (SVD),
    ``A = sqrt(S_r/s)·Vh_r (r x d_in)``, ``B = U_r·sqrt(S_r/s) (d_out x r)`` so ``s·B·A = U_r S_r Vh_r``,
    and the frozen base becomes the residual ``W_res = W0 - s·B·A``. The initial output equals the
    base's up to fp32 round-off. ``A0, B0`` are kept (not saved: recomputed from ``W0``) so
    ``to_base()`` of an unmerged layer restores ``W0`` and :func:`pissa_to_lora` can convert the update
    to a plain LoRA on the original base."""

    variant = "pissa"

    def __init__(self, base: nn.Linear, r: int, alpha: float, scaling: float, dropout: float = 0.0,
                 init: str = "kaiming", adapter_dtype: torch.dtype | None = None, name: str = "") -> None:
        super().__init__(base, r, alpha, scaling, dropout, init, adapter_dtype, name)
        with torch.no_grad():
            w = self.weight.detach().double()  # SVD in float64: the residual is exact to fp32 round-off
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            root = torch.sqrt(S[:r] / self.scaling)
            A0 = root[:, None] * Vh[:r]
            B0 = U[:, :r] * root[None, :]
            self.lora_A.copy_(A0.to(self.lora_A.dtype))
            self.lora_B.copy_(B0.to(self.lora_B.dtype))
            residual = w - self.scaling * (self.lora_B.double() @ self.lora_A.double())
            self.weight.copy_(residual.to(self.weight.dtype))
        self.register_buffer("pissa_A0", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("pissa_B0", self.lora_B.detach().clone(), persistent=False)

    def reset_lora_parameters(self) -> None:  # the SVD init happens in __init__
        super().reset_lora_parameters()

    def to_base(self) -> nn.Linear:
        """Unmerged: the original ``W0 = W_res + s·B0·A0``; merged: ``W_res + s·B·A``."""
        linear = super().to_base()
        if not self.merged:
            with torch.no_grad():
                w0 = linear.weight.float() + self.scaling * (self.pissa_B0.float() @ self.pissa_A0.float())
            linear.weight = nn.Parameter(w0.to(self.base_dtype), requires_grad=False)
        return linear


class DoRALinear(VariantLinear):
    """DoRA (Liu et al. 2024, arXiv 2402.09353): ``W' = m ⊙ V / ||V||_row`` with ``V = W0 + s·B·A``
    (``d_out x d_in``), ``||V||_row (d_out)`` the L2 norm of each output row (PEFT's
    ``weight_norm``), ``m (d_out)`` trainable, initialised to ``||W0||_row`` so ``W' = W0`` at
    step 0. ``y = (m/||V||) ⊙ (x W0ᵀ + s·dropout(x) Aᵀ Bᵀ) + b``; the norm is not detached."""

    variant = "dora"
    lora_trainable_names = ("lora_A", "lora_B", "lora_magnitude")
    lora_adapter_names = ("lora_A", "lora_B", "lora_magnitude")

    def __init__(self, base: nn.Linear, r: int, alpha: float, scaling: float, dropout: float = 0.0,
                 init: str = "kaiming", adapter_dtype: torch.dtype | None = None, name: str = "") -> None:
        super().__init__(base, r, alpha, scaling, dropout, init, adapter_dtype, name)
        with torch.no_grad():
            norm = self.weight.detach().float().norm(dim=1)
        self.lora_magnitude = nn.Parameter(norm.to(self.lora_A.dtype))
        self._dora_factor: Tensor | None = None

    def init_magnitude(self) -> None:
        """Reset ``m`` to ``||W0||_row`` of the current (dequantized) base."""
        with torch.no_grad():
            self.lora_magnitude.copy_(self.base_weight().float().norm(dim=1).to(self.lora_magnitude.dtype))

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
        w = self.base_weight()
        if self.merged:
            return F.linear(x, w, self.bias)
        dt = self.lora_A.dtype
        v = w.to(dt) + self.live_delta_weight(dt)
        mag_scale = self.lora_magnitude / v.norm(dim=1)
        out = mag_scale * (F.linear(x, w).to(dt) + self.lora_forward(x))
        if self.bias is not None:
            out = out + self.bias.to(dt)
        return out.to(x.dtype)

    def _merge_dense(self) -> None:
        with torch.no_grad():
            dt = self.lora_A.dtype
            v = self.weight.to(dt) + self.live_delta_weight(dt)
            factor = self.lora_magnitude / v.norm(dim=1)
            self._dora_factor = factor.detach().clone()
            self.weight.copy_((factor[:, None] * v).to(self.weight.dtype))

    def _unmerge_dense(self) -> None:
        with torch.no_grad():
            dt = self.lora_A.dtype
            factor = self._dora_factor if self._dora_factor is not None else self.lora_magnitude / self.dora_weight().norm(dim=1)
            w0 = self.weight.to(dt) / factor[:, None] - self.live_delta_weight(dt)
            self.weight.copy_(w0.to(self.weight.dtype))
            self._dora_factor = None


class VeRALinear(VariantLinear):
    """VeRA (Kopiczko et al. 2024, arXiv 2310.11454): ``ΔW = diag(b)·B·diag(d)·A`` with ``A (r x d_in)``
    and ``B (d_out x r)`` slices of frozen random matrices shared by every layer
    (``r x d_in_max``, ``d_out_max x r``, regenerated from ``vera_seed``, never saved) and trainable
    ``d (r)`` (init ``vera_d_init``) and ``b (d_out)`` (init 0, so ``ΔW = 0`` at step 0). No ``alpha/r``
    scaling. Trainable: ``r + d_out`` per layer."""

    variant = "vera"
    lora_trainable_names = ("vera_d", "vera_b")
    lora_adapter_names = ("vera_d", "vera_b")

    def __init__(self, base: nn.Linear, shared_A: nn.Parameter, shared_B: nn.Parameter, d_init: float = 0.1,
                 dropout: float = 0.0, name: str = "") -> None:
        r = shared_A.shape[0]
        super().__init__(base, r, 1.0, 1.0, dropout, "kaiming", shared_A.dtype, name)
        if shared_A.shape[1] < self.in_features or shared_B.shape[0] < self.out_features:
            raise LoRAConfigError(f"VeRA shared matrices {tuple(shared_A.shape)}, {tuple(shared_B.shape)} are too small for {name}")
        self.lora_A = shared_A  # replaces the layer's own A/B by the shared frozen ones
        self.lora_B = shared_B
        self.vera_d = nn.Parameter(torch.full((r,), float(d_init), dtype=shared_A.dtype, device=shared_A.device))
        self.vera_b = nn.Parameter(torch.zeros(self.out_features, dtype=shared_A.dtype, device=shared_A.device))

    def lora_forward(self, x: Tensor) -> Tensor:
        """``b ⊙ (B (d ⊙ (A·dropout(x))))`` for ``x (..., d_in)`` -> ``(..., d_out)``."""
        if self.dropout_p > 0:
            x = self.lora_dropout(x)
        x = x.to(self.vera_d.dtype)
        h = F.linear(x, self.lora_A[:, : self.in_features]) * self.vera_d
        return F.linear(h, self.lora_B[: self.out_features]) * self.vera_b

    def live_delta_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``diag(b)·B·diag(d)·A`` (``d_out x d_in``)."""
        A, B = self.lora_A[:, : self.in_features], self.lora_B[: self.out_features]
        delta = (self.vera_b[:, None] * B) @ (self.vera_d[:, None] * A)
        return delta if dtype is None else delta.to(dtype)

    def adapter_dims(self) -> tuple[int, int, tuple[str, ...]]:
        return self.out_features, self.in_features, ()


class AdaLoRALinear(VariantLinear):
    """AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): ``ΔW = s·P·diag(λ)·Q`` with ``P = lora_B
    (d_out x r)``, ``λ = lora_E (r)``, ``Q = lora_A (r x d_in)``; ``P, Q ~ N(0, 0.02²)``, ``λ = 0``.
    :class:`~lora_lightning.adalora.AdaLoRAController` zeroes entries of ``λ`` by importance until the
    total rank budget is met and adds the orthogonality penalty's gradient."""

    variant = "adalora"
    lora_trainable_names = ("lora_A", "lora_B", "lora_E")
    lora_adapter_names = ("lora_A", "lora_B", "lora_E")

    def __init__(self, base: nn.Linear, r: int, alpha: float, scaling: float, dropout: float = 0.0,
                 init: str = "kaiming", adapter_dtype: torch.dtype | None = None, name: str = "") -> None:
        super().__init__(base, r, alpha, scaling, dropout, init, adapter_dtype, name)
        self.lora_E = nn.Parameter(torch.zeros(r, dtype=self.lora_A.dtype, device=self.lora_A.device))
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)

    def lora_forward(self, x: Tensor) -> Tensor:
        """``s · ((dropout(x) Qᵀ) ⊙ λ) Pᵀ``."""
        if self.dropout_p > 0:
            x = self.lora_dropout(x)
        x = x.to(self.lora_A.dtype)
        return F.linear(F.linear(x, self.lora_A) * (self.lora_E * self.scaling), self.lora_B)

    def live_delta_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``s · P diag(λ) Q`` (``d_out x d_in``)."""
        delta = ((self.lora_B * self.lora_E) @ self.lora_A) * self.scaling
        return delta if dtype is None else delta.to(dtype)

    def orthogonality_penalty(self) -> Tensor:
        """``||PᵀP - I||²_F + ||QQᵀ - I||²_F`` (differentiable scalar)."""
        eye = torch.eye(self.r, dtype=self.lora_A.dtype, device=self.lora_A.device)
        return ((self.lora_B.T @ self.lora_B - eye) ** 2).sum() + ((self.lora_A @ self.lora_A.T - eye) ** 2).sum()

    def rank(self) -> int:
        """Entries of ``λ`` not pruned (non-zero)."""
        return int((self.lora_E.detach() != 0).sum())


# --------------------------------------------------------------------------- building
def vera_shared_matrices(seed: int, r: int, d_in: int, d_out: int, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """VeRA's frozen ``A (r x d_in)``, ``B (d_out x r)``: Kaiming-uniform (fan-in, gain sqrt(2))
    from a CPU ``torch.Generator`` seeded with ``seed`` — identical on every machine."""
    g = torch.Generator().manual_seed(int(seed))

    def kaiming(rows: int, cols: int) -> Tensor:
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(cols)
        return (torch.rand(rows, cols, generator=g, dtype=torch.float32) * 2 - 1) * bound

    A = kaiming(r, d_in)
    B = kaiming(d_out, r)
    return A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)


class VariantBuilder:
    """Builds the adapter layers of one injection (holds what layers share, e.g. VeRA's A and B).

    Created before the model is modified so unsupported targets fail first."""

    def __init__(self, model: nn.Module, config: LoRAConfig, specs: Sequence) -> None:
        self.config = config
        self.kind = layer_kind(config)
        bad = [s.name for s in specs if getattr(s, "fused", None) is not None or not isinstance(model.get_submodule(s.name), nn.Linear)]
        if bad:
            raise LoRAConfigError(
                f"variant={config.variant!r} / quantize_base={config.quantize_base!r} adapts nn.Linear layers only; "
                f"{bad[:3]} are fused projections, GPT-2 Conv1D or nn.MultiheadAttention. Target their nn.Linear "
                "children, or use variant='lora' there"
            )
        if config.quantize_base == "nf4":
            from .quantization import NF4_BLOCK, torchao_nf4

            torchao_nf4()  # clear error now if torchao is missing
            odd = [s.name for s in specs if (s.d_in * s.d_out) % NF4_BLOCK]
            if odd:
                raise LoRAConfigError(
                    f"quantize_base='nf4' needs weights with a multiple of {NF4_BLOCK} values; {odd[:3]} are not: "
                    "use quantize_base='int8' or other targets"
                )
        self.shared: tuple[nn.Parameter, nn.Parameter] | None = None
        if self.kind == "vera" and specs:
            first = model.get_submodule(specs[0].name)
            dtype = resolve_dtype(config.adapter_dtype, first.weight.dtype)
            A, B = vera_shared_matrices(
                config.vera_seed, config.r, max(s.d_in for s in specs), max(s.d_out for s in specs), dtype, first.weight.device
            )
            self.shared = (nn.Parameter(A, requires_grad=False), nn.Parameter(B, requires_grad=False))
        self.memory: dict[str, tuple[int, int]] = {}

    def build(self, base: nn.Linear, spec) -> VariantLinear:
        """The adapter layer for one planned module (``spec``: an ``AdapterSpec``)."""
        c = self.config
        common = dict(dropout=c.dropout, name=spec.name)
        if self.kind == "vera":
            assert self.shared is not None
            layer: VariantLinear = VeRALinear(base, self.shared[0], self.shared[1], c.vera_d_init, **common)
        else:
            cls = {"lora": VariantLinear, "pissa": PiSSALinear, "dora": DoRALinear, "adalora": AdaLoRALinear}[self.kind]
            layer = cls(
                base,
                r=spec.r,
                alpha=spec.alpha,
                scaling=c.scaling_for(spec.r, spec.alpha),
                init=c.init,
                adapter_dtype=resolve_dtype(c.adapter_dtype, base.weight.dtype),
                **common,
            )
        if c.quantize_base is not None:
            self.memory[spec.name] = layer.quantize_(c.quantize_base)
            if isinstance(layer, DoRALinear):
                layer.init_magnitude()  # m = ||dequantized W0||_row: the initial output is the quantized base's
        return layer


def build_variant_layer(base: nn.Linear, spec, config: LoRAConfig, builder: VariantBuilder) -> VariantLinear:
    """Entry point used by :func:`~lora_lightning.injection.inject_lora`."""
    return builder.build(base, spec)


def variant_layers(model: nn.Module) -> dict[str, VariantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, VariantLinear)}


def base_memory(model: nn.Module) -> dict[str, int]:
    """Bytes held by the adapted base weights now (quantized or not) vs in their original dtype."""
    now = before = 0
    for layer in variant_layers(model).values():
        now += layer.base_weight_bytes()
        before += layer.in_features * layer.out_features * torch.empty((), dtype=layer.base_dtype).element_size()
    return {"base_bytes_before": before, "base_bytes_after": now}


def pissa_to_lora(model: nn.Module) -> dict[str, tuple[Tensor, Tensor, float]]:
    """Each PiSSA layer's update on the ORIGINAL base as a plain rank-2r LoRA (PEFT's conversion):
    ``W_res + s·B·A = W0 + s·[B, B0]·[A; -A0]``. Returns ``{name: (A' (2r x d_in), B' (d_out x 2r), s)}``."""
    out = {}
    for name, layer in variant_layers(model).items():
        if isinstance(layer, PiSSALinear):
            A = torch.cat([layer.lora_A.detach(), -layer.pissa_A0], 0)
            B = torch.cat([layer.lora_B.detach(), layer.pissa_B0], 1)
            out[name] = (A, B, layer.scaling)
    if not out:
        raise LoRAConfigError("pissa_to_lora needs a model injected with LoRAConfig(variant='pissa')")
    return out


__all__ = [
    "AdaLoRALinear",
    "DoRALinear",
    "PiSSALinear",
    "VariantBuilder",
    "VariantLinear",
    "VeRALinear",
    "base_memory",
    "layer_kind",
    "pissa_to_lora",
    "uses_variant_layers",
    "variant_layers",
    "vera_shared_matrices",
]
