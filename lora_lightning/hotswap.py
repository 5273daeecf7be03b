"""Hot-swapping adapters of other ranks and alphas into a ``torch.compile``'d model without recompiling
(PEFT's ``prepare_model_for_compiled_hotswap`` and ``hotswap_adapter``).

Loading an adapter of the *same* structure copies into the same tensors, so a compiled graph keeps working
(:func:`~lora_lightning.load_adapter`). An adapter of another rank has tensors of other shapes and another
scaling ``alpha/r``, both of which a compiled graph was specialised on. :func:`prepare_for_hotswap` therefore,
once, before compiling:

* zero-pads every adapter to ``target_rank`` rows of ``A`` (per block of a fused layer) and columns of ``B``:
  ``[B, 0]·[A; 0] = B·A`` exactly, so the outputs do not change (up to the summation order of the zeros);
* turns each layer's scaling into a 0-dim tensor, so a new ``alpha/r`` is written into it rather than into a
  Python number the graph holds as a constant.

:func:`hotswap_tensors` (and :func:`~lora_lightning.hotswap_adapter` for files) then writes an adapter of
rank ``r <= target_rank`` into the padded tensors — the leading ``r`` rows/columns, zeros after — and its
scaling into the tensor: same tensors, same shapes, no recompilation.

The adapter's true rank travels on its scaling tensor (``scaling.lora_rank``, with the exact
``scaling.lora_scaling``), so named adapters keep theirs when they are switched; :func:`unpadded` shows the
active adapter at its true rank, which is what ``save_adapter`` and ``export_peft_adapter`` write: files never
hold the zero padding.

Padding is meaningful where an adapter is ``A``/``B`` plus rank-free tensors (plain LoRA, rsLoRA, DoRA's
magnitude vector). Variants whose other tensors are sized by the rank (AdaLoRA's ``E``, VeRA's ``d``) or
whose initialisation rewrote the frozen base from the adapter (PiSSA, OLoRA, LoftQ) are refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from . import registry
from .errors import AdapterMismatchError, LoRAConfigError, MergeStateError, NotInjectedError
from .injection import BANK, adapter_param_names, get_lora_state, has_lora, lora_layers
from .layers import LoRALayer
from .named import _refresh_record, active_adapter, list_adapters, named_adapters
from .record import LoRAState, align_names, check_fingerprint
from .state import injected_handle

# leaf -> the dimension of the rank in that tensor (A: n·r x d_in..., B: d_out x r ...)
PADDED = {"lora_A": 0, "lora_B": 1}
# adapter tensors whose size does not depend on the rank: copied as they are
RANK_FREE = ("lora_magnitude",)
FIX = "prepare_for_hotswap(model, target_rank={r})"


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wraps (``OptimizedModule._orig_mod``), or ``model`` itself."""
    inner = model._modules.get("_orig_mod") if type(model).__name__ == "OptimizedModule" else None
    return inner if isinstance(inner, nn.Module) else model


def _holders(layer: LoRALayer) -> dict[str, Any]:
    """Adapter name -> what holds its tensors and ``r``/``alpha``/``scaling`` in ``layer``: the layer itself
    for the active adapter, its ``lora_bank`` slots for the others."""
    out: dict[str, Any] = {layer.lora_active: layer}
    bank = layer._modules.get(BANK)  # type: ignore[attr-defined]
    if bank is not None:
        out.update(dict(bank.items()))
    return out


def padded_rank(holder: Any) -> int | None:
    """The rank an adapter's tensors are padded to (its ``r``), or ``None`` if it was not prepared."""
    s = holder.scaling
    return int(holder.r) if isinstance(s, Tensor) and hasattr(s, "lora_rank") else None


def true_rank(holder: Any) -> int:
    """The adapter's own rank (the leading rows of ``A``/columns of ``B``; zeros after it)."""
    s = holder.scaling
    return int(s.lora_rank) if isinstance(s, Tensor) and hasattr(s, "lora_rank") else int(holder.r)


