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
from typing import Callable, Iterable

from torch import nn

from .config import LoRAConfig
from .errors import AlreadyInjectedError, LoRAConfigError, NotInjectedError, RankTooLargeError, TargetNotFoundError
from .layers import LORA_PARAM_NAMES, LoRALinear, LoRAMixin, is_lora_layer, resolve_dtype

# alias -> name suffixes (regex fragments anchored at a dot boundary and at the end of the name)
ALIASES: dict[str, tuple[str, ...]] = {
    "q": ("query", "q_proj", "q_lin", "q", "to_q", "wq", "query_proj"),
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
    """Modules LoRA can wrap (``nn.Linear``), by full name, excluding those already adapted."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not is_lora_layer(module):
            found[name] = module
    return found


def _inside_multihead_attention(model: nn.Module, name: str) -> bool:
    parent_name = name.rpartition(".")[0]
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        return False
    return isinstance(parent, nn.MultiheadAttention)


@dataclass
class AdapterSpec:
    """One matrix to adapt: its module name, shape ``(d_out, d_in)``, rank and alpha."""

    name: str
    d_out: int
    d_in: int
    r: int
    alpha: float

    @property
    def num_params(self) -> int:
        """``r·(d_in + d_out)``: the size of A plus B."""
        return self.r * (self.d_in + self.d_out)


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
    candidates = {n: m for n, m in candidates.items() if not any(n == s or n.startswith(s + ".") for s in saved)}
    if not candidates:
        raise TargetNotFoundError(
            f"{type(model).__name__} has no nn.Linear module to adapt "
            "(if the model is built in configure_model(), inject after it has run)"
        )
    chosen: dict[str, None] = {}
    all_names = [n for n, _ in model.named_modules() if n]
    for spec in config.targets:
        match = compile_pattern(spec)
        hits = [n for n in candidates if match(n)]
        if not hits:
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
            chosen[n] = None
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
    mha = [n for n in names if _inside_multihead_attention(model, n)]
    if mha:
        raise TargetNotFoundError(
            f"{mha[0]} belongs to nn.MultiheadAttention, whose forward reads out_proj.weight directly, so a "
            "LoRA layer there would be silently ignored; target the model's own q/k/v/o Linear layers instead"
        )
    for pattern in list(config.rank_pattern) + list(config.alpha_pattern):
        if not any(compile_pattern(pattern)(n) for n in names):
            raise TargetNotFoundError(
                f"rank/alpha pattern {pattern!r} matches none of the adapted modules: {summarize_names(names)}"
            )
    specs = []
    for n in names:
        module = candidates[n]
        r = _first_match(config.rank_pattern, n) or config.r
        alpha = _first_match(config.alpha_pattern, n) or config.alpha
        spec = AdapterSpec(n, module.out_features, module.in_features, int(r), float(alpha))  # type: ignore[arg-type]
        if spec.r > min(spec.d_in, spec.d_out):
            raise RankTooLargeError(
                f"r={spec.r} is larger than min(d_in, d_out)={min(spec.d_in, spec.d_out)} for {n} "
                f"({spec.d_out}x{spec.d_in}); choose r <= {min(spec.d_in, spec.d_out)} "
                "(or lower it for this module with rank_pattern)"
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
            for pname in LORA_PARAM_NAMES:
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
    for name, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
        if name.rpartition(".")[2] in LORA_PARAM_NAMES:
            lora += p.numel()
    return ParameterCount(trainable, total, lora)


# --------------------------------------------------------------------------- injection
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
    for s in specs:
        base = model.get_submodule(s.name)
        dtype = resolve_dtype(config.adapter_dtype, base.weight.dtype)
        layer = LoRALinear(
            base,
            r=s.r,
            alpha=s.alpha,
            scaling=config.scaling_for(s.r, s.alpha),
            dropout=config.dropout,
            init=config.init,
            adapter_dtype=dtype,
            name=s.name,
        )
        layer.train(base.training)
        set_submodule(model, s.name, layer)
    saved = resolve_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    state = LoRAState(config=config, adapted=[s.name for s in specs], modules_to_save=saved, fingerprint=fingerprint)
    object.__setattr__(model, STATE_ATTR, state)
    mark_trainable(model, state)
    return specs


def remove_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by its plain base layer (merged weights stay merged)."""
    state = get_lora_state(model)
    for name, layer in lora_layers(model).items():
        set_submodule(model, name, layer.to_base())  # type: ignore[attr-defined]
    object.__delattr__(model, STATE_ATTR)
    del state
    return model


def adapter_param_names(model: nn.Module) -> list[str]:
    """State-dict keys that make up the adapter: A/B, trainable biases, ``modules_to_save`` (incl. buffers)."""
    state = get_lora_state(model)
    keys: list[str] = []
    sd_keys = model.state_dict(keep_vars=True).keys()
    adapted = set(state.adapted)
    saved = tuple(s + "." for s in state.modules_to_save)
    for key in sd_keys:
        owner, _, leaf = key.rpartition(".")
        if leaf in LORA_PARAM_NAMES and owner in adapted:
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
        out.append(AdapterSpec(name, layer.lora_B.shape[0], layer.lora_A.shape[1], layer.r, layer.alpha))
    return out


def set_adapter_trainable(model: nn.Module, trainable: bool = True) -> None:
    """Toggle ``requires_grad`` of A and B only (e.g. to freeze an adapter for evaluation)."""
    for layer in lora_layers(model).values():
        for pname in LORA_PARAM_NAMES:
            getattr(layer, pname).requires_grad_(trainable)


__all__ = [
    "ALIASES",
    "AdapterSpec",
    "LoRAState",
    "ParameterCount",
    "adapter_param_names",
    "count_parameters",
    "describe",
    "get_lora_state",
    "has_lora",
    "inject_lora",
    "lora_layers",
    "lora_parameter_count",
    "mark_trainable",
    "plan_injection",
    "remove_lora",
]
