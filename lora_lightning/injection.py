"""Putting adapters into a model and taking them out: injection, freezing, parameter counts.

:func:`inject_lora` plans the config against the model once (:func:`~lora_lightning.plan.plan_injection`),
builds every adapter layer through the config's variant and the layer kinds, and only then swaps
them in, so a bad target, rank or variant option leaves the model untouched. It records the model's
:class:`~lora_lightning.state.LoRAHandle` and freezes everything but the adapters, their biases
(``bias``) and ``modules_to_save``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from . import registry
from .config import LoRAConfig
from .errors import AlreadyInjectedError, LoRAConfigError
from .layers import LoRALayer, LoRALinear, is_lora_layer, is_lora_module
from .plan import AdapterSpec, ParamTarget, Plan, module_weight, plan_injection, summarize_names, target_module
from .record import LoRAState, base_fingerprint, identity_exclusions
from .sharding import _is_dtensor
from .shared_input import attach_tracker
from .state import attach, get_lora_state, injected_handle, lora_handle
from .tokens import LEAVES as TOKEN_LEAVES
from .tokens import ROWS as TOKEN_ROWS
from .tokens import TokenTarget, build_token_modules, is_token_module, plan_tokens, row_masks, token_modules

BANK = "lora_bank"  # <module>.lora_bank[name]: an inactive named adapter's tensors


# --------------------------------------------------------------------------- queries
def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds LoRA adapters (anywhere inside it)."""
    return any(is_lora_layer(m) for m in model.modules())


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """``{name: layer}`` of the layers holding adapter tensors of their own."""
    return {n: m for n, m in model.named_modules() if is_lora_layer(m)}  # type: ignore[misc]


def describe(model: nn.Module) -> list[AdapterSpec]:
    """The adapted matrices of an injected model as they are now (name, kind, shape, r, alpha, scaling)."""
    handle = lora_handle(model)
    config = handle.record.config if handle is not None and handle.record is not None else None
    out = []
    for name, layer in lora_layers(model).items():
        s = layer.structure()
        out.append(
            AdapterSpec(
                name,
                s["d_out"],
                s["d_in"],
                s["r"],
                s["alpha"],
                tuple(s["parts"]),
                layer.fused,
                s["kind"],
                s["scaling"],
                layer.variant_name,
                config,
            )
        )
    return out


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def place_parameter_layer(target: ParamTarget, layer: nn.Module) -> None:
    """Put the LoRA layer of a parameter target into the model: the parameter moves into the layer (as its
    ``weight``) and the layer takes its place as the owner's child of the same name, so the owner's ``state_dict``
    keys stay the same (the layer kind's guards keep them and let the owner's forward read ``W + ΔW``)."""
    owner = target.owner
    del owner._parameters[target.param_name]
    owner._modules[target.param_name] = layer


