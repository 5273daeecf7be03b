"""Merging adapters into the base weights (zero added latency, paper §4.1) and back.

``merge_lora``: ``W0 <- W0 + ΔW`` for every adapted matrix; ``unmerge_lora`` subtracts it again (exact
up to the round-off of the base dtype); ``merge_and_unload`` merges and swaps each LoRA layer back for
its base layer, so the model has the base architecture again; ``merged_state_dict`` gives the
merged weights without changing the model. (Switching between adapter files lives with the file
I/O, :func:`lora_lightning.switch_adapter`.)
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from .errors import MergeStateError
from .injection import get_lora_state, lora_layers, remove_lora
from .layers import LoRALayer, is_lora_layer, is_lora_module
from .sharding import check_not_sharded
from .state import lora_handle


def is_merged(model: nn.Module) -> bool:
    """True when every LoRA layer of ``model`` is merged (False when there are none)."""
    layers = list(lora_layers(model).values())
    return bool(layers) and all(layer.merged for layer in layers)


def check_mergeable(model: nn.Module) -> None:
    """Raise :class:`MergeStateError` if an adapted weight is also used by a module the adapter does not
    wrap (tied weights, e.g. GPT-2's ``wte`` and ``lm_head`` with only one targeted): merging would change
    that module too."""
    wrappers = {id(m) for m in model.modules() if is_lora_module(m)}
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in wrappers:
            continue
        for param in module._parameters.values():
            if param is not None:
                users.setdefault(id(param), []).append(name)
    for name, layer in lora_layers(model).items():
        weight = getattr(layer, layer.base_weight_name)
        others = sorted(set(users.get(id(weight), [])))
        if others:
            raise MergeStateError(
                f"the weight of {name} is tied to {others[:3]}, which the adapter does not wrap: merging would change "
                f"{others[0]} as well. Keep the adapters unmerged (they compute the right thing), untie the weights, or "
                f"target {others[0]} too (plain LoRA then gives both modules one shared adapter)"
            )


def adapted_modules(model: nn.Module) -> dict[str, LoRALayer]:
    """``{name: layer}`` of every layer applying an adapter, under every name it has: the layers holding one
    and those reading a tied layer's (their merged weight is the same tensor, seen in their own layout)."""
    return {
        n: m  # type: ignore[misc]
        for n, m in model.named_modules(remove_duplicate=False)
        if is_lora_layer(m) or (isinstance(m, LoRALayer) and m.lora_tie is not None)
    }


def _fold_all(model: nn.Module, merge: bool) -> int:
    """Merge (or unmerge) every LoRA layer, after checking none is in that state already."""
    get_lora_state(model)
    check_not_sharded(model, "merge_lora" if merge else "unmerge_lora")
    if merge:
        check_mergeable(model)
    layers = lora_layers(model)
    wrong = [n for n, layer in layers.items() if layer.merged == merge]
    if wrong:
        raise MergeStateError(
            f"{len(wrong)} LoRA layer(s) are already merged (e.g. {wrong[0]}); merging again would add ΔW twice. "
            "Call unmerge_lora(model) first"
            if merge
            else f"{len(wrong)} LoRA layer(s) are not merged (e.g. {wrong[0]}); there is nothing to unmerge. "
            "Call merge_lora(model) first"
        )
    for layer in layers.values():
        layer.merge() if merge else layer.unmerge()
    return len(layers)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight. Returns the number of merged matrices."""
    return _fold_all(model, merge=True)


def unmerge_lora(model: nn.Module) -> int:
    """Subtract every adapter from its base weight. Returns the number of unmerged matrices."""
    return _fold_all(model, merge=False)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge (if not merged yet) and replace LoRA layers by plain base layers, in place.

    The result has exactly the base model's modules and state-dict keys, with ``W0 + ΔW`` of the active
    adapter; other named adapters are dropped, with a warning naming them.
    """
    if not is_merged(model):
        merge_lora(model)
    handle = lora_handle(model)
    named = handle.adapters if handle is not None else None
    if named is not None and len(named.configs) > 1:
        others = [n for n in named.configs if n != named.active]
        warnings.warn(
            f"merge_and_unload merged adapter {named.active!r} and dropped {others}: save them first with "
            "save_adapter(model, path, adapter_name=...) to keep them",
            stacklevel=2,
        )
    return remove_lora(model)


def merged_state_dict(model: nn.Module, submodule: str = "") -> dict[str, Tensor]:
    """The base architecture's state dict with every ΔW folded in (the model is not modified).

    Keys are those of the model before injection; adapter tensors are dropped; a quantized base
    comes out dequantized. With ``submodule`` (e.g. ``"model"`` inside a LightningModule) only that
    module's tensors are kept, keyed relative to it, ready for the bare network's ``load_state_dict``.
    """
    check_mergeable(model)
    layers = adapted_modules(model)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if ".lora_bank." in f".{key}":  # inactive named adapters
            continue
        owner, _, leaf = key.rpartition(".")
        layer = layers.get(owner)
        if layer is not None and leaf in layer.state_names:
            continue
        if layer is not None and leaf == layer.base_weight_name:
            value = layer.merged_weight()  # stored layout: transposed for Conv1D, in_proj_weight for MHA
        out[key] = value
    if submodule:
        model.get_submodule(submodule)  # clear AttributeError for a wrong name
        prefix = submodule + "."
        out = {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}
    return out
