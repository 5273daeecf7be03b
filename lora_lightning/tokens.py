"""Trainable tokens (PEFT's ``trainable_token_indices``): train chosen rows of an embedding, the rest frozen.

``LoRAConfig(trainable_token_indices=[50257, 50258])`` (the model's input embedding, found with
``get_input_embeddings()`` or as its only ``nn.Embedding``) or ``{"embed_tokens": [...], "lm_head": [...]}`` (module
names, a full name or a dotted suffix of one) makes the rows at those indices trainable and nothing else of the
table: new special tokens added after ``resize_token_embeddings``, or existing ones. As in PEFT the trained tensor
holds the rows' *values* (initialised from the table), which replace the table's rows in forward, so an adapter
means the same on a base whose new rows were drawn at random anew.

The embedding is replaced by a :class:`TrainableTokensEmbedding` holding the same ``weight`` (frozen, its
state-dict key unchanged), ``token_rows`` (``k x dim``, trained) and ``token_indices`` (``k``); an nn.Linear
target (an untied output layer, whose rows are the vocabulary too) by a :class:`TrainableTokensLinear`. A module
holding the same weight (a tied output head: GPT-2's ``lm_head``) follows the rows of the one holding them, so the
input and the output embedding stay one matrix, as PEFT ties them. Forward never builds the whole updated table:
an embedding looks the rows up beside the base lookup and picks them where the token is one of them; an output
layer computes the ``k`` logits from the rows and writes them into the base logits. Only ``token_rows`` gets a
gradient (the table's ``requires_grad`` stays off, so no optimizer state exists for the other rows).

``merge`` writes the rows into the table (keeping the rows it overwrote), ``unmerge`` puts those back bit for bit;
adapter files hold ``token_rows`` and ``token_indices`` only (PEFT's files: ``trainable_tokens_delta``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LoRAConfig
from .errors import LoRAConfigError, MergeStateError, TargetNotFoundError
from .layers import is_lora_module
from .layers.base import plain_attrs, rebuild, resolve_dtype
from .plan import summarize_names

ROWS, INDICES = "token_rows", "token_indices"
LEAVES = (ROWS, INDICES)  # the adapter tensors of a module holding trainable tokens


# --------------------------------------------------------------------------- the modules
class TrainableTokens:
    """What the embedding and output-layer forms share: the rows (own, or a tied leader's), merging, disabling."""

    token_leader: TrainableTokens | None = None  # a tied module reads this module's rows
    token_merged: bool = False
    token_disabled: bool = False
    token_rows: nn.Parameter
    token_indices: Tensor
    weight: nn.Parameter

    def _init_tokens(self, base: nn.Module, indices: list[int] | None, dtype: torch.dtype | None) -> None:
        nn.Module.__init__(self)  # type: ignore[arg-type]
        self.__dict__["_base_cls"] = type(base)
        self.__dict__["_base_attrs"] = plain_attrs(base)
        self.__dict__.update(self._base_attrs)
        for leaf, p in base._parameters.items():  # weight (and an nn.Linear's bias), the same tensors
            self.register_parameter(leaf, p)  # type: ignore[attr-defined]
        if indices is not None:
            w = base.weight
            idx = torch.tensor(indices, dtype=torch.long, device=w.device)
            rows = w.detach().index_select(0, idx).to(resolve_dtype(None, w.dtype) if dtype is None else dtype)
            self.token_rows = nn.Parameter(rows.clone())
            self.register_buffer(INDICES, idx)
            self.register_buffer("token_original", None, persistent=False)  # the rows merging overwrote

    def follow(self, leader: TrainableTokens) -> None:
        """Read ``leader``'s rows (the two modules hold one weight: a tied output head)."""
        self.__dict__["token_leader"] = leader

    def source(self) -> TrainableTokens:
        return self.token_leader if self.token_leader is not None else self

    def active_rows(self) -> tuple[Tensor, Tensor] | None:
        """``(rows, indices)`` forward applies; ``None`` when merged (the table holds them) or disabled."""
        src = self.source()
        if src.token_merged or src.token_disabled:
            return None
        return src.token_rows, src.token_indices

    # ------------------------------------------------------------ merging (the module holding the rows)
    def merge(self) -> None:
        """Write the rows into the table (the overwritten rows are kept for :meth:`unmerge`)."""
        if self.token_leader is not None:
            raise MergeStateError("these trainable tokens follow a tied module's rows; merge that one (merge_lora)")
        if self.token_merged:
            raise MergeStateError("the trainable tokens are merged already; call unmerge first")
        with torch.no_grad():
            w, idx = self.weight, self.token_indices
            self.token_original = w.index_select(0, idx).clone()
            w.index_copy_(0, idx, self.token_rows.detach().to(w.dtype))
        self.token_merged = True

    def unmerge(self) -> None:
        """Put back the rows merging overwrote, bit for bit."""
        if self.token_leader is not None:
            raise MergeStateError("these trainable tokens follow a tied module's rows; unmerge that one")
        if not self.token_merged:
            raise MergeStateError("the trainable tokens are not merged; nothing to unmerge")
        with torch.no_grad():
            self.weight.index_copy_(0, self.token_indices, self.token_original)  # type: ignore[arg-type]
        self.token_original = None
        self.token_merged = False

    def merged_weight(self) -> Tensor:
        """The table with the rows written in (a copy unless merged), detached."""
        src = self.source()
        w = src.weight.detach()
        if src.token_merged:
            return w
        return w.index_copy(0, src.token_indices, src.token_rows.detach().to(w.dtype))

    def original_weight(self) -> Tensor:
        """The table as it was before merging (a copy if merged), detached."""
        src = self.source()
        w = src.weight.detach()
        if not src.token_merged:
            return w
        return w.index_copy(0, src.token_indices, src.token_original)

    def new_slots(self, indices: list[int]) -> dict[str, Tensor]:
        """Fresh rows for another named adapter: the unmerged table's rows at ``indices``."""
        w = self.original_weight()
        idx = torch.tensor(indices, dtype=torch.long, device=w.device)
        rows = w.index_select(0, idx).to(self.token_rows.dtype).clone()
        return {ROWS: nn.Parameter(rows, requires_grad=False), INDICES: idx}

    def to_base(self) -> nn.Module:
        params = {k: p for k, p in self._parameters.items() if k != ROWS}  # type: ignore[attr-defined]
        return rebuild(self._base_cls, self._base_attrs, params, {})  # type: ignore[attr-defined]

    def tokens_extra_repr(self) -> str:
        src = self.source()
        what = "follows its tied module's rows" if self.token_leader is not None else "trainable rows"
        return f"{what} {src.token_indices.tolist()}, merged={src.token_merged}"


class TrainableTokensEmbedding(TrainableTokens, nn.Embedding):
    """An ``nn.Embedding`` whose rows ``token_indices`` are ``token_rows``: ``y = W[x]``, or ``token_rows[j]`` where
    ``x == token_indices[j]``. ``padding_idx`` keeps its meaning (a padding row among them gets no gradient)."""

    def __init__(self, base: nn.Embedding, indices: list[int] | None, dtype: torch.dtype | None = None) -> None:
        self._init_tokens(base, indices, dtype)

    def forward(self, x: Tensor) -> Tensor:
        out = F.embedding(x, self.weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, self.sparse)
        active = self.active_rows()
        if active is None:
            return out
        rows, idx = active
        k = idx.numel()
        lookup = torch.full((self.num_embeddings,), k, dtype=torch.long, device=x.device)
        lookup[idx] = torch.arange(k, device=x.device)
        pos = lookup[x]  # the row of each token among the trained ones; k: not one of them
        table = torch.cat([rows.to(out.dtype), rows.new_zeros(1, rows.shape[1], dtype=out.dtype)])
        picked = F.embedding(pos, table, None, None, 2.0, self.scale_grad_by_freq, False)
        if self.padding_idx is not None:  # as F.embedding with padding_idx: that row's value, no gradient
            picked = torch.where((x == self.padding_idx).unsqueeze(-1), picked.detach(), picked)
        return torch.where((pos < k).unsqueeze(-1), picked, out)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, " + self.tokens_extra_repr()


class TrainableTokensLinear(TrainableTokens, nn.Linear):
    """A bias-free output ``nn.Linear`` (``out_features`` = the vocabulary) whose weight rows ``token_indices`` are
    ``token_rows``: the base logits with those ``k`` columns computed from the rows instead (as their change from
    the table's rows, so they are the base's bit for bit until the rows train)."""

    def __init__(self, base: nn.Linear, indices: list[int] | None, dtype: torch.dtype | None = None) -> None:
        self._init_tokens(base, indices, dtype)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        active = self.active_rows()
        if active is None:
            return out
        rows, idx = active
        # the k logits' change, x·(rows - W[idx])ᵀ, added to the base logits: exactly the base's while the rows are
        # the table's (at injection), x·rowsᵀ up to round-off after training; only the rows get a gradient
        change = rows.to(out.dtype) - self.weight.detach().index_select(0, idx).to(out.dtype)
        return out.index_add(out.dim() - 1, idx, F.linear(x, change))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + self.tokens_extra_repr()


def is_token_module(module: nn.Module) -> bool:
    return isinstance(module, TrainableTokens)


def token_modules(model: nn.Module) -> dict[str, TrainableTokens]:
    """``{name: module}`` of the modules holding trainable token rows (not the tied ones reading them)."""
    return {
        n: m  # type: ignore[misc]
        for n, m in model.named_modules()
        if isinstance(m, TrainableTokens) and m.token_leader is None
    }


def token_readers(model: nn.Module) -> dict[str, TrainableTokens]:
    """``{name: module}`` of every trainable-tokens module under every name it has (holders and tied readers)."""
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, TrainableTokens)}  # type: ignore[misc]


