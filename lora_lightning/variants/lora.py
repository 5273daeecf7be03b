"""Plain LoRA (Hu et al. 2021): ``ΔW = s·B·A`` with ``s = alpha/r``. The only variant that also adapts
GPT-2 ``Conv1D``, fused q/k/v blocks and ``nn.MultiheadAttention``.

Two aliases name settings of it: ``rslora`` (Kalajdzievski 2023, arXiv 2312.03732: ``s = alpha/sqrt(r)``,
i.e. ``use_rslora=True``) and ``qlora`` (Dettmers et al. 2023, arXiv 2305.14314: the frozen base
stored in 4-bit NormalFloat, i.e. ``quantize_base='nf4'``).
"""

from __future__ import annotations

from .base import Variant, register_variant, register_variant_alias


@register_variant("lora")
class LoRA(Variant):
    """``h = W0·x + (alpha/r)·B·A·dropout(x)``; trainable ``r·(d_in + d_out)`` per matrix."""

    linear_only = False
    supports_ties = True
    peft_lora = True


register_variant_alias("rslora", "lora", use_rslora=True)
register_variant_alias("qlora", "lora", quantize_base="nf4")
