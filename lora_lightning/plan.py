"""The injection plan: which weight matrices a :class:`~lora_lightning.LoRAConfig` adapts, at which
rank, and how (target patterns, fused projections, tied weights).

The plan is computed once per injection, without changing the model, and everything after it
(building layers, the record, loading checks, budgets) reads the plan. It knows layer kinds and
variants only through :mod:`lora_lightning.registry`, so it sits below the modules that implement them.

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

Parameters that are no module's weight (transformers' MoE experts hold ``gate_up_proj`` and ``down_proj`` as
3-D ``[num_experts, ...]`` parameters) are named by ``target_parameters`` (PEFT's option): a full parameter name
or a dotted suffix of one (``mlp.experts.gate_up_proj``). Each becomes a target named by the parameter
(``model.layers.0.mlp.experts.gate_up_proj``), of the layer kind that adapts a :class:`ParamTarget`.

Planning sees through adapters already in the model (an adapted layer counts as the layer it
wraps), so a config can be planned, compared or budgeted on an injected model too.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import registry
from .config import LoRAConfig
from .errors import LoRAConfigError, RankTooLargeError, TargetNotFoundError

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


# --------------------------------------------------------------------------- patterns
def compile_pattern(spec: str) -> Callable[[str], bool]:
    """A predicate on full module names for a target spec (alias, suffix, glob or ``re:``). An alias
    also matches a module literally called by it (a module named ``embed`` is matched by ``embed``)."""
    if spec in ALIASES:
        regex = re.compile(r"(?:^|\.)(?:" + "|".join((*ALIASES[spec], re.escape(spec))) + r")$")
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


def kind_name(module: nn.Module) -> str | None:
    """The registered layer kind of ``module`` (``linear``, ``conv1d``, ``mha``, ...), or ``None``."""
    kind = registry.kind_of(module)
    return None if kind is None else kind.name


def adaptable_description() -> str:
    """``'nn.Linear, GPT-2 Conv1D, ...'``: what the registered layer kinds adapt, for error messages."""
    return ", ".join(k.description for k in registry.LAYER_KINDS.values())


# --------------------------------------------------------------------------- fused layouts
@dataclass(frozen=True)
class FusedSlices:
    """Row layout of a fused projection, e.g. GPT-2 ``c_attn``: ``W = [Wq; Wk; Wv]`` (``parts``
    ``("q", "k", "v")`` with ``sizes`` rows each). Only the ``adapted`` parts get an adapter
    ``B_i·A_i`` (loralib's ``MergedLinear``); the other rows' outputs stay exactly the base's."""

    parts: tuple[str, ...]
    sizes: tuple[int, ...]
    adapted: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.parts) != len(self.sizes) or not self.adapted or set(self.adapted) - set(self.parts):
            raise LoRAConfigError(
                f"fused layout parts={self.parts} sizes={self.sizes} adapted={self.adapted} is inconsistent: "
                "give one size per part and adapt a non-empty subset of the parts"
            )

    @property
    def d_out(self) -> int:
        return sum(self.sizes)

    @property
    def adapted_rows(self) -> int:
        """Rows of the stacked ``lora_B``: the summed sizes of the adapted parts."""
        return sum(n for p, n in zip(self.parts, self.sizes, strict=True) if p in self.adapted)

    @property
    def smallest_adapted(self) -> int:
        return min(n for p, n in zip(self.parts, self.sizes, strict=True) if p in self.adapted)

    def segments(self) -> list[tuple[str, int, int, int | None, int]]:
        """``(part, row_start, size, adapter_index or None, b_row_start)`` in layout order."""
        out, start, i, b = [], 0, 0, 0
        for part, size in zip(self.parts, self.sizes, strict=True):
            if part in self.adapted:
                out.append((part, start, size, i, b))
                i, b = i + 1, b + size
            else:
                out.append((part, start, size, None, b))
            start += size
        return out

    def adapted_sizes(self) -> list[int]:
        return [size for part, size in zip(self.parts, self.sizes, strict=True) if part in self.adapted]

    def expand_B(self, B: Tensor, r: int) -> Tensor:
        """The stacked ``B (Σ adapted sizes x r)`` as the whole matrix's ``B' (d_out x n·r)``:
        block ``i`` of ``B`` in its rows and columns ``i·r..(i+1)·r``, zeros elsewhere, so that
        ``B'·A' = [B_q A_q; 0; B_v A_v]`` for ``A' = [A_q; A_v]`` (differentiable)."""
        n = len(self.adapted)
        rows = []
        for _, _, size, i, b in self.segments():
            if i is None:
                rows.append(B.new_zeros(size, n * r))
            else:
                blocks = [B.new_zeros(size, r)] * n
                blocks[i] = B[b : b + size]
                rows.append(torch.cat(blocks, 1))
        return torch.cat(rows, 0)


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
    """The layout of ``module`` (named ``name``) if it is a fused projection: a kind with fixed parts
    (``nn.MultiheadAttention``'s q/k/v), or a fusable kind (Linear, GPT-2 Conv1D) matching a registered layout."""
    kind = registry.kind_of(module)
    if kind is None:
        return None
    if kind.fused_parts:
        return FusedLayout(kind.description, tuple(kind.fused_parts))
    if not kind.fusable:
        return None
    for layout in FUSED_LAYOUTS:
        if compile_pattern(layout.pattern)(name):
            return layout
    return None


