"""LoRA-FA (variant="lora_fa"): A frozen, B trained; the backward keeps x·Aᵀ and no input; PEFT's projected gradient."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import LitTiny, randomize_adapters, tiny_batch, tiny_gpt2, tiny_loader, tiny_model, trainer
from lora_lightning import (
    LoRACallback,
    LoRAConfig,
    LoRAConfigError,
    add_adapter,
    count_parameters,
    export_peft_adapter,
    inject_lora,
    load_adapter,
    lora_layers,
    project_lora_fa_gradients,
    save_adapter,
)
from lora_lightning.variants.lora_fa import LoRAFALinear, projected_gradient

FA = dict(variant="lora_fa", r=4, alpha=8, targets=["q", "v"], init_seed=0)


def fa_model(seed: int = 0, **kw) -> nn.Module:
    model = tiny_model(seed)
    inject_lora(model, LoRAConfig(**(FA | kw)))
    return model


def fa_layer(base: nn.Linear, **kw) -> nn.Module:
    """``base`` wrapped by a LoRA-FA layer (``kw`` overrides FA)."""
    holder = nn.Sequential(base)
    inject_lora(holder, LoRAConfig(**(FA | dict(targets=["0"]) | kw)))
    return holder[0]


def saved_tensors(fn) -> list[torch.Tensor]:
    """The tensors autograd packs while ``fn`` runs (parameters included)."""
    out: list[torch.Tensor] = []

    def pack(t):
        out.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return out


def test_only_B_trains_and_the_count_says_so():
    model = fa_model()
    layers = lora_layers(model)
    assert len(layers) == 6 and all(isinstance(m, LoRAFALinear) for m in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_B" for n in layers}
    assert count_parameters(model).trainable == sum(4 * m.out_features for m in layers.values())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_and_gradients_equal_the_float64_formula(dropout):
    """y = x·W0ᵀ + b + s·dropout(x)·Aᵀ·Bᵀ; ∂B and ∂x as autograd gives them for that formula with A frozen."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = fa_layer(copy.deepcopy(base), dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 12, requires_grad=True)
    g = torch.randn(3, 5, 10)
    torch.manual_seed(7)
    y = layer(x)
    (y * g).sum().backward()
    # the reference: the same dropout mask (same seed), float64
    x64 = x.detach().double().requires_grad_(True)
    B64 = layer.lora_B.detach().double().requires_grad_(True)
    torch.manual_seed(7)
    keep = F.dropout(torch.ones_like(x64), dropout, training=True) if dropout else torch.ones_like(x64)
    ref = F.linear(x64, base.weight.double(), base.bias.double()) + layer.scaling * F.linear(
        F.linear(x64 * keep, layer.lora_A.detach().double()), B64
    )
    (ref * g.double()).sum().backward()
    assert torch.allclose(y.double(), ref, atol=1e-5)
    assert torch.allclose(layer.lora_B.grad.double(), B64.grad, atol=1e-4, rtol=1e-5)
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5)
    assert layer.lora_A.grad is None


def test_the_backward_keeps_x_A_transposed_and_no_input():
    """Plain LoRA's node keeps x (N x d_in) for ∂A; LoRA-FA's keeps h = x·Aᵀ (N x r) and the parameters only.
    With dropout, the only input-sized tensor kept is nn.Dropout's one-byte mask."""
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)

    def kept(variant: str, dropout: float = 0.0) -> list[torch.Tensor]:
        layer = fa_layer(nn.Linear(32, 48), variant=variant, dropout=dropout)
        params = {p.data_ptr() for p in layer.parameters()}
        return [t for t in saved_tensors(lambda: layer(x)) if t.data_ptr() not in params]

    assert any(t.shape == (64, 32) and t.dtype == torch.float32 for t in kept("lora"))
    fa = kept("lora_fa")
    assert [tuple(t.shape) for t in fa] == [(64, 4)]
    fa_drop = kept("lora_fa", 0.1)
    assert sorted((tuple(t.shape), t.dtype) for t in fa_drop) == [((64, 4), torch.float32), ((64, 32), torch.bool)]


