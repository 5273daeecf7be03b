"""Putting adapters into a model and taking them out: injection, freezing, parameter counts.

:func:`inject_lora` plans the config against the model (:func:`~lora_lightning.targets.plan_injection`),
builds every adapter layer through the config's variant, and only then swaps them in, so a bad
target, rank or variant option leaves the model untouched. It records a
:class:`~lora_lightning.record.LoRAState` on the model and freezes everything but the adapters,
their biases (``bias``) and ``modules_to_save``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import LoRAConfig
from .errors import AlreadyInjectedError, LoRAConfigError, NotInjectedError
from .layers import LoRALayer, LoRALinear, LoRAMultiheadAttention, is_lora_layer, is_lora_module, primary_weight
from .record import LoRAState, base_fingerprint
from .sharding import _is_dtensor
from .shared_input import attach_tracker
from .targets import AdapterSpec, plan_injection, resolve_modules_to_save, summarize_names
from .variants.registry import get_variant

STATE_ATTR = "_lora_state"
ORIGINALS_ATTR = "_lora_originals"  # modules_to_save values at injection (lora_lightning.named)
NAMED_ATTR = "_lora_named"
BANK = "lora_bank"  # <module>.lora_bank[name]: an inactive named adapter's tensors


# --------------------------------------------------------------------------- queries
def get_lora_state(model: nn.Module) -> LoRAState:
    """The record :func:`inject_lora` left on ``model``; :class:`NotInjectedError` if there is none."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        inner = [n for n, m in model.named_modules() if n and getattr(m, STATE_ATTR, None) is not None]
        where = f" (adapters were injected into submodule {inner[0]!r}: pass that module)" if inner else ""
        raise NotInjectedError(
            f"{type(model).__name__} has no LoRA adapters{where}; call inject_lora(model, LoRAConfig(...)) "
            "or attach LoRACallback to the Trainer first"
        )
    return state


def has_lora(model: nn.Module) -> bool:
    return any(is_lora_layer(m) for m in model.modules())


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {n: m for n, m in model.named_modules() if is_lora_layer(m)}  # type: ignore[misc]


def describe(model: nn.Module) -> list[AdapterSpec]:
    """The adapted matrices of an injected model as they are now (name, kind, shape, r, alpha, scaling)."""
    state = getattr(model, STATE_ATTR, None)
    out = []
    for name, layer in lora_layers(model).items():
        s = layer.structure()
        out.append(
            AdapterSpec(name, s["d_out"], s["d_in"], s["r"], s["alpha"], tuple(s["parts"]), layer.fused, s["kind"],
                        s["scaling"], layer.variant_name, state.config if state is not None else None)
        )
    return out


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# --------------------------------------------------------------------------- freezing and counting
def mark_trainable(model: nn.Module, state: LoRAState | None = None) -> None:
    """Freeze everything except the adapters, biases per ``config.bias`` and ``modules_to_save``."""
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
    biases, ``modules_to_save`` (with their buffers); ``all_adapters``: the inactive named adapters' too."""
    state = get_lora_state(model)
    keys: list[str] = []
    adapted = lora_layers(model)
    saved = tuple(s + "." for s in state.modules_to_save)
    for key in model.state_dict(keep_vars=True):
        if f".{BANK}." in f".{key}":
            if all_adapters:
                keys.append(key)
            continue
        owner, _, leaf = key.rpartition(".")
        if owner in adapted and leaf in adapted[owner].adapter_names:
            keys.append(key)
        elif key.startswith(saved):
            keys.append(key)
        elif leaf == "bias" and (state.config.bias == "all" or (state.config.bias == "lora_only" and owner in adapted)):
            keys.append(key)
    return keys