def _scaling_tensor(value: float, rank: int, like: Tensor) -> Tensor:
    """A 0-dim tensor holding ``value`` (in float64 for float64 adapters, else float32: what a Python number
    becomes in the products), with the true rank and the exact value on it."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    s = torch.tensor(float(value), dtype=dtype, device=like.device)
    s.lora_rank, s.lora_scaling = int(rank), float(value)  # type: ignore[attr-defined]
    return s


def _blocks(A: Tensor, r: int) -> int:
    """How many rank blocks ``A`` stacks (a fused layer: one per adapted part)."""
    return A.shape[0] // r


def _pad(t: Tensor, leaf: str, r: int, target: int, n: int) -> Tensor:
    """``t`` (of rank ``r``) zero-padded to rank ``target``: ``A``'s rows block by block, ``B``'s columns."""
    shape = list(t.shape)
    if leaf == "lora_A":
        shape[0] = n * target
        out = t.new_zeros(shape)
        for i in range(n):
            out[i * target : i * target + r] = t[i * r : (i + 1) * r]
        return out
    shape[1] = target
    out = t.new_zeros(shape)
    out[:, :r] = t
    return out


def _unpad(t: Tensor, leaf: str, r: int, padded: int, n: int) -> Tensor:
    """The leading rank-``r`` part of a tensor padded to ``padded``: the inverse of :func:`_pad`."""
    if leaf == "lora_A":
        return torch.cat([t[i * padded : i * padded + r] for i in range(n)], 0)
    return t[:, :r]


def check_hotswappable(model: nn.Module, what: str) -> None:
    """Raise (one line) if padding the model's adapters would not give the same adapters at another rank."""
    config = get_lora_state(model).config
    variant = registry.variant(config.variant)
    if variant.rewrites_base:
        raise LoRAConfigError(
            f"{what}: variant={config.variant!r} rewrote the frozen base from the adapter at initialisation, so an "
            "adapter of another rank needs another base; hot-swap plain LoRA (rsLoRA) or DoRA adapters, and load "
            "these with load_adapter()"
        )
    for name, layer in lora_layers(model).items():
        sized = sorted(set(layer.adapter_names) - set(PADDED) - set(RANK_FREE))
        if sized:
            raise LoRAConfigError(
                f"{what}: variant={config.variant!r} cannot be padded to another rank ({name} holds {sized}, sized "
                "by or tied to the rank); hot-swap works for plain LoRA (rsLoRA) and DoRA adapters"
            )
        if layer.merged:
            raise MergeStateError(f"{what}: {name} is merged into the base weights; call unmerge_lora(model) first")


def prepare_for_hotswap(model: nn.Module, target_rank: int) -> None:
    """Pad every adapter of ``model`` (each named adapter too) to ``target_rank`` and make each layer's
    scaling a tensor, so adapters of rank ``<= target_rank`` and any alpha can later be swapped in with
    :func:`~lora_lightning.hotswap_adapter` without ``torch.compile`` recompiling. Outputs are unchanged (the
    padding is zeros). Call it after loading the first adapter and before compiling; calling it again (a
    named adapter added since, or a larger ``target_rank``) pads what is not padded yet.

    Refused (one line, nothing changed): a compiled model, a model without adapters, ``target_rank`` smaller
    than an adapter's rank, merged adapters, and variants padding does not fit (AdaLoRA, VeRA, PiSSA, OLoRA,
    LoftQ). Parameters are replaced by padded ones: build optimizers afterwards.
    """
    if unwrap_compiled(model) is not model:
        raise LoRAConfigError(
            "prepare_for_hotswap got a torch.compile'd model; prepare the model itself, then compile it (preparing "
            "afterwards would recompile)"
        )
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
        raise LoRAConfigError(
            f"prepare_for_hotswap: target_rank={target_rank!r} must be a positive int (the largest rank to swap in)"
        )
    if not has_lora(model):
        raise NotInjectedError(
            "prepare_for_hotswap: the model has no LoRA adapters; load the first adapter (load_adapter or "
            "inject_lora), then prepare it"
        )
    check_hotswappable(model, "prepare_for_hotswap")
    layers = lora_layers(model)
    ranks = [(int(h.r), n, a, padded_rank(h)) for n, layer in layers.items() for a, h in _holders(layer).items()]
    largest, where, adapter, padded = max(ranks, key=lambda t: t[0])
    if largest > target_rank:
        what = "is already padded to" if padded else "has"
        raise LoRAConfigError(
            f"prepare_for_hotswap: target_rank={target_rank} is too small: adapter {adapter!r} at {where} {what} "
            f"rank {largest}; use {FIX.format(r=largest)} or larger"
        )
    plan = []  # everything is built before anything changes
    for layer in layers.values():
        for holder in _holders(layer).values():
            r = int(holder.r)
            A = holder.lora_A
            n = _blocks(A, r)
            tensors = {}
            if r != target_rank:
                for leaf in PADDED:
                    p = getattr(holder, leaf)
                    with torch.no_grad():
                        tensors[leaf] = nn.Parameter(_pad(p.detach(), leaf, r, target_rank, n), p.requires_grad)
            s = holder.scaling
            scaling = s if padded_rank(holder) is not None else _scaling_tensor(float(s), r, A)
            plan.append((holder, tensors, scaling))
    for holder, tensors, scaling in plan:
        for leaf, p in tensors.items():
            setattr(holder, leaf, p)
        holder.r, holder.scaling = target_rank, scaling
    handle = injected_handle(model)
    _refresh_record(model, handle, active_adapter(model))


