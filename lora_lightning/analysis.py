"""Understanding the low-rank updates (paper §7.2 subspace similarity, §7.3 ΔW vs W, Table 7).

Plain PyTorch; every decomposition runs on CPU in float64, whatever the input's device and dtype.

Notation (paper §4, §7): ``W`` is ``d x k``; LoRA learns ``ΔW = scaling · B·A`` with ``B (d x r)``,
``A (r x k)``.  The "right singular subspace" of ``A`` is spanned by the top rows of ``Vh`` in
``A = U·diag(S)·Vh`` (vectors in ``R^k``), i.e. the row space of ``A`` ordered by singular value.

§7.2::

    phi(A1, A2, i, j) = ||U1_iᵀ U2_j||_F² / min(i, j)  ∈ [0, 1]

with ``U1_i (k x i)``, ``U2_j (k x j)`` the top-i / top-j right singular vectors of ``A1`` / ``A2``.
phi = 1 when one subspace contains the other, 0 when they are orthogonal.

§7.3 (Table 7): with ``ΔW = U·S·Vᵀ`` (``U d x r``, ``V k x r``: the top-r singular vectors), the
projection of ``W`` onto ΔW's r-dimensional subspace is ``||Uᵀ W V||_F`` (the paper writes
``||Uᵀ W Vᵀ||_F`` with its ``V`` meaning the ``r x k`` rows of ``Vh``; it is the same ``r x r`` matrix
``U_rᵀ W Vh_rᵀ``).  The same projection is reported onto W's own top-r singular directions and onto
random orthonormal r-dim directions; the amplification factor is ``||ΔW||_F / ||Uᵀ W V||_F``.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import AnalysisInputError

__all__ = [
    "AnalysisInputError",
    "right_singular_subspace",
    "subspace_similarity",
    "subspace_similarity_grid",
    "plot_subspace_similarity",
    "amplification_report",
    "delta_weight",
]

# Relative threshold below which a singular value counts as zero (numerical rank).
_RANK_RTOL = 1e-10


# ----------------------------------------------------------------------------------------------
# helpers


def _as_matrix(x: Tensor, name: str) -> Tensor:
    """Validate ``x`` as a finite 2-D tensor; return a detached CPU float64 copy."""
    if not isinstance(x, Tensor):
        raise AnalysisInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise AnalysisInputError(f"{name} must be a 2-D matrix, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise AnalysisInputError(f"{name} is empty (shape {tuple(x.shape)})")
    if x.is_complex():
        raise AnalysisInputError(f"{name} must be real, got dtype {x.dtype}")
    out = x.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(out).all():
        raise AnalysisInputError(f"{name} contains NaN or Inf values")
    return out


def _check_index(value: Any, name: str, upper: int, what: str) -> int:
    """``value`` must be an int in ``[1, upper]``; ``what`` explains the upper bound."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise AnalysisInputError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if not 1 <= value <= upper:
        raise AnalysisInputError(f"{name}={value} is out of range: need 1 <= {name} <= {upper} ({what})")
    return value


def _numerical_rank(s: Tensor) -> int:
    """Number of singular values above ``_RANK_RTOL · s_max`` (``s`` sorted descending)."""
    if s.numel() == 0 or s[0] == 0:
        return 0
    return int((s > _RANK_RTOL * s[0]).sum())


def _right_vectors(a: Tensor) -> tuple[Tensor, Tensor]:
    """``(Vh, S)`` of the thin SVD of a validated float64 matrix ``a`` (r x k): Vh is min(r,k) x k."""
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    return vh, s


