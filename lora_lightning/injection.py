"""Finding the weight matrices to adapt, replacing them with LoRA layers, and freezing the rest.

Targets are resolved against module names from ``model.named_modules()``:

* aliases ``q``, ``k``, ``v``, ``o``, ``mlp`` cover the usual names of BERT/RoBERTa/ViT
  (``attention.self.query`` ...), Llama/Mistral/Qwen (``q_proj`` ... ``down_proj``), T5
  (``SelfAttention.q``), DistilBERT (``q_lin``), plain PyTorch (``q_proj``/``out_proj``,
  ``linear1``/``linear2``); ``all-linear`` adapts every Linear except output heads;
* a plain string is a dotted-name suffix (``attention.self.query`` matches
  ``bert.encoder.layer.3.attention.self.query``);
* a string with ``*``, ``?`` or ``[`` is a glob on the full name;
* ``re:<regex>`` is ``re.fullmatch`` on the full name.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from torch import Tensor, nn

from .config import LoRAConfig
from .fused import FusedLayout, fused_layout, fused_out_features
from .errors import AlreadyInjectedError, LoRAConfigError, NotInjectedError, RankTooLargeError, TargetNotFoundError
from .layers import (
    LORA_PARAM_NAMES,
    FusedSlices,
    LoRAConv1D,
    LoRALinear,
    LoRAMixin,
    LoRAMultiheadAttention,
    is_conv1d,
    is_lora_layer,
    is_lora_module,
    resolve_dtype,
)

# alias -> name suffixes (regex fragments anchored at a dot boundary and at the end of the name)
ALIASES: dict[str, tuple[str, ...]] = {
    "q": ("query", "q_proj", "q_lin", "q", "to_q", "wq", "query_proj", "q_attn"),
    "k": ("key", "k_proj", "k_lin", "k", "to_k", "wk", "key_proj"),
    "v": ("value", "v_proj", "v_lin", "v", "to_v", "wv", "value_proj"),
    "o": (
        r"attention\.output\.dense",  # BERT / RoBERTa / ViT
        "o_proj",  # Llama / Mistral / Qwen
        "out_proj",  # BART / OPT / plain PyTorch
        "out_lin",  # DistilBERT
        r"(?:SelfAttention|EncDecAttention)\.o",  # T5
        r"to_out\.0",
        r"attention\.wo",  # Meta Llama layout
        r"attn\.c_proj",  # GPT-2
        r"attn\.proj",  # timm ViT
    ),
    "mlp": (
        r"intermediate\.dense",  # BERT up-projection
        r"(?<!attention\.)output\.dense",  # BERT down-projection (not the attention output!)
        "gate_proj",
        "up_proj",
        "down_proj",
        r"mlp\.c_fc",
        r"mlp\.c_proj",
        r"DenseReluDense\.wi(?:_0|_1)?",
        r"DenseReluDense\.wo",
        "fc1",
        "fc2",
        r"ffn\.lin1",
        r"ffn\.lin2",
        "linear1",
        "linear2",
        r"feed_forward\.w[123]",
    ),
}
HEAD_NAMES = ("classifier", "lm_head", "score", "qa_outputs", "head", "pooler", "cls")
ALL_LINEAR = "all-linear"


# --------------------------------------------------------------------------- patterns
def compile_pattern(spec: str) -> Callable[[str], bool]:
    """A predicate on full module names for a target spec (alias, suffix, glob or ``re:``)."""
    if spec in ALIASES:
        regex = re.compile(r"(?:^|\.)(?:" + "|".join(ALIASES[spec]) + r")$")
        return lambda name: regex.search(name) is not None
    if spec == ALL_LINEAR:
        return lambda name: not any(part in HEAD_NAMES for part in name.split("."))
    if spec.startswith("re:"):
        try:
            regex = re.compile(spec[3:])
        except re.error as exc:
            raise LoRAConfigError(f"target {spec!r} is not a valid regular expression: {exc}") from None
        return lambda name: regex.fullmatch(name) is not None
    if any(c in spec for c in "*?["):
        return lambda name: fnmatch.fnmatchcase(name, spec)
    return lambda name: name == spec or name.endswith("." + spec)


def block_index(name: str) -> int | None:
    """The block a module belongs to: the first all-digit component of its dotted name."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def summarize_names(names: Iterable[str], limit: int = 40) -> str:
    """Names with block indices folded to ``{i}``, de-duplicated, e.g. ``encoder.layer.{i}.query``."""
    seen: dict[str, None] = {}
    for n in names:
        seen[re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "{i}", n)] = None
    folded = list(seen)
    text = ", ".join(folded[:limit])
    return text + (f", ... ({len(folded) - limit} more)" if len(folded) > limit else "")


