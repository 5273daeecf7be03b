"""lora-lightning: LoRA (Hu et al. 2021, arXiv 2106.09685) for any PyTorch Lightning module.

A plain-PyTorch core (config, targets, layers, variants, injection, merging, adapter files) with a
thin Lightning layer on top. ``h = W0·x + (alpha/r)·B·A·x`` with ``W0`` frozen, ``A: r x d_in``,
``B: d_out x r = 0``.

``import lora_lightning`` loads only the core (torch and safetensors); ``LoRACallback``,
``AtomicCheckpointIO`` and ``load_lora_checkpoint`` import Lightning when first used. Once Lightning
is imported (before or after this package), the Lightning layer is installed so that
``MyModule.load_from_checkpoint(...)`` and ``trainer.test(ckpt_path=...)`` restore LoRA checkpoints.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

from .config import LoRAConfig
from .errors import (
    AdapterFileError,
    AdapterMismatchError,
    AlreadyInjectedError,
    BaseModelMismatchError,
    LoRAConfigError,
    LoRAError,
    MergeStateError,
    NoAdapterGradientError,
    NonFiniteError,
    NotInjectedError,
    RankTooLargeError,
    TargetNotFoundError,
)
from .variants import (
    AdaLoRAController,
    AdaLoRALinear,
    DoRALinear,
    PiSSALinear,
    Variant,
    VeRALinear,
    get_variant,
    orthogonality_penalty,
    pissa_to_lora,
    register_variant,
    register_variant_alias,
)
from .layers import FusedSlices, LoRAConv1D, LoRALayer, LoRALinear, LoRAMultiheadAttention
from .targets import ALIASES, AdapterSpec, lora_parameter_count, plan_injection, register_fused_layout
from .record import LoRAState
from .injection import (
    ParameterCount,
    adapter_param_names,
    base_memory,
    count_parameters,
    describe,
    get_lora_state,
    has_lora,
    inject_lora,
    lora_layers,
    remove_lora,
)
from .merging import is_merged, merge_and_unload, merge_lora, merged_state_dict, unmerge_lora
from .shared_input import set_shared_input_fusion, set_shared_input_groups, shared_input_groups
from .adapter_io import (
    adapter_state_dict,
    load_adapter,
    read_adapter,
    read_adapter_config,
    save_adapter,
    save_merged_model,
    switch_adapter,
)
from .peft_format import export_peft_adapter, export_peft_adapters, import_peft_adapter
from .gradients import make_inputs_require_grad
from .budget import allocate_ranks, rank_for_budget
from .sharding import gathered, is_sharded
from .named import (
    active_adapter,
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    disable_adapter,
    list_adapters,
    mixed_batch,
    set_adapter,
    set_trainable_adapters,
    use_adapter,
)

__version__ = "0.2.0"

_LIGHTNING_EXPORTS = ("LoRACallback", "AtomicCheckpointIO", "load_lora_checkpoint", "inject_before_sharding")


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_EXPORTS:
        return getattr(importlib.import_module(".lightning", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _InstallWithLightning(importlib.abc.MetaPathFinder):
    """Imports the Lightning layer right after ``lightning.pytorch`` is first imported."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "lightning.pytorch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_install(module: Any) -> None:
                exec_module(module)
                importlib.import_module(".lightning", __name__)

            spec.loader.exec_module = exec_then_install  # type: ignore[method-assign]
        return spec


if "lightning.pytorch" in sys.modules:
    importlib.import_module(".lightning", __name__)
elif not any(isinstance(f, _InstallWithLightning) for f in sys.meta_path):
    sys.meta_path.insert(0, _InstallWithLightning())

__all__ = [
    "ALIASES",
    "AdaLoRAController",
    "AdaLoRALinear",
    "AdapterFileError",
    "AdapterMismatchError",
    "AdapterSpec",
    "AlreadyInjectedError",
    "AtomicCheckpointIO",
    "BaseModelMismatchError",
    "DoRALinear",
    "FusedSlices",
    "LoRACallback",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRAConv1D",
    "LoRAError",
    "LoRALayer",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "LoRAState",
    "MergeStateError",
    "NoAdapterGradientError",
    "NonFiniteError",
    "NotInjectedError",
    "ParameterCount",
    "PiSSALinear",
    "RankTooLargeError",
    "TargetNotFoundError",
    "Variant",
    "VeRALinear",
    "active_adapter",
    "adapter_param_names",
    "adapter_state_dict",
    "add_adapter",
    "add_weighted_adapter",
    "allocate_ranks",
    "base_memory",
    "count_parameters",
    "delete_adapter",
    "describe",
    "disable_adapter",
    "export_peft_adapter",
    "export_peft_adapters",
    "gathered",
    "get_lora_state",
    "get_variant",
    "has_lora",
    "import_peft_adapter",
    "inject_before_sharding",
    "inject_lora",
    "is_merged",
    "is_sharded",
    "list_adapters",
    "load_adapter",
    "load_lora_checkpoint",
    "lora_layers",
    "lora_parameter_count",
    "make_inputs_require_grad",
    "merge_and_unload",
    "merge_lora",
    "set_shared_input_fusion",
    "set_shared_input_groups",
    "shared_input_groups",
    "merged_state_dict",
    "mixed_batch",
    "orthogonality_penalty",
    "pissa_to_lora",
    "plan_injection",
    "rank_for_budget",
    "read_adapter",
    "read_adapter_config",
    "register_fused_layout",
    "register_variant",
    "register_variant_alias",
    "remove_lora",
    "save_adapter",
    "save_merged_model",
    "set_adapter",
    "switch_adapter",
    "unmerge_lora",
    "set_trainable_adapters",
    "use_adapter",
]
