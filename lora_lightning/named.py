"""Several named adapters on one frozen base, in PEFT's vocabulary, as functions on any ``nn.Module``.

The adapter injected first is named ``"default"`` (the single-adapter API keeps working on it).
Each adapter is a full set of tensors: ``A``/``B`` for every adapted matrix plus its own copy of
the ``modules_to_save``. The *active* adapter sits in the layers' usual slots (``lora_A``,
``lora_B``, the ``modules_to_save`` parameters), so training, merging, saving, PEFT export and
checkpoints act on it exactly as with one adapter; the others wait in ``<module>.lora_bank[name]``
(their keys in a checkpoint: ``...query.lora_bank.<name>.lora_A``). :func:`set_adapter` swaps
tensor *objects* between the slots and the bank — no copy, nothing re-created — and only the
active adapter requires grad. Which adapters exist and which is active is kept in the model's
:class:`~lora_lightning.state.LoRAHandle`.

* :func:`add_adapter`, :func:`set_adapter`, :func:`delete_adapter`, :func:`list_adapters`,
  :func:`active_adapter`, :func:`disable_adapter` (a context manager: exactly the base outputs).
* :func:`add_weighted_adapter`: ``linear`` / ``cat`` / ``svd`` combinations and the pruning merges ``ties``,
  ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (and their ``_svd`` forms), PEFT's formulas.
* :func:`mixed_batch`: one forward where each sample names its adapter (or ``None``: the base).
* :func:`use_adapter`: a context manager that activates an adapter for a block of code.

Every operation is transactional: if it raises, the model is exactly as before (:func:`unchanged`).
Named adapters share the adapted modules (their ranks may differ), the ``modules_to_save`` and the
base; they are plain LoRA (``variant="lora"``, rsLoRA scaling and quantized bases included).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .config import LoRAConfig
from .errors import AdapterMismatchError, LoRAConfigError, MergeStateError, NotInjectedError
from .injection import BANK, has_lora, inject_lora, lora_layers, mark_trainable, planned_state
from .layers import AdapterSlots, LoRALayer, stream_generator
from .merging import merge_task_tensors
from .record import LoRAState
from .state import DEFAULT, LoRAHandle, NamedAdapters, get_lora_state, injected_handle, lora_handle
from .tokens import LEAVES as TOKEN_LEAVES
from .tokens import TrainableTokens, token_modules, token_record

# PEFT's combination types; the pruning ones (TIES, DARE, magnitude) act on A and B separately, their ``_svd`` forms
# on ΔW
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
COMBINATIONS = ("linear", "cat", "svd", *PRUNING, *(f"{p}_svd" for p in PRUNING))
SIGN_ELECTING = ("ties", "dare_ties", "ties_svd", "dare_ties_svd")
RANDOM = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")


# --------------------------------------------------------------------------- queries
def named_adapters(model: nn.Module) -> NamedAdapters:
    """The model's adapters; a model injected once holds one, ``"default"``."""
    return injected_handle(model).named()


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters ``model`` holds, in the order they were added."""
    return list(named_adapters(model).configs)


def active_adapter(model: nn.Module) -> str:
    return named_adapters(model).active


def has_named_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds more than one adapter (checkpoints then carry all of them)."""
    handle = lora_handle(model)
    return handle is not None and handle.adapters is not None and len(handle.adapters.configs) > 1


# --------------------------------------------------------------------------- carriers
def _carriers(model: nn.Module) -> dict[str, tuple[nn.Module, tuple[str, ...]]]:
    """Every module that holds adapter tensors, with the leaf names of those tensors: the LoRA layers
    (``lora_A``, ``lora_B``), the trainable-tokens modules (``token_rows``, ``token_indices``: each adapter its own
    rows) and each ``modules_to_save`` submodule with parameters of its own."""
    out: dict[str, tuple[nn.Module, tuple[str, ...]]] = {
        n: (m, tuple(m.adapter_names)) for n, m in lora_layers(model).items()
    }
    out |= {n: (m, TOKEN_LEAVES) for n, m in token_modules(model).items()}  # type: ignore[misc]
    for root in get_lora_state(model).modules_to_save:
        for sub_name, sub in model.get_submodule(root).named_modules():
            if isinstance(sub, (AdapterSlots, nn.ModuleDict)) and BANK in sub_name.split("."):
                continue
            leaves = tuple(k for k, p in sub._parameters.items() if p is not None)
            if leaves:
                out[f"{root}.{sub_name}" if sub_name else root] = (sub, leaves)
    return out


def _bank(module: nn.Module) -> nn.ModuleDict:
    bank = module._modules.get(BANK)
    if bank is None:
        bank = nn.ModuleDict()
        module.add_module(BANK, bank)
    return bank  # type: ignore[return-value]


def _swap(model: nn.Module, incoming: str, outgoing: str) -> None:
    """Move the active adapter's tensors to ``bank[outgoing]`` and ``bank[incoming]``'s into the slots."""
    for module, leaves in _carriers(model).values():
        bank = _bank(module)
        slots = bank[incoming]
        out = AdapterSlots(
            {leaf: getattr(module, leaf) for leaf in leaves},
            *((module.r, module.alpha, module.scaling) if isinstance(module, LoRALayer) else ()),
        )
        for leaf in leaves:
            setattr(module, leaf, getattr(slots, leaf))
        if isinstance(module, LoRALayer):
            module.r, module.alpha, module.scaling = slots.r, slots.alpha, slots.scaling
            module.lora_active = incoming
        del bank[incoming]
        bank[outgoing] = out