def token_record(model: nn.Module) -> dict[str, list[int]]:
    """``{module: indices}`` of the model's trainable tokens now (the active adapter's)."""
    return {n: [int(i) for i in m.token_indices.tolist()] for n, m in token_modules(model).items()}


# --------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class TokenTarget:
    """One module whose rows ``indices`` train (``kind``: ``embedding`` | ``linear``), and the modules holding the
    same weight that read its rows (``followers``, a tied output head)."""

    name: str
    indices: tuple[int, ...]
    kind: str
    followers: tuple[str, ...] = ()


def _token_kind(module: nn.Module) -> str | None:
    """``embedding`` / ``linear`` for a module trainable tokens can wrap (or wrap already), else ``None``."""
    if isinstance(module, TrainableTokensEmbedding):
        return "embedding"
    if isinstance(module, TrainableTokensLinear):
        return "linear"
    if is_lora_module(module):
        return None
    if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward:
        return "embedding"
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    return None


def _rows(module: nn.Module, kind: str) -> int:
    return int(module.num_embeddings if kind == "embedding" else module.out_features)  # type: ignore[arg-type]


def _input_embedding(model: nn.Module) -> str:
    """The name of the model's input embedding: what ``get_input_embeddings()`` returns (on the model or the outermost
    submodule that has it, e.g. the Hugging Face model inside a LightningModule), else its only ``nn.Embedding``."""
    names = {id(m): n for n, m in reversed(list(model.named_modules()))}
    for _, owner in model.named_modules():
        getter = getattr(owner, "get_input_embeddings", None)
        if not callable(getter):
            continue
        try:
            emb = getter()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(emb, nn.Module) and id(emb) in names:
            return names[id(emb)]
    embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if len(embeddings) == 1:
        return embeddings[0]
    raise TargetNotFoundError(
        f"trainable_token_indices is a list, so it names the input embedding, but {type(model).__name__} has no "
        f"get_input_embeddings() and {len(embeddings)} nn.Embedding modules "
        f"({summarize_names(embeddings, 5) or 'none'}): give {{'<embedding name>': [indices]}} instead"
    )


