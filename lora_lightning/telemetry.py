"""What the adapters are doing, per adapted matrix, cheaply: the numbers :class:`~lora_lightning.LoRAMonitor`
logs during training (plain PyTorch, usable in any loop).

For a matrix with ``ΔW = s·B'·A'`` (``B' d_out x R``, ``A' R x d_in``, ``R`` = the rank, or ``n·r`` for a fused
projection) nothing ``d_out x d_in`` is ever formed:

* ``‖ΔW‖_F² = s²·Σ (B'ᵀB') ⊙ (A'A'ᵀ)`` — two ``R x R`` Gram matrices;
* the singular values of ``ΔW`` are those of the ``R x R`` core ``s·R_B·R_Aᵀ``, with ``B' = Q_B·R_B`` and
  ``A'ᵀ = Q_A·R_A`` (thin QR); the stable rank is ``‖ΔW‖_F² / σ_1²`` and the effective rank (Roy & Vetterli
  2007) ``exp(-Σ p_i log p_i)`` with ``p_i = σ_i / Σ σ``;
* paper §7.3's amplification ``‖ΔW‖_F / ‖Uᵀ W0 V‖_F`` with ``U = Q_B·U_c``, ``V = Q_A·V_c`` from the core's SVD:
  ``Uᵀ W0 V = U_cᵀ (Q_Bᵀ W0 Q_A) V_c`` costs one ``W0·Q_A`` product (``d_out x R``).

Everything runs in float64 on the tensors' device. Matrices are grouped by type (the aliases ``q``, ``k``,
``v``, ``o``, ``mlp``, ``embed``; a fused projection by its adapted parts, e.g. ``q+v``) and by block index.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .injection import lora_layers
from .layers import LoRALayer
from .plan import block_index, compile_pattern
from .state import lora_handle

D = torch.float64
TYPES = ("q", "k", "v", "o", "mlp", "embed")
_MATCHERS = [(t, compile_pattern(t)) for t in TYPES]


def matrix_type(name: str, layer: nn.Module | None = None) -> str:
    """``q``, ``k``, ``v``, ``o``, ``mlp`` or ``embed`` by the module's name (the target aliases), the adapted parts
    of a fused projection joined by ``+``, else ``other``."""
    fused = getattr(layer, "fused", None)
    if fused is not None:
        return "+".join(fused.adapted)
    for kind, match in _MATCHERS:
        if match(name):
            return kind
    return "other"


def _factors(layer: LoRALayer, adapter: str | None) -> tuple[Tensor, Tensor, float]:
    A, B, s = layer.factors() if adapter is None or adapter == layer.lora_active else layer.adapter_factors(adapter)
    return A.detach().reshape(A.shape[0], -1).to(D), B.detach().reshape(B.shape[0], -1).to(D), float(s)


def delta_frobenius(A: Tensor, B: Tensor, s: float) -> float:
    """``‖s·B·A‖_F`` from two ``R x R`` Gram matrices (``A (R x d_in)``, ``B (d_out x R)``)."""
    gram = (B.T @ B) * (A @ A.T)
    return abs(s) * math.sqrt(max(float(gram.sum()), 0.0))


def core(A: Tensor, B: Tensor, s: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(Q_B, C, Q_A)`` with ``s·B·A = Q_B·C·Q_Aᵀ``, ``C = s·R_B·R_Aᵀ`` (``R x R``), ``Q`` orthonormal columns."""
    q_b, r_b = torch.linalg.qr(B)
    q_a, r_a = torch.linalg.qr(A.T)
    return q_b, s * (r_b @ r_a.T), q_a


def spectrum(A: Tensor, B: Tensor, s: float) -> Tensor:
    """The singular values of ``ΔW = s·B·A``, descending (``R`` of them), from the ``R x R`` core."""
    return torch.linalg.svdvals(core(A, B, s)[1])


def stable_rank(sigma: Tensor) -> float:
    top = float(sigma[0]) if sigma.numel() else 0.0
    return float((sigma**2).sum()) / top**2 if top > 0 else 0.0


def effective_rank(sigma: Tensor) -> float:
    total = float(sigma.sum())
    if total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def amplification(A: Tensor, B: Tensor, s: float, W0: Tensor) -> float:
    """Paper §7.3: ``‖ΔW‖_F / ‖Uᵀ W0 V‖_F`` with ``U``, ``V`` the singular vectors of ``ΔW`` (``W0 d_out x d_in``)."""
    q_b, c, q_a = core(A, B, s)
    u, sigma, vh = torch.linalg.svd(c)
    keep = sigma > sigma[0] * 1e-12 if sigma.numel() and float(sigma[0]) > 0 else sigma > 0
    if not bool(keep.any()):
        return 0.0
    projected = u[:, keep].T @ (q_b.T @ (W0.to(D) @ q_a)) @ vh[keep].T
    denom = float(torch.linalg.matrix_norm(projected))
    return float(torch.linalg.vector_norm(sigma)) / denom if denom > 0 else math.inf


def base_matrix(layer: LoRALayer) -> Tensor:
    """The frozen ``W0`` of ``layer`` as ``d_out x d_in`` (dequantized; unmerged: minus ΔW if it is merged)."""
    weight = layer.base_weight() if hasattr(layer, "base_weight") else getattr(layer, layer.base_weight_name)
    w = weight.detach().to(D)
    w = w.T if layer.fan_in_fan_out else w.reshape(w.shape[0], -1)
    if layer.merged:
        A, B, s = _factors(layer, None)
        w = w - s * (B @ A)
    return w


