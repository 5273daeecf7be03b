"""Which weight matrices a :class:`~lora_lightning.LoRAConfig` adapts: target patterns, fused
projections and the injection plan.

Targets are resolved against module names from ``model.named_modules()``:

* aliases ``q``, ``k``, ``v``, ``o``, ``mlp`` cover the usual names of BERT/RoBERTa/ViT
  (``attention.self.query`` ...), Llama/Mistral/Qwen (``q_proj`` ... ``down_proj``), T5
  (``SelfAttention.q``), DistilBERT (``q_lin``), plain PyTorch (``q_proj``/``out_proj``,
  ``linear1``/``linear2``); ``all-linear`` adapts every Linear except output heads;
* a plain string is a dotted-name suffix (``attention.self.query`` matches
  ``bert.encoder.layer.3.attention.self.query``);
* a string with ``*``, ``?`` or ``[`` is a glob on the full name;
* ``re:<regex>`` is ``re.fullmatch`` on the full name.

Fused projections hold several logical matrices in one, ``W = [Wq; Wk; Wv]``: GPT-2's
``attn.c_attn`` (a ``Conv1D``), nanoGPT's ``c_attn``, timm's ``attn.qkv``, and
``nn.MultiheadAttention.in_proj_weight``. The aliases ``q``/``k``/``v`` resolve to row blocks of
such matrices (loralib's ``MergedLinear``), so ``targets=["q", "v"]`` adapts only those blocks of
GPT-2's ``c_attn``; naming the module itself adapts the whole matrix with one adapter. Only
contiguous layouts are listed (GPT-NeoX/BLOOM ``query_key_value`` is interleaved per head); other
models register theirs with :func:`register_fused_layout`.

Planning sees through adapters already in the model (an adapted layer counts as the layer it
wraps), so a config can be planned, compared or budgeted on an injected model too.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

from torch import nn

from .config import LoRAConfig
from .errors import LoRAConfigError, RankTooLargeError, TargetNotFoundError
from .layers import MHA_PARTS, FusedSlices, LoRALayer, base_kind
from .variants.registry import get_variant

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
    "embed": (
        "embed_tokens",  # Llama / Mistral / Qwen / BART
        "wte",  # GPT-2
        "word_embeddings",  # BERT / RoBERTa
        "shared",  # T5
        "tok_embeddings",  # Meta Llama layout
        "embed_in",  # GPT-NeoX
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
ADAPTABLE_KINDS = ("linear", "conv1d", "embedding", "conv")  # what a target may name as a whole module
LINEAR_KINDS = ("linear", "conv1d")  # what all-linear adapts


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


def first_match(patterns: dict[str, Any], name: str) -> Any | None:
    """The value of the first pattern in ``patterns`` that matches ``name``."""
    for pattern, value in patterns.items():
        if compile_pattern(pattern)(name):
            return value
    return None


# --------------------------------------------------------------------------- fused layouts
@dataclass(frozen=True)
class FusedLayout:
    """Modules whose name matches ``pattern`` (target syntax: suffix, glob or ``re:``) stack
    ``parts`` along the output dimension, with ``sizes`` rows each (``None``: equal split)."""

    pattern: str
    parts: tuple[str, ...]
    sizes: tuple[int, ...] | None = None

    def slices(self, d_out: int, name: str, adapted: Sequence[str]) -> FusedSlices:
        sizes = self.sizes
        if sizes is None:
            if d_out % len(self.parts):
                raise LoRAConfigError(
                    f"{name} matches the fused layout {self.pattern!r} ({'/'.join(self.parts)}) but its output size "
                    f"{d_out} does not split into {len(self.parts)} equal blocks; register its layout with explicit "
                    "sizes via lora_lightning.register_fused_layout(pattern, parts, sizes)"
                )
            sizes = (d_out // len(self.parts),) * len(self.parts)
        if sum(sizes) != d_out:
            raise LoRAConfigError(
                f"fused layout {self.pattern!r} has sizes {sizes} (sum {sum(sizes)}) but {name} has d_out={d_out}"
            )
        return FusedSlices(self.parts, tuple(sizes), tuple(p for p in self.parts if p in adapted))


# first match wins; user registrations are put in front
FUSED_LAYOUTS: list[FusedLayout] = [
    FusedLayout(r"re:(.*\.)?crossattention\.c_attn", ("k", "v")),  # GPT-2 cross-attention: q is q_attn
    FusedLayout("c_attn", ("q", "k", "v")),  # GPT-2 Conv1D, nanoGPT nn.Linear
    FusedLayout("qkv", ("q", "k", "v")),  # timm ViT, many hand-written transformers
    FusedLayout("to_qkv", ("q", "k", "v")),  # vit-pytorch
]


def register_fused_layout(pattern: str, parts: Sequence[str], sizes: Sequence[int] | None = None) -> None:
    """Declare that modules matching ``pattern`` are fused ``[part_0; part_1; ...]`` projections.

    Example (Phi-3 with grouped-query attention, 32 q heads and 8 kv heads of 96 dims):
    ``register_fused_layout("qkv_proj", ["q", "k", "v"], [3072, 768, 768])``.
    """
    parts = tuple(parts)
    if not parts or len(set(parts)) != len(parts) or not all(isinstance(p, str) and p for p in parts):
        raise LoRAConfigError(f"parts={list(parts)} must be distinct non-empty names such as ['q', 'k', 'v']")
    if sizes is not None and (len(sizes) != len(parts) or not all(isinstance(n, int) and n > 0 for n in sizes)):
        raise LoRAConfigError(f"sizes={sizes} must give one positive row count per part {list(parts)}")
    FUSED_LAYOUTS.insert(0, FusedLayout(pattern, parts, tuple(sizes) if sizes is not None else None))


def fused_layout(name: str, module: nn.Module) -> FusedLayout | None:
    """The layout of ``module`` (named ``name``) if it is a known fused projection."""
    kind = base_kind(module)
    if kind == "mha":
        return FusedLayout("nn.MultiheadAttention", MHA_PARTS)
    if kind not in ("linear", "conv1d"):
        return None
    for layout in FUSED_LAYOUTS:
        if compile_pattern(layout.pattern)(name):
            return layout
    return None


def module_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of an adaptable module's whole weight (an MHA: its ``3E x E`` in-projection)."""
    kind = base_kind(module)
    if kind == "mha":
        return 3 * module.embed_dim, module.embed_dim
    if isinstance(module, LoRALayer):
        return module.out_features, module.in_features
    if kind == "conv1d":
        return module.weight.shape[1], module.weight.shape[0]
    if kind == "embedding":  # a lookup is a product with a one-hot input: d_in = vocabulary, d_out = width
        return module.embedding_dim, module.num_embeddings
    if kind == "conv":  # the kernel flattened: d_in = in_channels · ∏ kernel
        return module.out_channels, module.in_channels * math.prod(module.kernel_size)
    return module.out_features, module.in_features