def module_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of an adaptable module's whole weight as a ``d_out x d_in`` matrix (an MHA: its
    ``3E x E`` in-projection; an embedding: ``dim x vocabulary``; a convolution: ``out x in·∏kernel``)."""
    kind = registry.kind_of(module)
    if kind is None:
        raise TargetNotFoundError(f"{type(module).__name__} is not a layer LoRA adapts ({adaptable_description()})")
    return kind.dims(module)


def module_weight(module: nn.Module) -> Tensor:
    """The stored weight an adapter of ``module`` changes (``weight``; ``in_proj_weight`` of an MHA)."""
    kind = registry.kind_of(module)
    if kind is None:
        raise TargetNotFoundError(f"{type(module).__name__} is not a layer LoRA adapts ({adaptable_description()})")
    return kind.weight(module)


# --------------------------------------------------------------------------- parameter targets
class ParamTarget(nn.Module):
    """A parameter named by ``target_parameters``, ``owner.<param_name>``, seen as the module an adapter wraps (a
    3-D MoE expert stack, or any 2-D weight a module reads as ``self.<param_name>``). Made while planning and
    injecting, never put into the model: the layer kind that matches it builds the LoRA layer, which injection
    places as the owner's child under the parameter's name (``name``: the parameter's full name)."""

    def __init__(self, owner: nn.Module, param_name: str, name: str) -> None:
        super().__init__()
        self.__dict__["owner"] = owner  # not a submodule: the owner stays where it is
        self.param_name, self.name = param_name, name
        self.training = owner.training

    @property
    def param(self) -> Tensor:
        return self.owner._parameters[self.param_name]  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"{self.name}: {tuple(self.param.shape)}"


def target_module(model: nn.Module, name: str) -> nn.Module:
    """The module a planned adapter ``name`` wraps: ``model.get_submodule(name)``, or a :class:`ParamTarget` when
    ``name`` is a parameter (``target_parameters``) not adapted yet (once adapted, its LoRA layer sits there)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if isinstance(owner._parameters.get(leaf), nn.Parameter):
            return ParamTarget(owner, leaf, name)
        raise


def _parameter_pattern(spec: str) -> Callable[[str], bool]:
    """PEFT's ``target_parameters`` matching: the full name or a dotted suffix of it (no aliases); a glob or
    ``re:<regex>`` as for targets."""
    if spec.startswith("re:") or any(c in spec for c in "*?["):
        return compile_pattern(spec)
    return lambda name: name == spec or name.endswith("." + spec)


def parameter_candidates(model: nn.Module) -> dict[str, nn.Module]:
    """``{full name: module}`` of every parameter ``target_parameters`` may name: a :class:`ParamTarget` for a
    parameter of a plain module, the LoRA layer for one adapted already (planning sees through adapters). The
    tensors of LoRA modules themselves (and of what they hold) are not candidates."""
    out: dict[str, nn.Module] = {}
    lora_roots: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(root + ".") for root in lora_roots):
            continue
        if getattr(module, "lora_kind", None) is not None:  # a LoRA module (registry.kind_of sees through it)
            lora_roots.append(name)
            kind = registry.kind_of(module)
            if kind is not None and kind.parameter:
                out[name] = module
            continue
        for leaf, param in module._parameters.items():
            if param is not None:
                full = f"{name}.{leaf}" if name else leaf
                out[full] = ParamTarget(module, leaf, full)
    return out


def _parameter_targets(
    model: nn.Module, config: LoRAConfig, kept: Callable[[str], bool], modules: Iterable[str]
) -> dict[str, nn.Module]:
    """``{full name: ParamTarget or LoRA layer}`` of the parameters ``config.target_parameters`` names. Raises on an
    entry matching nothing, a parameter no registered kind adapts (not 2-D or 3-D) or one whose module ``targets``
    adapt as a whole too (two updates to one weight); two targets holding one tensor are refused."""
    candidates = {n: m for n, m in parameter_candidates(model).items() if kept(n.rpartition(".")[0])}
    hits: dict[str, nn.Module] = {}
    for spec in config.target_parameters:
        match = _parameter_pattern(spec)
        found = [n for n in candidates if match(n)]
        if not found:
            shaped = [n for n, m in candidates.items() if registry.kind_of(m) is not None]
            raise TargetNotFoundError(
                f"target_parameters entry {spec!r} matched no parameter of {type(model).__name__}; parameters LoRA "
                f"can adapt there (2-D or 3-D): {summarize_names(shaped, 25) or 'none'}. Give a full parameter name "
                "or a dotted suffix of one, e.g. 'mlp.experts.gate_up_proj'"
            )
        for n in found:
            if registry.kind_of(candidates[n]) is None:
                shape = tuple(getattr(candidates[n], "param", torch.empty(0)).shape)
                raise LoRAConfigError(
                    f"target_parameters entry {spec!r} matches {n}, a parameter of shape {shape}; LoRA adapts a 2-D "
                    "(d_out x d_in) or 3-D (experts x ...) floating-point weight: name another parameter"
                )
            hits[n] = candidates[n]
    owners = set(modules)
    for n in hits:
        owner = n.rpartition(".")[0]
        if owner in owners:
            raise LoRAConfigError(
                f"{n} is a parameter of {owner}, which targets adapt as a module too: its weight would get two "
                "updates. Name it in targets or in target_parameters, not both"
            )
    holder: dict[int, str] = {}
    for n, m in hits.items():
        weight = registry.kind_of(m).weight(m)
        if id(weight) in holder:
            raise LoRAConfigError(
                f"{holder[id(weight)]} and {n} hold one weight and are parameter targets, so their adapters would add "
                "two updates to it (merging could not be exact): target only one of them, or untie the weights"
            )
        holder[id(weight)] = n
    return hits


# --------------------------------------------------------------------------- the plan
@dataclass
class AdapterSpec:
    """One matrix to adapt: its name, kind, adapted shape ``(d_out, d_in)``, rank, alpha and scaling.

    For a fused projection ``parts`` names the adapted row blocks (e.g. ``("q", "v")`` of GPT-2's
    ``c_attn``) and ``d_out`` is the sum of their sizes; each block gets its own ``A_i``, ``B_i``.
    ``variant`` names the registered variant whose layer adapts it (it decides :attr:`num_params`).
    ``tied``: other modules holding the same weight; they read this module's adapter (one ``ΔW`` for the
    one weight, so merging stays exact). ``aliases``: other names of this very module object.
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
    tied: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def num_params(self) -> int:
        """Trainable adapter parameters of this matrix, exactly (the variant's count; plain LoRA:
        ``r·(d_in + d_out)``, per adapted block of a fused matrix ``Σ r·(d_in + size_i)``)."""
        variant = registry.variant(self.variant)
        return variant.num_params(self, self.config or variant.config_class())

    def structure(self) -> dict[str, Any]:
        """What an adapter must match to load here: ``{kind, d_out, d_in, r, alpha, scaling, parts}``."""
        out = {k: v for k, v in asdict(self).items() if k in ("kind", "d_out", "d_in", "r", "alpha", "scaling")}
        return out | {"parts": list(self.parts)}


