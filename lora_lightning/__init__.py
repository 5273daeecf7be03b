"""lora-lightning: LoRA (Hu et al. 2021, arXiv 2106.09685) for any PyTorch Lightning module.

A plain-PyTorch core with a thin Lightning layer on top. ``h = W0·x + (alpha/r)·B·A·x`` with ``W0``
frozen, ``A: r x d_in``, ``B: d_out x r = 0``. Data flows one way through the core's modules:
config -> plan -> layers (one module per layer kind) -> variants -> state (record, handle) -> injection,
merging, named adapters -> adapter I/O and PEFT format; then the Lightning layer; the Hydra app beside it.

``import lora_lightning`` loads only the core (torch and safetensors); ``LoRACallback``,
``AtomicCheckpointIO`` and ``load_lora_checkpoint`` import Lightning when first used. Once a Lightning
package is imported (``lightning.pytorch`` or ``pytorch_lightning``, before or after this package), its
Lightning layer is installed so that ``MyModule.load_from_checkpoint(...)`` and
``trainer.test(ckpt_path=...)`` restore LoRA checkpoints.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

from . import telemetry as telemetry  # public submodule (lora_lightning.telemetry: LoRAMonitor's maths)
from .adapter_io import (
    adapter_state_dict,
    hotswap_adapter,
    load_adapter,
    read_adapter,
    read_adapter_config,
    save_adapter,
    save_merged_model,
    switch_adapter,
)
from .budget import allocate_ranks, rank_for_budget
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
from .gradients import make_inputs_require_grad
from .hotswap import prepare_for_hotswap
from .injection import (
    ParameterCount,
    adapter_param_names,
    base_memory,
    count_parameters,
    describe,
    has_lora,
    inject_lora,
    lora_layers,
    remove_lora,
)
from .layers import LayerKind, LoRAConv1D, LoRALayer, LoRALinear, LoRAMultiheadAttention, register_layer_kind
from .merging import is_merged, merge_and_unload, merge_lora, merged_state_dict, unmerge_lora
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
from .peft_format import export_peft_adapter, export_peft_adapters, import_peft_adapter
from .plan import ALIASES, AdapterSpec, FusedSlices, Plan, lora_parameter_count, plan_injection, register_fused_layout
from .quantization import Quantizer, register_quantizer
from .record import LoRAState
from .sharding import gathered, is_sharded
from .shared_input import set_shared_input_fusion, set_shared_input_groups, shared_input_groups
from .state import LoRAHandle, get_lora_state, lora_handle
from .variants import (
    AdaLoRAController,
    AdaLoRALinear,
    DoRALinear,
    LoftQLinear,
    LoRAFAConfig,
    LoRAFALinear,
    OLoRALinear,
    PiSSALinear,
    Variant,
    VeRALinear,
    get_variant,
    loftq_init,
    olora_to_lora,
    orthogonality_penalty,
    pissa_to_lora,
    project_lora_fa_gradients,
    register_variant,
    register_variant_alias,
)

__version__ = "0.2.0"

_LIGHTNING_EXPORTS = (
    "LoRACallback",
    "LoRAMonitor",
    "AtomicCheckpointIO",
    "load_lora_checkpoint",
    "inject_before_sharding",
)
_LAYERS = ("lightning.pytorch", "pytorch_lightning")  # the Lightning packages a layer is made for


def _install_layer(package: str) -> None:
    importlib.import_module(".lightning.package", __name__).layer(package)


def __getattr__(name: str) -> Any:
    """``LoRACallback`` & co. for ``lightning.pytorch`` (or, when only ``pytorch_lightning`` is installed, for it)."""
    if name in _LIGHTNING_EXPORTS:
        layer = ".lightning" if importlib.util.find_spec("lightning") is not None else ".pytorch_lightning"
        return getattr(importlib.import_module(layer, __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _InstallWithLightning(importlib.abc.MetaPathFinder):
    """Imports the Lightning layer of a Lightning package (``lightning.pytorch`` or ``pytorch_lightning``) right
    after the package is first imported, so ``load_from_checkpoint`` of a LoRA checkpoint gives the trained model
    with a bare ``import lora_lightning``, in whichever order the two are imported."""

    def __init__(self) -> None:
        self.pending = {name for name in _LAYERS if name not in sys.modules}

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # find the package itself without this finder
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            if self.pending:  # the other package may still come
                sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_install(module: Any) -> None:
                exec_module(module)
                _install_layer(fullname)

            spec.loader.exec_module = exec_then_install  # type: ignore[method-assign]
        return spec


for _package in [name for name in _LAYERS if name in sys.modules]:
    _install_layer(_package)
if any(name not in sys.modules for name in _LAYERS) and not any(
    isinstance(f, _InstallWithLightning) for f in sys.meta_path
):
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
    "LayerKind",
    "LoRACallback",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRAConv1D",
    "LoRAError",
    "LoRAHandle",
    "LoRALayer",
    "LoRALinear",
    "LoRAMonitor",
    "LoRAMultiheadAttention",
    "LoRAState",
    "MergeStateError",
    "NoAdapterGradientError",
    "NonFiniteError",
    "NotInjectedError",
    "OLoRALinear",
    "LoftQLinear",
    "ParameterCount",
    "PiSSALinear",
    "Plan",
    "Quantizer",
    "RankTooLargeError",
    "TargetNotFoundError",
    "Variant",
    "VeRALinear",
    "LoRAFAConfig",
    "LoRAFALinear",
    "project_lora_fa_gradients",
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
    "hotswap_adapter",
    "import_peft_adapter",
    "inject_before_sharding",
    "inject_lora",
    "is_merged",
    "is_sharded",
    "list_adapters",
    "load_adapter",
    "load_lora_checkpoint",
    "lora_handle",
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
    "loftq_init",
    "olora_to_lora",
    "orthogonality_penalty",
    "pissa_to_lora",
    "plan_injection",
    "prepare_for_hotswap",
    "rank_for_budget",
    "read_adapter",
    "read_adapter_config",
    "register_fused_layout",
    "register_layer_kind",
    "register_quantizer",
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