@contextmanager
def unpadded(model: nn.Module) -> Iterator[None]:
    """Inside the block the active adapter is at its true rank (its tensors without the zero padding, its
    ``r`` and float scaling, the record to match): what files hold. Everything is put back after it."""
    layers = [layer for layer in lora_layers(model).values() if padded_rank(layer) is not None]
    if not layers:
        yield
        return
    handle = injected_handle(model)
    record = handle.record
    kept = [(layer, layer.lora_A, layer.lora_B, layer.r, layer.scaling) for layer in layers]
    try:
        for layer, A, B, padded, s in kept:
            r = int(s.lora_rank)
            n = _blocks(A, padded)
            layer.lora_A = nn.Parameter(_unpad(A.detach(), "lora_A", r, padded, n), A.requires_grad)
            layer.lora_B = nn.Parameter(_unpad(B.detach(), "lora_B", r, padded, n), B.requires_grad)
            layer.r, layer.scaling = r, float(s.lora_scaling)
        _refresh_record(model, handle, active_adapter(model))
        yield
    finally:
        for layer, A, B, padded, s in kept:
            layer.lora_A, layer.lora_B, layer.r, layer.scaling = A, B, padded, s
        handle.record = record


def hotswap_tensors(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    saved: LoRAState,
    *,
    source: str = "adapter",
    on_base_mismatch: str = "raise",
    hint: str = "pass on_base_mismatch='warn' (or 'ignore')",
) -> None:
    """Write an adapter (``tensors`` keyed like the model's adapter keys, ``saved`` its record) into the active
    adapter of a prepared model, in place: same tensors, same shapes (rank ``r <= target_rank`` in the leading
    rows/columns, zeros after), its scaling written into the scaling tensors. Everything is checked first; a
    refusal leaves the model as it was. The active adapter's config becomes the swapped-in adapter's."""
    model = unwrap_compiled(model)
    if not has_lora(model):
        raise NotInjectedError(f"hotswap_adapter: the model has no LoRA adapters; load {source} with load_adapter()")
    state = get_lora_state(model)
    check_hotswappable(model, "hotswap_adapter")
    layers = lora_layers(model)
    needed = max(int(s.get("r", 0)) for s in saved.modules.values()) if saved.modules else 1
    unprepared = [n for n, layer in layers.items() if padded_rank(layer) is None]
    if unprepared:
        added = is_prepared_anywhere(model)
        why = (
            f"adapter {active_adapter(model)!r} was added after prepare_for_hotswap"
            if added
            else "the model is not prepared for hot-swapping"
        )
        raise LoRAConfigError(
            f"hotswap_adapter: {why} ({unprepared[0]} is not padded); call "
            f"{FIX.format(r=max(needed, *(int(layer.r) for layer in layers.values())))} after loading the first "
            "adapter and before torch.compile"
        )
    ours = registry.variant(state.config.variant).name
    theirs = registry.variant(saved.config.variant).name
    if ours != theirs:
        raise AdapterMismatchError(
            f"hotswap_adapter: {source} is variant={saved.config.variant!r}, the model's adapters "
            f"variant={state.config.variant!r}; a swap keeps the layers: use switch_adapter() (which recompiles)"
        )
    mapping = align_names(list(saved.modules), list(layers))
    if mapping is None:
        new = sorted(set(saved.modules) - set(layers))
        gone = sorted(set(layers) - set(saved.modules))
        raise AdapterMismatchError(
            f"hotswap_adapter: {source} adapts other modules than the model's adapters (only in it: {new[:3]}, only "
            f"in the model: {gone[:3]}); a swap cannot add or remove adapters: swap adapters with the same targets, or "
            "use switch_adapter() (which recompiles)"
        )
    structures = {mapping[n]: s for n, s in saved.modules.items()}
    for name, layer in layers.items():
        s, mine = structures[name], layer.structure()
        bad = [k for k in ("kind", "d_in", "d_out", "parts") if k in s and s[k] != mine[k]]
        if bad:
            raise AdapterMismatchError(
                f"hotswap_adapter: {source} adapts {name} with {bad[0]}={s[bad[0]]!r}, the model with "
                f"{mine[bad[0]]!r}; it was made for another model: load it onto that one"
            )
    too_big = [(int(structures[n]["r"]), n) for n, layer in layers.items() if int(structures[n]["r"]) > layer.r]
    if too_big:
        r, name = max(too_big)
        raise LoRAConfigError(
            f"hotswap_adapter: {source} has rank r={r} at {name}, above the padded rank {layers[name].r}; call "
            f"{FIX.format(r=r)} before torch.compile to swap adapters up to that rank"
        )
    if float(saved.config.dropout) != float(state.config.dropout):
        raise LoRAConfigError(
            f"hotswap_adapter: {source} has dropout={saved.config.dropout}, the model's adapters "
            f"dropout={state.config.dropout}; a swap keeps the layers' dropout: swap adapters with the same dropout"
        )
    if sorted(align_names(saved.modules_to_save, state.modules_to_save) or saved.modules_to_save) != sorted(
        state.modules_to_save
    ):
        raise AdapterMismatchError(
            f"hotswap_adapter: {source} has modules_to_save {saved.modules_to_save}, the model "
            f"{state.modules_to_save}; swap adapters with the same modules_to_save"
        )
    if saved.config.bias != state.config.bias:
        raise AdapterMismatchError(
            f"hotswap_adapter: {source} has bias={saved.config.bias!r}, the model's adapters "
            f"bias={state.config.bias!r}; swap adapters with the same bias setting"
        )
    check_fingerprint(saved.fingerprint, state.fingerprint, on_base_mismatch, source, hint)
    # the tensors: keys and shapes (the padded leaves at the adapter's own rank)
    wanted = adapter_param_names(model)
    keys = align_names(list(tensors), wanted) or {k: k for k in tensors}
    got = {keys[k]: v for k, v in tensors.items()}
    missing = [k for k in wanted if k not in got]
    unexpected = [k for k in got if k not in set(wanted)]
    if missing or unexpected:
        raise AdapterMismatchError(
            f"hotswap_adapter: {source} does not hold the model's adapter keys (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); it was made for other targets or another architecture"
        )
    writes: list[tuple[Tensor, Tensor]] = []
    fills: list[tuple[LoRALayer, int, float, float]] = []
    params = model.state_dict(keep_vars=True)
    for key in wanted:
        owner, _, leaf = key.rpartition(".")
        value, target = got[key], params[key]
        layer = layers.get(owner)
        if layer is not None and leaf in PADDED:
            r, padded = int(structures[owner]["r"]), int(layer.r)
            n = _blocks(target, padded) if leaf == "lora_A" else 1
            expected = list(target.shape)
            expected[PADDED[leaf]] = n * r if leaf == "lora_A" else r
            if list(value.shape) != expected:
                raise AdapterMismatchError(
                    f"hotswap_adapter: {key} has shape {tuple(value.shape)} in {source}, expected {tuple(expected)} "
                    f"for rank {r}; the file's record and tensors disagree: re-save it with save_adapter()"
                )
            value = _pad(value.detach(), leaf, r, padded, n)
        elif list(value.shape) != list(target.shape):
            raise AdapterMismatchError(
                f"hotswap_adapter: {key} has shape {tuple(value.shape)} in {source}, {tuple(target.shape)} in the "
                "model; it was made for another architecture"
            )
        writes.append((target, value.to(device=target.device, dtype=target.dtype)))
    for name, layer in layers.items():
        s = structures[name]
        fills.append((layer, int(s["r"]), float(s["alpha"]), float(s["scaling"])))
    # nothing can fail from here: copies into tensors of the same shape, dtype and device
    with torch.no_grad():
        for target, value in writes:
            target.copy_(value)
        for layer, r, alpha, scaling in fills:
            s = layer.scaling
            s.fill_(scaling)
            s.lora_rank, s.lora_scaling = r, scaling  # type: ignore[union-attr]
            layer.alpha = alpha
    handle = injected_handle(model)
    named = named_adapters(model)
    named.configs[named.active] = saved.config
    _refresh_record(model, handle, named.active)


