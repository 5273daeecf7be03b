"""LoRA layers, one module per base-layer kind, each registered as a :class:`LayerKind`.

``base`` holds what every layer shares (:class:`LoRALayer`) and the :class:`LayerKind` protocol;
``function`` the one-node autograd function of the linear maps; then one file per kind: ``linear``
(``nn.Linear``), ``conv1d`` (GPT-2 ``Conv1D``), ``mha`` (``nn.MultiheadAttention``), ``embedding``
(``nn.Embedding``), ``conv`` (``nn.Conv1d/2d/3d``), ``experts`` (a 2-D/3-D parameter named by ``target_parameters``,
e.g. MoE experts). A new kind is one file with a :class:`LayerKind`
subclass passed to :func:`register_layer_kind`; it is then planned, injected, merged, saved and run
through the conformance battery like the built-in ones.
"""

from .base import (
    AdapterSlots,
    LayerKind,
    LoRALayer,
    init_random,
    is_lora_layer,
    is_lora_module,
    plain_attrs,
    rebuild,
    register_layer_kind,
    resolve_dtype,
    stream_generator,
)
from .function import LoRALinearFunction, one_node_ok

# Each kind registers on import, and the import order is the order of registry.LAYER_KINDS: error messages list
# the kinds in it (nn.Linear first) and kind_of tries the later ones first. Not sorted, on purpose.
# isort: off
from .linear import LinearKind, LoRALinear
from .conv1d import Conv1DKind, LoRAConv1D, is_conv1d
from .mha import MHA_PARTS, LoRAMultiheadAttention, MultiheadAttentionKind
from .embedding import EmbeddingKind, LoRAEmbedding
from .conv import CONV_LAYERS, ConvKind, LoRAConv1d, LoRAConv2d, LoRAConv3d
from .experts import ExpertsKind, LoRAExperts, ParameterGuard, peft_module_names
# isort: on

__all__ = [
    "AdapterSlots",
    "CONV_LAYERS",
    "Conv1DKind",
    "ConvKind",
    "EmbeddingKind",
    "ExpertsKind",
    "LayerKind",
    "LinearKind",
    "LoRAConv1D",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAConv3d",
    "LoRAEmbedding",
    "LoRAExperts",
    "LoRALayer",
    "LoRALinear",
    "LoRALinearFunction",
    "LoRAMultiheadAttention",
    "MHA_PARTS",
    "MultiheadAttentionKind",
    "ParameterGuard",
    "init_random",
    "is_conv1d",
    "is_lora_layer",
    "is_lora_module",
    "one_node_ok",
    "peft_module_names",
    "plain_attrs",
    "rebuild",
    "register_layer_kind",
    "resolve_dtype",
    "stream_generator",
]