# --------------------------------------------------------------------------- injection
def inject_lora(model: nn.Module, config: LoRAConfig) -> list[AdapterSpec]:
    """Replace every targeted layer by its LoRA layer and freeze the rest; returns the adapted matrices.

    Raises :class:`AlreadyInjectedError` if the model already has adapters, and
    :class:`~lora_lightning.TargetNotFoundError` / :class:`~lora_lightning.LoRAConfigError` on a bad
    config, before anything is modified.
    """
    if has_lora(model):
        existing = list(lora_layers(model))
        raise AlreadyInjectedError(
            f"{type(model).__name__} already has LoRA adapters on {len(existing)} module(s) "
            f"({summarize_names(existing, 5)}); injecting again would stack adapters. Use load_adapter() to "
            "swap adapter weights, or remove_lora()/merge_and_unload() first"
        )
    specs = plan_injection(model, config)
    sharded = [s.name for s in specs if _is_dtensor(primary_weight(model.get_submodule(s.name)))]
    if sharded:
        raise LoRAConfigError(
            f"the weights of {summarize_names(sharded, 3)} are already sharded (DTensor from fully_shard); an adapter added now "
            "would not be sharded with them. Inject before fully_shard: with LoRACallback, call "
            "lora_lightning.inject_before_sharding(self) in configure_model before sharding"
        )
    fingerprint = base_fingerprint(model, [s.name for s in specs])
    variant = get_variant(config.variant)(model, config, specs)  # shared state; raises before any change
    # build everything first, swap in after: a failure while building leaves the model untouched
    built: dict[str, nn.Module] = {}
    hosts: dict[str, AdapterSpec | None] = {}  # nn.MultiheadAttention -> its q/k/v spec (None: hosts out_proj only)
    for s in specs:
        if s.kind == "mha":
            hosts[s.name] = s
    for s in specs:
        parent = s.name.rpartition(".")[0]
        if isinstance(model.get_submodule(parent) if parent else model, nn.MultiheadAttention):
            hosts.setdefault(parent, None)
    for enc_layer_name in _encoder_layers_with(model, specs):  # their fast path reads the base weights
        hosts.setdefault(f"{enc_layer_name}.self_attn", None)
    for s in specs:
        if s.kind != "mha":
            base = model.get_submodule(s.name)
            built[s.name] = variant.build(base, s)
            built[s.name].train(base.training)
    for name, s in hosts.items():
        base = model.get_submodule(name)
        kw = dict(parts=s.parts, **variant.layer_kwargs(_WeightView(base.in_proj_weight), s)) if s is not None else {}
        host = LoRAMultiheadAttention(base, **({"name": name} | kw))
        host.train(base.training)
        if f"{name}.out_proj" in built:
            host.out_proj = built.pop(f"{name}.out_proj")
        built[name] = host
    for s in specs:  # modules sharing the adapted weight share the adapter layer too
        for other in s.tied:
            built[other] = built[s.name]
    for name in sorted(built, key=lambda n: n.count(".")):  # parents before children
        set_submodule(model, name, built[name])
    _guard_transformer_encoders(model, specs)
    saved = resolve_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    layers = lora_layers(model)
    state = LoRAState(config, {s.name: layers[s.name].structure() for s in specs}, saved, fingerprint)
    object.__setattr__(model, STATE_ATTR, state)
    keep_originals(model, saved)
    mark_trainable(model, state)
    attach_tracker(list(dict.fromkeys(layers.values())), enabled=config.fuse_shared_inputs)
    return specs


class _WeightView:
    """Stands in for a module whose ``weight`` is ``weight`` (the MHA in-projection) in ``layer_kwargs``."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


def keep_originals(model: nn.Module, modules_to_save: list[str]) -> None:
    """Remember the ``modules_to_save`` parameters at injection: ``disable_adapter`` computes with them and a
    new named adapter's copies start from them (PEFT keeps the original module likewise)."""
    originals = {}
    for root in modules_to_save:
        for key, value in model.get_submodule(root).named_parameters():
            originals[f"{root}.{key}"] = value.detach().clone()
    object.__setattr__(model, ORIGINALS_ATTR, originals)