def replace_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Put ``replacements[id(old)]`` wherever ``old`` sits in ``model``, under every name it has (a module
    registered twice is replaced twice), parents before children."""
    places = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n and id(m) in replacements]
    for name, old in sorted(places, key=lambda nm: nm[0].count(".")):
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        child = name.rpartition(".")[2]
        if parent._modules.get(child) is old:
            parent._modules[child] = replacements[id(old)]


# --------------------------------------------------------------------------- freezing and counting
def mark_trainable(model: nn.Module, state: LoRAState | None = None) -> None:
    """Freeze everything except the active adapter, biases per ``config.bias`` and ``modules_to_save``."""
    state = state or get_lora_state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in lora_layers(model).values():
        for pname in module.trainable_names:
            getattr(module, pname).requires_grad_(True)
        if state.config.bias == "lora_only" and getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(True)
    if state.config.bias == "all":
        for pname, p in model.named_parameters():
            if pname == "bias" or pname.endswith(".bias"):
                p.requires_grad_(True)
    for name in state.modules_to_save:
        for pname, p in model.get_submodule(name).named_parameters():
            p.requires_grad_(f"{BANK}." not in f"{pname}.")  # the active adapter's copy only
    for module in token_modules(model).values():  # the token rows only, never the table
        module.token_rows.requires_grad_(True)


@dataclass
class ParameterCount:
    """Trainable vs total parameters (shared parameters counted once); ``lora``: the adapter tensors."""

    trainable: int
    total: int
    lora: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "params/trainable": self.trainable,
            "params/total": self.total,
            "params/lora": self.lora,
            "params/trainable_pct": 100.0 * self.trainable_fraction,
        }


def count_parameters(model: nn.Module) -> ParameterCount:
    trainable = total = lora = 0
    adapter = {f"{n}.{leaf}" if n else leaf for n, m in lora_layers(model).items() for leaf in m.adapter_names}
    adapter |= {f"{n}.{TOKEN_ROWS}" if n else TOKEN_ROWS for n in token_modules(model)}
    for name, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
        if name in adapter:
            lora += p.numel()
    return ParameterCount(trainable, total, lora)


def base_memory(model: nn.Module) -> dict[str, int]:
    """Bytes held by the adapted Linear base weights now (quantized or not) vs in their original dtype."""
    now = before = 0
    for layer in lora_layers(model).values():
        if isinstance(layer, LoRALinear):
            now += layer.base_weight_bytes()
            before += layer.in_features * layer.out_features * torch.empty((), dtype=layer.base_dtype).element_size()
    return {"base_bytes_before": before, "base_bytes_after": now}


def adapter_param_names(model: nn.Module, all_adapters: bool = False) -> list[str]:
    """State-dict keys that make up the (active) adapter: A/B (and a variant's own tensors), trainable
    biases, ``modules_to_save`` (with their buffers), trainable token rows and their indices; ``all_adapters``: the
    inactive named adapters' too."""
    state = get_lora_state(model)
    keys: list[str] = []
    adapted = lora_layers(model)
    tokens = token_modules(model)
    saved = tuple(s + "." for s in state.modules_to_save)
    for key in model.state_dict(keep_vars=True):
        if f".{BANK}." in f".{key}":
            if all_adapters:
                keys.append(key)
            continue
        owner, _, leaf = key.rpartition(".")
        adapter_tensor = (owner in adapted and leaf in adapted[owner].adapter_names) or (
            owner in tokens and leaf in TOKEN_LEAVES
        )
        trained_bias = leaf == "bias" and (
            state.config.bias == "all" or (state.config.bias == "lora_only" and owner in adapted)
        )
        if adapter_tensor or key.startswith(saved) or trained_bias:
            keys.append(key)
    return keys


# --------------------------------------------------------------------------- planning a record
def fingerprint_for(model: nn.Module, plan: Plan) -> dict:
    """The base fingerprint ``plan`` records: adapted modules' shapes and the identity of every base tensor
    (not the ``modules_to_save`` or the biases the config trains). Computed once per plan (kept on it)."""
    cached = getattr(plan, "fingerprint", None)
    if cached is not None:
        return cached
    names = plan.names
    tied = [f for s in plan for f in s.tied]
    exclude = identity_exclusions(model, plan.config, names + tied, plan.modules_to_save)
    plan.fingerprint = base_fingerprint(model, names, exclude, row_masks(model, tokens_for(model, plan)))
    return plan.fingerprint


def tokens_for(model: nn.Module, plan: Plan) -> list[TokenTarget]:
    """The trainable tokens of ``plan.config`` in ``model`` (checked against the planned adapters; kept on the plan)."""
    cached = getattr(plan, "tokens", None)
    if cached is None:
        adapted = plan.names + [f for s in plan for f in s.tied]
        cached = plan.tokens = plan_tokens(model, plan.config, adapted, plan.modules_to_save)
    return cached


def planned_record(model: nn.Module, config: LoRAConfig) -> tuple[Plan, LoRAState]:
    """``(plan, record)``: what injecting ``config`` into ``model`` would do and the record it would leave,
    without changing the model. Works on an injected model too: planning sees through adapters, and the base
    identity comes from the model's record (taken before any merge or training). Pass the plan on to
    :func:`inject_lora` so nothing is planned or hashed twice."""
    plan = plan_injection(model, config)
    handle = lora_handle(model)
    if handle is not None and handle.record is not None:
        recorded = handle.record.fingerprint
        index = {n: i for i, n in enumerate(recorded.get("names", []))}
        names = sorted(plan.names)
        if all(n in index for n in names):
            samples = recorded.get("samples")
            fingerprint = {
                "names": names,
                "shapes": [recorded["shapes"][index[n]] for n in names],
                "samples": None if not samples else [samples[index[n]] for n in names],
                "tensors": recorded.get("tensors"),
            } | ({"dropped_rows": recorded["dropped_rows"]} if recorded.get("dropped_rows") else {})
        else:  # other matrices than the record's: their shapes and samples from the model as it is now
            fingerprint = base_fingerprint(model, names, ()) | {"tensors": recorded.get("tensors")}
            fingerprint |= {"dropped_rows": recorded["dropped_rows"]} if recorded.get("dropped_rows") else {}
    else:
        fingerprint = fingerprint_for(model, plan)
    tokens = {t.name: list(t.indices) for t in tokens_for(model, plan)}
    structures = {s.name: s.structure() for s in plan}
    return plan, LoRAState(config, structures, list(plan.modules_to_save), fingerprint, tokens)


def planned_state(model: nn.Module, config: LoRAConfig) -> LoRAState:
    """The record injecting ``config`` into ``model`` would leave (see :func:`planned_record`)."""
    return planned_record(model, config)[1]


# --------------------------------------------------------------------------- injection
def inject_lora(model: nn.Module, config: LoRAConfig, plan: Plan | None = None) -> list[AdapterSpec]:
    """Replace every targeted layer by its LoRA layer and freeze the rest; returns the adapted matrices.

    ``plan``: a :func:`~lora_lightning.plan.plan_injection` of this model and ``config`` already made (it is
    not made again). Raises :class:`AlreadyInjectedError` if the model already has adapters, and
    :class:`~lora_lightning.TargetNotFoundError` / :class:`~lora_lightning.LoRAConfigError` on a bad config,
    before anything is modified. Outputs are bit-equal to the base's right after injection.
    """
    if has_lora(model):
        existing = list(lora_layers(model))
        raise AlreadyInjectedError(
            f"{type(model).__name__} already has LoRA adapters on {len(existing)} module(s) "
            f"({summarize_names(existing, 5)}); injecting again would stack adapters. Use load_adapter() to "
            "swap adapter weights, or remove_lora()/merge_and_unload() first"
        )
    for guard in registry.INJECTION_GUARDS:
        guard(model)
    wrapper = next(
        (
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel))
        ),
        None,
    )
    if wrapper is not None:
        raise LoRAConfigError(
            f"{wrapper[0] or 'the model'} is already wrapped in {type(wrapper[1]).__name__}, which has registered its "
            "parameters; adapters added now would not be synchronised. Inject before wrapping (LoRACallback does it in "
            "setup; with Lightning Fabric use lora_lightning.fabric.setup)"
        )
    if plan is None or plan.config is not config:
        plan = plan_injection(model, config)
    tokens = tokens_for(model, plan)  # trainable token rows: checked before anything changes
    sharded = [s.name for s in plan if _is_dtensor(module_weight(target_module(model, s.name)))]
    if sharded:
        raise LoRAConfigError(
            f"the weights of {summarize_names(sharded, 3)} are already sharded (DTensor from fully_shard); an adapter "
            "added now would not be sharded with them. Inject before fully_shard: with LoRACallback, call "
            "lora_lightning.inject_before_sharding(self) in configure_model before sharding"
        )
    fingerprint = fingerprint_for(model, plan)
    variant = registry.variant(config.variant)(model, config, plan)  # shared state; raises before any change
    # build everything first, swap in after: a failure while building leaves the model untouched
    built: dict[int, nn.Module] = {}
    parameters: list[tuple[ParamTarget, nn.Module]] = []  # parameter targets: placed, not swapped in
    for s in plan:
        base = target_module(model, s.name)
        layer = variant.build(base, s)
        layer.train(base.training)
        if isinstance(base, ParamTarget):
            parameters.append((base, layer))
            continue
        built[id(base)] = layer
        for follower in s.tied:  # same weight: the follower reads this layer's adapter
            f_base = model.get_submodule(follower)
            f_kind = registry.kind_of(f_base)
            d_out, d_in = f_kind.dims(f_base)
            f_spec = dataclasses.replace(
                s, name=follower, kind=f_kind.name, d_out=d_out, d_in=d_in, tied=(), fused=None, parts=()
            )
            kw = variant.layer_kwargs(f_kind.weight(f_base), f_spec) | {"generator": torch.Generator().manual_seed(0)}
            f_layer = f_kind.build(f_base, f_spec, **kw)  # (its own A/B are dropped: no draw from the global RNG)
            f_layer.tie_to(layer)
            f_layer.train(f_base.training)
            built[id(f_base)] = f_layer
    adapted = plan.names + [f for s in plan for f in s.tied]
    for kind in registry.LAYER_KINDS.values():
        for host_name in kind.hosts(model, adapted):
            base = model.get_submodule(host_name)
            if id(base) not in built:
                host = variant.build_host(base, None)
                host.train(base.training)
                built[id(base)] = host
    built.update(build_token_modules(model, tokens, config))
    replace_modules(model, built)
    for target, layer in parameters:
        place_parameter_layer(target, layer)
    handle = attach(model)
    for kind in registry.LAYER_KINDS.values():
        handle.guards += kind.guards(model, adapted)
    layers = lora_layers(model)
    handle.record = LoRAState(
        config,
        {s.name: layers[s.name].structure() for s in plan},
        list(plan.modules_to_save),
        fingerprint,
        {t.name: list(t.indices) for t in tokens},
    )
    handle.adapters = None
    handle.originals = originals_of(model, plan.modules_to_save)
    handle.tracker = attach_tracker(list(dict.fromkeys(layers.values())), enabled=config.fuse_shared_inputs)
    mark_trainable(model, handle.record)
    return list(plan)


