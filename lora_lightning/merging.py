"""Merging adapters into the base weights (zero added latency) and switching between adapters.

``merge_lora``: ``W0 <- W0 + (alpha/r)·B·A`` for every adapted matrix; ``unmerge_lora`` subtracts
it again (exact up to the round-off of the base dtype); ``merge_and_unload`` merges and swaps
each LoRA layer back for the base layer, so the model has the base architecture again;
``switch_adapter`` replaces one task's adapter by another on the same base (paper §4.1).
"""

from __future__ import annotations

import os

from torch import nn

from .checkpoint import check_config_compatible, load_adapter, read_adapter_config
from .errors import AdapterMismatchError, MergeStateError
from .injection import get_lora_state, has_lora, lora_layers, remove_lora


def is_merged(model: nn.Module) -> bool:
    """True when every LoRA layer of ``model`` is merged (False when there are none)."""
    layers = list(lora_layers(model).values())
    return bool(layers) and all(layer.merged for layer in layers)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight. Returns the number of merged matrices."""
    get_lora_state(model)
    layers = lora_layers(model)
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise MergeStateError(
            f"{len(merged)} LoRA layer(s) are already merged (e.g. {merged[0]}); merging again would add ΔW twice. "
            "Call unmerge_lora(model) first"
        )
    for layer in layers.values():
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Subtract every adapter from its base weight. Returns the number of unmerged matrices."""
    get_lora_state(model)
    layers = lora_layers(model)
    unmerged = [n for n, layer in layers.items() if not layer.merged]
    if unmerged:
        raise MergeStateError(
            f"{len(unmerged)} LoRA layer(s) are not merged (e.g. {unmerged[0]}); there is nothing to unmerge. "
            "Call merge_lora(model) first"
        )
    for layer in layers.values():
        layer.unmerge()
    return len(layers)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge (if not merged yet) and replace LoRA layers by plain base layers, in place.

    The result has exactly the base model's modules and state-dict keys, with ``W0 + ΔW``.
    """
    if not is_merged(model):
        merge_lora(model)
    return remove_lora(model)


def switch_adapter(model: nn.Module, path: str | os.PathLike, *, on_base_mismatch: str = "raise") -> nn.Module:
    """Replace the current adapter by the one in ``path``, keeping the merged/unmerged state.

    If the new adapter has another structure (targets, ranks), the old LoRA layers are removed
    (after unmerging) and the new ones injected.
    """
    if not has_lora(model):
        load_adapter(model, path, on_base_mismatch=on_base_mismatch)
        return model
    was_merged = is_merged(model)
    new_config = read_adapter_config(path)  # fails before anything changes
    if was_merged:
        unmerge_lora(model)
    try:
        check_config_compatible(new_config, get_lora_state(model).config)
    except AdapterMismatchError:
        remove_lora(model)
    load_adapter(model, path, on_base_mismatch=on_base_mismatch)
    if was_merged:
        merge_lora(model)
    return model