def test_plain_lora_with_A_frozen_leaves_the_shared_input_node_too():
    """Shared-input fusion keeps x for the members' ∂A; with every A frozen the layers' own nodes (no x) run."""
    model = tiny_model(0)
    inject_lora(model, LoRAConfig(r=4, targets=["q", "k", "v"]))
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(False)
    attn = model.layers[0].self_attn
    x = torch.randn(2, 6, 16, requires_grad=True)
    attn(x)  # learns the group
    params = {p.data_ptr() for p in model.parameters()}
    kept = [t for t in saved_tensors(lambda: attn(x)) if t.data_ptr() not in params]
    assert not any(t.data_ptr() == x.data_ptr() for t in kept)


def test_double_backward_is_refused_in_one_line():
    layer = fa_layer(nn.Linear(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="variant='lora' for higher-order gradients"):
        torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)


def test_projection_equals_the_formula():
    model = fa_model()
    ids, y = tiny_batch()
    F.cross_entropy(model(ids), y).backward()
    layers = lora_layers(model)
    raw = {n: m.lora_B.grad.clone() for n, m in layers.items()}
    assert project_lora_fa_gradients(model) == 6
    for n, m in layers.items():
        A = m.lora_A.detach().double()
        expected = raw[n].double() @ torch.linalg.pinv(A @ A.T + 1e-8 * torch.eye(4, dtype=torch.float64))
        assert torch.allclose(m.lora_B.grad.double(), expected / m.scaling**2, rtol=1e-4, atol=1e-7)
        assert torch.allclose(projected_gradient(raw[n], m.lora_A, m.scaling), m.lora_B.grad)


