"""Merging adapters into the base weights (zero added latency, paper §4.1) and back.

``merge_lora``: ``W0 <- W0 + ΔW`` for every adapted matrix; ``unmerge_lora`` subtracts it again (exact
up to the round-off of the base dtype); ``merge_and_unload`` merges and swaps each LoRA layer back for
its base layer, so the model has the base architecture again; ``merged_state_dict`` gives the
merged weights without changing the model. ``safe_merge=True`` (PEFT's option) first computes every
merged weight in a copy and raises :class:`NonFiniteError` naming the module if one holds inf/NaN, before
any weight changes. (Switching between adapter files lives with the file I/O,
:func:`lora_lightning.switch_adapter`.)

Also here: the task-tensor maths of PEFT's adapter merging (``peft.utils.merge_utils``: magnitude and random
pruning, TIES sign election, disjoint merge), used by :func:`lora_lightning.add_weighted_adapter`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .errors import MergeStateError, NonFiniteError
from .injection import get_lora_state, lora_layers, remove_lora
from .layers import LoRALayer, is_lora_layer, is_lora_module
from .sharding import check_not_sharded
from .state import lora_handle
from .tokens import ROWS as TOKEN_ROWS
from .tokens import TrainableTokens, token_modules, token_readers


def is_merged(model: nn.Module) -> bool:
    """True when every LoRA layer (and trainable-tokens module) of ``model`` is merged (False when there are none)."""
    layers = list(lora_layers(model).values())
    tokens = token_modules(model).values()
    return bool(layers) and all(layer.merged for layer in layers) and all(t.token_merged for t in tokens)


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
                f"{others[0]} as well. Keep the adapters unmerged (they compute the right thing), untie the weights, "
                "or "
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


def check_finite_merge(model: nn.Module, layers: dict[str, LoRALayer] | None = None) -> None:
    """``safe_merge``: compute every layer's merged weight ``W0 + ΔW`` in a copy (the model is not changed) and
    raise :class:`NonFiniteError` naming the first module whose merged weight holds inf or NaN."""
    layers = lora_layers(model) if layers is None else layers
    for name, layer in layers.items():
        with torch.no_grad():
            merged = layer.merged_weight()  # a copy with ΔW folded in (the weight itself if already merged)
            if bool(torch.isfinite(merged).all()):
                continue
            bad = int((~torch.isfinite(merged)).sum())
            stored = getattr(layer, layer.base_weight_name)  # a quantized base: packed integers
            if layer.merged:
                cause = "its merged weight already holds them"
            elif not bool(torch.isfinite(layer.delta_weight()).all()):
                cause = "its adapter's update ΔW holds inf/NaN (check the adapter's tensors, e.g. lora_B)"
            elif stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
                cause = "its base weight holds inf/NaN"
            else:
                cause = f"W0 + ΔW overflows {merged.dtype}"
        raise NonFiniteError(
            f"safe_merge: merging into {name} gives {bad} non-finite value(s): {cause}; nothing was merged "
            "(fix or retrain that adapter, or leave it unmerged)"
        )
    for name, module in token_modules(model).items():
        rows = module.merged_weight().index_select(0, module.token_indices)
        if not bool(torch.isfinite(rows).all()):
            raise NonFiniteError(
                f"safe_merge: merging the trainable token rows into {name} gives {int((~torch.isfinite(rows)).sum())} "
                "non-finite value(s); nothing was merged (fix or retrain those rows, or leave them unmerged)"
            )


def _fold_all(model: nn.Module, merge: bool, safe_merge: bool = False) -> int:
    """Merge (or unmerge) every LoRA layer, after checking none is in that state already (and, with
    ``safe_merge``, that every merged weight is finite)."""
    get_lora_state(model)
    check_not_sharded(model, "merge_lora" if merge else "unmerge_lora")
    if merge:
        check_mergeable(model)
    layers = lora_layers(model)
    tokens = token_modules(model)
    wrong = [n for n, layer in layers.items() if layer.merged == merge] + [
        n for n, t in tokens.items() if t.token_merged == merge
    ]
    if wrong:
        raise MergeStateError(
            f"{len(wrong)} LoRA layer(s) are already merged (e.g. {wrong[0]}); merging again would add ΔW twice. "
            "Call unmerge_lora(model) first"
            if merge
            else f"{len(wrong)} LoRA layer(s) are not merged (e.g. {wrong[0]}); there is nothing to unmerge. "
            "Call merge_lora(model) first"
        )
    if merge and safe_merge:
        check_finite_merge(model, layers)  # every merged weight in a copy first: raises before any weight changes
    for layer in layers.values():
        layer.merge() if merge else layer.unmerge()
    for module in tokens.values():  # the token rows written into (or taken out of) their tables
        module.merge() if merge else module.unmerge()
    return len(layers) + len(tokens)


def merge_lora(model: nn.Module, safe_merge: bool = False) -> int:
    """Fold every adapter into its base weight (and trainable token rows into their tables). Returns the number of
    merged matrices (token tables included).

    ``safe_merge=True`` (as PEFT's): every merged weight is first computed in a copy and checked finite; if one
    holds inf/NaN, :class:`NonFiniteError` names its module and no weight of the model has changed."""
    return _fold_all(model, merge=True, safe_merge=safe_merge)


def unmerge_lora(model: nn.Module) -> int:
    """Subtract every adapter from its base weight. Returns the number of unmerged matrices."""
    return _fold_all(model, merge=False)


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge (if not merged yet) and replace LoRA layers by plain base layers, in place.

    The result has exactly the base model's modules and state-dict keys, with ``W0 + ΔW`` of the active
    adapter; other named adapters are dropped, with a warning naming them. ``safe_merge=True``: as in
    :func:`merge_lora` (a model merged already has its merged weights checked), raising before anything changes.
    """
    if not is_merged(model):
        merge_lora(model, safe_merge=safe_merge)
    elif safe_merge:
        check_finite_merge(model)
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
    tokens: dict[str, TrainableTokens] = token_readers(model)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if ".lora_bank." in f".{key}":  # inactive named adapters
            continue
        owner, _, leaf = key.rpartition(".")
        layer = layers.get(owner)
        if layer is not None and leaf in layer.state_names:
            continue
        if owner in tokens and leaf in (TOKEN_ROWS, "token_indices", "token_original"):
            continue
        if owner in tokens and leaf == "weight":  # the table with the token rows written in
            value = tokens[owner].merged_weight()
        if layer is not None and leaf == layer.base_weight_name:
            value = layer.merged_weight()  # stored layout: transposed for Conv1D, in_proj_weight for MHA
        elif key in layers:  # a parameter target: its layer saves the weight under the parameter's own name
            value = layers[key].merged_weight()
        out[key] = value
    if submodule:
        model.get_submodule(submodule)  # clear AttributeError for a wrong name
        prefix = submodule + "."
        out = {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}
    return out


# --------------------------------------------------------------------------- merging adapters (PEFT's merge_utils)
# The same operations, in the same order, as peft.utils.merge_utils (0.21.2), so that add_weighted_adapter's results are
# equal to PEFT's; random pruning also takes a ``generator`` (PEFT draws from torch's global generator).
def magnitude_prune_tensor(tensor: Tensor, density: float) -> Tensor:
    """Keep the ``int(density·numel)`` entries of largest magnitude, zero the rest (``density >= 1``: unchanged)."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[top[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_prune_tensor(tensor: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE: keep each entry with probability ``density`` (a Bernoulli mask drawn from ``generator``, torch's
    global one by default, over a tensor of ``tensor``'s shape and strides) and rescale by ``1/density``."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density), generator=generator)
    return tensor * mask / density


def majority_sign_mask(stacked: Tensor, method: str = "total") -> Tensor:
    """TIES sign election over dim 0: ``total`` by the sign of the sum, ``frequency`` by the sign count (ties: +)."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def merge_task_tensors(
    how: str,
    tensors: Sequence[Tensor],
    weights: Tensor,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> Tensor:
    """PEFT's ``task_arithmetic`` / ``magnitude_prune`` / ``ties`` / ``dare_linear`` / ``dare_ties`` of ``tensors``
    (``how`` is one of ``linear``, ``magnitude_prune``, ``ties``, ``dare_linear``, ``dare_ties``): prune each
    tensor, stack, elect the signs (on the pruned, unweighted tensors), weight, and sum — the TIES kinds divide
    each entry by the number of tensors agreeing with the elected sign (at least 1)."""
    if how in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune_tensor(t, density) for t in tensors]  # type: ignore[arg-type]
    elif how in ("dare_linear", "dare_ties"):
        tensors = [random_prune_tensor(t, density, generator) for t in tensors]  # type: ignore[arg-type]
    elif how != "linear":
        raise ValueError(f"unknown task-tensor merge {how!r}")
    stacked = torch.stack(list(tensors), dim=0)
    mask = majority_sign_mask(stacked, majority_sign_method) if how in ("ties", "dare_ties") else None
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))
    if mask is None:
        return weighted.sum(dim=0)
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)
