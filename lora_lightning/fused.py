"""Fused projections: one weight matrix holding several logical ones, ``W = [Wq; Wk; Wv]``.

GPT-2's ``attn.c_attn`` (a ``Conv1D``), nanoGPT's ``c_attn``, timm's ``attn.qkv`` and
``nn.MultiheadAttention.in_proj_weight`` compute q, k and v with one matmul. The target aliases
``q``/``k``/``v`` resolve to row blocks of such matrices, so ``targets=["q", "v"]`` adapts only
the q and v blocks of GPT-2's ``c_attn`` (the paper's GPT-2 setup, loralib's
``MergedLinear(enable_lora=[True, False, True])``). Naming the module itself (``"c_attn"``)
adapts the whole matrix with one rank-r adapter instead.

Only layouts whose blocks are contiguous are listed (GPT-NeoX/BLOOM ``query_key_value`` is
interleaved per head and is *not* a fused [q;k;v] in this sense). Other models can register
their layout with :func:`register_fused_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from .errors import LoRAConfigError
from .layers import MHA_PARTS, FusedSlices, is_conv1d, primary_weight


@dataclass(frozen=True)
class FusedLayout:
    """Modules whose name matches ``pattern`` (target syntax: suffix, glob or ``re:``) stack
    ``parts`` along the output dimension, with ``sizes`` rows each (``None``: equal split)."""

    pattern: str
    parts: tuple[str, ...]
    sizes: tuple[int, ...] | None = None

    def slices(self, d_out: int, name: str, adapted: Sequence[str]) -> FusedSlices:
        sizes = self.sizes
        if sizes is None:
            if d_out % len(self.parts):
                raise LoRAConfigError(
                    f"{name} matches the fused layout {self.pattern!r} ({'/'.join(self.parts)}) but its output size "
                    f"{d_out} does not split into {len(self.parts)} equal blocks; register its layout with explicit "
                    "sizes via lora_lightning.register_fused_layout(pattern, parts, sizes)"
                )
            sizes = (d_out // len(self.parts),) * len(self.parts)
        if sum(sizes) != d_out:
            raise LoRAConfigError(
                f"fused layout {self.pattern!r} has sizes {sizes} (sum {sum(sizes)}) but {name} has d_out={d_out}"
            )
        return FusedSlices(self.parts, tuple(sizes), tuple(p for p in self.parts if p in adapted))


# first match wins; user registrations are put in front
FUSED_LAYOUTS: list[FusedLayout] = [
    FusedLayout(r"re:(.*\.)?crossattention\.c_attn", ("k", "v")),  # GPT-2 cross-attention: q is q_attn
    FusedLayout("c_attn", ("q", "k", "v")),  # GPT-2 Conv1D, nanoGPT nn.Linear
    FusedLayout("qkv", ("q", "k", "v")),  # timm ViT, many hand-written transformers
    FusedLayout("to_qkv", ("q", "k", "v")),  # vit-pytorch
]


def register_fused_layout(pattern: str, parts: Sequence[str], sizes: Sequence[int] | None = None) -> None:
    """Declare that modules matching ``pattern`` are fused ``[part_0; part_1; ...]`` projections.

    Example (Phi-3 with grouped-query attention, 32 q heads and 8 kv heads of 96 dims):
    ``register_fused_layout("qkv_proj", ["q", "k", "v"], [3072, 768, 768])``.
    """
    parts = tuple(parts)
    if not parts or len(set(parts)) != len(parts) or not all(isinstance(p, str) and p for p in parts):
        raise LoRAConfigError(f"parts={list(parts)} must be distinct non-empty names such as ['q', 'k', 'v']")
    if sizes is not None and (len(sizes) != len(parts) or not all(isinstance(n, int) and n > 0 for n in sizes)):
        raise LoRAConfigError(f"sizes={sizes} must give one positive row count per part {list(parts)}")
    FUSED_LAYOUTS.insert(0, FusedLayout(pattern, parts, tuple(sizes) if sizes is not None else None))


def fused_layout(name: str, module: nn.Module) -> FusedLayout | None:
    """The layout of ``module`` (named ``name``) if it is a known fused projection."""
    from .injection import compile_pattern  # local: injection imports this module

    if isinstance(module, nn.MultiheadAttention):
        return FusedLayout(type(module).__name__, MHA_PARTS)
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        return None
    for layout in FUSED_LAYOUTS:
        if compile_pattern(layout.pattern)(name):
            return layout
    return None


def fused_out_features(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a fused module's weight (MHA: its ``3E x E`` in-projection)."""
    weight = primary_weight(module)
    if is_conv1d(module):
        return weight.shape[1], weight.shape[0]
    if isinstance(module, nn.MultiheadAttention):
        return 3 * module.embed_dim, module.embed_dim
    return weight.shape[0], weight.shape[1]