# --------------------------------------------------------------------------- planning
def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules LoRA can wrap whole (``nn.Linear``, GPT-2 ``Conv1D``), by full name, excluding adapted ones."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) or is_conv1d(module)) and not is_lora_module(module):
            found[name] = module
    return found


def fused_modules(model: nn.Module) -> dict[str, tuple[nn.Module, "FusedLayout"]]:
    """Fused projections (GPT-2 ``c_attn``, ``qkv``, ``nn.MultiheadAttention``) whose row blocks
    the aliases ``q``/``k``/``v`` can target, with their layout."""
    found = {}
    for name, module in model.named_modules():
        if is_lora_module(module):
            continue
        layout = fused_layout(name, module)
        if layout is not None:
            found[name] = (module, layout)
    return found


def _module_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a wrappable module (Conv1D stores its weight ``d_in x d_out``)."""
    if is_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0]
    return module.out_features, module.in_features


@dataclass
class AdapterSpec:
    """One module to adapt: its name, adapted shape ``(d_out, d_in)``, rank and alpha.

    For a fused projection ``parts`` names the adapted row blocks (e.g. ``("q", "v")`` of GPT-2's
    ``c_attn``) and ``d_out`` is the sum of their sizes; each block gets its own ``A_i``, ``B_i``.
    """

    name: str
    d_out: int
    d_in: int
    r: int
    alpha: float
    parts: tuple[str, ...] = ()
    fused: FusedSlices | None = field(default=None, repr=False, compare=False)

    @property
    def num_params(self) -> int:
        """``r·(d_in + d_out)`` (per adapted block of a fused matrix: ``Σ r·(d_in + size_i)``)."""
        return self.r * (max(1, len(self.parts)) * self.d_in + self.d_out)


def _first_match(patterns: dict[str, object], name: str) -> object | None:
    for pattern, value in patterns.items():
        if compile_pattern(pattern)(name):
            return value
    return None


def resolve_modules_to_save(model: nn.Module, patterns: list[str]) -> list[str]:
    """Full names of modules matching ``modules_to_save`` (outermost matches only)."""
    names = [n for n, _ in model.named_modules() if n]
    chosen: list[str] = []
    for pattern in patterns:
        match = compile_pattern(pattern)
        hits = [n for n in names if match(n)]
        if not hits:
            raise TargetNotFoundError(
                f"modules_to_save entry {pattern!r} matched no module. Top-level modules: "
                f"{[n for n, _ in model.named_children()]}; candidates include {summarize_names(names, 25)}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    # drop names nested inside another chosen module
    return [n for n in chosen if not any(n.startswith(o + ".") for o in chosen if o != n)]


def plan_injection(model: nn.Module, config: LoRAConfig) -> list[AdapterSpec]:
    """Resolve ``config`` against ``model`` without changing it. Raises on any mismatch."""
    candidates = adaptable_modules(model)
    saved = resolve_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    kept = lambda n: not any(n == s or n.startswith(s + ".") for s in saved)  # noqa: E731
    candidates = {n: m for n, m in candidates.items() if kept(n)}
    fused = {n: v for n, v in fused_modules(model).items() if kept(n)}
    if not candidates and not fused:
        raise TargetNotFoundError(
            f"{type(model).__name__} has no nn.Linear module to adapt "
            "(if the model is built in configure_model(), inject after it has run)"
        )
    chosen: dict[str, set[str] | None] = {}  # name -> adapted fused parts, None = whole matrix
    all_names = [n for n, _ in model.named_modules() if n]
    for spec in config.targets:
        match = compile_pattern(spec)
        hits = [n for n in candidates if match(n)]
        part_hits = [n for n, (_, layout) in fused.items() if spec in layout.parts]
        if not hits and not part_hits:
            others = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in all_names if match(n)][:5]
            hint = (
                f" It matches non-Linear module(s) {others}: LoRA adapts Linear layers, target their Linear children."
                if others
                else ""
            )
            raise TargetNotFoundError(
                f"target {spec!r} matched no Linear module in {type(model).__name__}.{hint} "
                f"Linear modules: {summarize_names(candidates)}. Use an alias (q, k, v, o, mlp, all-linear), "
                "a name suffix such as 'attention.self.query', a glob such as '*.query', or 're:<regex>'."
            )
        for n in hits:
            chosen[n] = None  # the whole matrix (wins over adapting some of its blocks)
        for n in part_hits:
            if n not in chosen:
                chosen[n] = set()
            if chosen[n] is not None:
                chosen[n].add(spec)  # type: ignore[union-attr]
    names = list(chosen)
    if config.layers is not None:
        indexed = {n: block_index(n) for n in names}
        present = sorted({i for i in indexed.values() if i is not None})
        if not present:
            raise LoRAConfigError(
                f"layers={config.layers} was given but no targeted module has a block index in its name "
                f"(targeted: {summarize_names(names)}); drop 'layers' or target by name"
            )
        n_blocks = present[-1] + 1
        wanted = {i + n_blocks if i < 0 else i for i in config.layers}
        missing = sorted(i for i in wanted if i not in present)
        if missing:
            raise LoRAConfigError(
                f"layers={config.layers}: block(s) {missing} do not exist among the targeted modules; "
                f"available blocks: {present} (negative indices count from the end)"
            )
        names = [n for n in names if indexed[n] in wanted]
    for n in names:
        module = model.get_submodule(n)
        if chosen[n] and isinstance(module, nn.MultiheadAttention) and not module._qkv_same_embed_dim:
            raise LoRAConfigError(
                f"{n} is an nn.MultiheadAttention with kdim/vdim != embed_dim (separate q/k/v_proj_weight); LoRA on "
                f"its {sorted(chosen[n])} is not supported: target only 'o' (its out_proj) there"
            )
    for pattern in list(config.rank_pattern) + list(config.alpha_pattern):
        if not any(compile_pattern(pattern)(n) for n in names):
            raise TargetNotFoundError(
                f"rank/alpha pattern {pattern!r} matches none of the adapted modules: {summarize_names(names)}"
            )
    specs = []
    for n in names:
        r = int(_first_match(config.rank_pattern, n) or config.r)  # type: ignore[call-overload]
        alpha = float(_first_match(config.alpha_pattern, n) or config.alpha)  # type: ignore[arg-type]
        if chosen[n]:
            module, layout = fused[n]
            d_out, d_in = fused_out_features(module)
            slices = layout.slices(d_out, n, sorted(chosen[n]))  # type: ignore[arg-type]
            smallest = min(size for p, size in zip(slices.parts, slices.sizes) if p in slices.adapted)
            spec = AdapterSpec(n, slices.adapted_rows, d_in, r, alpha, slices.adapted, slices)
        else:
            d_out, d_in = _module_dims(candidates[n])
            smallest = d_out
            spec = AdapterSpec(n, d_out, d_in, r, alpha)
        if spec.r > min(spec.d_in, smallest):
            raise RankTooLargeError(
                f"r={spec.r} is larger than min(d_in, d_out)={min(spec.d_in, smallest)} for {n} "
                f"({smallest}x{spec.d_in}{', per fused block' if spec.parts else ''}); choose r <= "
                f"{min(spec.d_in, smallest)} (or lower it for this module with rank_pattern)"
            )
        specs.append(spec)
    return specs


# --------------------------------------------------------------------------- state
@dataclass
class LoRAState:
    """What injection recorded on the model: the config, adapted and fully-trained modules."""

    config: LoRAConfig
    adapted: list[str]
    modules_to_save: list[str]
    fingerprint: dict = field(default_factory=dict)


STATE_ATTR = "_lora_state"


def get_lora_state(model: nn.Module) -> LoRAState:
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


def lora_layers(model: nn.Module) -> dict[str, LoRAMixin]:
    return {n: m for n, m in model.named_modules() if is_lora_layer(m)}  # type: ignore[misc]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# --------------------------------------------------------------------------- freezing
def mark_trainable(model: nn.Module, state: LoRAState) -> None:
    """Freeze everything except A/B, biases per ``config.bias`` and ``modules_to_save``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in model.named_modules():
        if is_lora_layer(module):
            for pname in getattr(module, "lora_trainable_names", LORA_PARAM_NAMES):  # variants add e.g. DoRA's m
                getattr(module, pname).requires_grad_(True)
            if state.config.bias == "lora_only" and getattr(module, "bias", None) is not None:
                module.bias.requires_grad_(True)
    if state.config.bias == "all":
        for pname, p in model.named_parameters():
            if pname == "bias" or pname.endswith(".bias"):
                p.requires_grad_(True)
    for name in state.modules_to_save:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


