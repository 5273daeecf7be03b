"""Interoperability with Hugging Face PEFT LoRA adapters (``adapter_model.safetensors`` +
``adapter_config.json``).

Both libraries store ``A: r x d_in`` and ``B: d_out x r`` per adapted module (also for GPT-2's
``Conv1D``, where PEFT uses ``fan_in_fan_out=True`` and so do we, implicitly) and scale by
``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA). PEFT keys are
``base_model.model.<module>.lora_A.weight``; ``modules_to_save`` are stored as
``base_model.model.<module>.<param>``; trainable token rows as
``base_model.model.<module>.token_adapter.trainable_tokens_delta`` (the rows' values, as ours) with
``trainable_token_indices = {module: indices}`` (a tied output head is PEFT's to tie: it does so for a transformers
model's input embedding when ``tie_word_embeddings``).

Fused-block adapters (``targets=["q", "v"]`` on GPT-2's ``c_attn``) export exactly as a
whole-``c_attn`` PEFT adapter of rank ``n·r``: ``A' = [A_q; A_v]`` and ``B'`` block-structured,
``[[B_q, 0], [0, 0], [0, B_v]]`` (zero rows for k), so ``B'A' = [B_q A_q; 0; B_v A_v]``; the
module gets ``rank_pattern = n·r`` and ``alpha_pattern`` chosen so PEFT's scaling equals ours.
Each layer kind says how its adapter looks in PEFT's layout, or refuses in one line where PEFT would
compute something else (``nn.MultiheadAttention``; convolutions with dilation or non-zero padding modes,
which PEFT's ``lora_A`` convolution ignores). Tied weights sharing one adapter have no PEFT layout either.

Parameter targets (``target_parameters``, MoE experts) are PEFT's ``target_parameters``: PEFT wraps the targeted
parameters of one module in nested ``ParamWrapper``s in the module's registration order, so their tensors sit under
``<owner>.base_layer...`` (one ``base_layer`` per later parameter) and the last under ``<owner>``; a 3-D stack's
``lora_B`` is ``d_out x r·E`` there (column ``j·E + e`` of expert ``e``), ``E·d_out x r`` here.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from . import registry
from .adapter_io import atomic_write_bytes
from .config import LoRAConfig
from .errors import AdapterFileError, AdapterMismatchError, AlreadyInjectedError, LoRAConfigError, TargetNotFoundError
from .hotswap import padded_rank, unpadded
from .injection import BANK, get_lora_state, has_lora, inject_lora, lora_layers
from .layers import LoRALayer, is_lora_layer, peft_module_names
from .named import active_adapter, add_adapter, check_adapter_name, delete_adapter, list_adapters, use_adapter
from .plan import resolve_targets
from .tokens import token_modules, token_readers

PEFT_PREFIX = "base_model.model."
TOKENS_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's trainable token rows, below the module's name
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT LoraConfig options that change the math in ways lora_lightning does not reproduce
_UNSUPPORTED = {
    "use_dora": (False, None),
    "use_qalora": (False, None),
    "lora_bias": (False, None),
    "layer_replication": (None,),
    "layers_to_transform": (None,),
    "alora_invocation_tokens": (None,),
    "megatron_config": (None,),
    "use_bdlora": (None, False),
}
# PEFT initialisations that change the base weights the adapter is trained against (PiSSA/CorDA/OLoRA subtract the
# initial s·B·A from W0, LoftQ replaces W0 by its quantized residual); True/False/"gaussian"/"eva"/"orthogonal" do not
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq")


def _relative(name: str, submodule: str) -> str:
    if not submodule:
        return name
    prefix = submodule + "."
    if not name.startswith(prefix):
        raise LoRAConfigError(f"{name!r} lies outside submodule {submodule!r}; export the module holding every adapter")
    return name[len(prefix) :]


def export_peft_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    submodule: str = "",
    adapter_name: str | None = None,
) -> Path:
    """Write the adapter of ``model`` (the active one, or the named ``adapter_name``) as a PEFT LoRA
    adapter directory, loadable with ``peft.PeftModel.from_pretrained(base, directory)``.

    ``submodule``: attribute path of the Hugging Face model inside ``model`` (e.g. ``"model"``
    in a LightningModule); PEFT names are relative to it. Returns the directory.
    """
    if adapter_name is not None and adapter_name != active_adapter(model):
        with use_adapter(model, adapter_name, trainable=True):
            return export_peft_adapter(model, directory, base_model_name_or_path, submodule)
    if any(padded_rank(layer) is not None for layer in lora_layers(model).values()):
        with unpadded(model):  # prepared for hot-swapping: PEFT gets the adapter at its true rank
            return export_peft_adapter(model, directory, base_model_name_or_path, submodule)
    state = get_lora_state(model)
    config = state.config
    if config.bias != "none":
        raise LoRAConfigError(
            f"bias={config.bias!r}: exporting trained biases to PEFT is not supported; train with bias='none'"
        )
    if not registry.variant(config.variant).peft_lora or config.quantize_base is not None:
        raise LoRAConfigError(
            f"variant={config.variant!r} / quantize_base={config.quantize_base!r}: only plain LoRA adapters have an "
            "exact PEFT LoRA equivalent here; save with save_adapter(), or merge_and_unload() for a plain model"
        )
    layers = lora_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer) and module.lora_tie is not None:
            raise LoRAConfigError(
                f"{name} shares the adapter of its tied weight with another module; PEFT has no layout for one adapter "
                "on two modules: save with save_adapter(), or merge_and_unload() for a plain model"
            )
        if isinstance(module, LoRALayer) and not is_lora_layer(module):  # a host: its kind decides
            registry.layer_kind(module.lora_kind).peft_tensors(module)
    tokens = token_modules(model)
    if any(layer.merged for layer in layers.values()) or any(t.token_merged for t in tokens.values()):
        raise LoRAConfigError(
            "the adapters are merged into the base weights; call unmerge_lora(model) before exporting"
        )
    _check_peft_ties(model, submodule)
    tensors: dict[str, Tensor] = {}
    targets: list[str] = []
    parameters: list[str] = []  # PEFT's target_parameters
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    fan_in_fan_out = []
    wrappers = peft_module_names(model, list(layers))  # parameter target -> the (nested) PEFT module holding it
    for name, layer in layers.items():
        rel = _relative(name, submodule)
        kind = registry.layer_kind(layer.lora_kind)
        where = _relative(wrappers[name], submodule) if name in wrappers else rel
        for leaf, value in kind.peft_tensors(layer).items():  # fused: block-structured B'; embedding/conv: own shapes
            tensors[f"{PEFT_PREFIX}{where}.{leaf}"] = value
        r_eff = kind.peft_rank(layer)
        alpha_eff = layer.scaling * (math.sqrt(r_eff) if config.use_rslora else r_eff)
        (parameters if name in wrappers else targets).append(rel)
        pattern = "^" + re.escape(rel)  # PEFT matches patterns with re.match(r"(.*\.)?(pattern)$", name)
        if r_eff != config.r:
            rank_pattern[pattern] = r_eff
        if not math.isclose(alpha_eff, config.alpha, rel_tol=1e-12):
            alpha_pattern[pattern] = alpha_eff
        if kind.linear:  # PEFT's fan_in_fan_out describes Linear-like weights only
            fan_in_fan_out.append(layer.fan_in_fan_out)
    for name, t in tokens.items():  # the rows' values, as PEFT keeps them
        tensors[f"{PEFT_PREFIX}{_relative(name, submodule)}.{TOKENS_KEY}"] = t.token_rows.detach()
    for saved in state.modules_to_save:
        rel = _relative(saved, submodule)
        for key, value in model.get_submodule(saved).state_dict().items():
            if f".{BANK}." not in f".{key}":  # other named adapters' copies
                tensors[f"{PEFT_PREFIX}{rel}.{key}"] = value
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "target_parameters": parameters or None,
        "fan_in_fan_out": bool(fan_in_fan_out) and all(fan_in_fan_out),
        "bias": "none",
        "use_rslora": config.use_rslora,
        "modules_to_save": [_relative(s, submodule) for s in state.modules_to_save] or None,
        "trainable_token_indices": {_relative(n, submodule): t.token_indices.tolist() for n, t in tokens.items()}
        or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
    }
    directory = Path(directory)
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(directory / WEIGHTS_NAME, save(data, metadata={"format": "pt"}))
    atomic_write_bytes(directory / CONFIG_NAME, json.dumps(peft_config, indent=2, sort_keys=True).encode())
    return directory


def _check_peft_ties(model: nn.Module, submodule: str) -> None:
    """Refuse (one line) trainable token rows read by a tied module where PEFT would not tie them: PEFT ties the
    modules holding a transformers model's input embedding when its config has ``tie_word_embeddings``."""
    readers = token_readers(model)
    hf = model.get_submodule(submodule) if submodule else model
    for name, module in token_modules(model).items():
        followers = sorted(n for n, m in readers.items() if m.token_leader is module)
        if not followers:
            continue
        getter = getattr(hf, "get_input_embeddings", None)
        tied = bool(getattr(getattr(hf, "config", None), "tie_word_embeddings", False))
        if not (tied and callable(getter) and getter() is module):
            raise LoRAConfigError(
                f"the trainable token rows of {name} are read by {followers[0]}, which holds the same weight; PEFT "
                "ties only a transformers model's input embedding (config.tie_word_embeddings=True) to its output: "
                "save with save_adapter(), or untie the weights"
            )