class Plan(list):  # list[AdapterSpec]
    """The result of :func:`plan_injection`: one :class:`AdapterSpec` per adapted matrix (a list), plus the
    ``config`` it was planned from and the resolved ``modules_to_save``."""

    def __init__(self, specs: Iterable[AdapterSpec], config: LoRAConfig, modules_to_save: list[str]) -> None:
        super().__init__(specs)
        self.config = config
        self.modules_to_save = modules_to_save
        self.fingerprint: dict[str, Any] | None = None  # the base identity, once computed (injection.fingerprint_for)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self]


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
    tied: tuple[str, ...] = ()  # other modules holding the same weight (they read this one's adapter)
    aliases: tuple[str, ...] = ()  # other names of the same module object

    @property
    def max_rank(self) -> int:
        return min(self.d_in, self.fused.smallest_adapted if self.fused else self.d_out)

    def spec(self, r: int, alpha: float, scaling: float | None, config: LoRAConfig) -> AdapterSpec:
        """This target adapted at rank ``r`` by ``config``'s variant."""
        return AdapterSpec(
            self.name,
            self.d_out,
            self.d_in,
            r,
            alpha,
            self.parts,
            self.fused,
            self.kind,
            scaling,
            config.variant,
            config,
            self.tied,
            self.aliases,
        )


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


