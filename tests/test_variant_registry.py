"""The variant registry: a variant defined only in this file runs through the callback, the budget,
adapter files, merging and resume without touching library code; and every variant's parameter count
is exact."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from conftest import (
    N_LAYERS,
    LitTiny,
    lora_tensors,
    randomize_adapters,
    tiny_batch,
    tiny_gpt2,
    tiny_loader,
    tiny_model,
    trainer,
)
from lora_lightning import (
    AdapterMismatchError,
    LoRACallback,
    LoRAConfig,
    LoRAConfigError,
    LoRALinear,
    Variant,
    count_parameters,
    describe,
    inject_lora,
    load_adapter,
    lora_layers,
    lora_parameter_count,
    merge_lora,
    plan_injection,
    rank_for_budget,
    register_variant,
    save_adapter,
)
from lora_lightning.budget import adapter_cost, allocate_ranks, cost_per_rank
from lora_lightning.variants.base import registered_variants


# ----------------------------------------------------------------------------- a toy variant, here only
@dataclass
class GainConfig(LoRAConfig):
    """``gain_per_row``: one trainable gain per output row instead of one scalar (changes the shapes)."""

    variant: str = "gain"
    gain_per_row: bool = False
    gain_init: float = 1.0

    structural_options = ("gain_per_row",)

    def validate(self) -> None:
        super().validate()
        if self.gain_init <= 0:
            raise LoRAConfigError(f"gain_init={self.gain_init!r} must be positive")


class GainLinear(LoRALinear):
    """``ΔW = s·diag(g)·B·A``: LoRA with a trainable gain ``g`` (a scalar, or one per output row)."""

    variant_name = "gain"
    trainable_names = ("lora_A", "lora_B", "lora_gain")
    adapter_names = ("lora_A", "lora_B", "lora_gain")

    def __init__(self, base: nn.Linear, *args, gain_rows: int = 1, gain_init: float = 1.0, **kwargs) -> None:
        super().__init__(base, *args, **kwargs)
        self.lora_gain = nn.Parameter(torch.full((gain_rows,), gain_init, dtype=self.lora_A.dtype))

    def factors(self) -> tuple[Tensor, Tensor, float]:
        return self.lora_A, self.lora_B * self.lora_gain[:, None], self.scaling


class Gain(Variant):  # registered for this module's tests only (the fixture below), and added to the battery
    config_class = GainConfig
    layer_class = GainLinear

    def build(self, base, spec):
        c = self.config
        return GainLinear(
            base,
            gain_rows=spec.d_out if c.gain_per_row else 1,
            gain_init=c.gain_init,
            quantize=c.quantize_base,
            **self.layer_kwargs(base, spec),
        )

    @classmethod
    def num_params(cls, spec, config) -> int:
        return super().num_params(spec, config) + (spec.d_out if config.gain_per_row else 1)


def gain_delta(layer: GainLinear) -> Tensor:
    """ΔW written out independently of the library: s · diag(g) · B · A."""
    return layer.scaling * (layer.lora_gain[:, None] * layer.lora_B) @ layer.lora_A


def _battery_formula(case, layer, W0):
    """The conformance battery's hand formula for the toy variant (float64): s · diag(g) · B · A."""
    s = float(layer.alpha) / int(layer.r)
    d = torch.float64
    return s * (layer.lora_gain.detach().to(d)[:, None] * layer.lora_B.detach().to(d)) @ layer.lora_A.detach().to(d)


@pytest.fixture(autouse=True, scope="module")
def gain_variant():
    """The toy variant exists while this module's tests run, and is one entry more in the conformance battery."""
    from conformance import cases as battery
    from conformance.references import FORMULAS
    from lora_lightning import registry

    register_variant("gain")(Gain)
    battery.VARIANTS["gain"], FORMULAS["gain"] = {"variant": "gain", "gain_init": 0.7}, _battery_formula
    try:
        yield
    finally:
        del registry.VARIANTS["gain"], registry.VARIANT_CONFIGS["gain"], battery.VARIANTS["gain"], FORMULAS["gain"]
        registry.notify()