@dataclass
class ParameterCount:
    """Trainable vs total parameters (shared parameters counted once)."""

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
    adapter = {
        f"{n}.{leaf}" if n else leaf
        for n, m in lora_layers(model).items()
        for leaf in getattr(m, "lora_adapter_names", LORA_PARAM_NAMES)
    }
    for name, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
        if name in adapter:
            lora += p.numel()
    return ParameterCount(trainable, total, lora)


# --------------------------------------------------------------------------- injection
def _layer_kwargs(config: LoRAConfig, spec: AdapterSpec, base_weight: Tensor) -> dict[str, Any]:
    """The adapter arguments every LoRA layer class takes, for one resolved target."""
    return dict(
        r=spec.r,
        alpha=spec.alpha,
        scaling=config.scaling_for(spec.r, spec.alpha),
        dropout=config.dropout,
        init=config.init,
        adapter_dtype=resolve_dtype(config.adapter_dtype, base_weight.dtype),
    )


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[AdapterSpec]:
    """Replace every targeted ``nn.Linear`` by a :class:`LoRALinear` and freeze the rest.

    Returns the list of adapted matrices. Raises :class:`AlreadyInjectedError` if the model
    already has adapters, :class:`TargetNotFoundError` / :class:`LoRAConfigError` on a bad config
    (before anything is modified).
    """
    if has_lora(model):
        existing = list(lora_layers(model))
        raise AlreadyInjectedError(
            f"{type(model).__name__} already has LoRA adapters on {len(existing)} module(s) "
            f"({summarize_names(existing, 5)}); injecting again would stack adapters. Use load_adapter() to "
            "swap adapter weights, or remove_lora()/merge_and_unload() first"
        )
    specs = plan_injection(model, config)
    from .fingerprint import base_fingerprint  # local: fingerprint imports this module

    fingerprint = base_fingerprint(model, [s.name for s in specs])
    from .variants import VariantBuilder, uses_variant_layers  # DoRA, VeRA, PiSSA, AdaLoRA, quantized base

    builder = VariantBuilder(model, config, specs) if uses_variant_layers(config) else None  # raises before changes
    # nn.MultiheadAttention reads its weights directly: replace it by a host first (q/k/v adapters
    # on in_proj_weight), then its out_proj by a LoRALinear whose ΔW the host adds.
    hosts: dict[str, AdapterSpec | None] = {}
    for s in specs:
        if isinstance(model.get_submodule(s.name), nn.MultiheadAttention):
            hosts[s.name] = s
    for s in specs:
        parent = s.name.rpartition(".")[0]
        if isinstance(model.get_submodule(parent) if parent else model, nn.MultiheadAttention):
            hosts.setdefault(parent, None)
    for name, s in hosts.items():
        base = model.get_submodule(name)
        kw = dict(parts=s.parts, **_layer_kwargs(config, s, base.in_proj_weight)) if s is not None else {}
        host = LoRAMultiheadAttention(base, name=name, **kw)
        host.train(base.training)
        set_submodule(model, name, host)
        _pause_nested_tensor_fast_path(model, name)
    for s in specs:
        if s.name in hosts:
            continue
        base = model.get_submodule(s.name)
        cls = LoRAConv1D if is_conv1d(base) else LoRALinear
        layer = builder.build(base, s) if builder is not None else cls(
            base, name=s.name, fused=s.fused, **_layer_kwargs(config, s, base.weight)
        )
        layer.train(base.training)
        set_submodule(model, s.name, layer)
    saved = resolve_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    state = LoRAState(config=config, adapted=[s.name for s in specs], modules_to_save=saved, fingerprint=fingerprint)
    object.__setattr__(model, STATE_ATTR, state)
    mark_trainable(model, state)
    return specs