def _no_match_error(
    model: nn.Module, spec: str, match: Callable[[str], bool], whole: dict[str, nn.Module]
) -> TargetNotFoundError:
    others = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n and match(n)][:5]
    hint = (
        f" It matches {others}, which are not layers LoRA adapts ({adaptable_description()}): target the adaptable "
        "layers inside them."
        if others
        else ""
    )
    return TargetNotFoundError(
        f"target {spec!r} matched no Linear module (nor any other layer LoRA adapts) in {type(model).__name__}.{hint} "
        f"Adaptable modules: {summarize_names(whole)}. Use an alias (q, k, v, o, mlp, embed, all-linear), "
        "a name suffix such as 'attention.self.query', a glob such as '*.query', or 're:<regex>'."
    )


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
        kind = registry.kind_of(module)
        if kind is None:
            continue
        layout = fused_layout(name, module)
        if layout is not None:
            fused[name] = (module, layout)
        if kind.whole_module:
            whole[name] = module
    if not whole and not fused and not config.target_parameters:
        raise TargetNotFoundError(
            f"{type(model).__name__} has no layer LoRA adapts ({adaptable_description()}) "
            "(if the model is built in configure_model(), inject after it has run)"
        )
    chosen: dict[str, set[str] | None] = {}  # name -> adapted fused parts, None = whole matrix
    for spec in config.targets:
        match = compile_pattern(spec)
        hits = [n for n in whole if match(n) and (spec != ALL_LINEAR or registry.kind_of(whole[n]).linear)]
        part_hits = [n for n, (_, layout) in fused.items() if spec in layout.parts]
        if not hits and not part_hits:
            raise _no_match_error(model, spec, match, whole)
        for n in hits:
            chosen[n] = None  # the whole matrix (wins over adapting some of its blocks)
        for n in part_hits:
            if n not in chosen:
                chosen[n] = set()
            if chosen[n] is not None:
                chosen[n].add(spec)  # type: ignore[union-attr]
    params = _parameter_targets(model, config, kept, chosen) if config.target_parameters else {}
    names = list(chosen) + list(params)
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
    aliases = _aliases(model)
    modules = [n for n in names if n not in params]
    followers = _tie_followers(whole, [n for n in modules if chosen[n] is None])
    _refuse_double_updates(model, modules, chosen, followers)
    leader_of = {f: leader for leader, fs in followers.items() for f in fs}
    targets = []
    for n in dict.fromkeys(leader_of.get(n, n) if chosen.get(n) is None else n for n in names):
        if n in params:
            kind = registry.kind_of(params[n])
            d_out, d_in = kind.dims(params[n])
            blocks = kind.row_blocks(params[n])
            owner, _, leaf = n.rpartition(".")
            also = tuple(f"{a}.{leaf}" for a in aliases.get(owner, ()))
            parts = blocks.adapted if blocks is not None else ()
            targets.append(Target(n, kind.name, d_out, d_in, parts, blocks, aliases=also))
        elif chosen.get(n):
            module, layout = fused[n]
            kind = registry.kind_of(module)
            kind.check_parts(module, n, sorted(chosen[n]))  # type: ignore[arg-type]
            d_out, d_in = kind.dims(module)
            slices = layout.slices(d_out, n, sorted(chosen[n]))  # type: ignore[arg-type]
            targets.append(
                Target(n, kind.name, slices.adapted_rows, d_in, slices.adapted, slices, aliases=aliases.get(n, ()))
            )
        else:
            kind = registry.kind_of(whole[n])
            d_out, d_in = kind.dims(whole[n])
            targets.append(Target(n, kind.name, d_out, d_in, tied=followers.get(n, ()), aliases=aliases.get(n, ())))
    return targets