def export_peft_adapters(
    model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None, submodule: str = ""
) -> Path:
    """Every named adapter in PEFT's multi-adapter layout: ``"default"`` (or the first) in ``directory``,
    each other one in ``directory/<name>`` (``PeftModel.from_pretrained(base, directory)`` then
    ``model.load_adapter(directory/<name>, adapter_name=<name>)``). Returns the directory."""
    names = list_adapters(model)
    first = "default" if "default" in names else names[0]
    directory = Path(directory)
    for name in names:
        target = directory if name == first else directory / name
        export_peft_adapter(model, target, base_model_name_or_path, submodule, adapter_name=name)
    return directory


def _peft_pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's per-module override lookup: ``re.match(rf"(.*\\.)?({pattern})$", name)``, first match."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def read_peft_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The ``adapter_config.json`` dict and tensors of a PEFT adapter directory, checked for
    features lora_lightning cannot reproduce."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterFileError(
            f"{str(directory)!r} is not a PEFT adapter directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(adapters saved as adapter_model.bin: load them with PEFT and re-save with safe_serialization=True)"
        )
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"{str(config_path)!r} is not valid JSON: {exc}") from None
    if cfg.get("peft_type") != "LORA":
        raise AdapterFileError(
            f"{str(directory)!r} holds a {cfg.get('peft_type')!r} adapter; only PEFT LoRA adapters can be imported"
        )
    bad = [f"{k}={cfg[k]!r}" for k, ok in _UNSUPPORTED.items() if k in cfg and cfg[k] not in ok]
    if cfg.get("bias", "none") != "none":
        bad.append(f"bias={cfg['bias']!r}")
    if bad:
        raise LoRAConfigError(
            f"the PEFT adapter in {str(directory)!r} uses {', '.join(bad)}, which lora_lightning does not support "
            "(plain LoRA only: no DoRA, LoRA biases, trained biases, layer replication or selective layers)"
        )
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise LoRAConfigError(
            f"the PEFT adapter in {str(directory)!r} was made with init_lora_weights={init!r}, which rewrites the base "
            "weights it trains on (the original base plus this adapter is another model): save it in PEFT with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=<its initial adapter>), which writes the "
            "equivalent plain LoRA for the original base, and import that"
        )
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise AdapterFileError(f"{str(weights_path)!r} is not a readable safetensors file: {exc}") from None
    return cfg, tensors


