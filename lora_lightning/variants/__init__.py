"""LoRA variants, one file each, registered by name in :mod:`.registry`.

``lora`` (with the aliases ``rslora`` and ``qlora``), ``dora``, ``pissa``, ``vera`` and ``adalora``;
docs/variants.md gives the formulas and citations. A new variant is one file with a
``@register_variant("name")`` class (see :mod:`.registry`) plus its test file.
"""

from .adalora import AdaLoRAConfig, AdaLoRAController, AdaLoRALinear, orthogonality_penalty
from .base import TrainingHooks, Variant, get_variant, register_variant, register_variant_alias, registered_variants
from .dora import DoRALinear
from .lora import LoRA  # noqa: E402  (registration order: plain LoRA first)
from .pissa import PiSSALinear, pissa_to_lora
from .vera import VeRAConfig, VeRALinear, vera_shared_matrices

__all__ = [
    "AdaLoRAConfig",
    "AdaLoRAController",
    "AdaLoRALinear",
    "DoRALinear",
    "LoRA",
    "PiSSALinear",
    "TrainingHooks",
    "VeRAConfig",
    "VeRALinear",
    "Variant",
    "get_variant",
    "orthogonality_penalty",
    "pissa_to_lora",
    "register_variant",
    "register_variant_alias",
    "registered_variants",
    "vera_shared_matrices",
]
