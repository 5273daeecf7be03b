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

    def __post_init__(self) -> None:
        for name in ("targets", "layers", "modules_to_save", "rank_pattern", "alpha_pattern"):
            setattr(self, name, _plain(getattr(self, name)))
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            self.layers = [self.layers]
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
            raise LoRAConfigError(f"unknown LoRA option(s) {unknown}; valid options are {sorted(known)}")
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