def _matches(spec: str, names: Iterable[str]) -> list[str]:
    return [n for n in names if n == spec or n.endswith("." + spec)]


def plan_tokens(
    model: nn.Module, config: LoRAConfig, adapted: Iterable[str] = (), modules_to_save: Iterable[str] = ()
) -> list[TokenTarget]:
    """The modules ``config.trainable_token_indices`` makes rows of trainable, checked against the model (its
    LoRA-adapted modules ``adapted`` and ``modules_to_save`` too); raises one line before anything changes."""
    spec = config.trainable_token_indices
    if spec is None:
        return []
    modules = dict(model.named_modules())  # one name per module
    wanted: dict[str, list[int]] = {}
    if isinstance(spec, list):
        wanted[_input_embedding(model)] = list(spec)
    else:
        for key, indices in spec.items():
            found = _matches(key, modules)
            if not found:
                embeddings = [n for n, m in modules.items() if isinstance(m, nn.Embedding)]
                raise TargetNotFoundError(
                    f"trainable_token_indices key {key!r} matched no module of {type(model).__name__}; its embeddings: "
                    f"{summarize_names(embeddings, 8) or 'none'} (give a full module name or a dotted suffix of one)"
                )
            for n in found:
                wanted[n] = list(indices)
    kinds: dict[str, str] = {}
    for name, indices in wanted.items():
        module = modules[name]
        kind = _token_kind(module)
        if is_lora_module(module):
            raise LoRAConfigError(
                f"trainable_token_indices names {name}, which LoRA targets adapt too: a weight gets one kind of "
                "update; drop it from targets (or from trainable_token_indices)"
            )
        if kind is None or (kind == "linear" and getattr(module, "bias", None) is not None):
            what = type(module).__name__ + (" with a bias (PEFT's token rows drop it)" if kind == "linear" else "")
            raise LoRAConfigError(
                f"trainable_token_indices names {name}, {what}, not an nn.Embedding: trainable tokens train rows of an "
                "embedding table (or of a bias-free output nn.Linear such as an untied lm_head); name the embedding, "
                "e.g. 'embed_tokens'"
            )
        if kind == "embedding" and getattr(module, "max_norm", None) is not None:
            raise LoRAConfigError(
                f"{name} has max_norm={module.max_norm}: it renormalises rows in place during forward, which trainable "
                "token rows cannot follow; build the Embedding without max_norm"
            )
        rows = _rows(module, kind)
        bad = [i for i in indices if i >= rows]
        if bad:
            raise LoRAConfigError(
                f"trainable_token_indices: index {bad[0]} is out of range for {name}, which has {rows} rows "
                f"(vocabulary size {rows}); add the tokens to the tokenizer and call "
                "model.resize_token_embeddings(len(tokenizer)) before injecting"
            )
        kinds[name] = kind
    # tied weights: every module holding a target's weight reads the rows of one of them (an embedding first)
    holders: dict[int, list[tuple[str, str]]] = {}
    for n, m in modules.items():
        for leaf, p in m._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((n, leaf))
    targets: list[TokenTarget] = []
    done: set[str] = set()
    for name in wanted:
        if name in done:
            continue
        held = holders[id(modules[name].weight)]
        odd = next((f"{n}.{leaf}" for n, leaf in held if leaf != "weight"), None)
        if odd is not None:
            raise LoRAConfigError(
                f"the weight of {name} is also {odd}, which trainable token rows cannot follow; untie the weights or "
                "name another embedding in trainable_token_indices"
            )
        group = [n for n, _ in held]
        for g in group:
            kind = _token_kind(modules[g])
            if kind is None or (kind == "linear" and getattr(modules[g], "bias", None) is not None):
                raise LoRAConfigError(
                    f"{g} holds the weight of {name} (tied) and is a {type(modules[g]).__name__}, which cannot read "
                    "trainable token rows: untie the weights or name another embedding in trainable_token_indices"
                )
            kinds[g] = kind
        named = [g for g in group if g in wanted]
        differ = next((g for g in named if wanted[g] != wanted[named[0]]), None)
        if differ is not None:
            raise LoRAConfigError(
                f"{named[0]} and {differ} hold one weight (tied) but trainable_token_indices gives them other rows "
                f"({wanted[named[0]]} vs {wanted[differ]}): give the indices once, on the embedding; the tied module "
                "reads the same rows"
            )
        leader = next((g for g in group if kinds[g] == "embedding"), named[0])
        targets.append(TokenTarget(leader, tuple(wanted[name]), kinds[leader], tuple(g for g in group if g != leader)))
        done.update(group)
    adapted_set = set(adapted)
    saved = tuple(modules_to_save)
    for t in targets:
        for n in (t.name, *t.followers):
            if n in adapted_set:
                raise LoRAConfigError(
                    f"{n} is adapted by LoRA targets and its rows by trainable_token_indices (tied to {t.name})"
                    if n != t.name
                    else f"{n} is adapted by LoRA targets and named by trainable_token_indices: a weight gets one kind "
                    "of update; drop it from targets (or from trainable_token_indices)"
                )
            clash = next((s for s in saved if n == s or n.startswith(s + ".") or s.startswith(n + ".")), None)
            if clash is not None:
                raise LoRAConfigError(
                    f"{n} is in modules_to_save ({clash!r}: trained in full) and in trainable_token_indices (some "
                    "rows): give it to one of them"
                )
    return targets