def _aliases(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """``{first name: other names}`` of module objects registered under several names (``model.a`` and
    ``model.b`` being one module): every name must reach the adapted layer."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            names.setdefault(id(module), []).append(name)
    return {ns[0]: tuple(ns[1:]) for ns in names.values() if len(ns) > 1}


def _refuse_double_updates(
    model: nn.Module, names: list[str], chosen: dict[str, set[str] | None], followers: dict[str, tuple[str, ...]]
) -> None:
    """Two targets holding one weight whose adapters could not be one (a fused projection's blocks): merging
    would add both updates to the one weight. Refused, naming both."""
    shared = {f for fs in followers.values() for f in fs}
    owner: dict[int, str] = {}
    for n in names:
        if n in shared:
            continue
        module = model.get_submodule(n)
        weight = registry.kind_of(module).weight(module)
        if id(weight) in owner and (chosen.get(n) is not None or chosen.get(owner[id(weight)]) is not None):
            raise LoRAConfigError(
                f"{owner[id(weight)]} and {n} hold one weight and are fused projections, so their adapters would add "
                "two updates to it (merging could not be exact): target the blocks of only one of them, or untie the "
                "weights"
            )
        owner.setdefault(id(weight), n)


def _tie_followers(whole: dict[str, nn.Module], chosen: list[str]) -> dict[str, tuple[str, ...]]:
    """``{leader: followers}`` for weights held by several modules (tied weights) of which one is targeted:
    the targeted modules and every module *of the same kind* holding that weight (T5's ``shared`` and
    ``encoder/decoder.embed_tokens``: one weight, one embedding table) share one adapter, owned by the first in
    module order, so ``ΔW`` of the one weight is one tensor and merging stays exact. A module of another kind
    holding it (GPT-2's ``lm_head`` under ``wte``) shares it only when targeted too; otherwise merging is
    refused while it reads the weight."""
    groups: dict[int, list[str]] = {}
    for n, module in whole.items():
        weight = registry.kind_of(module).weight(module)
        if isinstance(weight, nn.Parameter):
            groups.setdefault(id(weight), []).append(n)
    wanted = set(chosen)
    out = {}
    for members in groups.values():
        picked = [m for m in members if m in wanted]
        if len(members) < 2 or not picked:
            continue
        kinds = {registry.kind_of(whole[m]).name for m in picked}
        included = [m for m in members if m in wanted or registry.kind_of(whole[m]).name in kinds]
        if len(included) > 1:
            out[included[0]] = tuple(included[1:])
    return out


def plan_injection(model: nn.Module, config: LoRAConfig) -> Plan:
    """Resolve ``config`` against ``model`` without changing it: one :class:`AdapterSpec` per adapted
    matrix, with its rank, alpha and scaling. Raises on any mismatch (a rank larger than a matrix, a
    rank/alpha pattern matching nothing, a variant that cannot adapt a target)."""
    targets = resolve_targets(model, config)
    names = [t.name for t in targets] + [f for t in targets for f in t.tied]
    for pattern in list(config.rank_pattern) + list(config.alpha_pattern):
        if not any(compile_pattern(pattern)(n) for n in names):
            raise TargetNotFoundError(
                f"rank/alpha pattern {pattern!r} matches none of the adapted modules: {summarize_names(names)}"
            )
    variant = registry.variant(config.variant)
    specs = []
    for t in targets:
        r = int(first_match(config.rank_pattern, t.name) or config.r)
        raw_alpha = float(first_match(config.alpha_pattern, t.name) or config.alpha)
        for follower in t.tied:
            r_f = int(first_match(config.rank_pattern, follower) or config.r)
            a_f = float(first_match(config.alpha_pattern, follower) or config.alpha)
            if (r_f, a_f) != (r, raw_alpha):
                raise LoRAConfigError(
                    f"{t.name} and {follower} hold one tied weight and so share one adapter, but "
                    f"rank_pattern/alpha_pattern give them r={r}/{r_f}, alpha={raw_alpha:g}/{a_f:g}: give both the "
                    "same rank and alpha"
                )
        alpha, scaling = variant.alpha_and_scaling(config, r, raw_alpha)
        if r > t.max_rank:
            shape = f"{t.fused.smallest_adapted if t.fused else t.d_out}x{t.d_in}"
            raise RankTooLargeError(
                f"r={r} is larger than min(d_in, d_out)={t.max_rank} for {t.name} "
                f"({shape}{', per fused block' if t.parts else ''}); choose r <= {t.max_rank} "
                "(or lower it for this module with rank_pattern)"
            )
        specs.append(t.spec(r, alpha, scaling, config))
    variant.check_targets(model, config, specs)
    saved = resolve_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    return Plan(specs, config, saved)


def lora_parameter_count(specs: Iterable[AdapterSpec]) -> int:
    """Trainable adapter parameters of a plan: ``Σ spec.num_params`` (each variant's exact count)."""
    return sum(s.num_params for s in specs)