def remove_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by its plain base layer (merged weights stay merged), in place; the
    inactive named adapters are dropped."""
    get_lora_state(model)
    for module in model.modules():
        if BANK in module._modules:
            del module._modules[BANK]
    wrapped = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if is_lora_module(m)]
    bases: dict[int, nn.Module] = {}  # one base module per LoRA layer, shared again where the layer was
    for name, layer in reversed(wrapped):  # children (an attention host's out_proj) before parents
        set_submodule(model, name, bases.setdefault(id(layer), layer.to_base()))  # type: ignore[attr-defined]
    for enc in model.modules():
        for handle in getattr(enc, _HOOKS_ATTR, ()):
            handle.remove()
        if getattr(enc, _NESTED_ATTR, False):
            enc.use_nested_tensor = True
            delattr(enc, _NESTED_ATTR)
        for attr in (_HOOKS_ATTR, _MASK_ATTR):
            enc.__dict__.pop(attr, None)
    object.__delattr__(model, STATE_ATTR)
    for attr in (ORIGINALS_ATTR, NAMED_ATTR):
        model.__dict__.pop(attr, None)
    return model


# --------------------------------------------------------------------------- nn.TransformerEncoder
_NESTED_ATTR = "_lora_paused_use_nested_tensor"
_HOOKS_ATTR = "_lora_hooks"
_MASK_ATTR = "_lora_nested_padding"


def _inside(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".") if prefix else True


def _encoder_layers_with(model: nn.Module, specs: Iterable[AdapterSpec]) -> list[str]:
    names = [s.name for s in specs]
    return [
        n for n, m in model.named_modules() if isinstance(m, nn.TransformerEncoderLayer) and any(_inside(s, n) for s in names)
    ]


def _guard_transformer_encoders(model: nn.Module, specs: list[AdapterSpec]) -> None:
    """``nn.TransformerEncoderLayer``'s fast path reads the base weights directly: its attention host
    reports it unusable while any adapter in the layer is unmerged. ``nn.TransformerEncoder`` may turn
    padded input into nested tensors (whose padded positions come out as zeros): that conversion is
    paused, and the zeros are reproduced, so the adapted model computes what the base computes."""
    for name in _encoder_layers_with(model, specs):
        layer = model.get_submodule(name)
        layer.self_attn.guard_fast_path([m for m in layer.modules() if is_lora_layer(m)])
    names = [s.name for s in specs]
    for enc_name, enc in model.named_modules():
        if not isinstance(enc, nn.TransformerEncoder) or not any(_inside(s, enc_name) for s in names):
            continue
        if getattr(enc, "use_nested_tensor", False):
            enc.use_nested_tensor = False
            setattr(enc, _NESTED_ATTR, True)
            handles = [
                enc.register_forward_pre_hook(_note_nested_padding, with_kwargs=True),
                enc.layers[-1].register_forward_hook(_zero_nested_padding),
                enc.register_forward_hook(_forget_nested_padding),
            ]
            setattr(enc, _HOOKS_ATTR, handles)


def _would_use_nested_tensor(enc: nn.TransformerEncoder, src: torch.Tensor, mask: Any, padding: Any) -> bool:
    """The conditions under which ``nn.TransformerEncoder.forward`` (torch 2.x) converts to nested tensors."""
    first = enc.layers[0]
    if (
        not torch.backends.mha.get_fastpath_enabled()
        or first.training
        or not isinstance(src, torch.Tensor)
        or src.dim() != 3
        or padding is None
        or src.is_nested
        or mask is not None
        or torch.is_autocast_enabled()
    ):
        return False
    if getattr(enc, "mask_check", True) and (
        torch.compiler.is_compiling() or not torch._nested_tensor_from_mask_left_aligned(src, padding.logical_not())
    ):
        return False
    attn = first.self_attn
    tensor_args = (src, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
                   first.norm1.weight, first.norm1.bias, first.norm2.weight, first.norm2.bias,
                   first.linear1.weight, first.linear1.bias, first.linear2.weight, first.linear2.bias)
    if torch.overrides.has_torch_function(tensor_args) or src.device.type not in ("cpu", "cuda", "xpu"):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensor_args if t is not None))


def _note_nested_padding(enc: nn.Module, args: tuple, kwargs: dict) -> None:
    src = args[0] if args else kwargs.get("src")
    mask = args[1] if len(args) > 1 else kwargs.get("mask")
    padding = args[2] if len(args) > 2 else kwargs.get("src_key_padding_mask")
    if padding is not None and isinstance(src, torch.Tensor):
        padding = F._canonical_mask(mask=padding, mask_name="src_key_padding_mask", other_type=F._none_or_dtype(mask),
                                    other_name="mask", target_type=src.dtype)
    pad = padding.logical_not().logical_not() if _would_use_nested_tensor(enc, src, mask, padding) else None
    object.__setattr__(enc.layers[-1], _MASK_ATTR, pad)  # read by the last layer's hook below


def _zero_nested_padding(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    pad = getattr(layer, _MASK_ATTR, None)
    return None if pad is None else output.masked_fill(pad[..., None], 0.0)


def _forget_nested_padding(enc: nn.Module, args: tuple, output: Any) -> None:
    object.__setattr__(enc.layers[-1], _MASK_ATTR, None)


__all__ = [
    "ParameterCount",
    "base_memory",
    "adapter_param_names",
    "count_parameters",
    "describe",
    "get_lora_state",
    "has_lora",
    "inject_lora",
    "lora_layers",
    "mark_trainable",
    "remove_lora",
]