_NESTED_ATTR = "_lora_paused_use_nested_tensor"


def _pause_nested_tensor_fast_path(model: nn.Module, host_name: str) -> None:
    """``nn.TransformerEncoder`` may turn padded input into nested tensors (a fast path that reads
    ``in_proj_weight`` directly); switch that off while a LoRA attention host sits inside it."""
    for enc_name, enc in model.named_modules():
        if isinstance(enc, nn.TransformerEncoder) and host_name.startswith(f"{enc_name}." if enc_name else ""):
            if getattr(enc, "use_nested_tensor", False):
                enc.use_nested_tensor = False
                setattr(enc, _NESTED_ATTR, True)


def remove_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by its plain base layer (merged weights stay merged)."""
    state = get_lora_state(model)
    wrapped = [(n, m) for n, m in model.named_modules() if is_lora_module(m)]
    for name, layer in reversed(wrapped):  # children (an attention host's out_proj) before parents
        set_submodule(model, name, layer.to_base())  # type: ignore[attr-defined]
    for enc in model.modules():
        if getattr(enc, _NESTED_ATTR, False):
            enc.use_nested_tensor = True
            delattr(enc, _NESTED_ATTR)
    object.__delattr__(model, STATE_ATTR)
    del state
    return model


def adapter_param_names(model: nn.Module) -> list[str]:
    """State-dict keys that make up the adapter: A/B, trainable biases, ``modules_to_save`` (incl. buffers)."""
    state = get_lora_state(model)
    keys: list[str] = []
    sd_keys = model.state_dict(keep_vars=True).keys()
    adapted = lora_layers(model)
    saved = tuple(s + "." for s in state.modules_to_save)
    for key in sd_keys:
        owner, _, leaf = key.rpartition(".")
        if owner in adapted and leaf in getattr(adapted[owner], "lora_adapter_names", LORA_PARAM_NAMES):
            keys.append(key)
        elif key.startswith(saved):
            keys.append(key)
        elif leaf == "bias" and (
            state.config.bias == "all" or (state.config.bias == "lora_only" and owner in adapted)
        ):
            keys.append(key)
    return keys


def lora_parameter_count(specs: Iterable[AdapterSpec]) -> int:
    """Closed form ``Σ r·(d_in + d_out)`` over the adapted matrices."""
    return sum(s.num_params for s in specs)


def describe(model: nn.Module) -> list[AdapterSpec]:
    """The adapted matrices of an injected model (name, shape, r, alpha)."""
    out = []
    for name, layer in lora_layers(model).items():
        d_out, d_in, parts = layer.adapter_dims()
        out.append(AdapterSpec(name, d_out, d_in, layer.r, layer.alpha, parts, layer.fused))
    return out


def set_adapter_trainable(model: nn.Module, trainable: bool = True) -> None:
    """Toggle ``requires_grad`` of A and B only (e.g. to freeze an adapter for evaluation)."""
    for layer in lora_layers(model).values():
        for pname in getattr(layer, "lora_trainable_names", LORA_PARAM_NAMES):
            getattr(layer, pname).requires_grad_(trainable)


__all__ = [
    "ALIASES",
    "AdapterSpec",
    "LoRAState",
    "ParameterCount",
    "adapter_param_names",
    "count_parameters",
    "describe",
    "fused_modules",
    "get_lora_state",
    "has_lora",
    "inject_lora",
    "lora_layers",
    "lora_parameter_count",
    "mark_trainable",
    "plan_injection",
    "remove_lora",
]
