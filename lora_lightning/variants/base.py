"""The :class:`Variant` protocol and :func:`register_variant`: one subclass per LoRA variant, registered by
name in :mod:`lora_lightning.registry`.

A variant is one file holding its options (a :class:`~lora_lightning.LoRAConfig` subclass whose
extra fields carry the variant's name as prefix, with ``structural_options`` naming those that
change what saved weights mean), its layer (a :class:`~lora_lightning.layers.LoRALinear` subclass),
its exact trainable-parameter count and, if it needs them, training-time hooks::

    @register_variant("mine")
    class Mine(Variant):
        config_class = MineConfig      # optional: only if the variant has options of its own
        layer_class = MineLinear

        @classmethod
        def num_params(cls, spec, config): return spec.r * (spec.d_in + spec.d_out) + spec.d_out

Everything else reads from here: injection builds layers through :meth:`Variant.build`, the
parameter budget and counts call :meth:`Variant.num_params`, loading compares the config's
``structural_options``, ``LoRACallback`` accepts every registered option as a keyword and the
Hydra app's ``lora`` group lists them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from .. import registry
from ..config import LoRAConfig
from ..errors import LoRAConfigError
from ..layers import LoRALayer, LoRALinear, resolve_dtype, stream_generator
from ..plan import AdapterSpec

ON_REGISTER = registry.ON_REGISTER  # called after each registration (the Lightning layer refreshes its keywords)


class TrainingHooks(Protocol):
    """What a variant does during training (AdaLoRA's rank schedule). Each method returns metrics
    to log (``{name: value}``); ``LoRACallback`` calls them, plain-PyTorch loops may too."""

    def before_optimizer_step(self) -> dict[str, float]: ...

    def after_optimizer_step(self, step: int) -> dict[str, float]: ...

    def at_end(self) -> dict[str, float]: ...

    def summary(self) -> dict[str, Any]: ...


class Variant:
    """Plain LoRA, and the base of every variant. One instance builds the layers of one injection
    (and holds what they share, e.g. VeRA's frozen projections); it is created before the model is
    changed, so a target the variant cannot adapt fails first."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[LoRAConfig]] = LoRAConfig
    layer_class: ClassVar[type[LoRALinear]] = LoRALinear
    # False: also GPT-2 Conv1D, fused q/k/v blocks, nn.MultiheadAttention, nn.Embedding and nn.Conv1d/2d/3d
    linear_only: ClassVar[bool] = True
    # whether modules holding one tied weight can share one adapter of this variant
    supports_ties: ClassVar[bool] = False
    # whether the initialisation rewrites the frozen base from W0 (PiSSA, OLoRA: a residual; LoftQ: a quantized
    # approximation), so the output right after injection equals the base's to round-off, not bit for bit
    rewrites_base: ClassVar[bool] = False
    # whether the variant needs quantize_base (LoftQ fits A, B to the quantization error): refused without it
    needs_quantized_base: ClassVar[bool] = False
    # whether a trained adapter is a plain PEFT LoRA adapter (export_peft_adapter writes it as one)
    peft_lora: ClassVar[bool] = False

    def __init__(self, model: nn.Module, config: LoRAConfig, specs: Sequence[AdapterSpec]) -> None:
        self.config = config
        self.check_targets(model, config, specs)

    @classmethod
    def check_targets(cls, model: nn.Module, config: LoRAConfig, specs: Sequence[AdapterSpec]) -> None:
        """Raise :class:`LoRAConfigError` for a planned matrix this variant cannot adapt (before any change)."""
        if cls.linear_only:
            bad = [s.name for s in specs if s.kind != "linear" or s.fused is not None]
            if bad:
                raise LoRAConfigError(
                    f"variant={config.variant!r} adapts whole nn.Linear layers only; {bad[:3]} are fused projections, "
                    "GPT-2 Conv1D, nn.MultiheadAttention, embeddings or convolutions. Target nn.Linear layers, or use "
                    "variant='lora' there"
                )
        if config.quantize_base is not None:
            bad = [s.name for s in specs if not registry.layer_kind(s.kind).quantizable]
            if bad:
                raise LoRAConfigError(
                    f"quantize_base={config.quantize_base!r} stores nn.Linear weights only; "
                    f"{bad[:3]} are not nn.Linear "
                    "(GPT-2 Conv1D, nn.MultiheadAttention, an embedding or a convolution): target nn.Linear layers or "
                    "drop quantize_base"
                )
            fmt = registry.quantizer(config.quantize_base)
            for s in specs:  # a missing package or an odd-sized weight fails now, before any change
                fmt.check(s.d_in * s.d_out, s.name)
        tied = [s for s in specs if s.tied]
        if tied:
            kinds = {s.kind for s in tied} | {kind_of_name(model, f) for s in tied for f in s.tied}
            untieable = sorted(k for k in kinds if not registry.layer_kind(k).tieable)
            if not cls.supports_ties or config.quantize_base is not None or untieable:
                why = (
                    f"variant={config.variant!r}"
                    if not cls.supports_ties
                    else f"quantize_base={config.quantize_base!r}"
                    if config.quantize_base is not None
                    else f"kind {untieable}"
                )
                raise LoRAConfigError(
                    f"{tied[0].name} and {tied[0].tied[0]} hold one tied weight and would share one adapter, "
                    f"which {why} "
                    "cannot do: target only one of them (merging is then refused while the other reads the weight), "
                    "untie the weights, or use variant='lora' without quantize_base"
                )

    def layer_kwargs(self, base: nn.Module | Tensor, spec: AdapterSpec) -> dict[str, Any]:
        """The arguments every layer class takes, for one planned matrix (``base``: its module, or its weight)."""
        c = self.config
        weight = base if isinstance(base, Tensor) else registry.kind_of(base).weight(base)
        return dict(
            r=spec.r,
            alpha=spec.alpha,
            scaling=spec.scaling if spec.scaling is not None else c.scaling_for(spec.r, spec.alpha),
            dropout=c.dropout,
            init=c.init,
            adapter_dtype=resolve_dtype(c.adapter_dtype, weight.dtype),
            name=spec.name,
            pin_dtype=c.adapter_dtype is not None,
            generator=self.generator(spec),
        )

    def generator(self, spec: AdapterSpec) -> torch.Generator | None:
        """The random stream of one adapter: seeded by ``(init_seed, name, rank)``, or ``None`` (global RNG)."""
        c = self.config
        return None if c.init_seed is None else stream_generator(c.init_seed, spec.name, spec.r)

    def build(self, base: nn.Module, spec: AdapterSpec) -> LoRALayer:
        """The adapter layer replacing ``base`` for one planned matrix: the kind builds it, with this variant's
        layer class on ``nn.Linear`` (and ``quantize`` where the kind stores quantized weights)."""
        kind = registry.layer_kind(spec.kind)
        kw = self.layer_kwargs(kind.weight(base), spec)
        if kind.quantizable:
            kw["quantize"] = self.config.quantize_base
        return kind.build(base, spec, layer_class=self.layer_class if spec.kind == "linear" else None, **kw)

    def build_host(self, base: nn.Module, spec: AdapterSpec | None) -> LoRALayer:
        """A host replacing ``base`` (see :meth:`~lora_lightning.layers.LayerKind.hosts`), with adapters of its
        own when ``spec`` plans them."""
        kind = registry.kind_of(base)
        kw = self.layer_kwargs(kind.weight(base), spec) if spec is not None else {}
        return kind.build(base, spec, **kw)

    @classmethod
    def alpha_and_scaling(cls, config: LoRAConfig, r: int, alpha: float) -> tuple[float, float]:
        """The ``alpha`` and scaling ``s`` a layer of rank ``r`` gets (``alpha/r``, or ``alpha/sqrt(r)``)."""
        return alpha, config.scaling_for(r, alpha)

    @classmethod
    def num_params(cls, spec: AdapterSpec, config: LoRAConfig) -> int:
        """Trainable parameters of one adapted matrix under ``config`` (the variant's options): plain LoRA
        ``r·(n·d_in + d_out)`` for ``n`` adapted blocks."""
        return spec.r * (max(1, len(spec.parts)) * spec.d_in + spec.d_out)

    # the option that switches the gradient edit off (named in a refusal), if the variant has one
    gradient_edit_switch: ClassVar[str | None] = None

    @classmethod
    def edits_gradients(cls, config: LoRAConfig) -> bool:
        """Whether the training hooks change ``.grad`` before the optimizer step (they need the gradients where
        autograd leaves them: refused where a strategy keeps them elsewhere, e.g. DeepSpeed ZeRO's buffers)."""
        return False

    @classmethod
    def training_hooks(cls, model: nn.Module, config: LoRAConfig, total_steps: int | None) -> TrainingHooks | None:
        """Hooks the variant needs while training (``None``: nothing to do)."""
        return None


def kind_of_name(model: nn.Module, name: str) -> str:
    kind = registry.kind_of(model.get_submodule(name))
    return kind.name if kind is not None else "?"


def register_variant(name: str) -> Any:
    """Class decorator registering a :class:`Variant` subclass (and its config class) under ``name``."""

    def decorate(cls: type[Variant]) -> type[Variant]:
        if not (isinstance(cls, type) and issubclass(cls, Variant)):
            raise TypeError(f"@register_variant({name!r}) decorates a Variant subclass, got {cls!r}")
        if name in registry.VARIANT_ALIASES or (
            name in registry.VARIANTS and registry.VARIANTS[name].__qualname__ != cls.__qualname__
        ):
            raise LoRAConfigError(f"variant name {name!r} is already registered; choose another name")
        config_class = cls.config_class
        if config_class is not LoRAConfig:
            if not issubclass(config_class, LoRAConfig):
                raise TypeError(f"{cls.__name__}.config_class must subclass LoRAConfig")
            fields = {f.name: f for f in dataclasses.fields(config_class)}
            if fields["variant"].default != name:
                raise LoRAConfigError(
                    f"{config_class.__name__} must declare `variant: str = {name!r}` so it can be built on its own"
                )
            config_class.variant_name = name
        cls.name = name
        registry.VARIANTS[name] = cls
        registry.VARIANT_CONFIGS[name] = config_class
        registry.notify()
        return cls

    return decorate


def register_variant_alias(alias: str, variant: str, **presets: Any) -> None:
    """``variant=alias`` means ``variant=variant`` with ``presets`` for options left at their default."""
    if variant not in registry.VARIANTS:
        raise LoRAConfigError(f"cannot alias {alias!r} to unregistered variant {variant!r}")
    registry.VARIANT_ALIASES[alias] = (variant, dict(presets))


def get_variant(name: str) -> type[Variant]:
    """The registered variant class for ``name`` (aliases resolved); unknown names list the choices."""
    return registry.variant(name)  # type: ignore[no-any-return]


def registered_variants() -> dict[str, type[Variant]]:
    return dict(registry.VARIANTS)