_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?:lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight|lora_embedding_(?P<eab>[AB])(?:\.[^.]+)?)$"
)


def import_peft_adapter(
    model: nn.Module, directory: str | os.PathLike, submodule: str = "", adapter_name: str | None = None
) -> LoRAConfig:
    """Inject LoRA into ``model`` with the structure of the PEFT adapter in ``directory`` and load its
    weights, so outputs equal ``PeftModel``'s. A model that has adapters takes it as a new named adapter
    ``adapter_name`` (inactive; same adapted modules required); a fresh model names it ``adapter_name``.

    ``submodule``: where the Hugging Face model sits inside ``model`` (e.g. ``"model"``).
    Returns the equivalent :class:`LoRAConfig` (exact module names as targets).
    """
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    if has_lora(model) and adapter_name is None:
        raise AlreadyInjectedError(
            f"{type(model).__name__} already has LoRA adapters; import a PEFT adapter into a model without "
            "adapters (remove_lora / merge_and_unload first), or as a named adapter: adapter_name=..."
        )
    cfg, tensors = read_peft_adapter(directory)
    prefix = submodule + "." if submodule else ""
    parameters = _peft_parameters(model.get_submodule(submodule) if submodule else model, cfg)  # PEFT module -> ours
    lora: dict[str, dict[str, Tensor]] = {}
    other: dict[str, Tensor] = {}
    rows: dict[str, Tensor] = {}  # trainable token rows, by module
    for key, value in tensors.items():
        match = _LORA_KEY.match(key)
        if key.endswith("." + TOKENS_KEY):
            rows[key.removeprefix(PEFT_PREFIX)[: -len(TOKENS_KEY) - 1]] = value
        elif match:
            module = parameters.get(match["module"], match["module"])
            lora.setdefault(module, {})[match["ab"] or match["eab"]] = value
        elif ".lora_" in key:
            raise LoRAConfigError(f"unsupported PEFT tensor {key!r} (only lora_A/lora_B weights are supported)")
        else:
            other[key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key] = value
    if not lora:
        raise AdapterFileError(f"the PEFT adapter in {str(directory)!r} holds no lora_A/lora_B tensors")
    incomplete = [m for m, ab in lora.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise AdapterFileError(f"PEFT adapter lacks lora_A or lora_B for {incomplete[:3]}")
    token_indices = _peft_token_indices(cfg, rows, directory)
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    targeted = set(parameters.values())
    for module, ab in lora.items():
        r_m = ab["A"].shape[0]
        if module in targeted:  # PEFT's r is per expert: its lora_A stacks r·E rows
            r_m = int(_peft_pattern_value(cfg.get("rank_pattern") or {}, module, r))
        a_m = float(_peft_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha))
        if r_m != r:
            rank_pattern[prefix + module] = r_m
        if a_m != alpha:
            alpha_pattern[prefix + module] = a_m
    config = LoRAConfig(
        r=r,
        alpha=alpha,
        dropout=float(cfg.get("lora_dropout") or 0.0),
        targets=[prefix + m for m in lora if m not in targeted],
        target_parameters=[prefix + m for m in lora if m in targeted],
        # PEFT task types add default heads ("classifier", "score"): keep those the file has tensors for
        modules_to_save=[
            prefix + m
            for m in (cfg.get("modules_to_save") or [])
            if any(k.startswith(m + ".") or f".{m}." in k for k in other)
        ],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=bool(cfg.get("use_rslora", False)),
        trainable_token_indices={prefix + m: i for m, i in token_indices.items()} or None,
    )
    for module in lora:
        if module in targeted:
            continue
        try:
            target = model.get_submodule(prefix + module)
        except AttributeError:
            raise AdapterMismatchError(
                f"the PEFT adapter adapts {module!r}, which {type(model).__name__} does not have"
            ) from None
        kind = registry.kind_of(target)
        if kind is None:
            raise TargetNotFoundError(
                f"the PEFT adapter adapts {module!r}, a {type(target).__name__}, which lora_lightning does not adapt"
            )
        kind.check_peft_import(target, prefix + module)
    if has_lora(model):
        add_adapter(model, adapter_name, config)  # type: ignore[arg-type]
        try:
            with use_adapter(model, adapter_name, trainable=True):  # type: ignore[arg-type]
                _copy_peft_tensors(model, lora, other, prefix, rows)
        except BaseException:
            delete_adapter(model, adapter_name)  # type: ignore[arg-type]
            raise
        return config
    if adapter_name is not None:
        add_adapter(model, adapter_name, config)
    else:
        inject_lora(model, config)
    _copy_peft_tensors(model, lora, other, prefix, rows)
    return config