# --------------------------------------------------------------------------- the plan
@dataclass
class AdapterSpec:
    """One matrix to adapt: its name, kind, adapted shape ``(d_out, d_in)``, rank, alpha and scaling.

    For a fused projection ``parts`` names the adapted row blocks (e.g. ``("q", "v")`` of GPT-2's
    ``c_attn``) and ``d_out`` is the sum of their sizes; each block gets its own ``A_i``, ``B_i``.
    ``variant`` names the registered variant whose layer adapts it (it decides :attr:`num_params`).
    """

    name: str
    d_out: int
    d_in: int
    r: int
    alpha: float
    parts: tuple[str, ...] = ()
    fused: FusedSlices | None = field(default=None, repr=False, compare=False)
    kind: str = "linear"
    scaling: float | None = None
    variant: str = "lora"
    config: LoRAConfig | None = field(default=None, repr=False, compare=False)  # the variant's options
    tied: tuple[str, ...] = ()  # modules sharing this one's weight: they get the same adapter layer

    @property
    def num_params(self) -> int:
        """Trainable adapter parameters of this matrix, exactly (the variant's count; plain LoRA:
        ``r·(d_in + d_out)``, per adapted block of a fused matrix ``Σ r·(d_in + size_i)``)."""
        variant = get_variant(self.variant)
        return variant.num_params(self, self.config or variant.config_class())

    def structure(self) -> dict[str, Any]:
        """What an adapter must match to load here: ``{kind, d_out, d_in, r, alpha, scaling, parts}``."""
        out = {k: v for k, v in asdict(self).items() if k in ("kind", "d_out", "d_in", "r", "alpha", "scaling")}
        return out | {"parts": list(self.parts)}


@dataclass
class Target:
    """A resolved target before ranks are chosen: the module, its kind, ``(d_out, d_in)`` of the
    adapted rows and, for a fused projection, the adapted blocks."""

    name: str
    kind: str
    d_out: int
    d_in: int
    parts: tuple[str, ...] = ()
    fused: FusedSlices | None = None
    tied: tuple[str, ...] = ()  # other modules holding the same weight (T5's encoder/decoder embed_tokens)

    @property
    def max_rank(self) -> int:
        return min(self.d_in, self.fused.smallest_adapted if self.fused else self.d_out)

    def spec(self, r: int, alpha: float, scaling: float | None, config: LoRAConfig) -> AdapterSpec:
        """This target adapted at rank ``r`` by ``config``'s variant."""
        return AdapterSpec(self.name, self.d_out, self.d_in, r, alpha, self.parts, self.fused, self.kind, scaling, config.variant,
                           config, self.tied)


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