def matrix_stats(
    layer: LoRALayer, adapter: str | None = None, base_norm: float | None = None, top_k: int = 4
) -> dict[str, float]:
    """Norms and spectrum of one adapted matrix's update (``adapter``: a named adapter; default the active one):
    ``delta_norm``, ``rel_delta`` (``‖ΔW‖/‖W0‖``), ``A_norm``, ``B_norm``, ``sigma_1..k``, ``stable_rank``,
    ``effective_rank``; DoRA adds ``magnitude_mean``, AdaLoRA ``rank``."""
    A, B, s = _factors(layer, adapter)
    sigma = spectrum(A, B, s)
    delta = delta_frobenius(A, B, s)
    raw = layer if adapter is None or adapter == layer.lora_active else layer.lora_bank[adapter]  # type: ignore[index]
    out = {
        "delta_norm": delta,
        "A_norm": float(torch.linalg.vector_norm(raw.lora_A.detach().to(D))),
        "B_norm": float(torch.linalg.vector_norm(raw.lora_B.detach().to(D))),
        "stable_rank": stable_rank(sigma),
        "effective_rank": effective_rank(sigma),
    }
    if base_norm is None:
        base_norm = float(torch.linalg.matrix_norm(base_matrix(layer)))
    out["rel_delta"] = delta / base_norm if base_norm > 0 else math.inf
    for i, value in enumerate(sigma[:top_k].tolist(), 1):
        out[f"sigma_{i}"] = value
    magnitude = getattr(layer, "lora_magnitude", None)
    if isinstance(magnitude, Tensor):
        out["magnitude_mean"] = float(magnitude.detach().float().mean())
    if hasattr(layer, "rank") and hasattr(layer, "lora_E"):
        out["rank"] = float(layer.rank())
    return out


def adapter_names(model: nn.Module) -> list[str | None]:
    """The named adapters of ``model`` (``[None]``: the one active adapter of a model injected once)."""
    handle = lora_handle(model)
    if handle is None or handle.adapters is None or len(handle.adapters.configs) < 2:
        return [None]
    return list(handle.adapters.configs)


def model_stats(
    model: nn.Module,
    base_norms: dict[str, float] | None = None,
    top_k: int = 4,
    adapters: Iterable[str | None] | None = None,
) -> dict[tuple[str | None, str], dict[str, float]]:
    """``{(adapter, module name): matrix_stats}`` for every adapted matrix (and named adapter) of ``model``;
    ``base_norms`` caches ``‖W0‖_F`` by module name (filled in as computed: the base is frozen)."""
    out = {}
    norms = base_norms if base_norms is not None else {}
    for name, layer in lora_layers(model).items():
        if name not in norms:
            norms[name] = float(torch.linalg.matrix_norm(base_matrix(layer)))
        for adapter in adapters if adapters is not None else adapter_names(model):
            out[(adapter, name)] = matrix_stats(layer, adapter, norms[name], top_k)
    return out


def aggregate(stats: dict[tuple[str | None, str], dict[str, float]], layers: dict[str, nn.Module]) -> dict[str, float]:
    """Scalars to log: ``lora/<type>/delta_norm`` (root of the summed squares over the type's matrices),
    ``lora/<type>/rel_delta`` (mean), ``lora/<type>/stable_rank`` (mean), ``lora/layer_<i>/delta_norm``, and each
    matrix's own values as ``lora/matrix/<name>/<stat>``; prefixed ``<adapter>/`` for named adapters."""
    out: dict[str, float] = {}
    groups: dict[str, list[dict[str, float]]] = {}
    for (adapter, name), values in stats.items():
        prefix = f"{adapter}/" if adapter is not None else ""
        for key, value in values.items():
            out[f"{prefix}lora/matrix/{name}/{key}"] = value
        kind = matrix_type(name, layers.get(name))
        groups.setdefault(f"{prefix}lora/{kind}", []).append(values)
        block = block_index(name)
        if block is not None:
            groups.setdefault(f"{prefix}lora/layer_{block}", []).append(values)
    for key, members in groups.items():
        out[f"{key}/delta_norm"] = math.sqrt(sum(m["delta_norm"] ** 2 for m in members))
        out[f"{key}/rel_delta"] = sum(m["rel_delta"] for m in members) / len(members)
        out[f"{key}/stable_rank"] = sum(m["stable_rank"] for m in members) / len(members)
    return out


def heatmap(
    stats: dict[tuple[str | None, str], dict[str, float]],
    layers: dict[str, nn.Module],
    adapter: str | None = None,
    key: str = "rel_delta",
) -> tuple[list[int], list[str], list[list[float]]]:
    """``(blocks, types, values[block][type])`` of ``key`` (mean over matrices of a cell; NaN where none)."""
    cells: dict[tuple[int, str], list[float]] = {}
    for (a, name), values in stats.items():
        if a != adapter or block_index(name) is None:
            continue
        cells.setdefault((block_index(name), matrix_type(name, layers.get(name))), []).append(values[key])  # type: ignore[arg-type]
    blocks = sorted({b for b, _ in cells})
    types = [t for t in (*TYPES, *sorted({t for _, t in cells} - set(TYPES))) if any(t == k for _, k in cells)]
    grid = [
        [sum(cells[(b, t)]) / len(cells[(b, t)]) if (b, t) in cells else float("nan") for t in types] for b in blocks
    ]
    return blocks, types, grid


__all__ = [
    "TYPES",
    "adapter_names",
    "aggregate",
    "amplification",
    "base_matrix",
    "core",
    "delta_frobenius",
    "effective_rank",
    "heatmap",
    "matrix_stats",
    "matrix_type",
    "model_stats",
    "spectrum",
    "stable_rank",
]
