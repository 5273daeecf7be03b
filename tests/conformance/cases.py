"""The battery's axes, taken from the library's registries, and the tiny models a case is checked on.

A **case** is one combination of a base-layer example (of a registered layer kind), a topology (the layer
alone, two modules sharing its weight, the same module under two names, an embedding tied to an output
head), a registered variant and a registered quantizer (or none). Every registered kind, variant and
quantizer must have an entry here (:func:`check_registries_covered`); a new one is one entry, and is then
checked in every combination with the others.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lora_lightning import LoRAConfig, registry

BATCH = 2


@dataclass(frozen=True)
class Example:
    """A tiny base layer of one registered kind: how to build it (seeded by the caller), an input batch, how
    to run it, the attribute it sits under and the targets that name it."""

    name: str
    kind: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], Tensor]
    attr: str = "layer"
    targets: tuple[str, ...] = ("layer",)
    run: Callable[[nn.Module, Tensor], Tensor] = lambda m, x: m(x)
    fused: bool = False
    peft: bool = True  # PEFT has an exact layout for it (else export/import must be refused)
    note: str = ""  # what makes this example special (shown in the matrix)
    target_parameters: tuple[str, ...] = ()  # parameters named by target_parameters (with targets=())
    weight: str = ""  # the tensor the "shared" topology shares, below the layer (default: weight / in_proj_weight)


def _floats(*shape: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randn(BATCH, *shape, generator=g)


def _gpt2_conv1d(nf: int, nx: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)


def _mha_run(m: nn.Module, x: Tensor) -> Tensor:
    return m(x, x, x, need_weights=False)[0]


def _mixtral_moe() -> nn.Module:
    """transformers' Mixtral sparse MoE block: a top-2 router over 4 experts held as 3-D parameters,
    ``experts.gate_up_proj [4, 16, 16]`` and ``experts.down_proj [4, 16, 8]`` (``d_out x d_in`` per expert), eager."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=16, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager"
    )
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():  # torch.empty in transformers: drawn here, from the caller's seed
            p.normal_(0.0, 0.3)
    return block


# kind name -> its examples. A registered kind without an entry fails tests/test_conformance.py.
EXAMPLES: dict[str, list[Example]] = {
    "linear": [
        Example("linear", "linear", lambda: nn.Linear(16, 8), _floats(3, 16)),
        Example(
            "linear fused qkv",
            "linear",
            lambda: nn.Linear(16, 24),
            _floats(3, 16),
            attr="qkv",
            targets=("q", "v"),
            fused=True,
            note="q and v blocks of [Wq; Wk; Wv]",
        ),
    ],
    "conv1d": [
        Example("GPT-2 Conv1D", "conv1d", lambda: _gpt2_conv1d(8, 16), _floats(3, 16)),
        Example(
            "GPT-2 Conv1D fused c_attn",
            "conv1d",
            lambda: _gpt2_conv1d(24, 16),
            _floats(3, 16),
            attr="c_attn",
            targets=("q", "v"),
            fused=True,
            note="q and v blocks",
        ),
    ],
    "mha": [
        Example(
            "nn.MultiheadAttention",
            "mha",
            lambda: nn.MultiheadAttention(16, 2, batch_first=True),
            _floats(3, 16),
            attr="attn",
            targets=("q", "v"),
            run=_mha_run,
            fused=True,
            peft=False,
            note="q and v of in_proj_weight",
        ),
    ],
    "embedding": [
        Example(
            "nn.Embedding",
            "embedding",
            lambda: nn.Embedding(12, 8, padding_idx=0),
            lambda g: torch.randint(0, 12, (BATCH, 3), generator=g),
        ),
    ],
    "conv": [
        Example("nn.Conv1d", "conv", lambda: nn.Conv1d(4, 8, 3, padding=1), _floats(4, 7)),
        Example("nn.Conv2d", "conv", lambda: nn.Conv2d(4, 8, 3, padding=1), _floats(4, 5, 5)),
        Example("nn.Conv3d", "conv", lambda: nn.Conv3d(2, 4, 3, padding=1), _floats(2, 4, 4, 4)),
        Example(
            "nn.Conv2d dilation=2",
            "conv",
            lambda: nn.Conv2d(4, 8, 3, padding=2, dilation=2),
            _floats(4, 6, 6),
            peft=False,
            note="dilated",
        ),
        Example(
            "nn.Conv2d reflect",
            "conv",
            lambda: nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"),
            _floats(4, 5, 5),
            peft=False,
            note="padding_mode='reflect'",
        ),
    ],
    "experts": [
        Example(
            "MoE experts (Mixtral)",
            "experts",
            _mixtral_moe,
            _floats(3, 16),
            attr="moe",
            targets=(),
            target_parameters=("experts.gate_up_proj", "experts.down_proj"),
            weight="experts.gate_up_proj",
            fused=True,
            note="target_parameters: 3-D gate_up_proj and down_proj, one adapter per expert",
        ),
    ],
}

EXAMPLE_BY_NAME = {ex.name: ex for examples in EXAMPLES.values() for ex in examples}

# topologies: "plain" (the layer alone), "siblings" (a second module of the same kind with its own weight reading
# the same input, as q/k/v do: shared-input fusion groups them), "shared" (a second module of the same kind holding
# the same weight, with its own bias), "alias" (the same module under two names), "tied-head" (an embedding whose
# weight is also an output Linear's, both targeted: GPT-2's wte/lm_head)
TOPOLOGIES = ("plain", "siblings", "shared", "alias", "tied-head")