def build_token_modules(model: nn.Module, targets: list[TokenTarget], config: LoRAConfig) -> dict[int, nn.Module]:
    """``{id(base module): its trainable-tokens module}`` for :func:`~lora_lightning.injection.replace_modules`."""
    dtype = None if config.adapter_dtype is None else resolve_dtype(config.adapter_dtype, torch.float32)
    built: dict[int, nn.Module] = {}
    for t in targets:
        base = model.get_submodule(t.name)
        if isinstance(base, TrainableTokens):
            raise LoRAConfigError(f"{t.name} holds trainable tokens already")
        cls = TrainableTokensEmbedding if t.kind == "embedding" else TrainableTokensLinear
        leader = cls(base, list(t.indices), dtype)  # type: ignore[arg-type]
        leader.train(base.training)
        built[id(base)] = leader
        for f in t.followers:
            f_base = model.get_submodule(f)
            f_cls = TrainableTokensEmbedding if isinstance(f_base, nn.Embedding) else TrainableTokensLinear
            follower = f_cls(f_base, None)  # type: ignore[arg-type]
            follower.follow(leader)
            follower.train(f_base.training)
            built[id(f_base)] = follower
    return built


def row_masks(model: nn.Module, targets: list[TokenTarget]) -> dict[str, list[int]]:
    """``{state-dict key: indices}`` of the weight rows trainable tokens replace, under every name the weight has
    (left out of the base identity, so an adapter fits a base whose new rows were drawn anew by
    ``resize_token_embeddings``)."""
    rows = {id(model.get_submodule(n)): list(t.indices) for t in targets for n in (t.name, *t.followers)}
    return {
        f"{n}.weight" if n else "weight": rows[id(m)]
        for n, m in model.named_modules(remove_duplicate=False)
        if id(m) in rows
    }


__all__ = [
    "INDICES",
    "LEAVES",
    "ROWS",
    "TokenTarget",
    "TrainableTokens",
    "TrainableTokensEmbedding",
    "TrainableTokensLinear",
    "build_token_modules",
    "is_token_module",
    "plan_tokens",
    "row_masks",
    "token_modules",
    "token_readers",
    "token_record",
]