def _refresh_record(model: nn.Module, handle: LoRAHandle, name: str) -> None:
    """The model's record describes the active adapter."""
    old = handle.record
    assert old is not None
    structures = {n: layer.structure() for n, layer in lora_layers(model).items()}
    config = handle.named().configs[name]
    handle.record = LoRAState(config, structures, list(old.modules_to_save), old.fingerprint, token_record(model))


def check_adapter_name(name: Any) -> str:
    if not isinstance(name, str) or not name or "." in name or "/" in name or name.startswith("_"):
        raise LoRAConfigError(
            f"adapter name {name!r} is not valid: use a non-empty string without '.' or '/' that does not start "
            "with '_'"
        )
    return name


def _check_name(model: nn.Module, name: str, *, exists: bool) -> None:
    names = list_adapters(model)
    if exists and name not in names:
        raise AdapterMismatchError(f"adapter {name!r} does not exist; the model holds {names}")
    if not exists:
        check_adapter_name(name)
        if name in names:
            raise AdapterMismatchError(
                f"an adapter named {name!r} already exists ({names}); pick another name or delete_adapter it first"
            )


def _check_unmerged(model: nn.Module, what: str) -> None:
    if any(layer.merged for layer in lora_layers(model).values()):
        raise MergeStateError(
            f"{what}: the active adapter is merged into the base weights; call unmerge_lora(model) first"
        )


# --------------------------------------------------------------------------- transactions
@contextmanager
def unchanged(model: nn.Module) -> Iterator[None]:
    """If the block raises, put back exactly what named-adapter operations change: which adapters exist and
    which is active, each layer's slots, banks, rank/alpha/scaling, the record and ``requires_grad`` flags."""
    handle = lora_handle(model)
    if handle is None or handle.record is None:
        yield
        return
    named = handle.named()
    saved_named = NamedAdapters(named.active, dict(named.configs))
    saved_record = handle.record
    carriers = list(_carriers(model).values())
    slots = [  # a leaf is a parameter, or a buffer (trainable tokens' indices)
        (m._parameters if leaf in m._parameters else m._buffers, leaf, getattr(m, leaf))
        for m, leaves in carriers
        for leaf in leaves
    ]
    banks = [
        (m, m._modules.get(BANK), dict(m._modules[BANK].items()) if BANK in m._modules else None) for m, _ in carriers
    ]
    meta = [(m, m.r, m.alpha, m.scaling, m.lora_active) for m, _ in carriers if isinstance(m, LoRALayer)]
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        yield
    except BaseException:
        for where, leaf, p in slots:
            where[leaf] = p
        for m, bank, entries in banks:
            if bank is None:
                m._modules.pop(BANK, None)
            else:
                m._modules[BANK] = bank
                for key in list(bank.keys()):
                    if key not in entries:  # type: ignore[operator]
                        del bank[key]
                for key, value in entries.items():  # type: ignore[union-attr]
                    bank[key] = value
        for m, r, alpha, scaling, active in meta:
            m.r, m.alpha, m.scaling, m.lora_active = r, alpha, scaling, active
        handle.adapters, handle.record = saved_named, saved_record
        for p, g in grads.items():
            p.requires_grad_(g)
        raise


# --------------------------------------------------------------------------- adding and switching
def _config_for(model: nn.Module, name: str, config: Any) -> LoRAConfig:
    base = get_lora_state(model).config
    if config is None:
        return base
    if isinstance(config, LoRAConfig):
        return config
    if isinstance(config, Mapping):  # options overriding the model's config, e.g. {"r": 4}
        return LoRAConfig.from_dict(base.to_dict() | dict(config))
    raise LoRAConfigError(
        f"add_adapter({name!r}, config={config!r}): give a LoRAConfig, a dict of options overriding the model's "
        "(e.g. {'r': 4}), or None (the active adapter's config)"
    )


def _check_same_structure(model: nn.Module, name: str, config: LoRAConfig) -> LoRAState:
    if config.variant != "lora":
        raise LoRAConfigError(
            f"add_adapter({name!r}): variant={config.variant!r}; named adapters are plain LoRA (variant='lora', "
            "use_rslora and quantized bases included)"
        )
    state = get_lora_state(model)
    if state.config.variant != "lora":
        raise LoRAConfigError(
            f"add_adapter({name!r}): the model's adapters are variant={state.config.variant!r}; named adapters are "
            "plain LoRA"
        )
    if config.bias != "none" or config.quantize_base != state.config.quantize_base:
        raise LoRAConfigError(
            f"add_adapter({name!r}): bias={config.bias!r}, quantize_base={config.quantize_base!r} must be 'none' and "
            f"{state.config.quantize_base!r} (the base, biases included, is shared by every adapter)"
        )
    planned = planned_state(model, config)
    if set(planned.modules) != set(state.modules):
        extra, missing = (
            sorted(set(planned.modules) - set(state.modules)),
            sorted(set(state.modules) - set(planned.modules)),
        )
        raise AdapterMismatchError(
            f"add_adapter({name!r}): its targets adapt other modules than the model's adapters (new: {extra[:3]}, "
            f"not adapted by it: {missing[:3]}); named adapters share the adapted modules: use the same targets"
        )
    keys = ("kind", "d_in", "d_out", "parts")
    bad = [n for n in state.modules if any(planned.modules[n][k] != state.modules[n][k] for k in keys)]
    if bad:
        raise AdapterMismatchError(
            f"add_adapter({name!r}): {bad[:3]} would be adapted in another layout (fused parts differ)"
        )
    if sorted(planned.modules_to_save) != sorted(state.modules_to_save):
        raise AdapterMismatchError(
            f"add_adapter({name!r}): modules_to_save {planned.modules_to_save} differ from the model's "
            f"{state.modules_to_save}; "
            "named adapters have the same modules_to_save (each its own copy)"
        )
    if sorted(planned.tokens) != sorted(token_modules(model)):
        raise AdapterMismatchError(
            f"add_adapter({name!r}): it trains token rows of {sorted(planned.tokens) or 'no module'}, the model's "
            f"adapters of {sorted(token_modules(model)) or 'no module'}; named adapters train rows of the same "
            "embeddings (the indices may differ)"
        )
    return planned


