"""``nn.Embedding``: a lookup is a product with a one-hot input, so ``ΔW`` (``dim x vocabulary``) is
``s·B·A`` with ``A: r x num``, ``B: dim x r``; the stored table is ``num x dim`` (``ΔWᵀ`` is added)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LoRAConfigError
from .base import LayerKind, LoRALayer, init_random, plain_attrs, rebuild, register_layer_kind


class LoRAEmbedding(LoRALayer, nn.Embedding):
    """A frozen ``nn.Embedding`` (weight ``W0: num x dim``) plus ``s·(B·A)ᵀ``, ``A: r x num``, ``B: dim x r``.

    ``y = W0[x] + s · (Aᵀ[x]) Bᵀ``: a lookup of ``A``'s columns, then ``B``. As in loralib and PEFT the
    initialisation is the reverse of Linear's — ``A = 0`` and ``B ~ N(0, 1)`` — so the output equals the
    base's at step 0 (a zero ``B`` would leave ``A`` without a gradient signal through the lookup).
    ``padding_idx`` is honoured: its row gets no gradient, so the padding vector stays the base's.
    Adapter dropout is not applied to a lookup. Keys: ``weight`` unchanged, ``lora_A``, ``lora_B``.
    """

    lora_kind = "embedding"
    fan_in_fan_out = True  # the stored weight is num x dim: ΔWᵀ of the d_out x d_in = dim x num update

    def __init__(self, base: nn.Embedding, r: int, alpha: float, **options: Any) -> None:
        name = options.get("name") or "this nn.Embedding"
        if base.max_norm is not None:
            raise LoRAConfigError(
                f"{name} has max_norm={base.max_norm}: it renormalises embedding rows in place during forward, which "
                "the adapter cannot follow; target other layers or build the Embedding without max_norm"
            )
        if base.sparse:
            raise LoRAConfigError(
                f"{name} has sparse=True (sparse gradients); LoRA needs dense ones: target other layers"
            )
        nn.Module.__init__(self)
        self._base_cls = type(base)
        self._base_attrs = plain_attrs(base)
        self.__dict__.update(self._base_attrs)
        self.weight = base.weight
        self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        if options.get("dropout", 0.0) > 0:
            warnings.warn(f"LoRA dropout is not applied to the embedding adapter of {name} (a lookup)", stacklevel=3)
        self._init_lora(base.num_embeddings, base.embedding_dim, base.weight, r, alpha, **options)

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A = 0, B ~ N(0, 1): ΔW = 0 at step 0 (loralib's and PEFT's embedding initialisation)."""
        with torch.no_grad():
            nn.init.zeros_(self.lora_A)
        init_random(self.lora_B, lambda t, g: nn.init.normal_(t, generator=g), generator)

    def _base_weight_view(self) -> Tensor:
        return self.weight.T

    def _lookup(self, x: Tensor, table: Tensor) -> Tensor:
        return F.embedding(x, table, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, False)

    def forward(self, x: Tensor) -> Tensor:
        out = self._lookup(x, self.weight)
        if self.adapter_off():
            return out
        A, B, s = self.factors()
        return out + (s * self._lookup(x, A.T) @ B.T).to(out.dtype)

    def to_base(self) -> nn.Embedding:
        return rebuild(self._base_cls, self._base_attrs, {"weight": self.weight}, {})  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, " + self.lora_extra_repr()


class EmbeddingKind(LayerKind):
    """``nn.Embedding``: ``d_out = embedding_dim``, ``d_in = num_embeddings``; PEFT keys ``lora_embedding_A/B``."""

    name, description, layer_class = "embedding", "nn.Embedding", LoRAEmbedding
    tieable = True

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return int(module.embedding_dim), int(module.num_embeddings)

    def peft_tensors(self, layer: LoRALayer) -> dict[str, Tensor]:
        return {"lora_embedding_A": layer.lora_A.detach(), "lora_embedding_B": layer.lora_B.detach()}

    def peft_import_leaves(self) -> dict[str, str]:
        return {"lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B"}


register_layer_kind(EmbeddingKind())