def _peft_token_indices(cfg: dict[str, Any], rows: dict[str, Tensor], directory: str | os.PathLike) -> dict[str, list]:
    """``{module: indices}`` of a PEFT adapter's trainable token rows (PEFT's ``trainable_token_indices``, a list for
    the input embedding or ``{name: indices}``; a tied module's rows are not in the file: it follows the embedding)."""
    spec = cfg.get("trainable_token_indices")
    out = {}
    for module, value in rows.items():
        if isinstance(spec, dict):
            key = next((k for k in spec if module == k or module.endswith("." + k)), None)
            indices = spec.get(key) if key is not None else None
        else:
            indices = spec
        if not isinstance(indices, list) or len(indices) != value.shape[0]:
            raise AdapterFileError(
                f"the PEFT adapter in {str(directory)!r} holds {value.shape[0]} trainable token rows for {module} but "
                f"its trainable_token_indices={spec!r} gives {indices!r} for it"
            )
        out[module] = indices
    return out


def _peft_parameters(model: nn.Module, cfg: dict[str, Any]) -> dict[str, str]:
    """``{PEFT module name: parameter target}`` for a PEFT adapter with ``target_parameters``: the parameters
    PEFT's matching finds in ``model`` (adapted already or not), at the nesting PEFT gives them."""
    names = cfg.get("target_parameters") or []
    if not names:
        return {}
    probe = LoRAConfig(targets=[], target_parameters=list(names))
    found = [t.name for t in resolve_targets(model, probe)]
    return {wrapper: name for name, wrapper in peft_module_names(model, found).items()}