def add_adapter(model: nn.Module, name: str, config: LoRAConfig | Mapping[str, Any] | None = None) -> None:
    """Add a new, freshly initialised adapter ``name`` (inactive; ``set_adapter`` activates it).

    A model without adapters is injected with ``config`` and its adapter is named ``name``. Otherwise
    ``config`` (default: the active adapter's; a dict: options overriding it) must adapt the same modules
    and keep the same ``modules_to_save``; ``r``/``alpha`` (and their patterns) may differ. Each
    ``modules_to_save`` copy starts from the module's values at injection, as in PEFT.
    """
    if not has_lora(model):
        check_adapter_name(name)
        if config is None:
            raise NotInjectedError(f"add_adapter({name!r}): the model has no adapters yet; pass a LoRAConfig")
        if isinstance(config, Mapping):
            config = LoRAConfig.from_dict(config)
        inject_lora(model, config)
        injected_handle(model).adapters = NamedAdapters(name, {name: config})
        for layer in lora_layers(model).values():
            layer.lora_active = name
        return
    _check_name(model, name, exists=False)
    config = _config_for(model, name, config)
    planned = _check_same_structure(model, name, config)
    handle = injected_handle(model)
    built: list[tuple[nn.Module, AdapterSlots]] = []
    for module_name, (module, leaves) in _carriers(model).items():
        if isinstance(module, LoRALayer):
            s = planned.modules[module_name]
            gen = None if config.init_seed is None else stream_generator(config.init_seed, module_name, s["r"])
            built.append((module, module.new_adapter_slots(s["r"], s["alpha"], s["scaling"], gen)))  # type: ignore[arg-type]
        elif isinstance(module, TrainableTokens):  # its rows at the new adapter's indices, from the table
            built.append((module, AdapterSlots(module.new_slots(planned.tokens[module_name]))))
        else:
            tensors = {}
            for leaf in leaves:
                current = getattr(module, leaf)
                start = handle.originals.get(f"{module_name}.{leaf}", current).detach()
                tensors[leaf] = nn.Parameter(
                    start.to(device=current.device, dtype=current.dtype).clone(), requires_grad=False
                )
            built.append((module, AdapterSlots(tensors)))
    with unchanged(model):  # nothing changes until every adapter tensor exists, and then all at once
        for module, slots in built:
            for p in slots.parameters():
                p.requires_grad_(False)
            _bank(module)[name] = slots
        handle.named().configs[name] = config


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter (the one forward uses, training updates and files hold).
    Tensor objects move between slots and bank: no copy, modules unchanged. Only it requires grad."""
    _check_name(model, name, exists=True)
    handle = injected_handle(model)
    named = handle.named()
    if name == named.active:
        return
    _check_unmerged(model, f"set_adapter({name!r})")
    with unchanged(model):
        _swap(model, name, named.active)
        named.active = name
        _refresh_record(model, handle, name)
        mark_trainable(model)


@contextmanager
def use_adapter(model: nn.Module, name: str, *, trainable: bool = False) -> Iterator[None]:
    """Activate ``name`` inside the block and the previous active adapter after it. ``trainable``:
    keep every adapter's ``requires_grad`` as it was (training several adapters in one step)."""
    previous = active_adapter(model)
    grads = {p: p.requires_grad for p in model.parameters()} if trainable else None
    set_adapter(model, name)
    if grads is not None:
        for p, g in grads.items():
            p.requires_grad_(g)
    try:
        yield
    finally:
        set_adapter(model, previous)
        if grads is not None:
            for p, g in grads.items():
                p.requires_grad_(g)


def adapter_tensors(model: nn.Module, name: str) -> list[Tensor]:
    """The tensor objects of adapter ``name`` (in the slots if active, else in the banks), in carrier order."""
    _check_name(model, name, exists=True)
    active = named_adapters(model).active
    out = []
    for module, leaves in _carriers(model).values():
        source = module if name == active else module._modules[BANK][name]
        out += [getattr(source, leaf) for leaf in leaves]
    return out


