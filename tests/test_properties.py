"""Property-based test (hypothesis): on random small shapes, ranks, dtypes and target subsets,

inject -> one optimizer step -> merge == unmerged == W0 + (alpha/r)·B·A computed here -> unmerge
restores W0 and the outputs -> save_adapter -> load into a fresh copy of the base == the trained model.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lora_lightning import (
    LoRAConfig,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

TARGETS = ("q", "k", "v", "o", "mlp")
# (atol, rtol) of whole-network output comparisons in fp32/fp64; atol is scaled by the outputs' largest magnitude.
# bfloat16 keeps 8 significant bits: x·W0 + s·(x·Aᵀ)·Bᵀ and x·(W0 + s·B·A) round differently, by an amount set by
# the terms' magnitudes (not their sum's), and a network can amplify it without bound (a 1-wide attention turns
# it into a different softmax). So bf16 is checked layer by layer, against a bound built from those magnitudes.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}


class Block(nn.Module):
    """Attention + MLP with rectangular projections: q/k/v: d_model -> d_attn, o: d_attn -> d_model,
    up: d_model -> d_ff, down: d_ff -> d_model."""

    def __init__(self, d_model: int, d_attn: int, d_ff: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d_model, d_attn) for _ in range(3))
        self.o_proj = nn.Linear(d_attn, d_model)
        self.mlp = nn.Sequential()
        self.mlp.up_proj = nn.Linear(d_model, d_ff)
        self.mlp.act = nn.Tanh()
        self.mlp.down_proj = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        x = x + self.o_proj(att @ v)
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self, d_model: int, d_attn: int, d_ff: int, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(d_model, d_attn, d_ff) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


def max_rank(d_model: int, d_attn: int, d_ff: int, targets: list[str]) -> int:
    dims = {
        "q": (d_model, d_attn),
        "k": (d_model, d_attn),
        "v": (d_model, d_attn),
        "o": (d_attn, d_model),
        "mlp": (d_model, d_ff),
    }
    return min(min(dims[t]) for t in targets)


@st.composite
def cases(draw):
    d_model = draw(st.integers(2, 12))
    d_attn = draw(st.integers(1, 12))
    d_ff = draw(st.integers(1, 16))
    targets = draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=5, unique=True))
    r = draw(st.integers(1, max_rank(d_model, d_attn, d_ff, targets)))
    return dict(
        d_model=d_model,
        d_attn=d_attn,
        d_ff=d_ff,
        n_layers=draw(st.integers(1, 2)),
        targets=targets,
        r=r,
        alpha=draw(st.sampled_from([1.0, 2.0 * r, 16.0])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        init=draw(st.sampled_from(["kaiming", "gaussian", "gaussian_fan_in"])),
        seed=draw(st.integers(0, 2**16)),
    )


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Whole-network outputs agree within TOL (fp32/fp64; bf16 has ``layers_close`` instead)."""
    if dtype not in TOL:
        return
    atol, rtol = TOL[dtype]
    atol *= max(1.0, expected.double().abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def layers_close(layers: dict, pristine: nn.Module, scale: float, r: int, dtype: torch.dtype, what: str) -> None:
    """Each adapted layer, on its own random input x (n, d_in), against x·(W0 + s·B·A)ᵀ + b computed in fp64, within
    the rounding its terms allow: 4·eps·(|x|·(|W0| + |ΔW| + r·|s|·|B|·|A|)ᵀ + |b| + |s|·(|x|·|A|ᵀ)·|B|ᵀ) -- every
    rounding of the unmerged sum, of a merged weight, or of an unmerge is at most eps times one of these terms."""
    eps = torch.finfo(dtype).eps
    gen = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        base = pristine.get_submodule(name)
        w0, b = base.weight.double(), base.bias.double()
        a, bb = layer.lora_A.double(), layer.lora_B.double()
        delta = scale * (bb @ a)
        x = torch.randn(5, w0.shape[1], generator=gen).to(dtype)
        xd = x.double()
        exact = xd @ (w0 + delta).T + b
        terms = w0.abs() + delta.abs() + r * abs(scale) * (bb.abs() @ a.abs())
        bound = 4 * eps * (xd.abs() @ terms.T + b.abs() + abs(scale) * (xd.abs() @ a.abs().T) @ bb.abs().T) + 1e-30
        err = (layer(x).double() - exact).abs()
        assert (err <= bound).all(), f"{what}, {name}: error {err.max().item():.3g} above the rounding bound"


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)  # the same cases on every run
@given(cases())
def test_inject_step_merge_unmerge_save_load(case):
    dtype = case["dtype"]
    torch.manual_seed(case["seed"])
    base = Net(case["d_model"], case["d_attn"], case["d_ff"], case["n_layers"]).to(dtype).eval()
    pristine = copy.deepcopy(base)
    x = torch.randn(3, 4, case["d_model"], dtype=dtype)
    y_base = base(x).detach()

    model = base
    config = LoRAConfig(r=case["r"], alpha=case["alpha"], targets=case["targets"], init=case["init"])
    specs = inject_lora(model, config)
    layers = lora_layers(model)
    expected_names = {
        f"layers.{i}.{n}"
        for i in range(case["n_layers"])
        for t in case["targets"]
        for n in (
            {
                "q": ["q_proj"],
                "k": ["k_proj"],
                "v": ["v_proj"],
                "o": ["o_proj"],
                "mlp": ["mlp.up_proj", "mlp.down_proj"],
            }[t]
        )
    }
    assert set(layers) == {s.name for s in specs} == expected_names
    assert torch.equal(model(x), y_base)  # B = 0: exactly the base model

    # one optimizer step on the adapters only
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(layers)
    opt = torch.optim.Adam(trainable, lr=0.05)  # first step moves every entry by ~lr: a bounded ΔW
    target = torch.randn(3, 4, case["d_model"], dtype=dtype)
    ((model(x) - target) ** 2).mean().backward()
    opt.step()
    for name, p in pristine.named_parameters():  # frozen base weights untouched
        assert torch.equal(model.get_parameter(name), p), name
    assert any(layer.lora_B.abs().sum() > 0 for layer in layers.values())

    with torch.no_grad():
        y_adapted = model(x)
        # independent computation: the base network with W0 + (alpha/r)·B·A folded in by hand
        manual = copy.deepcopy(pristine)
        for name, layer in layers.items():
            delta = (case["alpha"] / case["r"]) * (layer.lora_B.double() @ layer.lora_A.double())
            w = manual.get_submodule(name).weight
            w.copy_((w.double() + delta).to(dtype))
        close(y_adapted, manual(x), dtype, "adapted vs hand-merged")
        scale = case["alpha"] / case["r"]
        layers_close(layers, pristine, scale, case["r"], dtype, "adapted")
        assert not torch.equal(y_adapted, y_base)  # the step changed the function

        assert merge_lora(model) == len(layers)
        close(model(x), y_adapted, dtype, "merged vs unmerged")
        layers_close(layers, pristine, scale, case["r"], dtype, "merged")
        assert unmerge_lora(model) == len(layers)
        close(model(x), y_adapted, dtype, "unmerged again vs before merge")
        layers_close(layers, pristine, scale, case["r"], dtype, "unmerged again")
        # merge rounds W0 + ΔW once, unmerge rounds (W0 + ΔW) - ΔW once; the in-place GEMM (addmm_)
        # also rounds the r-term product s·B@A while accumulating (at most r·eps·|s|·|B|@|A| each way)
        eps = torch.finfo(dtype).eps
        for name, layer in layers.items():
            w0 = pristine.get_submodule(name).weight.double()
            delta = scale * (layer.lora_B.double() @ layer.lora_A.double())
            product_bound = case["r"] * abs(scale) * (layer.lora_B.double().abs() @ layer.lora_A.double().abs())
            err = (layer.weight.double() - w0).abs()
            bound = eps * ((w0 + delta).abs() + w0.abs() + 2 * product_bound) + 1e-12
            assert (err <= bound).all(), f"{name}.weight after unmerge: error {err.max().item():.3g} above round-off"

        with tempfile.TemporaryDirectory() as tmp:
            path = save_adapter(model, Path(tmp) / "adapter.safetensors")
            fresh = copy.deepcopy(pristine)
            assert load_adapter(fresh, path) == config
        for name, layer in lora_layers(fresh).items():
            assert layer.lora_A.dtype == dtype
            assert torch.equal(layer.lora_A, layers[name].lora_A) and torch.equal(layer.lora_B, layers[name].lora_B)
        assert torch.equal(fresh(x), y_adapted)  # same W0, same A and B, same ops: bit-identical
