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

Only ``A`` and ``B`` are trained. Because ``B = 0`` at initialisation the adapted model computes
exactly what the base computes. ``merge()`` folds ``ΔW = (alpha/r)·B·A`` into ``W0`` (zero extra
inference latency, §4.1); ``unmerge()`` subtracts it again to switch tasks.

Every layer states its update as ``ΔW = s·B'·A'`` through :meth:`LoRALayer.factors` (plain LoRA:
``B' = B``, ``A' = A``; VeRA, AdaLoRA and fused projections build ``A'``/``B'`` from their own
tensors), so one forward, one merge and one export serve them all. The forward never materialises
``B'·A'`` (``d_out x d_in``): base and low-rank products run as one autograd node
(:class:`LoRALinearFunction`, backward written out, benchmarks/OPTIMIZATIONS.md §3); only inputs
that node cannot take (mixed dtypes, autocast, quantized or sharded weights) take the composed
formula ``F.linear(x, W0, b) + s·(dropout(x)·A'ᵀ)·B'ᵀ``.
"""

from __future__ import annotations

import hashlib
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LoRAConfigError, MergeStateError, RankTooLargeError
from .quantization import quantizer

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


@dataclass(frozen=True)
class FusedSlices:
    """Row layout of a fused projection, e.g. GPT-2 ``c_attn``: ``W = [Wq; Wk; Wv]`` (``parts``
    ``("q", "k", "v")`` with ``sizes`` rows each). Only the ``adapted`` parts get an adapter
    ``B_i·A_i`` (loralib's ``MergedLinear``); the other rows' outputs stay exactly the base's."""

    parts: tuple[str, ...]
    sizes: tuple[int, ...]
    adapted: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.parts) != len(self.sizes) or not self.adapted or set(self.adapted) - set(self.parts):
            raise LoRAConfigError(
                f"fused layout parts={self.parts} sizes={self.sizes} adapted={self.adapted} is inconsistent: "
                "give one size per part and adapt a non-empty subset of the parts"
            )

    @property
    def d_out(self) -> int:
        return sum(self.sizes)

    @property
    def adapted_rows(self) -> int:
        """Rows of the stacked ``lora_B``: the summed sizes of the adapted parts."""
        return sum(n for p, n in zip(self.parts, self.sizes) if p in self.adapted)

    @property
    def smallest_adapted(self) -> int:
        return min(n for p, n in zip(self.parts, self.sizes) if p in self.adapted)

    def segments(self) -> list[tuple[str, int, int, int | None, int]]:
        """``(part, row_start, size, adapter_index or None, b_row_start)`` in layout order."""
        out, start, i, b = [], 0, 0, 0
        for part, size in zip(self.parts, self.sizes):
            if part in self.adapted:
                out.append((part, start, size, i, b))
                i, b = i + 1, b + size
            else:
                out.append((part, start, size, None, b))
            start += size
        return out

    def expand_B(self, B: Tensor, r: int) -> Tensor:
        """The stacked ``B (Σ adapted sizes x r)`` as the whole matrix's ``B' (d_out x n·r)``:
        block ``i`` of ``B`` in its rows and columns ``i·r..(i+1)·r``, zeros elsewhere, so that
        ``B'·A' = [B_q A_q; 0; B_v A_v]`` for ``A' = [A_q; A_v]`` (differentiable)."""
        n = len(self.adapted)
        rows = []
        for _, _, size, i, b in self.segments():
            if i is None:
                rows.append(B.new_zeros(size, n * r))
            else:
                blocks = [B.new_zeros(size, r)] * n
                blocks[i] = B[b : b + size]
                rows.append(torch.cat(blocks, 1))
        return torch.cat(rows, 0)


class AdapterSlots(nn.Module):
    """One inactive named adapter's tensors for one module, under the leaf names the module uses for
    its active adapter (``lora_A``, ``lora_B``; a ``modules_to_save`` copy: ``weight``, ``bias``...), plus
    a LoRA layer's ``r``, ``alpha`` and ``scaling``."""

    def __init__(self, tensors: Mapping[str, Tensor], r: int | None = None, alpha: float | None = None,
                 scaling: float | None = None) -> None:
        super().__init__()
        for leaf, t in tensors.items():
            if isinstance(t, nn.Parameter):
                self.register_parameter(leaf, t)
            else:
                self.register_buffer(leaf, t)
        self.r, self.alpha, self.scaling = r, alpha, scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}" if self.r is not None else ""


