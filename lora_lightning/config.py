"""The LoRA configuration: one validated dataclass shared by the core, the callback and the app.

Every field is a plain Python value so the config round-trips through JSON (safetensors
metadata), Lightning checkpoints, Hydra/OmegaConf and ``LightningCLI``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import LoRAConfigError

BIAS_OPTIONS = ("none", "all", "lora_only")
INIT_OPTIONS = ("kaiming", "gaussian")
DTYPE_OPTIONS = (None, "float32", "bfloat16", "float16", "float64")
# lora_lightning.variants: rslora = lora + use_rslora; qlora = lora + quantize_base (default nf4)
VARIANT_OPTIONS = ("lora", "rslora", "dora", "vera", "pissa", "adalora", "qlora")
QUANTIZE_OPTIONS = (None, "nf4", "int8")


def _plain(value: Any) -> Any:
    """OmegaConf containers / tuples -> plain lists and dicts (no-op for plain values)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(value, tuple):
        return list(value)
    return value


@dataclass
class LoRAConfig:
    """Where and how to add ``h = W0·x + (alpha/r)·B·A·dropout(x)`` adapters (paper §4.1).

    Attributes:
        r: rank of every adapter (``A: r x d_in``, ``B: d_out x r``); §7.2 shows r=1..8 suffices.
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (or ``alpha / sqrt(r)``
            with ``use_rslora``), so re-tuning the learning rate is not needed when r changes (§4.1).
        dropout: dropout probability on the adapter input (not on the frozen path).
        targets: which Linear layers get adapters: aliases ``q``, ``k``, ``v``, ``o``, ``mlp``,
            ``all-linear``; a dotted-name suffix (``attention.self.query``); a glob on the full
            module name (``*.layer.0.*.query``); or ``re:<regex>`` (``re.fullmatch`` on full names).
        layers: keep only modules whose block index (first integer in the module name) is in
            this list; negative indices count from the end. ``None`` = all blocks.
        bias: ``none`` (biases frozen), ``all`` (every bias trainable), ``lora_only`` (biases of
            adapted layers trainable) — loralib semantics. Trainable biases are saved with the adapter.
        modules_to_save: modules (same pattern syntax, any type) trained in full and saved with
            the adapter, e.g. a new classification head ``["classifier"]``.
        rank_pattern / alpha_pattern: per-pattern overrides of ``r`` / ``alpha`` (layer-wise
            ranks), first matching pattern wins, e.g. ``{"v": 16, "*.layer.5.*": 2}``.
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA) instead of ``alpha / r``.
        init: initialisation of ``A``: ``kaiming`` (uniform, as loralib/PEFT) or ``gaussian``
            (``N(0, 1/r)``, the paper's "random Gaussian"). ``B`` is always zero, so the adapted
            model starts exactly equal to the base.
        adapter_dtype: dtype of A and B (e.g. ``float32`` adapters on a ``bfloat16`` base);
            ``None`` = same dtype as the base weight.
        variant: ``lora`` | ``rslora`` (sets ``use_rslora``) | ``dora`` | ``vera`` | ``pissa`` |
            ``adalora`` | ``qlora`` (sets ``quantize_base='nf4'`` unless given); see docs/variants.md.
        quantize_base: store the adapted base weights quantized, ``nf4`` (torchao) or ``int8``
            (pure PyTorch), dequantized on the fly; combinable with every variant.
        vera_seed / vera_d_init: seed of VeRA's shared frozen A, B (regenerated, not saved) and the
            initial value of its ``d`` vectors.
        adalora_*: AdaLoRA schedule: ``r`` is the initial rank per matrix, ``adalora_target_r`` the
            final average rank (total budget ``target_r x matrices``); full budget for the first
            ``tinit`` fraction of steps, cubic decrease, final budget for the last ``tfinal``
            fraction; masks recomputed every ``delta_t`` steps; EMA factors ``beta1``/``beta2`` of
            importance and uncertainty; ``orth_reg`` weight of ``||PᵀP-I||²+||QQᵀ-I||²``;
            ``total_steps`` (``None`` = the Trainer's estimated stepping batches).
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
    adapter_dtype: str | None = None
    variant: str = "lora"
    quantize_base: str | None = None
    vera_seed: int = 0
    vera_d_init: float = 0.1
    adalora_target_r: int = 4
    adalora_tinit: float = 0.1
    adalora_tfinal: float = 0.2
    adalora_delta_t: int = 1
    adalora_beta1: float = 0.85
    adalora_beta2: float = 0.85
    adalora_orth_reg: float = 0.1
    adalora_total_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("targets", "layers", "modules_to_save", "rank_pattern", "alpha_pattern"):
            setattr(self, name, _plain(getattr(self, name)))
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            self.layers = [self.layers]
        if self.variant == "rslora":
            self.use_rslora = True
        if self.variant == "qlora" and self.quantize_base is None:
            self.quantize_base = "nf4"
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`LoRAConfigError` naming the bad field and the fix."""
        check_rank(self.r, "r")
        check_alpha(self.alpha, "alpha")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= float(self.dropout) < 1.0:
            raise LoRAConfigError(
                f"dropout={self.dropout!r} is outside [0, 1): set lora.dropout to a probability such as 0.05"
            )
        if self.bias not in BIAS_OPTIONS:
            raise LoRAConfigError(f"bias={self.bias!r} is not one of {BIAS_OPTIONS}: set lora.bias to one of them")
        if self.init not in INIT_OPTIONS:
            raise LoRAConfigError(f"init={self.init!r} is not one of {INIT_OPTIONS}")
        if self.adapter_dtype not in DTYPE_OPTIONS:
            raise LoRAConfigError(
                f"adapter_dtype={self.adapter_dtype!r} is not one of {DTYPE_OPTIONS}: use e.g. 'float32' or null"
            )
        if not isinstance(self.targets, list) or not self.targets or not all(
            isinstance(t, str) and t for t in self.targets
        ):
            raise LoRAConfigError(
                f"targets={self.targets!r} must be a non-empty list of strings, e.g. ['q', 'v'] "
                "or ['attention.self.query', 're:.*value']"
            )
        if self.layers is not None and (
            not isinstance(self.layers, list)
            or not self.layers
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)
        ):
            raise LoRAConfigError(f"layers={self.layers!r} must be null or a non-empty list of block indices, e.g. [0, 1]")
        if not isinstance(self.modules_to_save, list) or not all(isinstance(m, str) for m in self.modules_to_save):
            raise LoRAConfigError(f"modules_to_save={self.modules_to_save!r} must be a list of module names")
        for pattern, r in dict(self.rank_pattern).items():
            check_rank(r, f"rank_pattern[{pattern!r}]")
        for pattern, a in dict(self.alpha_pattern).items():
            check_alpha(a, f"alpha_pattern[{pattern!r}]")
        self._validate_variant()

    def _validate_variant(self) -> None:
        if self.variant not in VARIANT_OPTIONS:
            raise LoRAConfigError(f"variant={self.variant!r} is not one of {VARIANT_OPTIONS}: set lora.variant to one of them")
        if self.quantize_base not in QUANTIZE_OPTIONS:
            raise LoRAConfigError(
                f"quantize_base={self.quantize_base!r} is not one of {QUANTIZE_OPTIONS}: use 'nf4' (needs torchao), 'int8' or null"
            )
        if self.variant == "vera" and self.rank_pattern:
            raise LoRAConfigError("variant='vera' shares one r x d_in A across layers: rank_pattern is not supported, drop it")
        if isinstance(self.vera_seed, bool) or not isinstance(self.vera_seed, int):
            raise LoRAConfigError(f"vera_seed={self.vera_seed!r} must be an integer")
        check_alpha(self.vera_d_init, "vera_d_init")
        check_rank(self.adalora_target_r, "adalora_target_r")
        if self.variant == "adalora" and self.adalora_target_r > min([self.r, *self.rank_pattern.values()]):
            raise LoRAConfigError(
                f"adalora_target_r={self.adalora_target_r} exceeds the initial rank r={self.r}: AdaLoRA prunes from r "
                "down to the target, so set adalora_target_r <= r (e.g. r=12, adalora_target_r=8)"
            )
        for name in ("adalora_tinit", "adalora_tfinal"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
                raise LoRAConfigError(f"{name}={v!r} must be a fraction of the training steps in [0, 1)")
        if self.adalora_tinit + self.adalora_tfinal >= 1.0:
            raise LoRAConfigError(
                f"adalora_tinit + adalora_tfinal = {self.adalora_tinit + self.adalora_tfinal:g} >= 1 leaves no steps to "
                "prune in: lower them (defaults 0.1 and 0.2)"
            )
        check_rank(self.adalora_delta_t, "adalora_delta_t")
        for name in ("adalora_beta1", "adalora_beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
                raise LoRAConfigError(f"{name}={v!r} must be an EMA factor in [0, 1), e.g. 0.85")
        if isinstance(self.adalora_orth_reg, bool) or not isinstance(self.adalora_orth_reg, (int, float)) or self.adalora_orth_reg < 0:
            raise LoRAConfigError(f"adalora_orth_reg={self.adalora_orth_reg!r} must be a number >= 0 (PEFT uses 0.5)")
        if self.adalora_total_steps is not None:
            check_rank(self.adalora_total_steps, "adalora_total_steps")

    # ------------------------------------------------------------- conversions
    def scaling_for(self, r: int, alpha: float) -> float:
        """The factor multiplying ``B·A``: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA)."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoRAConfig":
        data = dict(_plain(data))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            import difflib

            # PEFT's LoraConfig names (a common first guess), else the closest spelling
            peft = {"rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
                    "layers_to_transform": "layers", "use_dora": "variant='dora'"}
            hints = {u: peft.get(u) or next(iter(difflib.get_close_matches(u, sorted(known), 1)), None) for u in unknown}
            hint = "; ".join(f"use {h if h.startswith('variant') else repr(h)} instead of {u!r}" for u, h in hints.items() if h)
            raise LoRAConfigError(
                f"unknown LoRA option(s) {unknown}" + (f" ({hint})" if hint else "")
                + f"; valid options are {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "LoRAConfig":
        return cls.from_dict(json.loads(text))

    def differences(self, other: "LoRAConfig") -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, as ``{field: (self_value, other_value)}``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def check_rank(r: Any, what: str = "r") -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoRAConfigError(f"{what}={r!r} is not a positive integer: LoRA needs a rank r >= 1 (the paper uses 1..64)")


def check_alpha(alpha: Any, what: str = "alpha") -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise LoRAConfigError(f"{what}={alpha!r} must be a positive number (commonly alpha = r or 2r)")