def resolve_targets(model: nn.Module, config: LoRAConfig) -> list[Target]:
    """The matrices ``config`` targets in ``model`` (ranks aside), without changing it. Raises on any
    mismatch: a target matching nothing lists the candidate names."""
    saved = resolve_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    kept = lambda n: not any(n == s or n.startswith(s + ".") for s in saved)  # noqa: E731
    whole: dict[str, nn.Module] = {}
    fused: dict[str, tuple[nn.Module, FusedLayout]] = {}
    for name, module in model.named_modules():
        if not name or not kept(name):
            continue
        kind = base_kind(module)
        layout = fused_layout(name, module)
        if layout is not None:
            fused[name] = (module, layout)
        if kind in ADAPTABLE_KINDS:
            whole[name] = module
    if not whole and not fused:
        raise TargetNotFoundError(
            f"{type(model).__name__} has no nn.Linear module to adapt "
            "(if the model is built in configure_model(), inject after it has run)"
        )
    chosen: dict[str, set[str] | None] = {}  # name -> adapted fused parts, None = whole matrix
    all_names = [n for n, _ in model.named_modules() if n]
    for spec in config.targets:
        match = compile_pattern(spec)
        hits = [n for n in whole if match(n) and (spec != ALL_LINEAR or base_kind(whole[n]) in LINEAR_KINDS)]
        part_hits = [n for n, (_, layout) in fused.items() if spec in layout.parts]
        if not hits and not part_hits:
            others = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in all_names if match(n)][:5]
            hint = (
                f" It matches non-Linear module(s) {others}: LoRA adapts Linear layers, target their Linear children."
                if others
                else ""
            )
            raise TargetNotFoundError(
                f"target {spec!r} matched no Linear module (nor Embedding or Conv) in {type(model).__name__}.{hint} "
                f"Adaptable modules: {summarize_names(whole)}. Use an alias (q, k, v, o, mlp, embed, all-linear), "
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
    targets = []
    ties = _weight_ties(whole)  # modules sharing one weight are adapted once, under the first one's name
    primary_of = {other: first for first, others in ties.items() for other in others}
    for n in names:
        if n in primary_of and chosen[n] is None:
            chosen[primary_of[n]] = None
    names = list(dict.fromkeys(primary_of.get(n, n) if chosen[n] is None else n for n in names))
    for n in names:
        if chosen[n]:
            module, layout = fused[n]
            if base_kind(module) == "mha" and not getattr(module, "_same_dim", module._qkv_same_embed_dim):
                raise LoRAConfigError(
                    f"{n} is an nn.MultiheadAttention with kdim/vdim != embed_dim (separate q/k/v_proj_weight); LoRA on "
                    f"its {sorted(chosen[n])} is not supported: target only 'o' (its out_proj) there"
                )
            d_out, d_in = module_dims(module)
            slices = layout.slices(d_out, n, sorted(chosen[n]))  # type: ignore[arg-type]
            targets.append(Target(n, base_kind(module) or "linear", slices.adapted_rows, d_in, slices.adapted, slices))
        else:
            d_out, d_in = module_dims(whole[n])
            targets.append(Target(n, base_kind(whole[n]) or "linear", d_out, d_in, tied=ties.get(n, ())))
    return targets


def _weight_ties(modules: dict[str, nn.Module]) -> dict[str, tuple[str, ...]]:
    """``{first name: other names}`` for modules of one kind holding the same weight Parameter (one
    adapter must serve all of them, or merging would fold several updates into one tensor)."""
    groups: dict[tuple[int, str | None], list[str]] = {}
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and not isinstance(module, LoRALayer):
            groups.setdefault((id(weight), base_kind(module)), []).append(name)
    return {names[0]: tuple(names[1:]) for names in groups.values() if len(names) > 1}


def plan_injection(model: nn.Module, config: LoRAConfig) -> list[AdapterSpec]:
    """Resolve ``config`` against ``model`` without changing it: one :class:`AdapterSpec` per adapted
    matrix, with its rank, alpha and scaling. Raises on any mismatch (a rank larger than a matrix, a
    rank/alpha pattern matching nothing, a variant that cannot adapt a target)."""
    targets = resolve_targets(model, config)
    names = [t.name for t in targets]
    for pattern in list(config.rank_pattern) + list(config.alpha_pattern):
        if not any(compile_pattern(pattern)(n) for n in names):
            raise TargetNotFoundError(
                f"rank/alpha pattern {pattern!r} matches none of the adapted modules: {summarize_names(names)}"
            )
    variant = get_variant(config.variant)
    specs = []
    for t in targets:
        r = int(first_match(config.rank_pattern, t.name) or config.r)
        alpha, scaling = variant.alpha_and_scaling(config, r, float(first_match(config.alpha_pattern, t.name) or config.alpha))
        if r > t.max_rank:
            shape = f"{t.fused.smallest_adapted if t.fused else t.d_out}x{t.d_in}"
            raise RankTooLargeError(
                f"r={r} is larger than min(d_in, d_out)={t.max_rank} for {t.name} "
                f"({shape}{', per fused block' if t.parts else ''}); choose r <= {t.max_rank} "
                "(or lower it for this module with rank_pattern)"
            )
        specs.append(t.spec(r, alpha, scaling, config))
    variant.check_targets(model, config, specs)
    return specs


def lora_parameter_count(specs: Iterable[AdapterSpec]) -> int:
    """Trainable adapter parameters of a plan: ``Σ spec.num_params`` (each variant's exact count)."""
    return sum(s.num_params for s in specs)
