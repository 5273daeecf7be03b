"""What every LoRA layer shares (paper §4.1), and the :class:`LayerKind` a base-layer kind registers.

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
tensors), so one forward, one merge and one export serve them all.

A layer whose base shares its weight with another adapted module (tied weights) reads that module's
adapter (:meth:`LoRALayer.tie_to`): one weight, one ``ΔW``, so merging stays exact.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import registry
from ..errors import LoRAConfigError, MergeStateError, RankTooLargeError

if TYPE_CHECKING:
    from ..plan import AdapterSpec, FusedSlices

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


class AdapterSlots(nn.Module):
    """One inactive named adapter's tensors for one module, under the leaf names the module uses for
    its active adapter (``lora_A``, ``lora_B``; a ``modules_to_save`` copy: ``weight``, ``bias``...), plus
    a LoRA layer's ``r``, ``alpha`` and ``scaling``."""

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        r: int | None = None,
        alpha: float | None = None,
        scaling: float | None = None,
    ) -> None:
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
    ``fused`` (a :class:`~lora_lightning.plan.FusedSlices`), ``lora_A`` stacks one ``r x d_in`` block per
    adapted part (``n·r x d_in``) and ``lora_B`` the parts' ``size_i x r`` blocks (``Σ size_i x r``), exactly
    loralib's ``MergedLinear`` layout; ΔW is zero on the other rows.

    Class attributes name what a variant adds: ``trainable_names`` (trained), ``adapter_names``
    (saved in adapter files and checkpoints) and ``extra_state_names`` (other state-dict entries
    that are not part of the base layer, e.g. a quantized weight's scales).
    """

    variant_name: str = "lora"
    lora_kind: str = "linear"  # the registered LayerKind this layer wraps
    trainable_names: tuple[str, ...] = ("lora_A", "lora_B")
    adapter_names: tuple[str, ...] = ("lora_A", "lora_B")
    extra_state_names: tuple[str, ...] = ()
    fan_in_fan_out: bool = False  # the stored weight is d_in x d_out (GPT-2 Conv1D, an embedding table)
    base_weight_name: str = "weight"  # the state-dict leaf that merge changes

    r: int
    alpha: float
    scaling: float
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
    # tied weights: (the layer owning the adapter, whether its ΔW is this layer's transposed); None: own adapter
    lora_tie: tuple[LoRALayer, bool] | None = None

    @property
    def kind(self) -> str:
        return self.lora_kind

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
        (``kaiming`` | ``gaussian`` | ``gaussian_fan_in``), ``adapter_dtype`` (default: the base weight's; kept
        through later casts when ``pin_dtype``), ``name`` (for errors), ``fused`` row layout, ``generator`` (a CPU
        generator for the random initialisation; ``None``: the global RNG)."""
        if fused is not None and fused.d_out != d_out:
            layout = dict(zip(fused.parts, fused.sizes, strict=True))
            raise LoRAConfigError(
                f"fused layout of {name or 'a layer'} has {fused.d_out} rows ({layout}) "
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

    # ---------------------------------------------------------------- tied weights
    def tie_to(self, leader: LoRALayer) -> None:
        """Make this layer read ``leader``'s adapter instead of holding its own: both wrap modules holding one
        weight, so one ``ΔW`` of that weight serves both and merging (done by the leader) stays exact. The
        layer's own ``A``/``B`` are dropped; its bias and its base forward stay its own."""
        for leaf in self.adapter_names:
            if leaf in self._parameters:  # type: ignore[attr-defined]
                del self._parameters[leaf]  # type: ignore[attr-defined]
        self.__dict__["lora_tie"] = (leader, leader.fan_in_fan_out != self.fan_in_fan_out)

    def _source(self) -> LoRALayer:
        """The layer holding the adapter this layer applies (itself, or its tie leader)."""
        return self.lora_tie[0] if self.lora_tie is not None else self

    @property
    def merged(self) -> bool:
        """Whether ΔW is folded into the base weight (a tied layer: its leader's state, the weight is one)."""
        if self.lora_tie is not None:
            return self.lora_tie[0].merged
        return bool(self.__dict__.get("_lora_merged", False))

    @merged.setter
    def merged(self, value: bool) -> None:
        self.__dict__["_lora_merged"] = bool(value)

    # ---------------------------------------------------------------- math
    def factors(self) -> tuple[Tensor, Tensor, float]:
        """``(A' (R x d_in), B' (d_out x R), s)`` with ``ΔW = s·B'·A'`` (differentiable). Plain LoRA:
        ``(A, B, alpha/r)``; a fused layer's ``B'`` is block-structured (zero rows for un-adapted parts);
        a tied layer's are its leader's (transposed when the two store the weight transposed)."""
        if self.lora_tie is not None:
            leader, transposed = self.lora_tie
            A, B, s = leader.factors()
            return (B.T, A.T, s) if transposed else (A, B, s)
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

    def adapter_off(self) -> bool:
        """Whether forward gives the base output: merged, or adapters disabled (``disable_adapter``)."""
        source = self._source()
        return source.merged or source.lora_disabled

    def adapted_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, base: Callable[[], Tensor]) -> Tensor:
        """``base() + lora_forward(x)``, as one autograd node where :class:`LoRALinearFunction` can take
        the inputs. ``weight`` is ``W0 (d_out x d_in)`` (a transposed view for Conv1D); ``base`` computes
        the frozen output the usual way for the composed fallback."""
        from .function import LoRALinearFunction, MaskedDropout, one_node_ok

        if self.adapter_off():
            return base()
        if self._source().lora_route is not None:
            return self._routed_forward(x, base())
        A, B, s = self.factors()
        if one_node_ok(x, weight, A, B):
            x_d = None
            if self.dropout_p > 0 and self.lora_dropout.training:  # A frozen: the node keeps h, not x_d (one-byte mask)
                x_d = self.lora_dropout(x) if A.requires_grad else MaskedDropout.apply(x, self.dropout_p)
            return LoRALinearFunction.apply(x, x_d, weight, bias, A, B, s)
        out = base()
        return out + self.lora_forward(x).to(out.dtype)

    # ------------------------------------------------------- named adapters
    def adapter_factors(self, name: str) -> tuple[Tensor, Tensor, float]:
        """``factors()`` of the named adapter (the active one, or one held in ``lora_bank``)."""
        if self.lora_tie is not None:
            leader, transposed = self.lora_tie
            A, B, s = leader.adapter_factors(name)
            return (B.T, A.T, s) if transposed else (A, B, s)
        if name == self.lora_active:
            return self.factors()
        slots = self.lora_bank[name]  # type: ignore[attr-defined]
        B = slots.lora_B if self.fused is None else self.fused.expand_B(slots.lora_B, slots.r)
        return slots.lora_A, B, slots.scaling

    def _routed_forward(self, x: Tensor, out: Tensor) -> Tensor:
        """``out`` plus, for each ``(name, rows)`` of ``lora_route``, the named adapter's update on those
        samples of ``x`` (along the route's batch dimension, 0 by default); samples routed to ``None`` keep the
        base output."""
        route = self._source().lora_route or []
        rows = sum(int(idx.numel()) for _, idx in route)
        dim = route.dim_of(x) if hasattr(route, "dim_of") else 0
        if x.shape[dim] != rows:
            raise LoRAConfigError(
                f"mixed batch: {rows} adapter names were given but a LoRA layer received {x.shape[dim]} rows along dim "
                f"{dim} (input {tuple(x.shape)}); give one name (or None) per sample of the batch, and batch_dim= if "
                "the samples are not along dim 0"
            )
        for name, idx in route:
            if name is None or idx.numel() == 0:
                continue
            A, B, s = self.adapter_factors(name)
            xs = x.index_select(dim, idx)
            if self.dropout_p > 0:
                xs = self.lora_dropout(xs)
            delta = F.linear(F.linear(xs.to(A.dtype), A) * s, B)
            out = out.index_add(dim, idx, delta.to(out.dtype))
        return out

    def new_adapter_slots(
        self, r: int, alpha: float, scaling: float, generator: torch.Generator | None = None
    ) -> nn.Module:
        """A freshly initialised adapter of rank ``r`` for this layer (this layer's own init: A random
        and B = 0, or the reverse for embeddings), as a module holding ``lora_A``/``lora_B``."""
        A0, B0 = self.lora_A, self.lora_B
        n = A0.shape[0] // self.r
        limit = min(int(self.in_features), self.fused.smallest_adapted if self.fused else int(self.out_features))  # type: ignore[attr-defined]
        if r > limit:
            raise RankTooLargeError(
                f"r={r} is larger than min(d_in, d_out)={limit} for this layer; choose r <= {limit}"
            )
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
        if self.lora_tie is not None:
            raise MergeStateError(
                "this LoRA layer reads a tied layer's adapter; merge that layer (merge_lora(model) does)"
            )
        if self.merged:
            raise MergeStateError(
                "this LoRA layer is already merged; call unmerge() first (merging twice would add ΔW twice)"
            )
        self._add_delta(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        """``W0 <- W0 - ΔW`` (exact up to floating-point round-off of the base dtype)."""
        if self.lora_tie is not None:
            raise MergeStateError(
                "this LoRA layer reads a tied layer's adapter; unmerge that layer (unmerge_lora(model) does)"
            )
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
        return tuple(
            dict.fromkeys(("lora_A", "lora_B") + self.trainable_names + self.adapter_names + self.extra_state_names)
        )

    def structure(self) -> dict[str, Any]:
        """``{kind, d_out (adapted rows), d_in, r, alpha, scaling, parts}``: what an adapter must match."""
        return {
            "kind": self.lora_kind,
            "d_out": int(self.lora_B.shape[0]) if self.fused else int(self.out_features),  # type: ignore[attr-defined]
            "d_in": int(self.in_features),  # type: ignore[attr-defined]
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
        if self.pinned_dtype is not None:  # every tensor of the adapter, trained or frozen (LoRA-FA's A)
            for name in dict.fromkeys(self.trainable_names + self.adapter_names):
                p = self._parameters.get(name)  # type: ignore[attr-defined]
                if isinstance(p, Tensor) and p.is_floating_point() and p.dtype != self.pinned_dtype:
                    p.data = p.data.to(self.pinned_dtype)
                    if p.grad is not None:
                        p.grad.data = p.grad.data.to(self.pinned_dtype)
        return out

    def lora_extra_repr(self) -> str:
        if self.lora_tie is not None:
            return "reads the adapter of its tied weight's first module, merged=" + str(self.merged)
        parts = f", parts={list(self.fused.adapted)}" if self.fused else ""
        return (
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout_p:g}{parts}, "
            f"merged={self.merged}"
        )


def init_random(
    tensor: Tensor, fill: Callable[[Tensor, torch.Generator | None], Any], generator: torch.Generator | None
) -> None:
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


def plain_attrs(module: nn.Module) -> dict[str, Any]:
    """A module's public non-tensor attributes (``nf``, ``embed_dim``, ...) to rebuild it later."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}


def rebuild(
    cls: type, attrs: dict[str, Any], params: dict[str, nn.Parameter | None], modules: dict[str, nn.Module]
) -> nn.Module:
    """A ``cls`` instance made without ``__init__`` (no re-initialisation) from saved attributes."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.__dict__.update(attrs)
    for k, p in params.items():
        module.register_parameter(k, p)
    for k, m in modules.items():
        module.add_module(k, m)
    return module


def is_lora_layer(module: nn.Module) -> bool:
    """A module holding adapter tensors of its own (an attention host without q/k/v adapters, or a layer
    reading a tied layer's adapter, is not one)."""
    return isinstance(module, LoRALayer) and "lora_B" in module._parameters


def is_lora_module(module: nn.Module) -> bool:
    """Any module lora_lightning put into the model (LoRA layers, tied readers and attention hosts)."""
    return isinstance(module, LoRALayer)


# --------------------------------------------------------------------------- layer kinds
class LayerKind:
    """A kind of base layer LoRA can wrap: one instance per kind, registered with :func:`register_layer_kind`.

    It answers what planning, injection, merging and the PEFT format need to know about the base layer,
    so the rest of the library asks the kind instead of switching on types::

        class MyKind(LayerKind):
            name, description, layer_class = "mine", "my.Layer", MyLoRALayer
            def matches(self, module): return isinstance(module, MyLayer)
            def dims(self, module): return module.d_out, module.d_in
        register_layer_kind(MyKind())

    Attributes: ``name`` (``spec.kind``, in records and adapter files), ``description`` (for messages),
    ``layer_class`` (built by :meth:`build`), ``whole_module`` (a target may name the module itself),
    ``linear`` (adapted by ``all-linear``), ``fusable`` (may hold a registered fused q/k/v layout),
    ``fused_parts`` (fixed parts, e.g. ``nn.MultiheadAttention``'s q/k/v), ``quantizable`` (``quantize_base``
    can store its weight), ``tieable`` (two such modules sharing one weight can share one adapter),
    ``routable`` (``mixed_batch`` can route samples through it), ``parameter`` (it adapts a parameter named by
    ``target_parameters``, a :class:`~lora_lightning.plan.ParamTarget`, not a module ``targets`` name).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    layer_class: ClassVar[type] = LoRALayer
    whole_module: ClassVar[bool] = True
    linear: ClassVar[bool] = False
    fusable: ClassVar[bool] = False
    fused_parts: ClassVar[tuple[str, ...]] = ()
    quantizable: ClassVar[bool] = False
    tieable: ClassVar[bool] = False
    routable: ClassVar[bool] = False
    parameter: ClassVar[bool] = False

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` (a plain, unadapted module) is of this kind."""
        raise NotImplementedError

    def dims(self, module: nn.Module) -> tuple[int, int]:
        """``(d_out, d_in)`` of the module's weight seen as a ``d_out x d_in`` matrix."""
        raise NotImplementedError

    def weight(self, module: nn.Module) -> Tensor:
        """The stored weight an adapter changes (merging writes into it)."""
        return module.weight  # type: ignore[return-value]

    def row_blocks(self, module: nn.Module) -> FusedSlices | None:
        """Fixed row blocks of the ``d_out x d_in`` weight that each get an adapter ``B_i·A_i`` of their own whatever
        the targets say (the experts of a 3-D MoE parameter); ``None``: one adapter for the whole matrix."""
        return None

    def check_parts(self, module: nn.Module, name: str, parts: list[str]) -> None:
        """Raise :class:`LoRAConfigError` if the fused ``parts`` of ``module`` cannot be adapted."""

    def build(self, base: nn.Module, spec: AdapterSpec, layer_class: type | None = None, **options: Any) -> LoRALayer:
        """The LoRA layer replacing ``base`` for one planned matrix; ``options`` are those of
        :meth:`LoRALayer._init_lora` (and ``quantize`` for a quantizable kind)."""
        return (layer_class or self.layer_class)(base, **options)

    def hosts(self, model: nn.Module, names: Sequence[str]) -> list[str]:
        """Modules of this kind to replace by a LoRA host (built with ``spec=None``) because they read adapted
        layers' weights directly (``nn.MultiheadAttention`` around an adapted ``out_proj``); ``names``: the
        adapted modules. Default: none."""
        return []

    def guards(self, model: nn.Module, names: Sequence[str]) -> list[Any]:
        """Objects with a ``remove()`` method that keep the model computing the right thing while adapters are
        in it (kept in the model's :class:`~lora_lightning.state.LoRAHandle`, removed by ``remove_lora``)."""
        return []

    def peft_tensors(self, layer: LoRALayer) -> dict[str, Tensor]:
        """The layer's adapter in PEFT's layout, ``{leaf: tensor}`` below the module's name (``lora_A.weight``,
        ...); raise :class:`LoRAConfigError` (one line: why, and what to do instead) if PEFT cannot hold it
        exactly."""
        A, B, _ = (t.detach() if isinstance(t, Tensor) else t for t in layer.factors())
        return {"lora_A.weight": A, "lora_B.weight": B}

    def peft_rank(self, layer: LoRALayer) -> int:
        """The rank PEFT sees (a fused layer exports its blocks as one adapter of rank ``n·r``)."""
        return int(layer.factors()[0].shape[0])

    def from_peft(self, layer: LoRALayer, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """A PEFT adapter's ``lora_A``, ``lora_B`` tensors for ``layer`` in this layer's layout (the inverse of
        :meth:`peft_tensors`; the same tensors for most kinds)."""
        return A, B

    def peft_import_leaves(self) -> dict[str, str]:
        """PEFT's tensor leaves -> this layer's (``lora_A.weight`` -> ``lora_A``)."""
        return {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}

    def check_peft_import(self, module: nn.Module, name: str) -> None:
        """Raise :class:`LoRAConfigError` if a PEFT adapter on ``module`` would compute something else here."""


def register_layer_kind(kind: LayerKind) -> LayerKind:
    """Register a base-layer kind (see :class:`LayerKind`); returns it. Re-registering a name replaces it."""
    if not isinstance(kind, LayerKind) or not kind.name:
        raise TypeError(f"register_layer_kind takes a named LayerKind instance, got {kind!r}")
    registry.LAYER_KINDS[kind.name] = kind
    registry.notify()
    return kind
