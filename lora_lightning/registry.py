"""The three registries every other module reads: base-layer kinds, variants and quantizers.

This module only stores and looks up; it imports nothing of lora_lightning but its errors, so the
modules that *implement* entries (``layers/``, ``variants/``, ``quantization.py``) sit above it and
the modules that *use* them (``config``, ``plan``, injection, I/O) can ask it without importing
those implementations. Entries register themselves when their module is imported
(``import lora_lightning`` imports all built-in ones):

* a **layer kind** (:class:`lora_lightning.layers.LayerKind`): a base layer LoRA can wrap
  (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.MultiheadAttention``, ``nn.Embedding``, ``nn.Conv1d/2d/3d``);
  it states its dimensions, builds its LoRA layer, merges and exports itself
  (:func:`lora_lightning.register_layer_kind`);
* a **variant** (:class:`lora_lightning.Variant`): how an adapter is parametrised (LoRA, DoRA, ...)
  plus its config class and aliases (:func:`lora_lightning.register_variant`);
* a **quantizer** (:class:`lora_lightning.quantization.Quantizer`): a storage format of a frozen base
  weight (:func:`lora_lightning.register_quantizer`).

The conformance battery (``tests/conformance``) takes its axes from here: a new entry is checked in
every combination with the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import LoRAConfigError

# name -> LayerKind instance, in registration order (detection asks them in this order)
LAYER_KINDS: dict[str, Any] = {}
# name -> Variant subclass; name -> its LoRAConfig subclass; alias -> (variant, presets)
VARIANTS: dict[str, Any] = {}
VARIANT_CONFIGS: dict[str, Any] = {}
VARIANT_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}
# name -> Quantizer instance
QUANTIZERS: dict[str, Any] = {}
# called after each registration (the Lightning layer refreshes LoRACallback's keyword list)
ON_REGISTER: list[Callable[[], None]] = []
# called with the model before inject_lora changes anything; each raises to refuse a model it cannot adapt
# (the Lightning layer adds one for models Lightning Fabric has already set up)
INJECTION_GUARDS: list[Callable[[Any], None]] = []


def register_injection_guard(guard: Callable[[Any], None]) -> Callable[[Any], None]:
    """Add ``guard(model)`` to the checks :func:`~lora_lightning.inject_lora` runs first (once per function)."""
    if guard not in INJECTION_GUARDS:
        INJECTION_GUARDS.append(guard)
    return guard


def notify() -> None:
    for listener in ON_REGISTER:
        listener()


# --------------------------------------------------------------------------- layer kinds
def layer_kind(name: str) -> Any:
    """The registered :class:`~lora_lightning.layers.LayerKind` called ``name``."""
    try:
        return LAYER_KINDS[name]
    except KeyError:
        raise LoRAConfigError(f"layer kind {name!r} is not registered; registered kinds: {list(LAYER_KINDS)}") from None


def kind_of(module: Any) -> Any | None:
    """The kind LoRA can wrap ``module`` as, seeing through LoRA layers (an adapted layer counts as the
    layer it wraps); ``None`` for a module no registered kind adapts."""
    own = getattr(module, "lora_kind", None)
    if isinstance(own, str) and own in LAYER_KINDS:
        return LAYER_KINDS[own]
    for kind in reversed(LAYER_KINDS.values()):  # later registrations are more specific (a user's subclass)
        if kind.matches(module):
            return kind
    return None


# --------------------------------------------------------------------------- variants
def variant_names() -> list[str]:
    """Registered variants and their aliases, e.g. ``['adalora', 'dora', 'lora', 'qlora', ...]``."""
    return sorted(set(VARIANT_CONFIGS) | set(VARIANT_ALIASES))


def resolve_variant(name: Any) -> tuple[str, dict[str, Any]]:
    """``(variant, presets)`` for a variant name or alias; unknown names list the choices."""
    if name in VARIANT_ALIASES:
        return VARIANT_ALIASES[name]
    if name in VARIANT_CONFIGS:
        return name, {}
    raise LoRAConfigError(f"variant={name!r} is not one of {variant_names()}: set lora.variant to one of them")


def variant(name: str) -> Any:
    """The registered :class:`~lora_lightning.Variant` subclass for ``name`` (aliases resolved)."""
    return VARIANTS[resolve_variant(name)[0]]


# --------------------------------------------------------------------------- quantizers
def quantizer(name: str) -> Any:
    """The registered :class:`~lora_lightning.quantization.Quantizer` called ``name``."""
    if name not in QUANTIZERS:
        raise LoRAConfigError(f"quantize_base={name!r} is not one of {[None, *QUANTIZERS]}")
    return QUANTIZERS[name]


__all__ = [
    "INJECTION_GUARDS",
    "LAYER_KINDS",
    "ON_REGISTER",
    "QUANTIZERS",
    "VARIANTS",
    "VARIANT_ALIASES",
    "VARIANT_CONFIGS",
    "register_injection_guard",
    "kind_of",
    "layer_kind",
    "notify",
    "quantizer",
    "resolve_variant",
    "variant",
    "variant_names",
]