def test_toy_variant_runs_through_the_whole_battery():
    """Registered in this file, the variant is checked in every combination of the conformance battery."""
    from conformance import cases as battery
    from conformance.matrix import CHECKED, REFUSED, run_cell
    from conformance.operations import OPERATIONS

    assert battery.check_registries_covered() == []
    seen = {CHECKED: 0, REFUSED: 0}
    failures = []
    for case in battery.all_cases():
        if case.variant != "gain" or case.quantizer not in (None, "int8"):
            continue
        for op in OPERATIONS:
            try:
                seen[run_cell(case, op.name).status] += 1
            except AssertionError as exc:
                failures.append(f"{case.id} {op.name}: {exc}")
    assert not failures, "\n".join(failures)
    assert seen[CHECKED] > 0 and seen[REFUSED] > 0, seen


def test_toy_variant_config_and_callback_keywords():
    cfg = LoRAConfig(variant="gain", r=2, gain_init=0.5)
    assert type(cfg) is GainConfig and cfg.gain_init == 0.5
    with pytest.raises(LoRAConfigError, match="gain_init"):
        LoRAConfig(variant="gain", gain_init=-1.0)
    with pytest.raises(LoRAConfigError, match="'gain_init' is an option of variant='gain'"):
        LoRAConfig(gain_init=0.5)  # an option of another variant
    assert LoRACallback(variant="gain", gain_per_row=True).config.gain_per_row is True
    import inspect

    assert {"gain_per_row", "gain_init"} <= set(inspect.signature(LoRACallback.__init__).parameters)


def test_toy_variant_layers_merge_and_file_round_trip(tmp_path):
    model = tiny_model(0)
    specs = inject_lora(model, LoRAConfig(variant="gain", r=2, targets=["q", "v"], gain_init=0.5))
    layers = lora_layers(model)
    assert len(specs) == 2 * N_LAYERS and all(isinstance(m, GainLinear) for m in layers.values())
    randomize_adapters(model)
    ids, _ = tiny_batch()
    x = torch.randn(4, 16)
    layer = layers["layers.0.self_attn.q_proj"]
    torch.testing.assert_close(layer(x), x @ (layer.weight + gain_delta(layer)).T + layer.bias, atol=1e-5, rtol=0)
    out = model(ids)
    path = save_adapter(model, tmp_path / "gain.safetensors")
    fresh = tiny_model(0)
    assert load_adapter(fresh, path).variant == "gain"
    torch.testing.assert_close(fresh(ids), out, atol=0, rtol=0)
    merge_lora(model)
    torch.testing.assert_close(model(ids), out, atol=1e-5, rtol=0)
    other = tiny_model(0)
    inject_lora(other, LoRAConfig(variant="gain", r=2, targets=["q", "v"], gain_per_row=True))
    with pytest.raises(AdapterMismatchError, match="gain_per_row: False in adapter gain.safetensors vs True in model"):
        load_adapter(other, path)


