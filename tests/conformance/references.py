"""Independent references: the adapted model's update computed by hand, in float64, from its raw adapter
tensors, put into a plain copy of the base model that lora_lightning never touched.

The plain model is built again from the same seed (so ``W0`` is independent of the adapted model), except
where the base itself is part of the variant's state: PiSSA's and OLoRA's frozen residual ``W0 - s·B0·A0``
and a quantized base (its dequantized values; LoftQ's ``Q``) are read from the adapted layer. Each variant's
formula is written out here, not taken from the library's ``factors()``: a variant without an entry in
:data:`FORMULAS` fails the battery.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lora_lightning import lora_layers, registry

from .cases import Case, Net

D = torch.float64


def _matrices(layer: nn.Module) -> tuple[Tensor, Tensor]:
    A = layer.lora_A.detach().to(D)
    B = layer.lora_B.detach().to(D)
    return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)


def _low_rank(layer: nn.Module, B: Tensor, A: Tensor, r: int) -> Tensor:
    """``B·A`` as the whole weight's ``d_out x d_in`` update; for a fused layer block ``i`` of rows gets
    ``B_i·A_i`` and the other parts' rows stay zero."""
    fused = layer.fused
    if fused is None:
        return B @ A
    rows, b_row, i = [], 0, 0
    for part, size in zip(fused.parts, fused.sizes, strict=True):
        if part in fused.adapted:
            rows.append(B[b_row : b_row + size] @ A[i * r : (i + 1) * r])
            b_row, i = b_row + size, i + 1
        else:
            rows.append(torch.zeros(size, A.shape[1], dtype=D))
    return torch.cat(rows, 0)


def _scale(case: Case, layer: nn.Module) -> float:
    """``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``) from the layer's rank and alpha (the configured values)."""
    r, alpha = int(layer.r), float(layer.alpha)
    return alpha / math.sqrt(r) if case.variant == "rslora" else alpha / r


def lora(case: Case, layer: nn.Module, W0: Tensor) -> Tensor:
    A, B = _matrices(layer)
    return _scale(case, layer) * _low_rank(layer, B, A, int(layer.r))


def dora(case: Case, layer: nn.Module, W0: Tensor) -> Tensor:
    """``W' = m ⊙ V / ||V||_row`` with ``V = W0 + s·B·A``: the update is ``W' - W0``."""
    V = W0 + lora(case, layer, W0)
    m = layer.lora_magnitude.detach().to(D)
    return m[:, None] * V / V.norm(dim=1, keepdim=True) - W0


def vera(case: Case, layer: nn.Module, W0: Tensor) -> Tensor:
    """``diag(b)·B·diag(d)·A`` with ``A``, ``B`` slices of the shared frozen matrices, no scaling."""
    d_out, d_in = W0.shape
    A = layer.lora_A.detach().to(D)[:, :d_in]
    B = layer.lora_B.detach().to(D)[:d_out]
    return (layer.vera_b.detach().to(D)[:, None] * B) @ (layer.vera_d.detach().to(D)[:, None] * A)


def adalora(case: Case, layer: nn.Module, W0: Tensor) -> Tensor:
    """``s·P·diag(λ)·Q`` with ``P = lora_B``, ``λ = lora_E``, ``Q = lora_A``, ``s = alpha/r``."""
    A, B = _matrices(layer)
    return _scale(case, layer) * B @ (layer.lora_E.detach().to(D)[:, None] * A)


# variant -> the update it adds to W0 (d_out x d_in, float64)
FORMULAS: dict[str, Callable[[Case, nn.Module, Tensor], Tensor]] = {
    "lora": lora,
    "rslora": lora,
    "lora_fa": lora,  # A frozen: the same update
    "dora": dora,
    "pissa": lora,  # on the residual base
    "olora": lora,  # on the residual base
    "loftq": lora,  # on the quantized base
    "vera": vera,
    "adalora": adalora,
}


def rewrites_base(case: Case) -> bool:
    """Whether the case's variant initialises by rewriting the frozen base (PiSSA, OLoRA, LoftQ)."""
    return bool(registry.variant(case.variant).rewrites_base)


def _view(kind: str, stored: Tensor, transposed: bool = False) -> Tensor:
    """The stored weight as ``d_out x d_in`` (GPT-2 Conv1D and embedding tables are stored transposed; a
    convolution's kernel is flattened; a 3-D MoE expert stack ``[E, d_out, d_in]`` is the ``E·d_out x d_in`` block
    column of its experts, ``[E, d_in, d_out]`` transposed first where the experts module says ``is_transposed``)."""
    if kind in ("conv1d", "embedding"):
        return stored.T
    if kind == "experts" and stored.dim() == 3:
        per = stored.transpose(1, 2) if transposed else stored
        return per.reshape(-1, per.shape[-1])
    return stored.reshape(stored.shape[0], -1)


def _stored(kind: str, view: Tensor, like: Tensor, transposed: bool = False) -> Tensor:
    if kind in ("conv1d", "embedding"):
        return view.T
    if kind == "experts" and like.dim() == 3:
        e = like.shape[0]
        return view.reshape(e, like.shape[2], like.shape[1]).transpose(1, 2) if transposed else view.reshape(like.shape)
    return view.reshape(like.shape)


def weight_name(module: nn.Module) -> str:
    return "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"


def stored_weight(plain: nn.Module, name: str) -> tuple[Tensor, bool]:
    """``(tensor, transposed)``: the plain model's tensor the adapter ``name`` changes (a module's weight, or the
    parameter a ``target_parameters`` adapter is named after) and whether its owner stores experts transposed."""
    try:
        target = plain.get_submodule(name)
    except AttributeError:
        owner = plain.get_submodule(name.rpartition(".")[0])
        return plain.get_parameter(name), bool(getattr(owner, "is_transposed", False))
    return getattr(target, weight_name(target)), False


def reference_model(case: Case, model: nn.Module, weights: dict[str, float] | None = None, seed: int = 0) -> nn.Module:
    """A plain :class:`Net` in float64 whose adapted weights hold ``W0 + ΔW``, ``ΔW`` by :data:`FORMULAS` from the
    active adapter's tensors — or ``W0 + Σ w·ΔW_name`` over the named adapters in ``weights``."""
    from lora_lightning import use_adapter

    plain = Net(case, seed).to(D)
    deltas: dict[str, Tensor] = {}
    bases: dict[str, Tensor] = {}
    for adapter, w in (weights or {None: 1.0}).items():
        with use_adapter(model, adapter) if adapter is not None else _nothing():
            for name, layer in lora_layers(model).items():
                stored, transposed = stored_weight(plain, name)
                if rewrites_base(case) and case.quantizer is None:
                    base_view = _view(case.example.kind, layer.weight.detach().to(D))  # PiSSA's or OLoRA's residual
                elif case.quantizer is not None:
                    base_view = layer.base_weight().detach().to(D)  # the dequantized (residual) base
                else:
                    base_view = _view(case.example.kind, stored.detach(), transposed)
                bases[name] = base_view
                deltas[name] = deltas.get(name, 0) + w * FORMULAS[case.variant](case, layer, base_view)
    for name, delta in deltas.items():
        stored, transposed = stored_weight(plain, name)
        with torch.no_grad():
            stored.copy_(_stored(case.example.kind, bases[name] + delta, stored, transposed))
    return plain


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None