def _warn_beyond_rank(n: int, s: Tensor, name: str, index_name: str) -> None:
    rank = _numerical_rank(s)
    if n > rank:
        warnings.warn(
            f"{index_name}={n} exceeds the numerical rank {rank} of {name}; its singular vectors beyond "
            f"the rank are an arbitrary basis of the null space, so the result past {rank} is not meaningful",
            RuntimeWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------
# §7.2 subspace similarity


def right_singular_subspace(A: Tensor, i: int) -> Tensor:
    """Top-``i`` right singular vectors of ``A`` (``r x k``) as the columns of a ``k x i`` matrix.

    With ``A = U·diag(S)·Vh`` (float64 thin SVD) this is ``Vh[:i].T``: orthonormal columns in ``R^k``
    ordered by decreasing singular value.  ``1 <= i <= min(r, k)``; returns float64 on CPU.
    Warns (RuntimeWarning) if ``i`` exceeds A's numerical rank (those directions are arbitrary).
    """
    a = _as_matrix(A, "A")
    n_vec = min(a.shape)
    _check_index(i, "i", n_vec, f"A has shape {tuple(a.shape)}, so it has {n_vec} right singular vectors")
    vh, s = _right_vectors(a)
    _warn_beyond_rank(i, s, "A", "i")
    return vh[:i].T.contiguous()


def _prepare_pair(A1: Tensor, A2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    a1 = _as_matrix(A1, "A1")
    a2 = _as_matrix(A2, "A2")
    if a1.shape[1] != a2.shape[1]:
        raise AnalysisInputError(
            f"A1 and A2 must have the same number of columns k (the input dimension): got A1 {tuple(a1.shape)} "
            f"and A2 {tuple(a2.shape)}. Pass the r x k down-projections lora_A (not lora_B, not transposed)"
        )
    vh1, s1 = _right_vectors(a1)
    vh2, s2 = _right_vectors(a2)
    return vh1, s1, vh2, s2


def subspace_similarity(A1: Tensor, A2: Tensor, i: int, j: int) -> float:
    """Normalised subspace similarity of paper §7.2 (Figure 3), a float in ``[0, 1]``.

    ``phi(A1, A2, i, j) = ||U1_iᵀ U2_j||_F² / min(i, j)`` where ``U1_i (k x i)`` / ``U2_j (k x j)`` are
    the top-i / top-j right singular vectors of ``A1 (r1 x k)`` / ``A2 (r2 x k)``.  Requires the same
    ``k``, ``1 <= i <= min(r1, k)``, ``1 <= j <= min(r2, k)``; otherwise raises ``ValueError``
    (:class:`AnalysisInputError`).  Invariant to scaling ``A`` and to ``A -> M·A`` for invertible ``M``
    when ``i``/``j`` cover the full rank (the row space is unchanged).
    """
    vh1, s1, vh2, s2 = _prepare_pair(A1, A2)
    _check_index(
        i, "i", vh1.shape[0], f"A1 has shape {tuple(A1.shape)}, so it has {vh1.shape[0]} right singular vectors"
    )
    _check_index(
        j, "j", vh2.shape[0], f"A2 has shape {tuple(A2.shape)}, so it has {vh2.shape[0]} right singular vectors"
    )
    _warn_beyond_rank(i, s1, "A1", "i")
    _warn_beyond_rank(j, s2, "A2", "j")
    overlap = vh1[:i] @ vh2[:j].T  # (i x j) = U1_iᵀ U2_j
    phi = float((overlap**2).sum()) / min(i, j)
    return min(max(phi, 0.0), 1.0)  # clamp float round-off


def subspace_similarity_grid(A1: Tensor, A2: Tensor, max_i: int | None = None, max_j: int | None = None) -> Tensor:
    """``phi(A1, A2, i, j)`` for all ``i = 1..max_i``, ``j = 1..max_j`` as a float64 ``max_i x max_j`` tensor.

    Entry ``[i-1, j-1]`` is phi(i, j).  Defaults: ``max_i = min(r1, k)``, ``max_j = min(r2, k)``.
    One SVD per matrix: with ``C = (Vh1[:max_i] · Vh2[:max_j]ᵀ)²`` (elementwise square),
    ``||U1_iᵀ U2_j||_F² = sum_{a<i, b<j} C[a, b]`` is a 2-D cumulative sum, then divided by ``min(i, j)``.
    Cost O(max_i·max_j·k) after the two SVDs.
    """
    vh1, s1, vh2, s2 = _prepare_pair(A1, A2)
    n1, n2 = vh1.shape[0], vh2.shape[0]
    max_i = n1 if max_i is None else _check_index(max_i, "max_i", n1, f"A1 has {n1} right singular vectors")
    max_j = n2 if max_j is None else _check_index(max_j, "max_j", n2, f"A2 has {n2} right singular vectors")
    _warn_beyond_rank(max_i, s1, "A1", "max_i")
    _warn_beyond_rank(max_j, s2, "A2", "max_j")
    c = (vh1[:max_i] @ vh2[:max_j].T) ** 2
    cum = c.cumsum(0).cumsum(1)
    ii = torch.arange(1, max_i + 1, dtype=torch.float64).unsqueeze(1)
    jj = torch.arange(1, max_j + 1, dtype=torch.float64).unsqueeze(0)
    return (cum / torch.minimum(ii, jj)).clamp_(0.0, 1.0)


def plot_subspace_similarity(
    grid: Tensor,
    path: str | os.PathLike[str],
    title: str | None = None,
    *,
    xlabel: str = "j",
    ylabel: str = "i",
    cmap: str = "viridis",
    annotate: bool | None = None,
    dpi: int = 150,
) -> Path:
    """Save a Figure-3-style heatmap of a phi grid (``max_i x max_j``, from :func:`subspace_similarity_grid`).

    x axis = ``j`` (columns), y axis = ``i`` (rows, i = 1 at the top), both 1-based; colour scale fixed
    to ``[0, 1]`` with a colorbar.  ``annotate`` writes each value in its cell (default: only for grids
    of at most 12 x 12).  Uses the Agg canvas directly (no pyplot, no global backend change); creates
    parent folders; returns the PNG path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if not isinstance(grid, Tensor):
        grid = torch.as_tensor(grid)
    if grid.ndim != 2 or grid.numel() == 0:
        raise AnalysisInputError(f"grid must be a non-empty 2-D (max_i x max_j) tensor, got shape {tuple(grid.shape)}")
    g = grid.detach().to(device="cpu", dtype=torch.float64).numpy()
    n_i, n_j = g.shape
    if annotate is None:
        annotate = n_i <= 12 and n_j <= 12

    # ~0.45 in per cell for small grids, capped so a 64 x 64 grid stays a normal-sized figure
    fig = Figure(figsize=(min(max(3.0, 0.45 * n_j + 1.8), 9.0), min(max(2.6, 0.45 * n_i + 1.0), 7.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(g, vmin=0.0, vmax=1.0, cmap=cmap, origin="upper", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax)
    one_based = FuncFormatter(lambda v, _pos: f"{int(round(v)) + 1}")
    for axis, n in ((ax.xaxis, n_j), (ax.yaxis, n_i)):
        axis.set_major_locator(MaxNLocator(nbins=min(n, 10), integer=True))
        axis.set_major_formatter(one_based)
    ax.set_xlim(-0.5, n_j - 0.5)
    ax.set_ylim(n_i - 0.5, -0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if annotate:
        for a in range(n_i):
            for b in range(n_j):
                v = g[a, b]
                ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return out


# ----------------------------------------------------------------------------------------------
# §7.3 ΔW vs W (Table 7)


def _random_orthonormal(n: int, r: int, generator: torch.Generator) -> Tensor:
    """Haar-random ``n x r`` matrix with orthonormal columns: QR of a Gaussian, signs fixed by diag(R)."""
    g = torch.randn(n, r, generator=generator, dtype=torch.float64)
    q, rr = torch.linalg.qr(g)
    d = torch.sign(torch.diagonal(rr))
    d[d == 0] = 1.0
    return q * d


def amplification_report(
    delta_w: Tensor,
    w: Tensor,
    r: int,
    generator: torch.Generator | None = None,
    *,
    random_trials: int = 1,
) -> dict[str, float]:
    """Table 7 of the paper: how strongly ΔW (``d x k``) correlates with W (``d x k``), in float64.

    For a ``d x k`` matrix ``M`` and ``U (d x r)``, ``V (k x r)`` with orthonormal columns, the
    projection norm is ``||Uᵀ M V||_F`` (an ``r x r`` matrix; the paper writes ``Uᵀ W Vᵀ``).
    Returned keys (all floats):

    - ``r``, ``d``, ``k``;
    - ``delta_w_norm``  = ``||ΔW||_F``;  ``w_norm`` = ``||W||_F``;
    - ``proj_delta_w``  = ``||U_ΔWᵀ W V_ΔW||_F``, ``ΔW = U S Vᵀ`` truncated to its top r (column "ΔWq");
    - ``proj_w_top_r``  = ``||U_Wᵀ W V_W||_F`` = ``sqrt(sum of W's top-r σ²)`` (column "Wq");
    - ``proj_random``   = ``||Uᵀ W V||_F`` for Haar-random orthonormal ``U``, ``V`` (QR of a Gaussian
      drawn from ``generator``; seed 0 when None), mean over ``random_trials`` draws (column "random");
      its expectation is about ``||W||_F · r / sqrt(d·k)``;
    - ``proj_delta_w_self`` = ``||U_ΔWᵀ ΔW V_ΔW||_F`` (ΔW's energy in its top r, = ``||ΔW||_F`` when
      ``rank ΔW <= r``), a sanity value;
    - ``amplification_factor`` = ``||ΔW||_F / proj_delta_w`` (≈ 21.5 for GPT-3 Wq at r=4, paper §7.3);
      ``inf`` when W has no component in ΔW's directions.

    Raises ``ValueError`` for shape mismatch, ``r`` outside ``[1, min(d, k)]``, non-finite input or an
    all-zero ΔW (e.g. untrained LoRA, ``B = 0``).  Warns if ``r`` exceeds ΔW's numerical rank.
    """
    dw = _as_matrix(delta_w, "delta_w")
    w64 = _as_matrix(w, "w")
    if dw.shape != w64.shape:
        raise AnalysisInputError(
            f"delta_w and w must have the same shape (d x k), got {tuple(dw.shape)} and {tuple(w64.shape)}; "
            "use delta_weight(lora_A, lora_B, scaling) for ΔW and the base layer's weight for W"
        )
    d, k = dw.shape
    _check_index(r, "r", min(d, k), f"the matrices are {d} x {k}")
    if isinstance(random_trials, bool) or not isinstance(random_trials, int) or random_trials < 1:
        raise AnalysisInputError(f"random_trials must be a positive int, got {random_trials!r}")
    dw_norm = float(torch.linalg.matrix_norm(dw))
    if dw_norm == 0.0:
        raise AnalysisInputError(
            "delta_w is all zeros, so it has no singular directions (an untrained LoRA has B = 0); train first"
        )

    u_d, s_d, vh_d = torch.linalg.svd(dw, full_matrices=False)
    _warn_beyond_rank(r, s_d, "delta_w", "r")
    u_dr, v_dr = u_d[:, :r], vh_d[:r].T
    proj_delta = float(torch.linalg.matrix_norm(u_dr.T @ w64 @ v_dr))
    proj_delta_self = float(torch.linalg.matrix_norm(u_dr.T @ dw @ v_dr))

    u_w, s_w, vh_w = torch.linalg.svd(w64, full_matrices=False)
    proj_top = float(torch.linalg.matrix_norm(u_w[:, :r].T @ w64 @ vh_w[:r].T))

    if generator is None:
        generator = torch.Generator().manual_seed(0)
    rand_vals = []
    for _ in range(random_trials):
        u_rand = _random_orthonormal(d, r, generator)
        v_rand = _random_orthonormal(k, r, generator)
        rand_vals.append(float(torch.linalg.matrix_norm(u_rand.T @ w64 @ v_rand)))
    proj_rand = sum(rand_vals) / len(rand_vals)

    amp = dw_norm / proj_delta if proj_delta > 0.0 else math.inf
    return {
        "r": float(r),
        "d": float(d),
        "k": float(k),
        "delta_w_norm": dw_norm,
        "w_norm": float(torch.linalg.matrix_norm(w64)),
        "proj_delta_w": proj_delta,
        "proj_w_top_r": proj_top,
        "proj_random": proj_rand,
        "proj_delta_w_self": proj_delta_self,
        "amplification_factor": amp,
    }


def delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """``ΔW = scaling · B @ A`` (``d_out x d_in``) from ``lora_A (r x d_in)`` and ``lora_B (d_out x r)``.

    Computed (and returned) detached on the inputs' device in ``dtype`` (float32 or float64), so
    half-precision adapters do not lose digits.  Raises ``ValueError`` on shape mismatch.
    """
    if dtype not in (torch.float32, torch.float64):
        raise AnalysisInputError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor) or t.ndim != 2:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise AnalysisInputError(f"{name} must be a 2-D tensor, got {shape}")
    if lora_B.shape[1] != lora_A.shape[0]:
        raise AnalysisInputError(
            f"rank mismatch: lora_B is {tuple(lora_B.shape)} (d_out x r) but lora_A is {tuple(lora_A.shape)} "
            "(r x d_in); pass lora_A first, lora_B second"
        )
    if isinstance(scaling, Tensor) and scaling.numel() == 1:
        scaling = scaling.item()
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not math.isfinite(scaling):
        raise AnalysisInputError(f"scaling must be a finite number (alpha / r), got {scaling!r}")
    return (lora_B.detach().to(dtype) @ lora_A.detach().to(dtype)) * float(scaling)