def test_toy_variant_through_the_callback_budget_and_resume(tmp_path):
    model = LitTiny()
    budget_cfg = GainConfig(targets=["q", "v"])
    r = rank_for_budget(model, budget_cfg, 6 * (2 * (16 + 16) + 1))  # rank 2 on 16x16 + the gain, per matrix
    assert r == 2
    ckpt = ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)
    cb = LoRACallback(variant="gain", r=r, targets=["q", "v"], gain_init=0.5)
    trainer(tmp_path, [cb, ckpt], max_steps=4, enable_checkpointing=True).fit(model, tiny_loader())
    gains = [m.lora_gain.item() for m in lora_layers(model).values()]
    assert any(abs(g - 0.5) > 1e-6 for g in gains)  # trained
    assert count_parameters(model).trainable == lora_parameter_count(describe(model)) == 6 * (2 * 32 + 1)
    # resume: 1 epoch + 1 from the checkpoint == 2 epochs in one go, bit for bit
    gain = dict(variant="gain", r=2, targets=["q", "v"], gain_init=0.5)
    straight, first, resumed = LitTiny(), LitTiny(), LitTiny()
    torch.manual_seed(1)  # the same adapter initialisation for both runs
    trainer(tmp_path, [LoRACallback(**gain)], max_steps=-1, max_epochs=2).fit(straight, tiny_loader())
    torch.manual_seed(1)
    ck = ModelCheckpoint(dirpath=tmp_path / "d", save_last=True)
    trainer(tmp_path, [LoRACallback(**gain), ck], max_steps=-1, max_epochs=1, enable_checkpointing=True).fit(
        first, tiny_loader()
    )
    trainer(tmp_path, [LoRACallback(**gain)], max_steps=-1, max_epochs=2).fit(
        resumed, tiny_loader(), ckpt_path=str(tmp_path / "d" / "last.ckpt")
    )
    for k, v in lora_tensors(straight).items():
        torch.testing.assert_close(lora_tensors(resumed)[k], v, atol=0, rtol=0)
    assert [m.lora_gain.item() for m in lora_layers(resumed).values()] == [
        m.lora_gain.item() for m in lora_layers(straight).values()
    ]


# ----------------------------------------------------------------------------- exact counts, every variant
def _configs() -> list[tuple[str, dict]]:
    extra = {"adalora": {"adalora_target_r": 2}, "gain": {"gain_per_row": True}, "loftq": {"quantize_base": "int8"}}
    return [(name, extra.get(name, {})) for name in sorted(set(registered_variants()) | {"gain"})]


@pytest.mark.parametrize("name,extra", _configs(), ids=[n for n, _ in _configs()])
@pytest.mark.parametrize("r,targets", [(2, ["q", "v"]), (3, ["q", "k", "v", "o", "mlp"])])
def test_num_params_and_budget_cost_equal_the_trainable_adapter_tensors(name, extra, r, targets):
    model = tiny_model(0)
    cfg = LoRAConfig(variant=name, r=r, targets=targets, **extra)
    planned = plan_injection(model, cfg)
    inject_lora(model, cfg)
    real = sum(getattr(layer, leaf).numel() for layer in lora_layers(model).values() for leaf in layer.trainable_names)
    assert count_parameters(model).trainable == real  # nothing else trains
    assert lora_parameter_count(planned) == lora_parameter_count(describe(model)) == real
    assert adapter_cost(tiny_model(0), cfg, r) == real


@pytest.mark.parametrize("targets", [["q", "v"], ["q", "k", "v"], ["c_attn"], ["q", "v", "mlp"]])
def test_num_params_and_budget_cost_on_fused_blocks(targets):
    pytest.importorskip("transformers")
    model = tiny_gpt2()
    cfg = LoRAConfig(r=2, targets=targets)
    planned = plan_injection(model, cfg)
    inject_lora(model, cfg)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_parameter_count(planned) == real == adapter_cost(tiny_gpt2(), cfg, 2)
    assert cost_per_rank(tiny_gpt2(), cfg) * 2 == real  # what one rank costs on these (fused) blocks
    assert rank_for_budget(tiny_gpt2(), cfg, real) == 2 and rank_for_budget(tiny_gpt2(), cfg, real - 1) == 1
    if targets == ["q", "v"]:  # per block r·(d_in + size): A is 2r x 16, B is 32 x r, for each of 2 layers
        assert real == 2 * (2 * 2 * 16 + 32 * 2)