def set_trainable_adapters(model: nn.Module, names: Sequence[str]) -> None:
    """Make the adapters ``names`` (the active one among them or not) require grad and freeze everything
    else: several adapters trained in one run (each step routes its batches through ``use_adapter(...,
    trainable=True)``; an optimizer built afterwards holds all of them)."""
    if isinstance(names, str):
        raise LoRAConfigError(
            f"set_trainable_adapters(model, {names!r}): give a list of adapter names, e.g. [{names!r}]"
        )
    for name in names:
        _check_name(model, name, exists=True)
    mark_trainable(model)
    named = named_adapters(model)
    if named.active not in names:
        for p in adapter_tensors(model, named.active):
            p.requires_grad_(False)
    for name in names:
        for p in adapter_tensors(model, name):
            if p.is_floating_point():
                p.requires_grad_(True)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``. Deleting the active one activates the first remaining adapter; the
    last adapter cannot be deleted (``remove_lora(model)`` removes LoRA altogether)."""
    _check_name(model, name, exists=True)
    named = named_adapters(model)
    if len(named.configs) == 1:
        raise AdapterMismatchError(
            f"delete_adapter({name!r}): it is the model's only adapter; call remove_lora(model) to remove LoRA"
        )
    if name == named.active:
        _check_unmerged(model, f"delete_adapter({name!r}) (the active adapter)")
    with unchanged(model):
        if name == named.active:
            set_adapter(model, next(n for n in named.configs if n != name))
        for module, _ in _carriers(model).values():
            bank = _bank(module)
            del bank[name]
            if not len(bank):
                del module._modules[BANK]
        del named.configs[name]


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes exactly its base outputs: no adapter update, and the
    ``modules_to_save`` at their values from before injection."""
    _check_unmerged(model, "disable_adapter")
    layers: list[LoRALayer | TrainableTokens] = [*lora_layers(model).values(), *token_modules(model).values()]
    originals = injected_handle(model).originals
    swapped: list[tuple[nn.Module, str, Tensor]] = []
    for module_name, (module, leaves) in _carriers(model).items():
        if isinstance(module, (LoRALayer, TrainableTokens)):
            continue
        for leaf in leaves:
            key = f"{module_name}.{leaf}"
            if key not in originals:
                raise AdapterMismatchError(f"disable_adapter: no value from before injection is kept for {key}")
    for module_name, (module, leaves) in _carriers(model).items():
        if isinstance(module, (LoRALayer, TrainableTokens)):
            continue
        for leaf in leaves:
            current = getattr(module, leaf)
            swapped.append((module, leaf, current))
            original = originals[f"{module_name}.{leaf}"]
            setattr(
                module, leaf, nn.Parameter(original.to(device=current.device, dtype=current.dtype), requires_grad=False)
            )
    flag = {id(m): "lora_disabled" if isinstance(m, LoRALayer) else "token_disabled" for m in layers}
    for layer in layers:
        setattr(layer, flag[id(layer)], True)
    try:
        yield
    finally:
        for layer in layers:
            setattr(layer, flag[id(layer)], False)
        for module, leaf, current in swapped:
            setattr(module, leaf, current)


def restore_named_adapters(model: nn.Module, record: dict | None) -> None:
    """Give ``model`` (whose active adapter matches the record's) the named adapters a checkpoint or file
    recorded (``NamedAdapters.to_dict()``), so their tensors can be loaded; ``None``: only one adapter.
    ``requires_grad`` flags are left as they were (loading weights does not change what trains)."""
    if not record:
        return
    saved = NamedAdapters.from_dict(record)
    handle = injected_handle(model)
    named = handle.named()
    grads = {p: p.requires_grad for p in model.parameters()}
    if named.active != saved.active:
        if saved.active in named.configs:
            set_adapter(model, saved.active)
        else:  # the model's single adapter is the record's active one under another name
            if len(named.configs) > 1:
                raise AdapterMismatchError(
                    f"the checkpoint's active adapter is {saved.active!r} but the model holds {list(named.configs)}"
                )
            named.configs = {saved.active: named.configs.pop(named.active)}
            named.active = saved.active
            for layer in lora_layers(model).values():
                layer.lora_active = saved.active
    for name, config in saved.configs.items():
        if name not in named.configs:
            add_adapter(model, name, config)
    named.configs = {n: named.configs[n] for n in saved.configs} | {
        n: c for n, c in named.configs.items() if n not in saved.configs
    }
    for p in model.parameters():
        p.requires_grad_(grads.get(p, False))


# --------------------------------------------------------------------------- mixed batches
def _route_dim(x: Tensor, rows: int, batch_dim: int | None) -> int:
    """The dimension of ``x`` holding the samples: ``batch_dim`` if given, else 0 — refused when another
    leading dimension has the same size (``(T, B, D)`` with ``T == B``: time or batch?)."""
    lead = x.dim() - 1 if x.dim() > 1 else x.dim()
    if batch_dim is not None:
        dim = batch_dim if batch_dim >= 0 else x.dim() + batch_dim
        if not 0 <= dim < max(1, lead):
            raise LoRAConfigError(
                f"mixed_batch(batch_dim={batch_dim}) does not name a leading dimension of an input of shape "
                f"{tuple(x.shape)}"
            )
        return dim
    if any(x.shape[d] == rows for d in range(1, lead)) and x.shape[0] == rows:
        raise LoRAConfigError(
            f"mixed_batch: an adapted layer got an input of shape {tuple(x.shape)} with {rows} rows along more than "
            "one "
            "leading dimension, so which one holds the samples is ambiguous (e.g. (T, B, D) with T == B): pass "
            "mixed_batch(model, names, batch_dim=0) for batch-first inputs, or the dimension that holds the samples"
        )
    return 0


