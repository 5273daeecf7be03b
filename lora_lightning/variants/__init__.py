"""LoRA variants, one file each, registered by name in :mod:`.registry`.

``lora`` (with the aliases ``rslora`` and ``qlora``), ``lora_fa``, ``dora``, ``pissa``, ``olora``, ``loftq``,
``vera`` and ``adalora``;
docs/variants.md gives the formulas and citations. A new variant is one file with a
``@register_variant("name")`` class (see :mod:`.registry`) plus its test file.
"""

from .adalora import AdaLoRAConfig, AdaLoRAController, AdaLoRALinear, orthogonality_penalty
from .base import TrainingHooks, Variant, get_variant, register_variant, register_variant_alias, registered_variants
from .dora import DoRALinear
from .loftq import LoftQConfig, LoftQInit, LoftQLinear, loftq_init
from .lora import LoRA  # noqa: E402  (registration order: plain LoRA first)
from .lora_fa import LoRAFAConfig, LoRAFALinear, project_lora_fa_gradients, projected_gradient
from .olora import OLoRALinear, olora_to_lora
from .pissa import PiSSALinear, pissa_to_lora
from .vera import VeRAConfig, VeRALinear, vera_shared_matrices

__all__ = [
    "AdaLoRAConfig",
    "AdaLoRAController",
    "AdaLoRALinear",
    "DoRALinear",
    "LoRA",
    "LoRAFAConfig",
    "LoRAFALinear",
    "LoftQConfig",
    "LoftQInit",
    "LoftQLinear",
    "OLoRALinear",
    "PiSSALinear",
    "TrainingHooks",
    "VeRAConfig",
    "VeRALinear",
    "Variant",
    "get_variant",
    "loftq_init",
    "olora_to_lora",
    "orthogonality_penalty",
    "pissa_to_lora",
    "project_lora_fa_gradients",
    "projected_gradient",
    "register_variant",
    "register_variant_alias",
    "registered_variants",
    "vera_shared_matrices",
]
