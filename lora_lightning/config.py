"""The LoRA configuration: one validated dataclass shared by the core, the callback and the app.

:class:`LoRAConfig` holds the options every variant shares. A variant with options of its own
(VeRA's seed, AdaLoRA's schedule) registers a subclass whose extra fields are prefixed with the
variant's name; ``LoRAConfig(variant="vera", vera_seed=7)`` returns that subclass, so the flat
spelling works everywhere (Python, YAML, Hydra overrides, checkpoints) and each variant validates
its own fields. Two spellings of one thing are normalised: ``variant="rslora"`` is
``variant="lora", use_rslora=True`` and ``variant="qlora"`` is ``variant="lora", quantize_base="nf4"``.

Every field is a plain Python value so a config round-trips through JSON (safetensors metadata),
Lightning checkpoints, Hydra/OmegaConf and ``LightningCLI``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import registry
from .errors import LoRAConfigError

BIAS_OPTIONS = ("none", "all", "lora_only")
INIT_OPTIONS = ("kaiming", "gaussian", "gaussian_fan_in")
DTYPE_OPTIONS = (None, "float32", "bfloat16", "float16", "float64")

# variant name -> its config class; alias -> (variant, presets): the registry's, filled by register_variant
_VARIANT_CONFIGS: dict[str, type[LoRAConfig]] = registry.VARIANT_CONFIGS
# PEFT's LoraConfig names, a common first guess
_PEFT_NAMES = {
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "layers_to_transform": "layers",
    "use_dora": "variant='dora'",
}


def _plain(value: Any) -> Any:
    """OmegaConf containers / tuples -> plain lists and dicts (no-op for plain values)."""
    omegaconf = sys.modules.get("omegaconf")  # only if the caller uses it: never imported here
    if omegaconf is not None and isinstance(value, (omegaconf.DictConfig, omegaconf.ListConfig)):
        return omegaconf.OmegaConf.to_container(value, resolve=True)
    if isinstance(value, tuple):
        return list(value)
    return value


variant_names = registry.variant_names
_resolve_variant = registry.resolve_variant


def _option_owner(name: str) -> str | None:
    """The variant whose own config class declares option ``name`` (None for shared options)."""
    for variant, cls in _VARIANT_CONFIGS.items():
        if name in own_option_names(cls):
            return variant
    return None


def own_option_names(cls: type[LoRAConfig]) -> list[str]:
    """Fields a variant's config class adds to :class:`LoRAConfig`."""
    shared = {f.name for f in dataclasses.fields(LoRAConfig)}
    return [f.name for f in dataclasses.fields(cls) if f.name not in shared]


def _unknown_options_error(unknown: list[str], cls: type[LoRAConfig]) -> LoRAConfigError:
    known = sorted(f.name for f in dataclasses.fields(cls))
    hints = []
    for u in unknown:
        owner = _option_owner(u)
        if owner is not None:
            hints.append(f"{u!r} is an option of variant={owner!r}, not of variant={cls.variant_name!r}")
            continue
        guess = _PEFT_NAMES.get(u) or next(iter(difflib.get_close_matches(u, known, 1)), None)
        if guess:
            hints.append(f"use {guess if guess.startswith('variant') else repr(guess)} instead of {u!r}")
    hint = f" ({'; '.join(hints)})" if hints else ""
    return LoRAConfigError(f"unknown LoRA option(s) {unknown}{hint}; valid options are {known}")