class _Route(list):
    """``[(name, indices)]`` of a mixed batch, plus the dimension that holds the samples (``None``: 0, refused
    when ambiguous)."""

    def __init__(self, entries: list[tuple[str | None, Tensor]], batch_dim: int | None) -> None:
        super().__init__(entries)
        self.batch_dim = batch_dim

    @property
    def rows(self) -> int:
        return sum(int(idx.numel()) for _, idx in self)

    def dim_of(self, x: Tensor) -> int:
        return _route_dim(x, self.rows, self.batch_dim)


@contextmanager
def mixed_batch(
    model: nn.Module, adapter_names: Sequence[str | None], *, batch_dim: int | None = None
) -> Iterator[None]:
    """Forwards inside the block route sample ``i`` through adapter ``adapter_names[i]``, or the base for
    ``None``; every output row equals running that sample through its own merged model. The samples lie
    along ``batch_dim`` of every adapted layer's input (default 0; an input with as many rows along another
    leading dimension is refused until ``batch_dim`` is given). For Linear and GPT-2 Conv1D layers (fused
    q/k/v included); each ``modules_to_save`` module runs its rows through the matching adapter's copy (its
    first input and its output batch-first)."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise LoRAConfigError(
            f"mixed_batch(model, {adapter_names!r}): give one adapter name (or None) per sample, e.g. ['a', 'b', None]"
        )
    names = list(adapter_names)
    known = list_adapters(model)
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise AdapterMismatchError(f"mixed_batch: unknown adapter name(s) {unknown}; the model holds {known}")
    _check_unmerged(model, "mixed_batch")
    if token_modules(model):
        raise LoRAConfigError(
            f"mixed_batch does not route trainable token rows ({sorted(token_modules(model))}); run the samples of "
            "each adapter in batches of their own with set_adapter"
        )
    layers = lora_layers(model)
    unsupported = [n for n, layer in layers.items() if not layer.supports_routing or layer.variant_name != "lora"]
    if unsupported:
        raise LoRAConfigError(
            f"mixed_batch routes Linear and GPT-2 Conv1D LoRA layers; {unsupported[:3]} are "
            f"{type(layers[unsupported[0]]).__name__}: run those samples in separate batches with set_adapter"
        )
    device = next(iter(layers.values())).lora_A.device
    route = _Route(
        [
            (name, torch.tensor([i for i, n in enumerate(names) if n == name], dtype=torch.long, device=device))
            for name in dict.fromkeys(names)
        ],
        batch_dim,
    )
    hooks = [_RoutedModule(model, root, route) for root in get_lora_state(model).modules_to_save]
    handles = [model.get_submodule(h.root).register_forward_hook(h, with_kwargs=True) for h in hooks]
    for layer in layers.values():
        layer.lora_route = route
    try:
        yield
    finally:
        for layer in layers.values():
            layer.lora_route = None
        for handle in handles:
            handle.remove()


class _RoutedModule:
    """A forward hook on a ``modules_to_save`` module under :func:`mixed_batch`: its output is recomputed with
    the rows of its first input (dim 0) routed to each adapter going through that adapter's copy of the
    module (``None``: its values from before injection), and put back in row order."""

    def __init__(self, model: nn.Module, root: str, route: list[tuple[str | None, Tensor]]) -> None:
        self.root, self.module, self.route = root, model.get_submodule(root), route
        originals = injected_handle(model).originals
        self.carriers: list[tuple[nn.Module, str, dict[str | None, Tensor]]] = []
        active = active_adapter(model)
        for name, (module, leaves) in _carriers(model).items():
            if not (name == root or name.startswith(root + ".")) or isinstance(module, LoRALayer):
                continue
            for leaf in leaves:
                values: dict[str | None, Tensor] = {None: originals[f"{name}.{leaf}"], active: getattr(module, leaf)}
                for adapter, slots in module._modules.get(BANK, {}).items():
                    values[adapter] = getattr(slots, leaf)
                self.carriers.append((module, leaf, values))

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else None
        rows = sum(int(i.numel()) for _, i in self.route)
        if not isinstance(x, Tensor) or x.shape[0] != rows:
            raise LoRAConfigError(
                f"mixed_batch: {type(self.module).__name__} (modules_to_save) must take the batch first in its first "
                "input"
            )
        if rows == 0:
            return output
        out: Tensor | None = None
        current = [(m, leaf, getattr(m, leaf)) for m, leaf, _ in self.carriers]
        try:
            for name, idx in self.route:
                if idx.numel() == 0:
                    continue
                for carrier, leaf, values in self.carriers:
                    v = values[name]
                    setattr(
                        carrier,
                        leaf,
                        v
                        if isinstance(v, nn.Parameter)
                        else nn.Parameter(v.to(getattr(carrier, leaf)), requires_grad=False),
                    )
                part = type(self.module).forward(self.module, x.index_select(0, idx), *args[1:], **kwargs)
                if not isinstance(part, Tensor):
                    raise LoRAConfigError(
                        f"mixed_batch: {type(self.module).__name__} (modules_to_save) must return one tensor"
                    )
                if out is None:
                    out = part.new_zeros((x.shape[0], *part.shape[1:]))
                out = out.index_copy(0, idx, part)
        finally:
            for carrier, leaf, value in current:
                setattr(carrier, leaf, value)
        return out


# --------------------------------------------------------------------------- combining
def _factors(layer: LoRALayer, name: str) -> tuple[Tensor, Tensor, float, int]:
    """``(A, B, scaling, r)`` of adapter ``name`` in ``layer``, compact (a fused layer's B not expanded)."""
    if name == layer.lora_active:
        return layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling, layer.r
    slots = layer.lora_bank[name]  # type: ignore[attr-defined]
    return slots.lora_A.detach(), slots.lora_B.detach(), slots.scaling, slots.r


def _part_blocks(layer: LoRALayer, A: Tensor, B: Tensor, r: int) -> list[tuple[Tensor, Tensor]]:
    """Per adapted part of a fused layer, its ``(A_i (r x d_in), B_i (size_i x r))``; one pair otherwise."""
    A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)  # a convolution's A/B as matrices
    if layer.fused is None:
        return [(A, B)]
    rows = torch.split(B, layer.fused.adapted_sizes(), dim=0)
    return [(A[i * r : (i + 1) * r], rows[i]) for i in range(len(rows))]