def originals_of(model: nn.Module, modules_to_save: list[str]) -> dict[str, torch.Tensor]:
    """The ``modules_to_save`` parameters at injection: ``disable_adapter`` computes with them and a new
    named adapter's copies start from them (PEFT keeps the original module likewise)."""
    originals = {}
    for root in modules_to_save:
        for key, value in model.get_submodule(root).named_parameters():
            originals[f"{root}.{key}"] = value.detach().clone()
    return originals


def remove_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer (and trainable-tokens module) by its plain base layer (merged weights stay merged), in
    place; the inactive named adapters are dropped."""
    handle = injected_handle(model)
    for module in model.modules():
        if BANK in module._modules:
            del module._modules[BANK]
    places = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if is_lora_module(m) or is_token_module(m)]
    bases: dict[int, nn.Module] = {}  # one base module per LoRA layer, shared again where the layer was
    for name, layer in reversed(places):  # children (an attention host's out_proj) before parents
        if id(layer) not in bases:
            bases[id(layer)] = layer.to_base()  # type: ignore[attr-defined]
        set_submodule(model, name, bases[id(layer)])
    handle.clear()
    return model


__all__ = [
    "BANK",
    "ParameterCount",
    "adapter_param_names",
    "base_memory",
    "count_parameters",
    "describe",
    "get_lora_state",
    "has_lora",
    "inject_lora",
    "lora_layers",
    "mark_trainable",
    "planned_record",
    "planned_state",
    "remove_lora",
]
