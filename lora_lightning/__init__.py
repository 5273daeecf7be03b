"""lora-lightning: LoRA (Hu et al. 2021, arXiv 2106.09685) for any PyTorch Lightning module.

Plain-PyTorch core (layers, injection, checkpoint I/O, merging) with a thin Lightning callback
on top. ``h = W0·x + (alpha/r)·B·A·x`` with ``W0`` frozen, ``A: r x d_in``, ``B: d_out x r = 0``.
"""

from .callback import LoRACallback
from .checkpoint import (
    adapter_state_dict,
    load_adapter,
    merged_state_dict,
    read_adapter,
    read_adapter_config,
    save_adapter,
    save_merged_model,
)
from .config import LoRAConfig
from .errors import (
    AdapterFileError,
    AdapterMismatchError,
    AlreadyInjectedError,
    BaseModelMismatchError,
    LoRAConfigError,
    LoRAError,
    MergeStateError,
    NonFiniteError,
    NotInjectedError,
    RankTooLargeError,
    TargetNotFoundError,
)
from .injection import (
    ALIASES,
    AdapterSpec,
    ParameterCount,
    count_parameters,
    describe,
    has_lora,
    inject_lora,
    lora_layers,
    lora_parameter_count,
    plan_injection,
    remove_lora,
)
from .fused import register_fused_layout
from .layers import FusedSlices, LoRAConv1D, LoRALinear, LoRAMultiheadAttention
from .lightning_io import AtomicCheckpointIO
from .peft_compat import export_peft_adapter, import_peft_adapter
from .merging import is_merged, merge_and_unload, merge_lora, switch_adapter, unmerge_lora
from .variants import AdaLoRALinear, DoRALinear, PiSSALinear, VariantLinear, VeRALinear, base_memory, pissa_to_lora
from .adalora import AdaLoRAController, orthogonality_penalty
from .budget import allocate_ranks

__version__ = "0.1.0"

__all__ = [
    "ALIASES",
    "AdaLoRAController",
    "AdaLoRALinear",
    "DoRALinear",
    "PiSSALinear",
    "VariantLinear",
    "VeRALinear",
    "allocate_ranks",
    "base_memory",
    "orthogonality_penalty",
    "pissa_to_lora",
    "AdapterFileError",
    "AdapterMismatchError",
    "AdapterSpec",
    "AlreadyInjectedError",
    "AtomicCheckpointIO",
    "BaseModelMismatchError",
    "LoRACallback",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRAError",
    "FusedSlices",
    "LoRAConv1D",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "MergeStateError",
    "NonFiniteError",
    "NotInjectedError",
    "ParameterCount",
    "RankTooLargeError",
    "TargetNotFoundError",
    "adapter_state_dict",
    "count_parameters",
    "describe",
    "export_peft_adapter",
    "has_lora",
    "import_peft_adapter",
    "inject_lora",
    "is_merged",
    "load_adapter",
    "lora_layers",
    "lora_parameter_count",
    "merge_and_unload",
    "merge_lora",
    "merged_state_dict",
    "plan_injection",
    "read_adapter",
    "read_adapter_config",
    "register_fused_layout",
    "remove_lora",
    "save_adapter",
    "save_merged_model",
    "switch_adapter",
    "unmerge_lora",
]