def _peft_delta(layer: LoRALayer, delta: Tensor) -> Tensor:
    """One part's ``ΔW (d_out x d_in)`` as PEFT's ``get_delta_weight`` gives it: transposed for GPT-2 Conv1D and
    embeddings, a kernel for a convolution, with PEFT's strides too (a k x k convolution's is a transposed ``conv``
    result). A DARE mask is drawn over the tensor's shape (on the CPU in its logical order, which the transposition
    changes); copying the strides as well keeps the masks PEFT's wherever the order followed memory instead."""
    if layer.fan_in_fan_out:
        return delta.T
    shape = getattr(layer, layer.base_weight_name).shape
    if len(shape) <= 2 or layer.fused is not None:  # a fused part (one MoE expert of a 3-D stack): d_out x d_in
        return delta
    kernel = delta.reshape(shape)
    return kernel if tuple(shape[2:4]) == (1, 1) else kernel.transpose(0, 1).contiguous().transpose(0, 1)


def _combine_layer(
    layer: LoRALayer,
    adapters: Sequence[str],
    weights: Sequence[float],
    how: str,
    new_r: int,
    svd_clamp: float | None,
    svd_full_matrices: bool,
    svd_driver: str | None,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The combined adapter's ``(A, B)`` for one layer, with scaling 1 (alpha = r), PEFT's formulas and order of
    operations (``peft/tuners/lora/model.py``, ``peft/utils/merge_utils.py``). A fused layer's parts are combined
    one by one, as PEFT combines separate modules."""
    per = [_factors(layer, a) for a in adapters]
    dtype = per[0][0].dtype
    device = per[0][0].device
    blocks_of = [_part_blocks(layer, A, B, r) for A, B, _, r in per]
    parts = list(zip(*blocks_of, strict=True))  # [part][adapter] -> (A_i, B_i)
    new_A, new_B = [], []
    for blocks in parts:
        if how == "cat":
            A = torch.cat([a * w * s for (a, _), w, (_, _, s, _) in zip(blocks, weights, per, strict=True)], dim=0)
            B = torch.cat([b for _, b in blocks], dim=1)
        elif not how.endswith("svd"):  # linear and the pruning merges: A and B separately, √|w·s| on each
            ws = [w * s for w, (_, _, s, _) in zip(weights, per, strict=True)]
            w_A = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws]).to(device)
            w_B = torch.tensor([math.sqrt(abs(x)) for x in ws]).to(device)
            A, B = (
                merge_task_tensors(how, [blk[i] for blk in blocks], w, density, majority_sign_method, generator)
                for i, w in ((0, w_A), (1, w_B))
            )
        else:  # svd, ties_svd, ...: merge the updates s_i·B_i·A_i (each pruned as PEFT lays it out), then its svd
            deltas = [
                _peft_delta(layer, (b.float() @ a.float()) * s)
                for (a, b), (_, _, s, _) in zip(blocks, per, strict=True)
            ]
            merged = merge_task_tensors(
                "linear" if how == "svd" else how.removesuffix("_svd"),
                deltas,
                torch.tensor(list(weights)).to(device),
                density,
                majority_sign_method,
                generator,
            )
            delta = merged.T if layer.fan_in_fan_out else merged.reshape(merged.shape[0], -1)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices, driver=svd_driver)
            U, Vh = U[:, :new_r] @ torch.diag(S[:new_r]), Vh[:new_r, :]
            if svd_clamp is not None:
                hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), svd_clamp)
                U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
            A, B = Vh, U
        new_A.append(A.to(dtype))
        new_B.append(B.to(dtype))
    return torch.cat(new_A, dim=0), torch.cat(new_B, dim=0)


def _check_merge_options(how: str, density: Any, majority_sign_method: Any, generator: torch.Generator | None) -> None:
    """One-line refusals of ``density`` / ``majority_sign_method`` / ``generator`` values ``how`` cannot use."""
    prunes = how.removesuffix("_svd") in PRUNING
    if prunes and density is None:
        raise LoRAConfigError(
            f"combination_type={how!r} needs density= (the fraction of each adapter's entries kept, in (0, 1]), "
            "e.g. density=0.5"
        )
    if not prunes and density is not None:
        raise LoRAConfigError(
            f"density={density!r} is for the pruning merges {PRUNING} (and their _svd forms), not combination_type="
            f"{how!r}: drop density or choose one of them"
        )
    if density is not None:
        ok = isinstance(density, numbers.Real) and not isinstance(density, bool) and 0 < float(density) <= 1
        if not ok:
            raise LoRAConfigError(
                f"density={density!r} must be a number in (0, 1] (the fraction of entries kept; 1 keeps all), "
                "e.g. density=0.5"
            )
    if majority_sign_method not in ("total", "frequency"):
        raise LoRAConfigError(
            f"majority_sign_method={majority_sign_method!r} is not 'total' or 'frequency' (how TIES elects each "
            "entry's sign: by the sum, or by the count of signs)"
        )
    if majority_sign_method != "total" and how not in SIGN_ELECTING:
        raise LoRAConfigError(
            f"majority_sign_method={majority_sign_method!r} is for the sign-electing merges {SIGN_ELECTING}, not "
            f"combination_type={how!r}: drop it or choose one of them"
        )
    if generator is not None and how not in RANDOM:
        raise LoRAConfigError(
            f"generator= draws DARE's random masks ({RANDOM}); combination_type={how!r} draws none: drop it"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise LoRAConfigError(f"generator={generator!r} is not a torch.Generator")


def _exact(name: str) -> str:
    """A rank/alpha pattern matching the module ``name`` only (a plain name would also match ``x.<name>``)."""
    return "re:" + re.escape(name)


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: Literal[
        "svd",
        "linear",
        "cat",
        "ties",
        "ties_svd",
        "dare_ties",
        "dare_linear",
        "dare_ties_svd",
        "dare_linear_svd",
        "magnitude_prune",
        "magnitude_prune_svd",
    ] = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    generator: torch.Generator | None = None,
) -> None:
    """Add ``adapter_name`` = the weighted combination of ``adapters`` (PEFT's ``add_weighted_adapter``):

    * ``cat``: ``A = [w_i·s_i·A_i]`` stacked, ``B = [B_i]`` side by side — rank ``Σ r_i``, exactly
      ``ΔW = Σ w_i·ΔW_i``;
    * ``linear``: ``A = Σ √|w_i s_i|·sign(w_i s_i)·A_i``, ``B = Σ √|w_i s_i|·B_i`` (same ranks; an
      approximation: cross terms ``B_i A_j`` appear);
    * ``svd``: the best rank-``svd_rank`` (default ``max r_i``) approximation of ``Σ w_i·ΔW_i``;
    * ``magnitude_prune``, ``ties``, ``dare_linear``, ``dare_ties`` (same ranks): as ``linear``, on the ``A_i`` and,
      separately, the ``B_i`` after pruning each tensor to a fraction ``density`` of its entries — by magnitude
      (``magnitude_prune``, ``ties``) or at random, rescaled by ``1/density`` (DARE); ``ties`` and ``dare_ties`` then
      elect a sign per entry (``majority_sign_method``: ``"total"``, the sign of the sum of the pruned tensors, or
      ``"frequency"``, the more frequent sign) and average the weighted entries that agree with it;
    * ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the same pruning and sign
      election on the updates ``s_i·ΔW_i`` (any ranks), then ``svd``'s truncation to ``svd_rank``.

    The results equal PEFT 0.21.2's on the same adapters (fp32 adapters; a fused layer's parts are combined as
    PEFT combines separate modules). DARE's masks come from ``generator`` if given (on the adapters' device), else
    from torch's global generator, drawn as PEFT draws them: layer by layer in ``named_modules`` order (a fused
    layer part by part), each layer's ``A_i`` of every adapter in the given order, then its ``B_i`` (``_svd``
    forms: one ``ΔW_i`` per adapter, in PEFT's layout). PEFT draws its masks after initialising the new adapter,
    which consumes the global generator; here they are the first draws of the call, so the same generator state
    at that point gives the same masks (the tests match them so). Unlike PEFT, which turns any combination of a
    single adapter into ``linear``, one adapter is pruned too.

    The new adapter has ``alpha = r`` (scaling 1), as in PEFT; its ``modules_to_save`` start from their
    values at injection. Inactive until ``set_adapter``. Weights must be finite numbers; ``density`` (in
    ``(0, 1]``), ``majority_sign_method`` other than ``"total"`` and ``generator`` are refused where the
    combination does not use them."""
    if combination_type not in COMBINATIONS:
        raise LoRAConfigError(f"combination_type={combination_type!r} is not one of {COMBINATIONS}")
    _check_merge_options(combination_type, density, majority_sign_method, generator)
    density = None if density is None else float(density)
    if isinstance(adapters, str):
        raise LoRAConfigError(
            f"add_weighted_adapter(adapters={adapters!r}): give a list of adapter names, e.g. [{adapters!r}]"
        )
    adapters = list(adapters)
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise LoRAConfigError(f"add_weighted_adapter: weights={weights!r} must be numbers, one per adapter") from None
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise LoRAConfigError(
            f"add_weighted_adapter: weights {weights} include {bad[0]}, not a finite number; give finite weights"
        )
    if not adapters or len(adapters) != len(weights):
        raise LoRAConfigError(
            f"add_weighted_adapter: {len(adapters)} adapters and {len(weights)} weights; give one weight per adapter"
        )
    for a in adapters:
        _check_name(model, a, exists=True)
    _check_name(model, adapter_name, exists=False)
    _check_unmerged(model, "add_weighted_adapter")
    if token_modules(model):
        raise LoRAConfigError(
            f"add_weighted_adapter does not combine trainable token rows ({sorted(token_modules(model))}: each adapter "
            "replaces them with values of its own); combine adapters without trainable_token_indices"
        )
    named = named_adapters(model)
    configs = [named.configs[a] for a in adapters]
    layers = lora_layers(model)
    ranks = {a: {n: _factors(layer, a)[3] for n, layer in layers.items()} for a in adapters}
    if combination_type in ("linear", *PRUNING) and len({tuple(r.values()) for r in ranks.values()}) > 1:
        fix = "'cat' or 'svd'" if combination_type == "linear" else f"{combination_type + '_svd'!r}"
        raise AdapterMismatchError(
            f"combination_type={combination_type!r} needs adapters of the same ranks; {adapters} differ: use {fix}"
        )
    limit = {
        n: min(layer.in_features, layer.fused.smallest_adapted if layer.fused else layer.out_features)
        for n, layer in layers.items()
    }
    if combination_type == "cat":
        new_ranks = {n: sum(ranks[a][n] for a in adapters) for n in layers}
        too_big = [n for n in layers if new_ranks[n] > limit[n]]
        if too_big:
            n = too_big[0]
            raise LoRAConfigError(
                f"combination_type='cat' stacks the adapters to rank {new_ranks[n]} on {n}, more than min(d_in, d_out)="
                f"{limit[n]}: use combination_type='svd' with svd_rank <= {limit[n]}, or combine fewer adapters"
            )
    elif combination_type in ("linear", *PRUNING):
        new_ranks = dict(ranks[adapters[0]])
    else:
        new_ranks = {n: svd_rank if svd_rank is not None else max(ranks[a][n] for a in adapters) for n in layers}
        too_big = [n for n in layers if new_ranks[n] > limit[n] or new_ranks[n] < 1]
        if too_big:
            raise LoRAConfigError(
                f"svd_rank={svd_rank} does not fit {too_big[:3]} (min(d_in, d_out)={limit[too_big[0]]}); choose "
                "1 <= svd_rank <= "
                f"{min(limit.values())}"
            )
    device = next(iter(layers.values())).lora_A.device
    if generator is not None and generator.device.type != device.type:
        raise LoRAConfigError(
            f"add_weighted_adapter: generator is on {generator.device} but the adapters are on {device}; give a "
            f"torch.Generator(device={device.type!r})"
        )
    tensors = {  # computed before the new adapter is created: DARE's masks are the call's first random draws
        n: _combine_layer(
            layer,
            adapters,
            weights,
            combination_type,
            new_ranks[n],
            svd_clamp,
            svd_full_matrices,
            svd_driver,
            density,
            majority_sign_method,
            generator,
        )
        for n, layer in layers.items()
    }
    uniform = len(set(new_ranks.values())) == 1
    r0 = next(iter(new_ranks.values()))
    config = dataclasses.replace(
        configs[0],
        r=r0,
        alpha=float(r0),
        use_rslora=False,
        init_seed=None,
        rank_pattern={} if uniform else {_exact(n): r for n, r in new_ranks.items()},
        alpha_pattern={} if uniform else {_exact(n): float(r) for n, r in new_ranks.items()},
    )
    index = (
        device.index
        if device.index is not None or device.type == "cpu"
        else getattr(torch, device.type).current_device()
    )
    forked = [] if device.type == "cpu" else [index]
    with unchanged(model), torch.random.fork_rng(devices=forked, device_type=device.type):
        add_adapter(model, adapter_name, config)  # its random initialisation (overwritten) leaves the RNG as it was
        with torch.no_grad():
            for n, layer in layers.items():
                slots = layer.lora_bank[adapter_name]  # type: ignore[attr-defined]
                A, B = tensors[n]
                if A.numel() != slots.lora_A.numel() or B.numel() != slots.lora_B.numel():
                    raise AdapterMismatchError(
                        f"add_weighted_adapter: the combined adapter of {n} has A {tuple(A.shape)}, B {tuple(B.shape)} "
                        f"but its slots are {tuple(slots.lora_A.shape)}, {tuple(slots.lora_B.shape)}"
                    )
                slots.lora_A.copy_(A.reshape(slots.lora_A.shape))
                slots.lora_B.copy_(B.reshape(slots.lora_B.shape))


__all__ = [
    "DEFAULT",
    "NamedAdapters",
    "active_adapter",
    "add_adapter",
    "add_weighted_adapter",
    "adapter_tensors",
    "delete_adapter",
    "disable_adapter",
    "has_named_adapters",
    "list_adapters",
    "mixed_batch",
    "named_adapters",
    "restore_named_adapters",
    "set_adapter",
    "set_trainable_adapters",
    "unchanged",
    "use_adapter",
]