def test_rank_for_budget_and_allocate_ranks_spend_within_the_budget_for_every_variant():
    for name, extra in _configs():
        if name in ("gain", "vera"):
            continue
        cfg = LoRAConfig(variant=name, r=8, targets=["q", "v"], **extra)
        budget = 6 * 8 * 32 + 100
        r = rank_for_budget(tiny_model(0), cfg, budget)
        assert adapter_cost(tiny_model(0), cfg, r) <= budget, name
        assert budget < adapter_cost(tiny_model(0), cfg, r + 1) or r == 16, name  # 16: the 16 x 16 q, v's rank cap
        pattern = allocate_ranks(tiny_model(0), cfg, budget)
        model = tiny_model(0)
        inject_lora(
            model,
            LoRAConfig(
                variant=name,
                r=8,
                targets=["q", "v"],
                rank_pattern=pattern,
                **(extra if name != "adalora" else {"adalora_target_r": 1}),
            ),
        )
        assert count_parameters(model).trainable <= budget, name
    with pytest.raises(LoRAConfigError, match="rank_pattern is not supported"):
        allocate_ranks(tiny_model(0), LoRAConfig(variant="vera", targets=["q", "v"]), 5000)


@pytest.mark.parametrize("fmt", ["nf4", "bnb-nf4", "bnb-fp4"])
def test_blockwise_formats_refuse_weights_that_are_not_whole_blocks(fmt):
    from lora_lightning.quantization import QUANTIZERS

    q = QUANTIZERS[fmt]
    q.check(q.block * 3, "ok")  # whole blocks: accepted
    with pytest.raises(
        LoRAConfigError, match=rf"quantize_base='{fmt}' stores blocks of 64 values; layer has 100, not a multiple"
    ):
        q.check(100, "layer")


@pytest.mark.parametrize("name,extra", _configs(), ids=[n for n, _ in _configs()])
def test_adapter_dtype_pins_every_adapter_tensor_through_a_half_precision_cast(name, extra):
    """adapter_dtype='float32', then the model cast to bf16 (what Lightning's bf16-true does): every tensor the adapter
    holds stays fp32, trained or frozen (LoRA-FA's A), and a training step runs."""
    model = tiny_model(0)
    inject_lora(model, LoRAConfig(variant=name, r=2, targets=["q", "v"], adapter_dtype="float32", **extra))
    model.to(torch.bfloat16)
    for layer in lora_layers(model).values():
        for leaf in dict.fromkeys(layer.trainable_names + layer.adapter_names):
            t = getattr(layer, leaf)
            assert not t.is_floating_point() or t.dtype == torch.float32, (name, leaf, t.dtype)
    ids, y = tiny_batch()
    F.cross_entropy(model(ids).float(), y).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


QUANTIZER_PACKAGES = {"int8": "torch", "nf4": "torchao", "bnb-nf4": "bitsandbytes", "bnb-fp4": "bitsandbytes"}
QUANTIZER_PACKAGES["bnb-int8"] = "bitsandbytes"


def test_every_registered_quantizer_is_cast_checked():
    from lora_lightning import registry

    assert set(registry.QUANTIZERS) == set(QUANTIZER_PACKAGES)


@pytest.mark.parametrize("fmt", sorted(QUANTIZER_PACKAGES))
def test_a_quantized_base_follows_a_half_precision_cast_of_the_model(fmt):
    """``model.to(torch.bfloat16)`` after injection with ``quantize_base`` (Lightning's bf16-true): the codes stay, the
    base is dequantized to bf16, and the output is the fp32 one to bf16 round-off (it raised a dtype error)."""
    pytest.importorskip(QUANTIZER_PACKAGES[fmt])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    inject_lora(model, LoRAConfig(targets=["0"], quantize_base=fmt))
    randomize_adapters(model)
    x = torch.randn(4, 64)
    expected = model(x).detach()
    model.to(torch.bfloat16)
    out = model(x.bfloat16())
    assert out.dtype == torch.bfloat16 and model[0].base_dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=0.05, rtol=0.02)