def _copy_peft_tensors(
    model: nn.Module,
    lora: dict[str, dict[str, Tensor]],
    other: dict[str, Tensor],
    prefix: str,
    rows: dict[str, Tensor] | None = None,
) -> None:
    params = model.state_dict()
    for module, value in (rows or {}).items():
        key = f"{prefix}{module}.token_rows"
        if key not in params or tuple(params[key].shape) != tuple(value.shape):
            raise AdapterMismatchError(
                f"PEFT trainable token rows for {module} have shape {tuple(value.shape)} but the model has "
                f"{tuple(params[key].shape) if key in params else 'none there'}"
            )
        with torch.no_grad():
            params[key].copy_(value)
    layers = lora_layers(model)
    with torch.no_grad():
        for module, ab in lora.items():
            layer = layers.get(prefix + module)
            A, B = ab["A"], ab["B"]
            if layer is not None:  # PEFT's layout -> this layer's (a MoE expert stack's lora_B)
                A, B = registry.layer_kind(layer.lora_kind).from_peft(layer, A, B)
            for leaf, value in (("lora_A", A), ("lora_B", B)):
                key = f"{prefix}{module}.{leaf}"
                if key not in params or tuple(params[key].shape) != tuple(value.shape):
                    got = tuple(params[key].shape) if key in params else "missing"
                    raise AdapterMismatchError(
                        f"PEFT tensor for {module}.{leaf} has shape {tuple(value.shape)} but the model has {got}; "
                        "the adapter was made for another architecture or size"
                    )
                params[key].copy_(value)
        for key, value in other.items():
            full = prefix + key
            if full not in params:
                raise AdapterMismatchError(
                    f"PEFT modules_to_save tensor {key!r} has no counterpart {full!r} in the model"
                )
            params[full].copy_(value)


__all__ = ["export_peft_adapter", "export_peft_adapters", "import_peft_adapter", "read_peft_adapter"]