def _peft_fa(seed: int, lr: float, weight_decay: float):
    peft = pytest.importorskip("peft")
    lorafa = importlib.import_module("peft.optimizers.lorafa")
    model = peft.get_peft_model(
        tiny_model(seed),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    return model, lorafa


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_training_equals_peft_create_lorafa_optimizer(monkeypatch, weight_decay):
    """Same A (PEFT's), same batches: our projection before PEFT's own AdamW update rule equals PEFT's LoRA-FA
    optimizer over 4 steps. PEFT computes the projection under bf16 autocast when the CPU has bf16; that is
    switched off here so both run in float32 (test_peft_bf16_projection_is_the_coarser_one measures it)."""
    peft_model, lorafa = _peft_fa(0, 1e-2, weight_decay)
    monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)
    ours = fa_model(0)
    peft_layers = {n.replace("base_model.model.", ""): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    ours_layers = lora_layers(ours)
    assert set(peft_layers) == set(ours_layers)
    with torch.no_grad():
        for n, m in ours_layers.items():
            m.lora_A.copy_(peft_layers[n].lora_A["default"].weight)
    theirs = lorafa.create_lorafa_optimizer(peft_model, lr=1e-2, weight_decay=weight_decay)
    bs = [m.lora_B for m in ours_layers.values()]
    mine = lorafa.LoraFAOptimizer(  # PEFT's class as its plain AdamW: names without "lora" take that branch
        [
            dict(
                params=bs,
                names=[f"p{i}" for i in range(len(bs))],
                scaling_factors=[None] * len(bs),
                lr=1e-2,
                betas=(0.9, 0.999),
                weight_decay=weight_decay,
            )
        ]  # fmt: skip
    )
    for step in range(4):
        ids, y = tiny_batch(seed=10 + step)
        for model, opt, project in ((peft_model, theirs, False), (ours, mine, True)):
            opt.zero_grad()
            F.cross_entropy(model(ids), y).backward()
            if project:
                project_lora_fa_gradients(model)
            opt.step()
    for n, m in ours_layers.items():
        B_peft = peft_layers[n].lora_B["default"].weight
        assert torch.allclose(m.lora_B, B_peft, atol=1e-6, rtol=1e-5), (n, (m.lora_B - B_peft).abs().max())
        assert torch.equal(m.lora_A, peft_layers[n].lora_A["default"].weight)  # A never moved, in either
        assert m.lora_B.abs().max() > 1e-3


def test_peft_bf16_projection_is_the_coarser_one():
    """PEFT's default projection (bf16 autocast on a CPU with bf16), read from its first Adam moment, against the
    float64 formula: ours (float32) is within 1e-5 of it, PEFT's off by bf16's round-off."""
    peft_model, lorafa = _peft_fa(0, 1e-2, 0.0)
    if not lorafa.is_bf16_available():
        pytest.skip("PEFT projects in float32 on this machine")
    opt = lorafa.create_lorafa_optimizer(peft_model, lr=1e-2)
    ids, y = tiny_batch()
    F.cross_entropy(peft_model(ids), y).backward()
    layers = {n: m for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    raw = {
        n: (m.lora_B["default"].weight.grad.clone(), m.lora_A["default"].weight.detach(), m.scaling["default"])
        for n, m in layers.items()
    }
    opt.step()
    eye = torch.eye(4, dtype=torch.float64)
    for n, (g, A, s) in raw.items():
        exact = (g.double() @ torch.linalg.pinv(A.double() @ A.double().T + 1e-8 * eye)) / s**2
        theirs = opt.state[f"{n}.lora"]["exp_avg_B"].double() / 0.1  # (1 - beta1) * g after the first step
        ours = projected_gradient(g, A, s).double()
        ours_err = ((ours - exact).abs().max() / exact.abs().max()).item()
        theirs_err = ((theirs - exact).abs().max() / exact.abs().max()).item()
        assert ours_err < 1e-5 and theirs_err > 10 * ours_err, (n, ours_err, theirs_err)


def test_callback_fit_equals_a_loop_with_the_projection(tmp_path):
    """LoRACallback(variant='lora_fa'): A stays as initialised, B equals a plain loop that projects ∂B before each
    AdamW step; without the projection (lora_fa_projection=False) B is different."""
    lit = LitTiny(seed=0)
    trainer(tmp_path, [LoRACallback(**FA, verbose=False)], max_steps=4).fit(lit, tiny_loader())

    def loop(project: bool) -> nn.Module:
        model = LitTiny(seed=0)  # the same module names, so the same init_seed streams
        inject_lora(model, LoRAConfig(**FA, lora_fa_projection=project))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for ids, y in list(tiny_loader())[:4]:
            opt.zero_grad()
            F.cross_entropy(model(ids), y).backward()
            project_lora_fa_gradients(model) if project else None
            opt.step()
        return model

    ref, unprojected = loop(True), loop(False)
    for n, m in lora_layers(lit).items():
        r = lora_layers(ref)[n]
        assert torch.equal(m.lora_A, r.lora_A)
        assert torch.allclose(m.lora_B, r.lora_B, atol=1e-6), n
        assert not torch.allclose(m.lora_B, lora_layers(unprojected)[n].lora_B, atol=1e-4)


def test_checkpoint_and_adapter_file_hold_A_and_B_and_reload(tmp_path):
    model = fa_model(0)
    randomize_adapters(model)
    path = tmp_path / "fa.safetensors"
    save_adapter(model, path)
    other = fa_model(0, init_seed=5)
    load_adapter(other, path)
    ids, _ = tiny_batch()
    assert torch.equal(model(ids), other(ids))
    assert [n for n, p in other.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad
    ]
    with pytest.raises(Exception, match="variant"):
        load_adapter(tiny_model_with(LoRAConfig(r=4, alpha=8, targets=["q", "v"])), path)


def tiny_model_with(config: LoRAConfig) -> nn.Module:
    model = tiny_model(0)
    inject_lora(model, config)
    return model


def test_peft_export_is_a_plain_lora_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model = fa_model(0)
    randomize_adapters(model)
    export_peft_adapter(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(tiny_model(0), str(tmp_path / "peft"))
    ids, _ = tiny_batch()
    assert torch.allclose(loaded(ids), model(ids), atol=1e-6)


def test_refusals_are_one_line():
    with pytest.raises(LoRAConfigError, match="adapts whole nn.Linear layers only"):
        inject_lora(tiny_gpt2(), LoRAConfig(variant="lora_fa", targets=["c_attn"]))
    model = fa_model(0)
    with pytest.raises(LoRAConfigError, match="named adapters are"):
        add_adapter(model, "other", LoRAConfig(**FA))
    with pytest.raises(LoRAConfigError, match="lora_fa_projection"):
        LoRAConfig(variant="lora_fa", lora_fa_projection="yes")
    from lora_lightning.lightning.callback import deepspeed_refusal

    zero2 = {"zero_optimization": {"stage": 2}}
    why = deepspeed_refusal(LoRACallback(**FA), zero2, "32-true")
    assert "lora_fa_projection=False" in why and "\n" not in why
    assert deepspeed_refusal(LoRACallback(**FA, lora_fa_projection=False), zero2, "32-true") is None


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_project_equal_to_one_process(tmp_path, strategy):
    """DDP (the projection reads the all-reduced ∂B) and FSDP2 (ModelParallelStrategy: each rank gathers A and
    projects its own rows of ∂B), 2 CPU processes: the adapters equal a one-process run on the same batches, and A
    stays as initialised."""
    from distributed_helpers import assert_adapters_close, launch, lora_tensors, single_process_fit

    launch(tmp_path, "--devices", "2", "--epochs", "1", "--strategy", strategy, "--variant", "lora_fa", "--tag", "fa")
    r0 = torch.load(tmp_path / "fa-rank0.pt", weights_only=False)
    assert r0["world_size"] == 2
    if strategy == "fsdp2":
        assert r0["trainable"] == sorted(k for k in r0["adapter"] if k.endswith("lora_B"))
    ref, _ = single_process_fit(tmp_path / "one", epochs=1, variant="lora_fa")
    unprojected = LitTiny(seed=0)
    inject_lora(unprojected, LoRAConfig(r=2, targets=["q", "v", "mlp"], variant="lora_fa", init_seed=0))
    assert_adapters_close(r0["adapter"], lora_tensors(ref))
    for k, v in lora_tensors(unprojected).items():
        if k.endswith("lora_A"):
            assert torch.equal(r0["adapter"][k], v), k  # never trained


def test_resume_from_the_adapter_only_checkpoint_restores_A_and_is_bit_identical(tmp_path):
    """The checkpoint holds A (frozen, random: part of the adapter) and B; a resume under another global seed and with
    no init_seed equals the uninterrupted run bit for bit."""
    from conftest import ModelCheckpoint

    def fit(root, epochs, ckpt_path=None):
        model = LitTiny(seed=0)
        cb = LoRACallback(variant="lora_fa", r=2, targets=["q", "v", "mlp"], verbose=False)
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)
        t = trainer(root, [cb, ckpt], max_steps=-1, max_epochs=epochs, enable_checkpointing=True)
        t.fit(model, tiny_loader(n=32, batch_size=8), ckpt_path=ckpt_path)
        return model

    torch.manual_seed(0)
    straight = fit(tmp_path / "a", 3)
    torch.manual_seed(0)
    fit(tmp_path / "b", 2)
    mid = tmp_path / "b" / "ckpt" / "last.ckpt"
    keys = set(torch.load(mid, weights_only=False)["state_dict"])
    assert keys == {k for k in straight.state_dict() if ".lora_" in k} and any(k.endswith("lora_A") for k in keys)
    torch.manual_seed(123)  # another A would be drawn: it must come from the checkpoint
    resumed = fit(tmp_path / "c", 3, ckpt_path=mid)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
