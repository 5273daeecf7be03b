"""A layer kind registered here, in the test file, goes through injection, merging, adapter files and the whole
conformance battery like the built-in ones: the registry is the one place a new kind is added.

The kind: ``ScaledLinear``, ``y = c·(x·Wᵀ) + b`` with a fixed scalar ``c`` (a layer no built-in kind adapts,
since its forward is its own). Its LoRA layer computes ``c·x·(W0 + s·B·A)ᵀ + b``; it is not fusable,
quantizable, tieable or routable and has no PEFT layout, so the battery expects those cells refused.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conformance import cases as battery
from conformance.matrix import CHECKED, REFUSED, run_cell
from conformance.operations import OPERATIONS
from lora_lightning import (
    LayerKind,
    LoRAConfig,
    LoRAConfigError,
    LoRAError,
    LoRALayer,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    register_layer_kind,
    registry,
    save_adapter,
)
from lora_lightning.layers import plain_attrs, rebuild


class ScaledLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, c: float = 0.5) -> None:
        super().__init__()
        self.in_features, self.out_features, self.c = d_in, d_out, c
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c * F.linear(x, self.weight) + self.bias


class LoRAScaledLinear(LoRALayer, nn.Module):
    lora_kind = "scaled"

    def __init__(self, base: ScaledLinear, r: int, alpha: float, **options: Any) -> None:
        nn.Module.__init__(self)
        self._base_cls, self._base_attrs = type(base), plain_attrs(base)
        self.__dict__.update(self._base_attrs)
        self.weight, self.bias = base.weight, base.bias
        self._init_lora(base.in_features, base.out_features, base.weight, r, alpha, **options)

    def _base_weight_view(self) -> Tensor:
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        out = self.c * F.linear(x, self.weight) + self.bias
        return out if self.adapter_off() else out + self.c * self.lora_forward(x)

    def to_base(self) -> nn.Module:
        return rebuild(self._base_cls, self._base_attrs, {"weight": self.weight, "bias": self.bias}, {})


class ScaledKind(LayerKind):
    name, description, layer_class = "scaled", "ScaledLinear (a test kind)", LoRAScaledLinear

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, ScaledLinear)

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return module.out_features, module.in_features

    def peft_tensors(self, layer: LoRALayer) -> dict[str, Tensor]:
        raise LoRAConfigError("ScaledLinear has no PEFT layout: save with save_adapter()")


EXAMPLE = battery.Example("ScaledLinear", "scaled", lambda: ScaledLinear(16, 8), battery._floats(3, 16), peft=False)


@pytest.fixture()
def scaled_kind():
    register_layer_kind(ScaledKind())
    battery.EXAMPLES["scaled"] = [EXAMPLE]
    battery.EXAMPLE_BY_NAME[EXAMPLE.name] = EXAMPLE
    try:
        yield
    finally:
        del registry.LAYER_KINDS["scaled"], battery.EXAMPLES["scaled"], battery.EXAMPLE_BY_NAME[EXAMPLE.name]


def test_before_registration_the_layer_is_not_adaptable():
    with pytest.raises(LoRAError, match=r"which are not layers LoRA adapts"):
        inject_lora(nn.Sequential(ScaledLinear(4, 4), nn.Linear(4, 4)), LoRAConfig(targets=["0"]))


def test_a_registered_kind_injects_merges_and_round_trips(scaled_kind, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(16, 8))
    x = torch.randn(2, 16)
    base = model(x)
    inject_lora(model, LoRAConfig(r=2, alpha=4, targets=["0"]))
    assert isinstance(model[0], LoRAScaledLinear) and torch.equal(model(x), base)
    with torch.no_grad():
        model[0].lora_B.normal_()
    y = model(x)
    layer = model[0]
    expected = 0.5 * x @ (layer.weight + 2.0 * layer.lora_B @ layer.lora_A).T + layer.bias
    torch.testing.assert_close(y, expected.detach())
    path = save_adapter(model, tmp_path / "s.safetensors")
    torch.manual_seed(0)
    fresh = nn.Sequential(ScaledLinear(16, 8))
    load_adapter(fresh, path)
    assert torch.equal(fresh(x), y)
    merge_lora(model)
    torch.testing.assert_close(model(x), y)
    plain = merge_and_unload(model)
    assert type(plain[0]) is ScaledLinear and not lora_layers(plain)


def test_a_registered_kind_runs_through_the_whole_battery(scaled_kind):
    assert battery.check_registries_covered() == []
    cases = [c for c in battery.all_cases() if c.example.kind == "scaled" and c.quantizer in (None, "int8")]
    seen = {CHECKED: 0, REFUSED: 0}
    failures = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in cases:
            for op in OPERATIONS:
                try:
                    seen[run_cell(case, op.name).status] += 1
                except AssertionError as exc:
                    failures.append(f"{case.id} {op.name}: {exc}")
    assert not failures, "\n".join(failures)
    assert seen[CHECKED] >= 2 * len(OPERATIONS) - 4 and seen[REFUSED] > 0, (
        seen
    )  # lora and rslora on plain/alias: checked