def is_prepared_anywhere(model: nn.Module) -> bool:
    """Whether any adapter of any layer is padded (the model was prepared, maybe before a named adapter was
    added)."""
    return any(padded_rank(h) is not None for layer in lora_layers(model).values() for h in _holders(layer).values())


def is_padded(model: nn.Module, adapter_name: str) -> bool:
    """Whether the named adapter's tensors are padded in any layer (it was prepared for hot-swapping)."""
    for layer in lora_layers(unwrap_compiled(model)).values():
        holder = _holders(layer).get(adapter_name)
        if holder is not None and padded_rank(holder) is not None:
            return True
    return False


def check_name(model: nn.Module, adapter_name: str | None) -> str:
    """The adapter a swap writes into: ``adapter_name`` (which must exist) or the active one."""
    model = unwrap_compiled(model)
    if adapter_name is None:
        return active_adapter(model)
    names = list_adapters(model)
    if adapter_name not in names:
        raise AdapterMismatchError(
            f"hotswap_adapter: adapter {adapter_name!r} does not exist; the model holds {names} (a swap writes into "
            "an adapter prepared with prepare_for_hotswap: add_adapter it, then prepare again, before compiling)"
        )
    return adapter_name


__all__ = ["hotswap_tensors", "unwrap_compiled", "is_padded", "prepare_for_hotswap", "unpadded"]
