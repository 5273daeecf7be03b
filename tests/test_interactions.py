"""Where two features meet: one test per case found by trying the features together (each failed before the
fix; the conformance battery, tests/test_conformance.py, then checks every combination)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import (
    LitTiny,
    adapted,
    assert_unchanged,
    randomize_adapters,
    snapshot,
    tiny_batch,
    tiny_loader,
    tiny_model,
    trainer,
)
from lora_lightning import (
    LoRACallback,
    LoRAConfig,
    LoRAConfigError,
    LoRAError,
    MergeStateError,
    NonFiniteError,
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    disable_adapter,
    export_peft_adapter,
    import_peft_adapter,
    inject_lora,
    list_adapters,
    load_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    merged_state_dict,
    mixed_batch,
    save_adapter,
    set_adapter,
    unmerge_lora,
    use_adapter,
)

OPTS = dict(r=2, alpha=4, targets=["q", "v"], modules_to_save=["net.classifier"])


def out(model, x):
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------- 1. tied embedding / head
class TiedLM(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.proj(self.embed_tokens(ids))))


def test_tied_embedding_and_head_both_targeted_merge_exactly():
    """1: targets embed and lm_head (one weight): one adapter, merge_lora and merged_state_dict give the adapted
    outputs"""
    model = TiedLM()
    ids = torch.randint(0, 20, (3, 5))
    base = out(model, ids)
    inject_lora(model, LoRAConfig(r=2, targets=["embed_tokens", "lm_head"]))
    assert torch.equal(out(model, ids), base)
    randomize_adapters(model)
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_A.normal_()  # the embedding's A starts at 0: give it values too
    adapted_out = out(model, ids)
    assert not torch.allclose(adapted_out, base)
    plain = TiedLM()
    plain.load_state_dict(merged_state_dict(model))
    torch.testing.assert_close(out(plain, ids), adapted_out, rtol=1e-5, atol=1e-5)
    merge_lora(model)
    torch.testing.assert_close(out(model, ids), adapted_out, rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight is model.embed_tokens.weight  # still one weight


# --------------------------------------------------------------------------- 2. shared weight, own biases
class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)
        self.v_proj.weight = self.q_proj.weight  # one weight, two biases

    def forward(self, x):
        return self.q_proj(x) * 2 + self.v_proj(x)


def test_linears_sharing_a_weight_keep_their_own_biases_and_merge_once():
    """2: two Linears sharing one weight, own biases, both targeted: bit-equal at B=0, one ΔW, exact merge"""
    model = TwoHeads()
    x = torch.randn(4, 8)
    base = out(model, x)
    inject_lora(model, LoRAConfig(r=2, alpha=4, targets=["q", "v"]))
    assert torch.equal(out(model, x), base)
    assert model.q_proj is not model.v_proj and model.v_proj.lora_tie[0] is model.q_proj
    randomize_adapters(model)
    y = out(model, x)
    w = model.q_proj.weight.detach().clone()
    delta = 2.0 * model.q_proj.lora_B.detach() @ model.q_proj.lora_A.detach()
    expect = (x @ (w + delta).T + model.q_proj.bias) * 2 + x @ (w + delta).T + model.v_proj.bias
    torch.testing.assert_close(y, expect.detach(), rtol=1e-5, atol=1e-5)
    merge_lora(model)
    torch.testing.assert_close(out(model, x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.q_proj.weight.detach(), w + delta, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- 3, 7, 8. multi-adapter fits and LoRA+
class LitTwo(LitTiny):
    def test_step(self, batch, batch_idx, dataloader_idx=0):
        ids, y = batch
        self.log("test_loss", F.cross_entropy(self(ids), y))


def _loaders():
    return {"a": tiny_loader(32, 8, seed=1), "b": tiny_loader(32, 8, seed=2)}


def _adapter(model, name):
    with use_adapter(model, name, trainable=True):
        return {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if (".lora_" in k or "classifier" in k) and "lora_bank" not in k
        }


@pytest.mark.parametrize(
    "extra", [dict(loraplus_lr_ratio=16), dict(gradient_clip_val=0.05), dict(accumulate_grad_batches=2)]
)
def test_each_adapter_of_a_multi_adapter_fit_equals_training_it_alone(tmp_path, extra):
    """3 (LoRA+: every adapter's B gets the ratio), 8 (clipping by norm is per adapter), accumulation"""
    trainer_kw = {k: v for k, v in extra.items() if k != "loraplus_lr_ratio"}
    cb_kw = {k: v for k, v in extra.items() if k == "loraplus_lr_ratio"}
    seeds = {"a": {"init_seed": 11}, "b": {"init_seed": 22}}
    both = LitTwo(seed=0)
    trainer(tmp_path / "both", [LoRACallback(**OPTS, adapters=seeds, **cb_kw)], max_steps=4, **trainer_kw).fit(
        both, _loaders()
    )
    for name in "ab":
        alone = LitTwo(seed=0)
        trainer(tmp_path / name, [LoRACallback(**OPTS, **seeds[name], **cb_kw)], max_steps=4, **trainer_kw).fit(
            alone, _loaders()[name]
        )
        got, want = _adapter(both, name), _adapter(alone, list_adapters(alone)[0])
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")


@pytest.mark.parametrize("scheduler", ["cosine_eta_min", "cyclic", "warm_restarts"])
def test_loraplus_ratio_holds_at_every_step_of_the_schedule(tmp_path, scheduler):
    """7: LoRA+ with CosineAnnealingLR(eta_min), CyclicLR (crashed), CosineAnnealingWarmRestarts(eta_min)"""
    ratios = []

    class Lit(LitTiny):
        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            S = torch.optim.lr_scheduler
            sched = {
                "cosine_eta_min": lambda: S.CosineAnnealingLR(opt, T_max=4, eta_min=1e-3),
                "cyclic": lambda: S.CyclicLR(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=2),
                "warm_restarts": lambda: S.CosineAnnealingWarmRestarts(opt, T_0=2, eta_min=1e-3),
            }[scheduler]()
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def on_train_batch_start(self, batch, batch_idx):  # what LearningRateMonitor would read
            groups = self.trainer.optimizers[0].param_groups
            layer = self.net.layers[0].self_attn.q_proj
            lr_of = lambda p: next(g["lr"] for g in groups if any(q is p for q in g["params"]))  # noqa: E731
            ratios.append(lr_of(layer.lora_B) / lr_of(layer.lora_A))

    trainer(tmp_path, [LoRACallback(**OPTS, loraplus_lr_ratio=16, verbose=False)], max_steps=6).fit(
        Lit(), tiny_loader(48)
    )
    assert len(ratios) == 6 and all(math.isclose(r, 16.0, rel_tol=1e-12) for r in ratios), ratios


# --------------------------------------------------------------------------- 4. PEFT export of convolutions
@pytest.mark.parametrize(
    "kw", [dict(padding_mode="reflect", padding=1), dict(padding="same", dilation=2), dict(dilation=2, padding=2)]
)
def test_peft_export_of_a_convolution_peft_cannot_reproduce_is_refused(tmp_path, kw):
    """4: PEFT's conv adapter uses dilation 1 and zero padding: other convolutions are refused, not exported wrong"""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, **kw))
    inject_lora(model, LoRAConfig(r=2, targets=["0"]))
    with pytest.raises(LoRAConfigError, match=r"has no exact PEFT LoRA equivalent"):
        export_peft_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_peft_export_of_a_plain_convolution_equals_peft(tmp_path):
    peft = pytest.importorskip("peft")
    make = lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"))  # noqa: E731
    torch.manual_seed(0)
    model = make()
    inject_lora(model, LoRAConfig(r=2, targets=["0"]))
    randomize_adapters(model)
    x = torch.randn(2, 3, 6, 6)
    export_peft_adapter(model, tmp_path / "peft")
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "peft")
    torch.testing.assert_close(out(theirs, x), out(model, x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 5, 6. multi-adapter loaders
def test_multi_adapter_fit_without_a_loader_for_every_adapter_is_refused(tmp_path):
    """5: adapters=['a', 'b'] with train_dataloaders={'a': ...} only"""
    with pytest.raises(LoRAConfigError, match=r"loaders for \['a'\] only: \['b'\] would get no batch"):
        trainer(tmp_path, [LoRACallback(**OPTS, adapters=["a", "b"])], max_steps=2).fit(LitTwo(), {"a": tiny_loader()})


def test_a_loaded_multi_adapter_model_routes_test_loaders_without_the_callback(tmp_path):
    """6: load_from_checkpoint of a multi-adapter fit, then trainer.test with {'a': ..., 'b': ...} and no callback"""
    model = LitTwo(seed=0)
    t = trainer(tmp_path, [LoRACallback(**OPTS, adapters={"a": {"init_seed": 1}, "b": {"init_seed": 2}})], max_steps=4)
    t.fit(model, _loaders())
    t.save_checkpoint(tmp_path / "two.ckpt")
    loaded = LitTwo.load_from_checkpoint(tmp_path / "two.ckpt")
    test = {"a": tiny_loader(16, 8, seed=5), "b": tiny_loader(16, 8, seed=6)}
    metrics = trainer(tmp_path / "t", []).test(loaded, test, verbose=False)
    for name, loader in test.items():
        with use_adapter(loaded, name), torch.no_grad():
            want = torch.stack([F.cross_entropy(loaded(ids), y) for ids, y in loader]).mean()
        got = next(m[f"{name}/test_loss"] for m in metrics if f"{name}/test_loss" in m)
        assert math.isclose(got, float(want), rel_tol=1e-5), (name, got, float(want))


# --------------------------------------------------------------------------- 9. set_adapter after the optimizer exists
def test_set_adapter_after_the_optimizer_was_built_is_refused(tmp_path):
    """9: set_adapter('b') in on_train_epoch_start: the optimizer holds adapter a only"""

    class Switch(LitTiny):
        def on_train_epoch_start(self):
            if "b" not in list_adapters(self):
                add_adapter(self, "b")
            set_adapter(self, "b")

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    with pytest.raises(LoRAConfigError, match=r"adapter 'b' is active but the optimizer holds none of its"):
        trainer(tmp_path, [LoRACallback(**OPTS)], max_steps=2).fit(Switch(), tiny_loader())


# --------------------------------------------------------------------------- 10. fusion with an unused member
class ThreeReaders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        q, k, _v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # v's output is not used
        return q * k


def test_fusion_gives_none_gradients_to_an_unused_member_as_unfused_does():
    """10: weight decay must not move the unused layer's A under fusion"""
    results = []
    for fuse in (True, False):
        model = ThreeReaders()
        inject_lora(model, LoRAConfig(r=2, targets=["q", "k", "v"], fuse_shared_inputs=fuse))
        randomize_adapters(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            model(torch.randn(4, 8, generator=torch.Generator().manual_seed(1))).sum().backward()
            assert model.v_proj.lora_A.grad is None and model.v_proj.lora_B.grad is None
            opt.step()
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-7, msg=k)


# --------------------------------------------------------------------------- 11. mixed_batch time-major
def test_mixed_batch_on_time_major_input_is_refused_when_ambiguous_and_right_with_batch_dim():
    """11: (T, B, D) with T == B: which dimension holds the samples is asked for, and batch_dim=1 routes samples"""
    model = nn.Sequential(nn.Linear(8, 8))
    inject_lora(model, LoRAConfig(r=2, targets=["0"]))
    randomize_adapters(model)
    add_adapter(model, "b")
    with use_adapter(model, "b"):
        randomize_adapters(model, seed=9)
    x = torch.randn(3, 3, 8)  # (T=3, B=3, D)
    with pytest.raises(LoRAConfigError, match=r"ambiguous .* batch_dim="), mixed_batch(model, ["b", None, "default"]):
        model(x)
    with mixed_batch(model, ["b", None, "default"], batch_dim=1), torch.no_grad():
        mixed = model(x)
    with use_adapter(model, "b"):
        y_b = out(model, x)
    with disable_adapter(model):
        y_0 = out(model, x)
    y_a = out(model, x)
    torch.testing.assert_close(mixed[:, 0], y_b[:, 0])
    torch.testing.assert_close(mixed[:, 1], y_0[:, 1])
    torch.testing.assert_close(mixed[:, 2], y_a[:, 2])


# --------------------------------------------------------------------------- 12. add_weighted_adapter weights
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_add_weighted_adapter_refuses_a_non_finite_weight(bad):
    """12"""
    model = adapted()
    add_adapter(model, "b")
    before = snapshot(model)
    with pytest.raises(LoRAConfigError, match=r"not a finite number"):
        add_weighted_adapter(model, ["default", "b"], [1.0, bad], "w", combination_type="cat")
    assert_unchanged(model, before) and list_adapters(model) == ["default", "b"]


# --------------------------------------------------------------------------- base identity
def test_base_identity_covers_unadapted_layers_and_single_elements_and_accepts_casts(tmp_path):
    model = adapted()
    path = save_adapter(model, tmp_path / "a.safetensors")
    for cast in (torch.bfloat16, torch.float16):
        other = tiny_model().to(cast)
        load_adapter(other, path)  # the same base, cast: loads
    changed = tiny_model()
    with torch.no_grad():
        changed.layers[1].mlp.down_proj.weight[3, 2] += 2.0**-20  # one element of a layer the adapter does not touch
    with pytest.raises(
        LoRAError, match=r"1 of 51 base tensor\(s\) hold other values \(e.g. layers.1.mlp.down_proj.weight\)"
    ):
        load_adapter(changed, path)
    # trained in bf16, loaded onto the fp32 base it was cast from: loads
    bf16 = tiny_model().to(torch.bfloat16)
    inject_lora(bf16, LoRAConfig(r=4, targets=["q", "v"]))
    load_adapter(tiny_model(), save_adapter(bf16, tmp_path / "b.safetensors"))


# --------------------------------------------------------------------------- §2 transactions
def _nested():
    class Sub(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(16, 16)

    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.q_proj = nn.Linear(16, 16)
            self.sub = Sub()

        def forward(self, x):
            return self.q_proj(x) + self.sub.q_proj(x)

    return Nested()


def test_add_weighted_adapter_cat_with_nested_names_and_rank_patterns():
    """§2: q_proj and sub.q_proj at different ranks: 'cat' is exact (it raised and left a half-built adapter)"""
    model = _nested()
    inject_lora(model, LoRAConfig(r=2, targets=["q_proj", "sub.q_proj"], rank_pattern={"re:sub\\.q_proj": 4}))
    randomize_adapters(model)
    add_adapter(model, "b", LoRAConfig(r=3, targets=["q_proj", "sub.q_proj"]))
    with use_adapter(model, "b"):
        randomize_adapters(model, seed=4)
    x = torch.randn(2, 16)
    y_a = out(model, x)
    with use_adapter(model, "b"):
        y_b = out(model, x)
    with disable_adapter(model):
        y_0 = out(model, x)
    add_weighted_adapter(model, ["default", "b"], [0.5, 2.0], "w", combination_type="cat")
    with use_adapter(model, "w"):
        torch.testing.assert_close(out(model, x), y_0 + 0.5 * (y_a - y_0) + 2.0 * (y_b - y_0), rtol=1e-5, atol=1e-5)
        assert model.sub.q_proj.lora_A.shape[0] == 4 + 3 and model.q_proj.lora_A.shape[0] == 2 + 3


def _fail_on_call(monkeypatch, target, name, n):
    """Make ``target.name`` raise on its n-th call (a failure in the middle of an operation)."""
    original = getattr(target, name)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


@pytest.mark.parametrize(
    "operation",
    ["add_adapter", "set_adapter", "delete_adapter", "add_weighted_adapter", "load_adapter", "import_peft_adapter"],
)
def test_every_named_adapter_operation_leaves_the_model_as_it_was_on_an_error(tmp_path, monkeypatch, operation):
    """§2: an error in the middle of any named-adapter operation changes nothing"""
    import lora_lightning.named as named

    model = adapted(modules_to_save=["classifier"])
    add_adapter(model, "b")
    other = adapted(seed=0, modules_to_save=["classifier"])
    file = save_adapter(other, tmp_path / "o.safetensors")
    export_peft_adapter(other, tmp_path / "peft")
    before, adapters = snapshot(model), list_adapters(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    calls = {
        "add_adapter": lambda: add_adapter(model, "c"),
        "set_adapter": lambda: set_adapter(model, "b"),
        "delete_adapter": lambda: delete_adapter(model, "default"),
        "add_weighted_adapter": lambda: add_weighted_adapter(
            model, ["default", "b"], [1, 1], "w", combination_type="cat"
        ),
        "load_adapter": lambda: load_adapter(model, file, adapter_name="c"),
        "import_peft_adapter": lambda: import_peft_adapter(model, tmp_path / "peft", adapter_name="c"),
    }
    point = {
        "add_adapter": (named, "_bank", 3),
        "set_adapter": (named, "_bank", 3),
        "delete_adapter": (named, "_bank", 10),
        "add_weighted_adapter": (torch.Tensor, "copy_", 3),
        "load_adapter": (torch.Tensor, "copy_", 3),
        "import_peft_adapter": (torch.Tensor, "copy_", 3),
    }[operation]
    _fail_on_call(monkeypatch, *point)
    with pytest.raises(RuntimeError, match="injected failure"):
        calls[operation]()
    monkeypatch.undo()
    assert_unchanged(model, before)
    assert list_adapters(model) == adapters
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert torch.equal(out(model, tiny_batch()[0]), out(copy.deepcopy(model), tiny_batch()[0]))


# --------------------------------------------------------------------------- §3 crashes and unclear errors
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("inplace", ["mul_", "relu_", "ReLU(inplace=True)"])
def test_in_place_ops_on_an_adapted_output_train(fuse, inplace):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.q_proj, self.k_proj = nn.Linear(8, 8), nn.Linear(8, 8)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            q, k = self.q_proj(x), self.k_proj(x)
            if inplace == "mul_":
                q *= 0.5
            elif inplace == "relu_":
                q.relu_()
            else:
                q = self.act(q)
            return (q * k).sum()

    model = M()
    inject_lora(model, LoRAConfig(r=2, targets=["q", "k"], fuse_shared_inputs=fuse))
    randomize_adapters(model)
    x = torch.randn(2, 3, 8, requires_grad=True)
    for _ in range(2):  # the second forward runs fused
        model(x).backward()
    ref = M()
    ref.load_state_dict(merged_state_dict(model), strict=True)
    assert model.q_proj.lora_B.grad is not None


def test_deepcopy_and_state_dict_clones_of_an_nf4_base():
    pytest.importorskip("torchao")
    model = nn.Sequential(
        nn.Linear(32, 64)
    )  # a 64x32 weight: 32 blocks of 64, fewer than torchao's 256 per scaler block
    inject_lora(model, LoRAConfig(r=2, targets=["0"], quantize_base="nf4"))
    x = torch.randn(2, 32)
    y = out(model, x)
    assert torch.equal(out(copy.deepcopy(model), x), y)
    clones = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = nn.Sequential(nn.Linear(32, 64))
    inject_lora(fresh, LoRAConfig(r=2, targets=["0"], quantize_base="nf4"))
    fresh.load_state_dict(clones)
    assert torch.equal(out(fresh, x), y)


def test_a_module_named_like_an_alias_can_be_targeted_and_imported(tmp_path):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(10, 4)

        def forward(self, ids):
            return self.embed(ids)

    model = M()
    inject_lora(model, LoRAConfig(r=2, targets=["embed"]))
    assert list(lora_layers(model)) == ["embed"]
    with torch.no_grad():
        model.embed.lora_A.normal_()
    export_peft_adapter(model, tmp_path / "p")
    fresh = M()
    import_peft_adapter(fresh, tmp_path / "p")
    ids = torch.randint(0, 10, (2, 3))
    assert torch.equal(out(fresh, ids), out(model, ids))


def test_mixed_batch_on_an_empty_batch_with_a_modules_to_save_head():
    model = adapted(modules_to_save=["classifier"])
    add_adapter(model, "b")
    with mixed_batch(model, []):
        assert out(model, torch.zeros(0, 6, dtype=torch.long)).shape == (0, 3)


def test_unclear_inputs_get_clear_errors():
    model = adapted()
    add_adapter(model, "c", {"r": 4})  # a dict: options over the model's config
    assert model.layers[0].self_attn.q_proj.lora_bank["c"].r == 4
    with pytest.raises(LoRAConfigError, match=r"adapters='ab': give a list"):
        LoRACallback(adapters="ab")
    with pytest.raises(LoRAConfigError, match=r"fuse_shared_inputs='yes' must be true or false"):
        LoRAConfig(fuse_shared_inputs="yes")
    with pytest.raises(LoRAConfigError, match=r"give one adapter name \(or None\) per sample"), mixed_batch(model, "c"):
        pass
    set_adapter(model, "c")
    merge_lora(model)
    with pytest.raises(MergeStateError, match=r"delete_adapter\('c'\) \(the active adapter\): .* unmerge_lora"):
        delete_adapter(model, "c")
    unmerge_lora(model)
    with pytest.warns(UserWarning, match=r"merge_and_unload merged adapter 'c' and dropped \['default'\]"):
        merge_and_unload(model)
    conv = nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.Linear(4, 4))
    with pytest.raises(
        LoRAError,
        match=r"ConvTranspose2d\)'\], which are not layers LoRA adapts \(nn.Linear, .*nn.Conv1d/2d/3d, "
        r"a 2-D/3-D parameter named by target_parameters \(MoE experts\)\)",
    ):
        inject_lora(conv, LoRAConfig(targets=["0"]))


def test_a_nan_loss_of_one_adapter_in_a_multi_adapter_fit_names_it(tmp_path):
    class NaNForB(LitTwo):
        def training_step(self, batch, batch_idx):
            from lora_lightning import active_adapter

            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if active_adapter(self) == "b" else loss

    with pytest.raises(NonFiniteError, match=r"training loss of adapter 'b' is nan"):
        trainer(tmp_path, [LoRACallback(**OPTS, adapters=["a", "b"])], max_steps=2).fit(NaNForB(), _loaders())


def test_adapter_files_and_resume_claims(tmp_path):
    """save_adapter writes one adapter (adapter_name=... picks it); the README says so"""
    model = adapted()
    add_adapter(model, "b")
    path = save_adapter(model, tmp_path / "one.safetensors", adapter_name="b")
    from lora_lightning import read_adapter

    tensors, meta = read_adapter(path)
    assert meta["adapter_name"] == "b" and not any("lora_bank" in k for k in tensors)
    assert json.loads(meta["lora_record"])["config"]["r"] == 4