# variant name -> options its config needs here (r=2, alpha=4 for all). A registered variant without an entry fails.
VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {},
    "rslora": {"variant": "rslora"},
    "lora_fa": {"variant": "lora_fa"},
    "dora": {"variant": "dora"},
    "pissa": {"variant": "pissa"},
    "olora": {"variant": "olora"},
    "loftq": {"variant": "loftq", "loftq_iter": 2},
    "vera": {"variant": "vera", "vera_seed": 3},
    "adalora": {"variant": "adalora", "adalora_target_r": 1, "adalora_total_steps": 10},
}
QUANTIZERS: tuple[str | None, ...] = (None, "int8", "nf4", "bnb-nf4", "bnb-fp4", "bnb-int8")


@dataclass(frozen=True)
class Case:
    example: Example
    topology: str
    variant: str
    quantizer: str | None

    @property
    def id(self) -> str:
        return f"{self.example.name}|{self.topology}|{self.variant}|{self.quantizer or 'none'}"

    @property
    def kind(self) -> Any:
        return registry.layer_kind(self.example.kind)

    def config(self, **overrides: Any) -> LoRAConfig:
        targets = list(self.example.targets) + (["head"] if self.topology == "tied-head" else [])
        options = {"r": 2, "alpha": 4.0, "targets": targets, "quantize_base": self.quantizer} | VARIANTS[self.variant]
        if self.example.target_parameters:
            options["target_parameters"] = list(self.example.target_parameters)
        return LoRAConfig(**(options | overrides))


def all_cases() -> list[Case]:
    out = []
    for examples in EXAMPLES.values():
        for ex, topology, variant, quant in itertools.product(examples, TOPOLOGIES, VARIANTS, QUANTIZERS):
            if topology == "tied-head" and ex.kind != "embedding":
                continue  # an output head tied to the input embedding: an embedding's topology
            out.append(Case(ex, topology, variant, quant))
    return out


def check_registries_covered() -> list[str]:
    """What the registries hold that the battery has no entry for (each must be added here)."""
    missing = [f"layer kind {k!r}" for k in registry.LAYER_KINDS if k not in EXAMPLES]
    missing += [
        f"variant {v!r}"
        for v in list(registry.VARIANTS) + list(registry.VARIANT_ALIASES)
        if v not in VARIANTS and v != "qlora"
    ]
    missing += [f"quantizer {q!r}" for q in registry.QUANTIZERS if q not in QUANTIZERS]
    return missing


# --------------------------------------------------------------------------- the models
class Holder(nn.Module):
    """Holds one base layer under the example's attribute name (so ``first.qkv``, ``second.qkv``)."""

    def __init__(self, attr: str, layer: nn.Module) -> None:
        super().__init__()
        setattr(self, attr, layer)


class Net(nn.Module):
    """The model a case is checked on: ``first.<attr>`` and, by topology, ``second.<attr>`` (sharing the weight, or
    the same module) or an output ``head`` tied to an embedding. ``forward(x)`` sums what the layers give."""

    def __init__(self, case: Case, seed: int = 0) -> None:
        super().__init__()
        ex = case.example
        self.attr, self.example, self.topology = ex.attr, ex.name, case.topology
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.first = Holder(ex.attr, ex.build())
            if case.topology == "siblings":
                self.second = Holder(ex.attr, ex.build())
            elif case.topology == "shared":
                twin = ex.build()
                weight_name = ex.weight or ("in_proj_weight" if isinstance(twin, nn.MultiheadAttention) else "weight")
                owner, _, leaf = weight_name.rpartition(".")
                shared = self.first.get_submodule(ex.attr).get_parameter(weight_name)
                setattr(twin.get_submodule(owner), leaf, shared)
                self.second = Holder(ex.attr, twin)
            elif case.topology == "alias":
                self.second = self.first
            elif case.topology == "tied-head":
                emb = self.first.get_submodule(ex.attr)
                self.head = nn.Linear(emb.embedding_dim, emb.num_embeddings)
                self.head.weight = emb.weight

    def run(self, layer: nn.Module, x: Tensor) -> Tensor:
        return EXAMPLE_BY_NAME[self.example].run(layer, x)  # looked up: the model stays picklable

    def forward(self, x: Tensor) -> Tensor:
        y = self.run(self.first.get_submodule(self.attr), x)
        if self.topology in ("siblings", "shared", "alias"):
            y = y + 0.5 * self.run(self.second.get_submodule(self.attr), x)
        if self.topology == "tied-head":
            y = self.head(y)
        return y


def inputs(case: Case, seed: int = 1) -> Tensor:
    return case.example.inputs(torch.Generator().manual_seed(seed))


def randomize(model: nn.Module, seed: int = 5, std: float = 0.3) -> None:
    """Every trainable adapter tensor gets random values (ΔW != 0, as after training), in its own dtype."""
    from lora_lightning import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name in layer.trainable_names:
                p = getattr(layer, name)
                p.copy_(
                    (torch.randn(p.shape, generator=g) * std + (1.0 if name == "lora_magnitude" else 0.0)).to(p.dtype)
                )


@dataclass
class Outcome:
    """A cell's result: ``checked`` (passed against its reference) or ``refused`` with the one-line error."""

    status: str
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