class LoRALayer:
    """State and math shared by every LoRA layer: ``lora_A (r x d_in)``, ``lora_B (d_out x r)``.

    Subclasses provide ``_base_weight_view()``: the frozen weight as a ``d_out x d_in`` view
    (transposed for weights stored ``d_in x d_out``) that merge/unmerge update in place. With
    ``fused`` (a :class:`FusedSlices`), ``lora_A`` stacks one ``r x d_in`` block per adapted part
    (``n·r x d_in``) and ``lora_B`` the parts' ``size_i x r`` blocks (``Σ size_i x r``), exactly
    loralib's ``MergedLinear`` layout; ΔW is zero on the other rows.

    Class attributes name what a variant adds: ``trainable_names`` (trained), ``adapter_names``
    (saved in adapter files and checkpoints) and ``extra_state_names`` (other state-dict entries
    that are not part of the base layer, e.g. a quantized weight's scales).
    """

    variant_name: str = "lora"
    kind: str = "linear"  # linear | conv1d | mha: what the layer wraps
    trainable_names: tuple[str, ...] = ("lora_A", "lora_B")
    adapter_names: tuple[str, ...] = ("lora_A", "lora_B")
    extra_state_names: tuple[str, ...] = ()
    fan_in_fan_out: bool = False  # the stored weight is d_in x d_out (GPT-2 Conv1D)
    base_weight_name: str = "weight"  # the state-dict leaf that merge changes

    r: int
    alpha: float
    scaling: float
    merged: bool
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    fused: FusedSlices | None = None
    pinned_dtype: torch.dtype | None = None
    # named adapters (lora_lightning.named): the active one lives in the slots above, the others in
    # ``lora_bank[name]``; ``lora_route`` routes the rows of the next input to adapters (mixed batches);
    # ``lora_disabled`` gives the base output
    lora_active: str = "default"
    lora_route: list[tuple[str | None, Tensor]] | None = None
    lora_disabled: bool = False
    supports_routing: bool = False

    def _init_lora(
        self,
        d_in: int,
        d_out: int,
        base_weight: Tensor,
        r: int,
        alpha: float,
        *,
        scaling: float | None = None,
        dropout: float = 0.0,
        init: str = "kaiming",
        adapter_dtype: torch.dtype | None = None,
        name: str = "",
        fused: FusedSlices | None = None,
        pin_dtype: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        """Validate ``r`` and create ``A (n·r x d_in)``/``B (rows x r)``, the options every layer takes:
        ``scaling`` (default ``alpha/r``), ``dropout`` on the adapter input, ``init`` of ``A``
        (``kaiming`` | ``gaussian`` | ``gaussian_fan_in``), ``adapter_dtype`` (default: the base weight's; kept through later
        casts when ``pin_dtype``), ``name`` (for errors), ``fused`` row layout, ``generator`` (a CPU
        generator for the random initialisation; ``None``: the global RNG)."""
        if fused is not None and fused.d_out != d_out:
            raise LoRAConfigError(
                f"fused layout of {name or 'a layer'} has {fused.d_out} rows ({dict(zip(fused.parts, fused.sizes))}) "
                f"but the weight has d_out={d_out}; register the layout with the right sizes"
            )
        n = len(fused.adapted) if fused else 1
        rows = fused.adapted_rows if fused else d_out
        smallest = fused.smallest_adapted if fused else d_out
        if r > min(d_in, smallest):
            raise RankTooLargeError(
                f"r={r} is larger than min(d_in, d_out)={min(d_in, smallest)} for {name or 'a layer'} "
                f"({smallest}x{d_in}); a rank-{r} update cannot exist there: choose r <= {min(d_in, smallest)} "
                "(or lower it for this module with rank_pattern)"
            )
        self.fused = fused
        self.r = r
        self.alpha = float(alpha)
        self.scaling = float(alpha / r if scaling is None else scaling)
        self.init = init
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype, device = adapter_dtype or resolve_dtype(None, base_weight.dtype), base_weight.device
        self.pinned_dtype = dtype if pin_dtype else None
        self.lora_A = nn.Parameter(torch.empty(n * r, d_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(rows, r, dtype=dtype, device=device))
        self.merged = False
        self.reset_lora_parameters(generator)

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A random (Kaiming-uniform like nn.Linear: std 1/sqrt(3·d_in); Gaussian with std 1/r; or Gaussian
        with std 1/sqrt(3·d_in)); B = 0 so ΔW = 0."""
        if self.init == "gaussian":
            init_random(self.lora_A, lambda t, g: nn.init.normal_(t, std=1.0 / self.r, generator=g), generator)
        elif self.init == "gaussian_fan_in":
            std = 1.0 / math.sqrt(3 * self.lora_A.shape[1])
            init_random(self.lora_A, lambda t, g: nn.init.normal_(t, std=std, generator=g), generator)
        else:
            init_random(self.lora_A, lambda t, g: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g), generator)
        with torch.no_grad():
            nn.init.zeros_(self.lora_B)

    # ---------------------------------------------------------------- math
    def factors(self) -> tuple[Tensor, Tensor, float]:
        """``(A' (R x d_in), B' (d_out x R), s)`` with ``ΔW = s·B'·A'`` (differentiable). Plain LoRA:
        ``(A, B, alpha/r)``; a fused layer's ``B'`` is block-structured (zero rows for un-adapted parts)."""
        if self.fused is None:
            return self.lora_A, self.lora_B, self.scaling
        return self.lora_A, self.fused.expand_B(self.lora_B, self.r), self.scaling

    def live_delta_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """Differentiable ``ΔW = s·B'·A'`` (``d_out x d_in``), in ``dtype`` if given."""
        A, B, s = self.factors()
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        return (B @ A) * s

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The update merging adds, ``d_out x d_in``, computed in ``dtype``, detached."""
        with torch.no_grad():
            return self.live_delta_weight(dtype)

    def stored_delta_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """ΔW in the layout of the stored weight (``d_in x d_out`` for fan-in-fan-out Conv1D and
        Embedding, ``out x in x k...`` for a convolution)."""
        delta = self.delta_weight(dtype)
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.reshape(getattr(self, self.base_weight_name).shape)

    def lora_forward(self, x: Tensor) -> Tensor:
        """``s · dropout(x) @ A'ᵀ @ B'ᵀ`` for ``x (..., d_in)`` -> ``(..., d_out)``, in the adapters' dtype."""
        A, B, s = self.factors()
        if self.dropout_p > 0:
            x = self.lora_dropout(x)
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        return F.linear(F.linear(x, A) * s, B)  # scale the thin r-wide intermediate

    def adapted_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, base: Callable[[], Tensor]) -> Tensor:
        """``base() + lora_forward(x)``, as one autograd node where :class:`LoRALinearFunction` can take
        the inputs. ``weight`` is ``W0 (d_out x d_in)`` (a transposed view for Conv1D); ``base`` computes
        the frozen output the usual way for the composed fallback."""
        if self.merged or self.lora_disabled:
            return base()
        if self.lora_route is not None:
            return self._routed_forward(x, base())
        A, B, s = self.factors()
        if _one_node_ok(x, weight, A, B):
            x_d = self.lora_dropout(x) if self.dropout_p > 0 and self.lora_dropout.training else None
            return LoRALinearFunction.apply(x, x_d, weight, bias, A, B, s)
        out = base()
        return out + self.lora_forward(x).to(out.dtype)

    # ------------------------------------------------------- named adapters
    def adapter_factors(self, name: str) -> tuple[Tensor, Tensor, float]:
        """``factors()`` of the named adapter (the active one, or one held in ``lora_bank``)."""
        if name == self.lora_active:
            return self.factors()
        slots = self.lora_bank[name]  # type: ignore[attr-defined]
        B = slots.lora_B if self.fused is None else self.fused.expand_B(slots.lora_B, slots.r)
        return slots.lora_A, B, slots.scaling

    def _routed_forward(self, x: Tensor, out: Tensor) -> Tensor:
        """``out`` plus, for each ``(name, rows)`` of ``lora_route``, the named adapter's update on those
        rows of ``x`` (dim 0); rows routed to ``None`` keep the base output."""
        rows = sum(int(idx.numel()) for _, idx in self.lora_route or [])
        if x.shape[0] != rows:
            raise LoRAConfigError(
                f"mixed batch: {rows} adapter names were given but a LoRA layer received {x.shape[0]} rows along dim 0; "
                "give one name (or None) per sample of the batch, with the batch first"
            )
        for name, idx in self.lora_route or []:
            if name is None or idx.numel() == 0:
                continue
            A, B, s = self.adapter_factors(name)
            xs = x.index_select(0, idx)
            if self.dropout_p > 0:
                xs = self.lora_dropout(xs)
            delta = F.linear(F.linear(xs.to(A.dtype), A) * s, B)
            out = out.index_add(0, idx, delta.to(out.dtype))
        return out

    def new_adapter_slots(self, r: int, alpha: float, scaling: float, generator: torch.Generator | None = None) -> nn.Module:
        """A freshly initialised adapter of rank ``r`` for this layer (this layer's own init: A random
        and B = 0, or the reverse for embeddings), as a module holding ``lora_A``/``lora_B``."""
        A0, B0 = self.lora_A, self.lora_B
        n = A0.shape[0] // self.r
        limit = min(int(self.in_features), self.fused.smallest_adapted if self.fused else int(self.out_features))
        if r > limit:
            raise RankTooLargeError(f"r={r} is larger than min(d_in, d_out)={limit} for this layer; choose r <= {limit}")
        A = nn.Parameter(torch.empty((n * r, *A0.shape[1:]), dtype=A0.dtype, device=A0.device))
        B = nn.Parameter(torch.zeros((B0.shape[0], r, *B0.shape[2:]), dtype=B0.dtype, device=B0.device))
        saved = (self.lora_A, self.lora_B, self.r, self.alpha, self.scaling)
        try:
            self.lora_A, self.lora_B, self.r, self.alpha, self.scaling = A, B, r, float(alpha), float(scaling)
            self.reset_lora_parameters(generator)
        finally:
            self.lora_A, self.lora_B, self.r, self.alpha, self.scaling = saved
        return AdapterSlots({"lora_A": A, "lora_B": B}, r=r, alpha=float(alpha), scaling=float(scaling))

    # --------------------------------------------------------- merge/unmerge
    def _base_weight_view(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _add_delta(self, sign: float) -> None:
        weight = self._base_weight_view()
        with torch.no_grad():
            A, B, s = (t.detach() if isinstance(t, Tensor) else t for t in self.factors())
            if A.dtype == B.dtype == weight.dtype and A.device == weight.device:
                # one in-place GEMM, W += sign·s·B'@A' (fp32 accumulation inside the kernel, one rounding),
                # no d_out x d_in temporaries; works on a transposed (Conv1D) view too
                weight.addmm_(B, A, alpha=sign * s)
                return
            wide = torch.float64 if weight.dtype == torch.float64 else torch.float32
            delta = self.delta_weight(wide).to(weight.device)
            if weight.dtype in (torch.float32, torch.float64):
                weight.add_(delta, alpha=sign)
            else:  # low-precision base: do the sum in fp32, round once
                weight.copy_((weight.to(wide) + sign * delta).to(weight.dtype))

    def merge(self) -> None:
        """``W0 <- W0 + ΔW``; afterwards forward costs exactly the base layer's."""
        if self.merged:
            raise MergeStateError("this LoRA layer is already merged; call unmerge() first (merging twice would add ΔW twice)")
        self._add_delta(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        """``W0 <- W0 - ΔW`` (exact up to floating-point round-off of the base dtype)."""
        if not self.merged:
            raise MergeStateError("this LoRA layer is not merged; nothing to unmerge (call merge() first)")
        self._add_delta(-1.0)
        self.merged = False

    def merged_weight(self) -> Tensor:
        """The stored base weight with ΔW folded in (what a merged export holds), detached."""
        value = getattr(self, self.base_weight_name).detach()
        if self.merged:
            return value
        return (value.float() + self.stored_delta_weight().to(value.device)).to(value.dtype)

    @property
    def state_names(self) -> tuple[str, ...]:
        """State-dict leaves this layer adds to its base layer (dropped from merged exports)."""
        return tuple(dict.fromkeys(("lora_A", "lora_B") + self.trainable_names + self.adapter_names + self.extra_state_names))

    def structure(self) -> dict[str, Any]:
        """``{kind, d_out (adapted rows), d_in, r, alpha, scaling, parts}``: what an adapter must match."""
        return {
            "kind": self.kind,
            "d_out": int(self.lora_B.shape[0]) if self.fused else int(self.out_features),
            "d_in": int(self.in_features),
            "r": int(self.r),
            "alpha": float(self.alpha),
            "scaling": float(self.scaling),
            "parts": list(self.fused.adapted) if self.fused else [],
        }

    # ------------------------------------------------------------- dtype pin
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Any:
        """``module.to(...)`` / ``.half()`` / Lightning's ``*-true`` precisions cast every tensor; adapters
        created with an explicit ``adapter_dtype`` keep that dtype (fp32 adapters on a half-precision
        base, the QLoRA recipe), whatever the cast."""
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        if self.pinned_dtype is not None:
            for name in self.trainable_names:
                p = getattr(self, name, None)
                if isinstance(p, Tensor) and p.is_floating_point() and p.dtype != self.pinned_dtype:
                    p.data = p.data.to(self.pinned_dtype)
                    if p.grad is not None:
                        p.grad.data = p.grad.data.to(self.pinned_dtype)
        return out

    def lora_extra_repr(self) -> str:
        parts = f", parts={list(self.fused.adapted)}" if self.fused else ""
        return (
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout_p:g}{parts}, "
            f"merged={self.merged}"
        )


def init_random(tensor: Tensor, fill: Callable[[Tensor, torch.Generator | None], Any], generator: torch.Generator | None) -> None:
    """``fill(tensor, generator)`` in place; with a (CPU) generator the values are drawn on the CPU
    in float32, so they are the same whatever the tensor's device and dtype."""
    with torch.no_grad():
        if generator is None:
            fill(tensor, None)
        else:
            values = torch.empty(tensor.shape, dtype=torch.float32)
            fill(values, generator)
            tensor.copy_(values)


def stream_generator(seed: int, *key: object) -> torch.Generator:
    """A CPU generator seeded by ``seed`` and ``key`` through SHA-256: a stream of its own per key."""
    digest = hashlib.sha256(repr((int(seed), *key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _one_node_ok(x: Tensor, weight: Tensor, A: Tensor, B: Tensor) -> bool:
    """Whether :class:`LoRALinearFunction` can take these inputs: one dtype for input, base weight and
    adapters, plain (not quantized, sharded or nested) tensors, no autocast, a non-empty input."""
    w = weight.data if isinstance(weight, nn.Parameter) else weight
    return (
        type(x) is Tensor
        and type(w) is Tensor
        and not x.is_nested
        and x.dtype == weight.dtype == A.dtype == B.dtype
        and x.dim() >= 1
        and x.numel() > 0
        and not torch.is_autocast_enabled(x.device.type)
    )


class LoRALinearFunction(torch.autograd.Function):
    """``y = x·W0ᵀ + b + s·(x_d·Aᵀ)·Bᵀ`` as one autograd node, with its backward written out.

    Shapes: ``x, x_d (..., d_in)`` (``x_d`` = ``dropout(x)``; ``None`` means ``x`` itself), ``W0 (d_out x d_in)``,
    ``A (R x d_in)``, ``B (d_out x R)``. Backward, with ``g = ∂L/∂y`` flattened to ``(N, d_out)``:
    ``gh = s·g·B``, ``∂A = ghᵀ·x_d``, ``∂B = s·(hᵀ·g)ᵀ``, ``∂x = g·W0 (+ gh·A)``.

    Same function as ``F.linear(x, W0, b) + s·F.linear(F.linear(x_d, A), B)``, but autograd sees one
    node instead of five, the low-rank update is added into the base output in place, and every
    skinny (r-wide) product uses the fast GEMM layout (``hᵀ·g`` instead of ``gᵀ·h``: ~5x on one CPU
    core for r=8). ``W0``'s gradient is computed only when it requires grad.
    """

    @staticmethod
    def forward(ctx, x: Tensor, x_d: Tensor | None, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)
        xd2 = x2 if x_d is None else x_d.reshape(-1, d_in)
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
        h = torch.mm(xd2, lora_A.t())
        out.addmm_(h, lora_B.t(), alpha=scaling)
        ctx.same, ctx.scaling, ctx.has_bias = x_d is None, scaling, bias is not None
        # inputs only (plus h, N x R), so a create_graph backward can rebuild a differentiable graph;
        # x is kept alive only when W0 itself trains (or x is x_d, needed for ∂A anyway)
        ctx.save_for_backward(x if weight.requires_grad or x_d is None else None, x_d, h, weight, lora_A, lora_B)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, x_d, h, weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        xd2 = (x if ctx.same else x_d).reshape(-1, lora_A.shape[-1])
        if torch.is_grad_enabled():  # double backward: recompute h inside the graph being built
            h = torch.mm(xd2, lora_A.t())
        g2 = grad.reshape(-1, grad.shape[-1])
        # r-wide products in the layouts BLAS handles well (B is d_out x R, row-major)
        gh = torch.mm(g2, lora_B.t().contiguous().t()) * s
        grad_A = torch.mm(gh.t(), xd2) if ctx.needs_input_grad[4] else None
        grad_B = torch.mm(h.t(), g2).t() * s if ctx.needs_input_grad[5] else None
        grad_x = grad_xd = None
        lead = grad.shape[:-1]
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g2, weight)
            if ctx.same:
                grad_x = grad_x.addmm_(gh, lora_A)
            grad_x = grad_x.view(*lead, grad_x.shape[-1])
        if not ctx.same and ctx.needs_input_grad[1]:
            grad_xd = torch.mm(gh, lora_A).view(*lead, lora_A.shape[-1])
        grad_w = torch.mm(g2.t(), x.reshape(-1, lora_A.shape[-1])) if ctx.needs_input_grad[2] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, grad_xd, grad_w, grad_b, grad_A, grad_B, None


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


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    """A module's public non-tensor attributes (``nf``, ``embed_dim``, ...) to rebuild it later."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}


def _rebuild(cls: type, attrs: dict[str, Any], params: dict[str, nn.Parameter | None], modules: dict[str, nn.Module]) -> nn.Module:
    """A ``cls`` instance made without ``__init__`` (no re-initialisation) from saved attributes."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for k, v in attrs.items():
        object.__setattr__(module, k, v)
    for k, p in params.items():
        module.register_parameter(k, p)
    for k, m in modules.items():
        module.add_module(k, m)
    return module


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
                f"{options.get('name') or 'this module'} is a {type(base).__name__}; {type(self).__name__} adapts nn.Linear"
            )
        self.in_features = base.in_features
        self.out_features = base.out_features
        self._base_cls = type(base)
        self.weight = base.weight
        self.bias = base.bias
        self.base_dtype = base.weight.dtype
        self.quantize_base: str | None = None
        self.register_buffer("weight_scale", None)
        self._quant_state: Any = None
        self._init_lora(base.in_features, base.out_features, base.weight, r, alpha, **options)
        if quantize is not None:
            self.quantize_(quantize)

    @property
    def extra_state_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("weight_scale",) if self.weight_scale is not None else ()

    def _base_weight_view(self) -> Tensor:
        return self.weight

    # ----------------------------------------------------------- quantized base
    def quantize_(self, method: str) -> tuple[int, int]:
        """Store ``W0`` quantized (see :mod:`lora_lightning.quantization`). Returns ``(bytes before, after)``.
        A per-row scale is a buffer (``weight_scale``, it follows ``.to()``); a bitsandbytes ``QuantState``
        is kept beside the packed weight."""
        before = self.weight.numel() * self.weight.element_size()
        stored, state = quantizer(method).quantize(self.weight.detach().float().contiguous())
        self.weight = nn.Parameter(stored, requires_grad=False)
        self.weight_scale = state if isinstance(state, Tensor) else None
        self._quant_state = None if isinstance(state, Tensor) else state
        self.quantize_base = method
        return before, self.base_weight_bytes()

    def base_weight(self) -> Tensor:
        """Dense ``W0 (d_out x d_in)`` in the base dtype (dequantized if stored quantized)."""
        if self.quantize_base is None:
            return self.weight
        state = self.weight_scale if self.weight_scale is not None else self._quant_state
        return quantizer(self.quantize_base).dequantize(self.weight, state, self.base_dtype)

    def base_weight_bytes(self) -> int:
        if self.quantize_base is None:
            return self.weight.numel() * self.weight.element_size()
        state = self.weight_scale if self.weight_scale is not None else self._quant_state
        return quantizer(self.quantize_base).nbytes(self.weight, state)

    def forward(self, x: Tensor) -> Tensor:
        shared = self.lora_shared
        if shared is not None and not self.merged:  # siblings reading the same x: one node for the group (shared_input.py)
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
            self.weight_scale, self._quant_state = None, None
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
        linear = self._base_cls.__new__(self._base_cls)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        weight = self.weight
        if self.quantize_base is not None:
            weight = nn.Parameter(self.base_weight().detach().clone(), requires_grad=False)
        linear.weight, linear.bias = weight, self.bias
        return linear

    def extra_repr(self) -> str:
        quant = f", quantize_base={self.quantize_base}" if self.quantize_base else ""
        variant = f"variant={self.variant_name}, " if self.variant_name != "lora" else ""
        return (
            f"{variant}in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            + self.lora_extra_repr() + quant
        )


class LoRAConv1D(LoRALayer, nn.Module):
    """A frozen GPT-2 ``Conv1D`` (weight ``W0ᵀ`` stored ``d_in x d_out``) plus ``(alpha/r)·B·A``.

    ``y = x @ W + b + (alpha/r) · dropout(x) Aᵀ Bᵀ`` with the usual ``A: r x d_in``,
    ``B: d_out x r`` (the same shapes PEFT uses with ``fan_in_fan_out=True``). Merging adds
    ``ΔWᵀ`` to the stored weight. Keys ``weight``/``bias`` are unchanged.
    """

    kind = "conv1d"
    fan_in_fan_out = True
    supports_routing = True

    def __init__(self, base: nn.Module, r: int, alpha: float, **options: Any) -> None:
        """``options``: those of :meth:`LoRALayer._init_lora`."""
        if not is_conv1d(base):
            raise TypeError(f"LoRAConv1D wraps a GPT-style Conv1D (weight d_in x nf), got {type(base).__name__}")
        nn.Module.__init__(self)
        self._base_cls = type(base)
        self._base_attrs = _plain_attrs(base)
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
        return _rebuild(self._base_cls, self._base_attrs, {"weight": self.weight, "bias": self.bias}, {})

    def extra_repr(self) -> str:
        return f"nx={self.in_features}, nf={self.nf}, fan_in_fan_out=True, " + self.lora_extra_repr()


class LoRAEmbedding(LoRALayer, nn.Embedding):
    """A frozen ``nn.Embedding`` (weight ``W0: num x dim``) plus ``s·(B·A)ᵀ``, ``A: r x num``, ``B: dim x r``.

    ``y = W0[x] + s · (Aᵀ[x]) Bᵀ``: a lookup of ``A``'s columns, then ``B``. As in loralib and PEFT the
    initialisation is the reverse of Linear's — ``A = 0`` and ``B ~ N(0, 1)`` — so the output equals the
    base's at step 0 (a zero ``B`` would leave ``A`` without a gradient signal through the lookup).
    ``padding_idx`` is honoured: its row gets no gradient, so the padding vector stays the base's.
    Adapter dropout is not applied to a lookup. Keys: ``weight`` unchanged, ``lora_A``, ``lora_B``.
    """

    kind = "embedding"
    fan_in_fan_out = True  # the stored weight is num x dim: ΔWᵀ of the d_out x d_in = dim x num update

    def __init__(self, base: nn.Embedding, r: int, alpha: float, **options: Any) -> None:
        name = options.get("name") or "this nn.Embedding"
        if base.max_norm is not None:
            raise LoRAConfigError(
                f"{name} has max_norm={base.max_norm}: it renormalises embedding rows in place during forward, which "
                "the adapter cannot follow; target other layers or build the Embedding without max_norm"
            )
        if base.sparse:
            raise LoRAConfigError(f"{name} has sparse=True (sparse gradients); LoRA needs dense ones: target other layers")
        nn.Module.__init__(self)
        self._base_cls = type(base)
        self._base_attrs = _plain_attrs(base)
        for k, v in self._base_attrs.items():
            object.__setattr__(self, k, v)
        self.weight = base.weight
        self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        if options.get("dropout", 0.0) > 0:
            warnings.warn(f"LoRA dropout is not applied to the embedding adapter of {name} (a lookup)", stacklevel=3)
        self._init_lora(base.num_embeddings, base.embedding_dim, base.weight, r, alpha, **options)

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A = 0, B ~ N(0, 1): ΔW = 0 at step 0 (loralib's and PEFT's embedding initialisation)."""
        with torch.no_grad():
            nn.init.zeros_(self.lora_A)
        init_random(self.lora_B, lambda t, g: nn.init.normal_(t, generator=g), generator)

    def _base_weight_view(self) -> Tensor:
        return self.weight.T

    def _lookup(self, x: Tensor, table: Tensor) -> Tensor:
        return F.embedding(x, table, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, False)

    def forward(self, x: Tensor) -> Tensor:
        out = self._lookup(x, self.weight)
        if self.merged or self.lora_disabled:
            return out
        A, B, s = self.factors()
        return out + (s * self._lookup(x, A.T) @ B.T).to(out.dtype)

    def to_base(self) -> nn.Embedding:
        return _rebuild(self._base_cls, self._base_attrs, {"weight": self.weight}, {})  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, " + self.lora_extra_repr()


class _LoRAConvNd(LoRALayer):
    """A frozen ``nn.Conv{1,2,3}d`` (``W0: out x in x k...``) plus ``s·B·A``: ``A`` a convolution with the
    layer's kernel, stride, padding and dilation (``r x in x k...``), ``B`` a 1x1 convolution
    (``out x r x 1...``) — PEFT's and loralib's layout, so ``ΔW = s·B·A`` reshaped to the kernel's shape
    merges exactly. Grouped convolutions are refused (their ΔW is block-diagonal; PEFT cannot merge them)."""

    kind = "conv"
    _conv_fn: Callable[..., Tensor]

    def __init__(self, base: nn.Module, r: int, alpha: float, **options: Any) -> None:
        name = options.get("name") or f"this {type(base).__name__}"
        if base.groups != 1:
            raise LoRAConfigError(
                f"{name} is a grouped convolution (groups={base.groups}): LoRA on grouped convolutions is not supported "
                "(its update would be block-diagonal); target other layers"
            )
        nn.Module.__init__(self)
        self._base_cls = type(base)
        self._base_attrs = _plain_attrs(base) | {"_reversed_padding_repeated_twice": base._reversed_padding_repeated_twice}
        for k, v in self._base_attrs.items():
            object.__setattr__(self, k, v)
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
        return out if self.merged or self.lora_disabled else out + self.lora_forward(x).to(out.dtype)

    def to_base(self) -> nn.Module:
        return _rebuild(self._base_cls, self._base_attrs, {"weight": self.weight, "bias": self.bias}, {})

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


MHA_PARTS = ("q", "k", "v")


class LoRAMultiheadAttention(LoRALayer, nn.Module):
    """``nn.MultiheadAttention`` with LoRA on the q/k/v blocks of ``in_proj_weight = [Wq; Wk; Wv]``
    (``3E x E``) and, when ``out_proj`` is a :class:`LoRALinear`, on ``Wo``.

    ``forward`` calls ``F.multi_head_attention_forward`` with ``in_proj_weight + ΔW_in`` and
    ``out_proj.weight + ΔW_o`` (the ``d_out x d_in`` deltas are materialised; adapter dropout is
    not applied here). The original parameters keep their names (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj.weight`` ...), so state-dict keys stay compatible;
    ``to_base()`` returns a plain ``nn.MultiheadAttention`` (whose fast path then works again).
    With no q/k/v adapters the module has no ``lora_A``/``lora_B`` and only hosts ``out_proj`` (or
    guards the fast path of the ``nn.TransformerEncoderLayer`` around adapted MLP layers).
    """

    kind = "mha"
    base_weight_name = "in_proj_weight"
    # used by nn.TransformerEncoderLayer's fast path (taken once every adapter is merged)
    merge_masks = nn.MultiheadAttention.merge_masks

    def __init__(self, base: nn.MultiheadAttention, parts: Sequence[str] = (), r: int = 8, alpha: float = 16.0, **options: Any) -> None:
        """``parts``: the in-projection blocks to adapt (none: only host ``out_proj``); ``options``: those
        of :meth:`LoRALayer._init_lora` (adapter dropout is not applied here)."""
        nn.Module.__init__(self)
        self._base_cls = type(base)
        self._base_attrs = _plain_attrs(base) | {"_qkv_same_embed_dim": base._qkv_same_embed_dim}
        for k, v in _plain_attrs(base).items():
            object.__setattr__(self, k, v)
        self._same_dim = bool(base._qkv_same_embed_dim)
        self._guarded: tuple[weakref.ref, ...] = ()
        for pname, param in base._parameters.items():
            self.register_parameter(pname, param)
        self.out_proj = base.out_proj
        self.merged = False
        self.in_features = self.out_features = self.embed_dim
        name = options.get("name", "")
        bad = sorted(set(parts) - set(MHA_PARTS))
        if bad:
            raise LoRAConfigError(f"nn.MultiheadAttention in-projection parts are {MHA_PARTS}; got {bad}")
        if parts and not self._same_dim:
            raise LoRAConfigError(
                f"{name or 'this nn.MultiheadAttention'} has kdim/vdim != embed_dim (separate q/k/v_proj_weight); "
                "LoRA on its q/k/v is not supported, target only 'o' (out_proj) there"
            )
        if parts:
            if options.get("dropout", 0.0) > 0:
                warnings.warn(
                    f"LoRA dropout={options['dropout']} is not applied to the nn.MultiheadAttention adapters of {name!r} "
                    "(their ΔW is folded into the projection weights at each forward)",
                    stacklevel=3,
                )
            e = self.embed_dim
            fused = FusedSlices(MHA_PARTS, (e, e, e), tuple(p for p in MHA_PARTS if p in parts))
            self._init_lora(e, 3 * e, self.in_proj_weight, r, alpha, fused=fused, **options)

    def guard_fast_path(self, layers: Sequence[LoRALayer]) -> None:
        """Report ``_qkv_same_embed_dim = False`` while any of ``layers`` (the adapted layers of the
        surrounding ``nn.TransformerEncoderLayer``) is unmerged: its fast path reads the base weights."""
        self._guarded = tuple(weakref.ref(layer) for layer in layers)

    @property
    def _qkv_same_embed_dim(self) -> bool:  # type: ignore[override]
        """Read by ``nn.TransformerEncoder(Layer)`` to pick its fused fast path, which reads the weights
        directly and would skip unmerged adapters: report False until every adapter is merged."""
        return self._same_dim and not self.has_unmerged_adapters()

    def has_unmerged_adapters(self) -> bool:
        layers = [self, self.out_proj] + [ref() for ref in self._guarded]
        return any(layer is not None and is_lora_layer(layer) and not layer.merged for layer in layers)

    def _base_weight_view(self) -> Tensor:
        return self.in_proj_weight

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Same contract as ``nn.MultiheadAttention.forward`` (its slow path, adapters added)."""
        if query.is_nested:
            raise RuntimeError(
                "nested-tensor input reached a LoRA nn.MultiheadAttention; build nn.TransformerEncoder with "
                "enable_nested_tensor=False, or merge_and_unload() the adapters for fast-path inference"
            )
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype, check_other=False
        )
        if self.batch_first and is_batched:  # keep the "is" relations the functional relies on
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        in_w = self.in_proj_weight
        if is_lora_layer(self) and not self.merged and not self.lora_disabled:
            in_w = in_w + self.live_delta_weight(self.lora_A.dtype).to(in_w.dtype)
        out_w = self.out_proj.weight
        if is_lora_layer(self.out_proj) and not self.out_proj.merged:
            out_w = out_w + self.out_proj.live_delta_weight(self.out_proj.lora_A.dtype).to(out_w.dtype)
        separate = {}
        if not self._same_dim:
            separate = dict(
                use_separate_proj_weight=True,
                q_proj_weight=self.q_proj_weight,
                k_proj_weight=self.k_proj_weight,
                v_proj_weight=self.v_proj_weight,
            )
        attn_output, attn_weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            in_w,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            out_w,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            **separate,
        )
        if self.batch_first and is_batched:
            return attn_output.transpose(1, 0), attn_weights
        return attn_output, attn_weights

    def to_base(self) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` with this module's (possibly merged) parameters."""
        params = {k: v for k, v in self._parameters.items() if k not in self.state_names}
        return _rebuild(self._base_cls, self._base_attrs, params, {"out_proj": self.out_proj})  # type: ignore[return-value]

    def extra_repr(self) -> str:
        own = self.lora_extra_repr() if is_lora_layer(self) else "no q/k/v adapters"
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, " + own


def is_lora_layer(module: nn.Module) -> bool:
    """A module holding adapter tensors of its own (an attention host without q/k/v adapters is not one)."""
    return isinstance(module, LoRALayer) and "lora_B" in module._parameters


def is_lora_module(module: nn.Module) -> bool:
    """Any module lora_lightning put into the model (LoRA layers and attention hosts)."""
    return isinstance(module, LoRALayer)


def base_kind(module: nn.Module) -> str | None:
    """What LoRA can wrap ``module`` as — ``linear``, ``conv1d`` (GPT-2), ``mha``, ``embedding`` or ``conv``
    (``nn.Conv1d/2d/3d``) — seeing through LoRA layers
    (an adapted layer counts as the layer it wraps); ``None`` for anything else."""
    if isinstance(module, LoRALayer):
        return module.kind
    if isinstance(module, nn.Linear):
        return "linear"
    if is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module) in CONV_LAYERS:
        return "conv"
    return None


def primary_weight(module: nn.Module) -> Tensor:
    """The main weight of an adaptable module: ``weight``, or ``in_proj_weight`` (or
    ``q_proj_weight``) of an ``nn.MultiheadAttention``."""
    for attr in ("weight", "in_proj_weight", "q_proj_weight"):
        weight = getattr(module, attr, None)
        if isinstance(weight, Tensor):
            return weight
    raise TypeError(f"{type(module).__name__} has no weight matrix to adapt")
