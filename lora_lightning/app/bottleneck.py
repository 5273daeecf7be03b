"""Bottleneck adapters, the baselines of the paper's Table 1 and Table 2 (plain PyTorch).

* Adapter^H (Houlsby et al. 2019): two adapters per block, one on the attention output projection and one on the
  MLP output projection, each before the block's residual add.
* Adapter^L (Lin et al. 2020): one adapter per block, after the MLP, with a LayerNorm of its own in front.

An adapter maps the wrapped module's output ``h`` (``... × d``) to ``h + W_up·act(W_down·LN(h) + b_down) + b_up``
(``W_down``: ``m × d``, ``W_up``: ``d × m``, ``m`` the bottleneck size, ``LN`` only for Adapter^L). ``W_up`` and
``b_up`` start at zero, so an adapted model computes exactly the base model until it trains. Unlike LoRA, the adapter
is a second, sequential computation after the wrapped one and cannot be folded into any weight: that is the inference
latency of the paper's Table 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_lightning.errors import AppConfigError


class BottleneckAdapter(nn.Module):
    """``h -> h + up(relu(down(LN(h))))``; ``h``: ``(..., d)``; ``LN`` present when ``layer_norm``."""

    def __init__(self, d: int, size: int, layer_norm: bool = False, init_std: float = 0.01) -> None:
        super().__init__()
        if size < 1:
            raise AppConfigError(f"lora.adapter_size={size}: the bottleneck needs at least 1 unit")
        self.norm = nn.LayerNorm(d) if layer_norm else None
        self.down = nn.Linear(d, size)
        self.up = nn.Linear(size, d)
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # identity at the start: the adapted model is the base model
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h) if self.norm is not None else h
        return h + self.up(torch.relu(self.down(x)))


class AdapterAfter(nn.Module):
    """``base`` followed by ``adapter``: ``forward(*args) = adapter(base(*args))`` (the base's output is a tensor)."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.adapter(self.base(*args, **kwargs))


@dataclass(frozen=True)
class AdapterStyle:
    """Where one adapter style goes (module names matching ``where``) and whether it has its own LayerNorm."""

    name: str
    where: str  # regex searched in the full module name
    layer_norm: bool
    placement: str  # for messages and docs


ADAPTER_STYLES: dict[str, AdapterStyle] = {
    "adapter_h": AdapterStyle(
        "adapter_h",
        # BERT: attention.output.dense and output.dense; GPT-2: attn.c_proj and mlp.c_proj; Llama: o_proj, down_proj
        r"(\.output\.dense|\.attn\.c_proj|\.mlp\.c_proj|\.self_attn\.o_proj|\.mlp\.down_proj)$",
        layer_norm=False,
        placement="after the attention output projection and after the MLP output projection, before each residual add",
    ),
    "adapter_l": AdapterStyle(
        "adapter_l",
        # BERT: the block's output (BertOutput: dense -> residual -> LayerNorm); GPT-2 and Llama: the MLP
        r"(\.layer\.\d+\.output|\.mlp)$",
        layer_norm=True,
        placement="after the MLP (BERT: after the block's LayerNorm), with a LayerNorm of its own",
    ),
}


def hidden_size(model: nn.Module) -> int:
    """The residual-stream width ``d`` of a Hugging Face model (``config.hidden_size`` or GPT-2's ``n_embd``)."""
    config = getattr(model, "config", None)
    d = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not isinstance(d, int):
        raise AppConfigError(
            f"bottleneck adapters need the model's width: {type(model).__name__} has no config.hidden_size; "
            "use a Hugging Face BERT, GPT-2 or Llama-family model"
        )
    return d


def add_adapters(
    model: nn.Module, style: str, size: int, make: Callable[[int, int, bool], BottleneckAdapter] | None = None
) -> list[str]:
    """Wrap every module of ``model`` that ``style`` places an adapter after (``AdapterAfter``); returns their names.

    ``size``: the bottleneck ``m``. Adds ``2·d·m + m + d`` parameters per adapter (``+ 2·d`` with a LayerNorm).
    """
    if style not in ADAPTER_STYLES:
        raise AppConfigError(f"adapter style {style!r} is not one of {sorted(ADAPTER_STYLES)}")
    spec, d = ADAPTER_STYLES[style], hidden_size(model)
    if any(isinstance(m, AdapterAfter) for m in model.modules()):
        raise AppConfigError(f"{type(model).__name__} already has bottleneck adapters; add {style} to a fresh model")
    pattern = re.compile(spec.where)
    names = [n for n, _ in model.named_modules() if n and pattern.search("." + n)]
    if not names:
        some = [n for n, _ in model.named_modules() if n.count(".") <= 4][:12]
        raise AppConfigError(
            f"lora.method={style}: no module of {type(model).__name__} is where {style} goes ({spec.placement}; "
            f"BERT, GPT-2 and Llama layouts are known); modules include {some}"
        )
    make = make or (lambda d_, m_, ln: BottleneckAdapter(d_, m_, layer_norm=ln))
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, leaf)
        ref = next(base.parameters())
        adapter = make(d, size, spec.layer_norm).to(device=ref.device, dtype=ref.dtype)
        setattr(parent, leaf, AdapterAfter(base, adapter))
    return names


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names of the adapters' own parameters in ``model`` (``....adapter.down.weight`` and so on)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterAfter):
            out += [f"{name}.adapter.{n}" if name else f"adapter.{n}" for n, _ in module.adapter.named_parameters()]
    return out