@dataclass
class LoRAConfig:
    """Where and how to add ``h = W0·x + (alpha/r)·B·A·dropout(x)`` adapters (paper §4.1).

    Attributes:
        r: rank of every adapter (``A: r x d_in``, ``B: d_out x r``); §7.2 shows r=1..8 suffices.
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (or ``alpha / sqrt(r)``
            with ``use_rslora``), so re-tuning the learning rate is not needed when r changes (§4.1).
        dropout: dropout probability on the adapter input (not on the frozen path).
        targets: which layers get adapters: aliases ``q``, ``k``, ``v``, ``o``, ``mlp``,
            ``all-linear``; a dotted-name suffix (``attention.self.query``); a glob on the full
            module name (``*.layer.0.*.query``); or ``re:<regex>`` (``re.fullmatch`` on full names).
        layers: keep only modules whose block index (first integer in the module name) is in
            this list; negative indices count from the end. ``None`` = all blocks.
        bias: ``none`` (biases frozen), ``all`` (every bias trainable), ``lora_only`` (biases of
            adapted layers trainable) — loralib semantics. Trainable biases are saved with the adapter.
        modules_to_save: modules (same pattern syntax, any type) trained in full and saved with
            the adapter, e.g. a new classification head ``["classifier"]``.
        rank_pattern: per-pattern overrides of ``r`` (layer-wise ranks), first matching pattern wins, e.g.
            ``{"v": 16, "*.layer.5.*": 2}``.
        alpha_pattern: per-pattern overrides of ``alpha``, the same way.
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead of ``alpha / r``.
        init: initialisation of ``A``: ``kaiming`` (uniform, std ``1/sqrt(3·d_in)``, as loralib/PEFT),
            ``gaussian`` (std ``1/r``, PEFT's ``init_lora_weights="gaussian"``) or ``gaussian_fan_in``
            (the paper's "random Gaussian" at loralib's scale: std ``1/sqrt(3·d_in)``, independent of
            ``r``: with ``alpha/r`` the change an Adam step makes to ``ΔW·x`` then falls about as
            ``1/sqrt(r)``, as with ``kaiming`` and in the paper's code; with ``gaussian`` it falls about
            as ``1/r``, so one learning rate cannot suit r=1 and r=64). ``B`` is always zero, so the
            adapted model starts exactly equal to the base.
        init_seed: draw each adapter's random initialisation from its own stream, seeded by
            ``(init_seed, module name, rank)``: runs with different seeds or ranks start from
            independent ``A`` matrices, and a run does not depend on what consumed the global RNG
            before injection. ``None``: the global torch RNG (reproducible with ``seed_everything``,
            but the first rows of a rank-64 ``A`` then equal a rank-8 ``A`` drawn from the same state).
        adapter_dtype: dtype of the adapter tensors (e.g. ``float32`` adapters on a ``bfloat16``
            base, the QLoRA recipe); kept through ``module.to(dtype)`` and Lightning's ``*-true``
            precisions. ``None`` = the base weight's dtype (and it follows the module's casts).
        variant: a registered variant (``lora``, ``dora``, ``pissa``, ``vera``, ``adalora``, ...) or
            an alias (``rslora``, ``qlora``); see docs/variants.md.
        quantize_base: store the adapted base weights quantized — ``nf4`` (torchao), ``int8`` (pure
            PyTorch), ``bnb-nf4`` / ``bnb-fp4`` / ``bnb-int8`` (bitsandbytes) — dequantized on the fly;
            combinable with every Linear variant.
        fuse_shared_inputs: run plain LoRA Linear layers that read the same tensor (q/k/v, gate/up) as
            one autograd node (one fused backward: one ``∂[A_1;...;A_n]`` GEMM, ``∂x`` summed in place;
            lora_lightning.shared_input).
            A speed setting only: results equal the unfused layers' up to float round-off.
        target_parameters: parameters to adapt that are no module's weight (PEFT's option of that name): a full
            parameter name or a dotted suffix of one, e.g. ``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``
            for transformers' MoE experts, whose 3-D ``[num_experts, ...]`` weights get one adapter per expert
            (PEFT's layout). Adds to ``targets``; with only parameters to adapt, set ``targets=[]``.
        trainable_token_indices: rows of an embedding to train on their own, the rest of it frozen (PEFT's option of
            that name; lora_lightning.tokens): a list of token ids (the model's input embedding) or
            ``{module name: [ids]}`` (a full name or a dotted suffix, e.g. ``{"embed_tokens": [...], "lm_head": [...]}``
            for an untied output layer). New tokens first: ``tokenizer.add_tokens(...)``, then
            ``model.resize_token_embeddings(len(tokenizer))``. A tied output head reads the same rows; adapter files
            hold only those rows (and their indices). ``None``: no token rows train.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    layers: list[int] | None = None
    bias: str = "none"
    modules_to_save: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init: str = "kaiming"
    init_seed: int | None = None
    adapter_dtype: str | None = None
    variant: str = "lora"
    quantize_base: str | None = None
    fuse_shared_inputs: bool = True
    target_parameters: list[str] = field(default_factory=list)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    # the registered name of this config class's variant; fields of a subclass that change what
    # saved adapter weights mean (compared when an adapter or checkpoint is loaded)
    variant_name: ClassVar[str] = "lora"
    structural_options: ClassVar[tuple[str, ...]] = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> LoRAConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        variant = kwargs.get("variant", args[names.index("variant")] if len(args) > names.index("variant") else None)
        target = cls
        if cls is LoRAConfig and variant is not None:
            target = _VARIANT_CONFIGS.get(_resolve_variant(variant)[0], cls)
        valid = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise _unknown_options_error(unknown, target)
        return object.__new__(target)

    def __post_init__(self) -> None:
        for name in ("targets", "target_parameters", "layers", "modules_to_save", "rank_pattern", "alpha_pattern"):
            setattr(self, name, _plain(getattr(self, name)))
        tokens = self.trainable_token_indices = _plain(self.trainable_token_indices)
        if isinstance(tokens, dict):
            self.trainable_token_indices = {k: _plain(v) for k, v in tokens.items()}
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if self.target_parameters is None:  # PEFT's default
            self.target_parameters = []
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            self.layers = [self.layers]
        variant, presets = _resolve_variant(self.variant)
        defaults = {f.name: f.default for f in dataclasses.fields(LoRAConfig)}
        for key, value in presets.items():  # an alias fills what the user left at its default
            if getattr(self, key) == defaults[key]:
                setattr(self, key, value)
        self.variant = variant
        if _VARIANT_CONFIGS.get(variant, type(self)) is not type(self):
            raise LoRAConfigError(
                f"{type(self).__name__} is the config of variant={self.variant_name!r}, not of variant={variant!r}; "
                f"use LoRAConfig(variant={variant!r}, ...)"
            )
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`LoRAConfigError` naming the bad field and the fix (variants extend this)."""
        check_rank(self.r, "r")
        check_alpha(self.alpha, "alpha")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= float(self.dropout) < 1.0:
            raise LoRAConfigError(
                f"dropout={self.dropout!r} is outside [0, 1): set lora.dropout to a probability such as 0.05"
            )
        for flag in ("use_rslora", "fuse_shared_inputs"):
            if not isinstance(getattr(self, flag), bool):
                raise LoRAConfigError(f"{flag}={getattr(self, flag)!r} must be true or false (a bool, not a string)")
        if self.bias not in BIAS_OPTIONS:
            raise LoRAConfigError(f"bias={self.bias!r} is not one of {BIAS_OPTIONS}: set lora.bias to one of them")
        if self.init not in INIT_OPTIONS:
            raise LoRAConfigError(f"init={self.init!r} is not one of {INIT_OPTIONS}")
        if self.init_seed is not None and (isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int)):
            raise LoRAConfigError(
                f"init_seed={self.init_seed!r} must be an integer or null (null: the global torch RNG)"
            )
        if self.adapter_dtype not in DTYPE_OPTIONS:
            raise LoRAConfigError(
                f"adapter_dtype={self.adapter_dtype!r} is not one of {DTYPE_OPTIONS}: use e.g. 'float32' or null"
            )
        if not isinstance(self.target_parameters, list) or not all(
            isinstance(t, str) and t for t in self.target_parameters
        ):
            raise LoRAConfigError(
                f"target_parameters={self.target_parameters!r} must be a list of parameter names, e.g. "
                "['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']"
            )
        if (
            not isinstance(self.targets, list)
            or not (self.targets or self.target_parameters)
            or not all(isinstance(t, str) and t for t in self.targets)
        ):
            raise LoRAConfigError(
                f"targets={self.targets!r} must be a non-empty list of strings, e.g. ['q', 'v'] "
                "or ['attention.self.query', 're:.*value'] (it may be [] when target_parameters names parameters)"
            )
        check_token_indices(self.trainable_token_indices)
        if self.layers is not None and (
            not isinstance(self.layers, list)
            or not self.layers
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)
        ):
            raise LoRAConfigError(
                f"layers={self.layers!r} must be null or a non-empty list of block indices, e.g. [0, 1]"
            )
        if not isinstance(self.modules_to_save, list) or not all(isinstance(m, str) for m in self.modules_to_save):
            raise LoRAConfigError(f"modules_to_save={self.modules_to_save!r} must be a list of module names")
        if not isinstance(self.rank_pattern, dict) or not isinstance(self.alpha_pattern, dict):
            raise LoRAConfigError("rank_pattern and alpha_pattern must be mappings {pattern: value}, e.g. {'v': 16}")
        for pattern, r in self.rank_pattern.items():
            check_rank(r, f"rank_pattern[{pattern!r}]")
        for pattern, a in self.alpha_pattern.items():
            check_alpha(a, f"alpha_pattern[{pattern!r}]")
        if self.quantize_base is not None and self.quantize_base not in registry.QUANTIZERS:
            raise LoRAConfigError(
                f"quantize_base={self.quantize_base!r} is not one of {[None, *registry.QUANTIZERS]}: use 'nf4' "
                "(torchao), 'bnb-nf4' (bitsandbytes), 'int8' (pure PyTorch) or null"
            )

    # ------------------------------------------------------------- conversions
    def scaling_for(self, r: int, alpha: float) -> float:
        """The factor multiplying ``B·A``: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA)."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, drop_other_variant_defaults: bool = False) -> LoRAConfig:
        """Build a config from a flat mapping (YAML, JSON, a checkpoint).

        With ``drop_other_variant_defaults`` options of variants other than the selected one are
        dropped when they hold their default (a Hydra schema or an old checkpoint lists every
        variant's options); one set to another value raises, since it would have no effect.
        """
        data = dict(_plain(data))
        if drop_other_variant_defaults:
            active = _resolve_variant(data.get("variant", "lora"))[0]
            for key in list(data):
                owner = _option_owner(key)
                if owner is None or owner == active:
                    continue
                default = {f.name: f for f in dataclasses.fields(_VARIANT_CONFIGS[owner])}[key].default
                if data[key] != default:
                    raise LoRAConfigError(
                        f"{key}={data[key]!r} is an option of variant={owner!r} and has no effect with "
                        f"variant={data.get('variant', 'lora')!r}: drop it or set variant={owner!r}"
                    )
                del data[key]
        return LoRAConfig(**data) if cls is LoRAConfig else cls(**data)

    @classmethod
    def from_json(cls, text: str) -> LoRAConfig:
        return cls.from_dict(json.loads(text), drop_other_variant_defaults=True)

    def differences(self, other: LoRAConfig) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, as ``{field: (self_value, other_value)}`` (missing = None)."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a.get(k), b.get(k)) for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)}


def all_option_defaults() -> dict[str, Any]:
    """Every option of :class:`LoRAConfig` and of every registered variant, with its default: the
    schema behind the Hydra app's ``lora`` group and the callback's keyword arguments."""
    out = LoRAConfig().to_dict()
    for cls in _VARIANT_CONFIGS.values():
        defaults = {f.name: f for f in dataclasses.fields(cls)}
        for name in own_option_names(cls):
            f = defaults[name]
            out[name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


def check_rank(r: Any, what: str = "r") -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoRAConfigError(
            f"{what}={r!r} is not a positive integer: LoRA needs a rank r >= 1 (the paper uses 1..64)"
        )


def check_alpha(alpha: Any, what: str = "alpha") -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise LoRAConfigError(f"{what}={alpha!r} must be a positive number (commonly alpha = r or 2r)")


def _is_index(i: Any) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and i >= 0


def check_token_indices(value: Any) -> None:
    """``trainable_token_indices``: ``None``, a non-empty list of distinct token ids, or ``{module: such a list}``."""
    example = "e.g. [50257, 50258] or {'embed_tokens': [50257], 'lm_head': [50257]}"
    if value is None:
        return
    lists = value.items() if isinstance(value, dict) else [("", value)] if isinstance(value, list) else None
    if lists is None or (isinstance(value, dict) and not value):
        raise LoRAConfigError(
            f"trainable_token_indices={value!r} must be a list of token ids or {{module name: [ids]}}, {example}"
        )
    for key, ids in lists:
        where = f"[{key!r}]" if key else ""
        if isinstance(value, dict) and (not isinstance(key, str) or not key):
            raise LoRAConfigError(f"trainable_token_indices key {key!r} must be a module name, {example}")
        if not isinstance(ids, list) or not ids or not all(_is_index(i) for i in ids):
            raise LoRAConfigError(
                f"trainable_token_indices{where}={ids!r} must be a non-empty list of token ids (integers >= 0), "
                f"{example}"
            )
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise LoRAConfigError(
                f"trainable_token_indices{where} lists token id {repeated[0]} more than once; give each row once"
            )


def check_fraction(value: Any, what: str, meaning: str) -> None:
    """``value`` must be a number in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise LoRAConfigError(f"{what}={value!r} must be {meaning} in [0, 1)")
