"""The Lightning callback: injection timing, adapter-only checkpoints, exact resume, exports."""

import pickle

import pytest
import torch

from conftest import (
    N_LAYERS,
    AtomicCheckpointIO,
    CSVLogger,
    LitTiny,
    LitTinyLate,
    LoRACallback,
    ModelCheckpoint,
    tiny_batch,
    tiny_loader,
    tiny_model,
    trainer,
)
from lora_lightning import (
    AdapterMismatchError,
    LoRALinear,
    count_parameters,
    is_merged,
    load_adapter,
    read_adapter,
)


def lora_tensors(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".lora_" in k}


def test_injects_before_optimizer_and_trains_only_adapters(tmp_path):
    model = LitTiny()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = LoRACallback(r=2, targets=["q", "v"])
    t = trainer(tmp_path, [cb], max_steps=3)
    t.fit(model, tiny_loader())
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * N_LAYERS
    opt = t.optimizers[0]
    params_with_state = [p for g in opt.param_groups for p in g["params"] if p in opt.state]
    lora_params = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert len(params_with_state) == len(lora_params) == 4 * N_LAYERS
    assert {id(p) for p in params_with_state} == {id(p) for p in lora_params}
    after = model.state_dict()
    for k, v in base_before.items():
        assert torch.equal(after[k], v), f"base tensor {k} changed"
    assert any(v.abs().sum() > 0 for k, v in after.items() if k.endswith("lora_B"))


def test_model_built_in_configure_model(tmp_path):
    model = LitTinyLate()
    t = trainer(tmp_path, [LoRACallback(r=2, targets=["q", "v"])], max_steps=2)
    t.fit(model, tiny_loader())
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * N_LAYERS
    assert count_parameters(model).trainable == N_LAYERS * 2 * 2 * (16 + 16)
    assert len([p for g in t.optimizers[0].param_groups for p in g["params"] if p.requires_grad]) == 4 * N_LAYERS


def test_checkpoint_holds_only_adapter_and_config(tmp_path):
    model = LitTiny()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = trainer(
        tmp_path,
        [LoRACallback(r=4, targets=["q", "v"], modules_to_save=["classifier"]), ckpt_cb],
        max_steps=4,
        enable_checkpointing=True,
    )
    t.fit(model, tiny_loader())
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    sd = ckpt["state_dict"]
    lora_keys = {f"net.layers.{i}.self_attn.{p}_proj.lora_{ab}" for i in range(N_LAYERS) for p in "qv" for ab in "AB"}
    assert set(sd) == lora_keys | {"net.classifier.weight", "net.classifier.bias"}
    n_lora = N_LAYERS * 2 * 4 * (16 + 16)
    n_head = 16 * 3 + 3
    assert sum(v.numel() for v in sd.values()) == n_lora + n_head
    # AdamW state: exp_avg + exp_avg_sq per trainable tensor, nothing for frozen ones
    state = ckpt["optimizer_states"][0]["state"]
    assert len(state) == len(sd)
    assert sum(s["exp_avg"].numel() for s in state.values()) == n_lora + n_head
    assert ckpt["lora_lightning"]["config"]["r"] == 4
    assert len(ckpt["lora_lightning"]["modules"]) == 2 * N_LAYERS
    assert isinstance(t.strategy.checkpoint_io, AtomicCheckpointIO)
    full = sum(p.numel() for p in tiny_model().parameters())
    record = len(pickle.dumps(ckpt["lora_lightning"]))  # config, structure, the base identity's hashes
    assert (
        tmp_path / "ckpt" / "last.ckpt"
    ).stat().st_size - record < 4 * full  # full weights alone would be 4*full bytes
    # weights_only saves are filtered too
    t.save_checkpoint(tmp_path / "w.ckpt", weights_only=True)
    assert set(torch.load(tmp_path / "w.ckpt", weights_only=False)["state_dict"]) == set(sd)


def _fit(tmp_path, epochs, ckpt_path=None, save_to=None, **cb_kw):
    """4 steps per epoch; ModelCheckpoint writes last.ckpt at every epoch end."""
    model = LitTiny(seed=0)
    cb = LoRACallback(r=2, targets=["q", "v", "mlp"], **cb_kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    t = trainer(tmp_path, [cb, ckpt], max_steps=-1, max_epochs=epochs, enable_checkpointing=True)
    t.fit(model, tiny_loader(n=32, batch_size=8), ckpt_path=ckpt_path)
    if save_to:
        t.save_checkpoint(save_to)
    return model, t


def test_resume_from_adapter_only_checkpoint_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    straight, t1 = _fit(tmp_path / "a", 3)
    torch.manual_seed(0)
    _fit(tmp_path / "b", 2)  # "interrupted" after 2 of 3 epochs
    mid = tmp_path / "b" / "ckpt" / "last.ckpt"
    assert set(torch.load(mid, weights_only=False)["state_dict"]) == set(lora_tensors(straight))
    torch.manual_seed(123)  # a different global seed must not matter: all state comes from the checkpoint
    resumed, t2 = _fit(tmp_path / "c", 3, ckpt_path=mid)
    assert t2.global_step == t1.global_step == 12
    a, b = lora_tensors(straight), lora_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids, y = tiny_batch()
    assert torch.equal(straight(ids), resumed(ids))


def test_resume_with_other_lora_config_names_the_difference(tmp_path):
    _fit(tmp_path / "a", 1, save_to=tmp_path / "x.ckpt")
    model = LitTiny()
    t = trainer(tmp_path / "b", [LoRACallback(r=8, targets=["q", "v", "mlp"])], max_steps=4)
    with pytest.raises(AdapterMismatchError, match=r"r: 2 in checkpoint vs 8 in model"):
        t.fit(model, tiny_loader(), ckpt_path=tmp_path / "x.ckpt")


def test_hyperparameters_logged(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    t = trainer(tmp_path, [LoRACallback(r=2, targets=["q"])], max_steps=1, logger=logger)
    t.fit(LitTiny(), tiny_loader())
    text = (tmp_path / "run" / "version_0" / "hparams.yaml").read_text()
    assert "params/trainable: 192" in text  # 3 layers * 2*(16+16)
    assert "r: 2" in text


def test_exports_and_merge_on_fit_end(tmp_path):
    model = LitTiny()
    cb = LoRACallback(
        r=2,
        targets=["q", "v"],
        merge_on_fit_end=True,
        export_adapter=str(tmp_path / "out" / "adapter.safetensors"),
        export_merged=str(tmp_path / "out" / "merged.safetensors"),
        export_module="net",
    )
    t = trainer(tmp_path, [cb], max_steps=3)
    t.fit(model, tiny_loader())
    assert is_merged(model)
    ids, _ = tiny_batch()
    model.eval()
    tensors, _ = read_adapter(tmp_path / "out" / "adapter.safetensors")
    assert len(tensors) == 4 * N_LAYERS
    fresh = tiny_model(0).eval()
    load_adapter(fresh, tmp_path / "out" / "adapter.safetensors")
    torch.testing.assert_close(fresh(ids), model(ids), atol=1e-5, rtol=0)
    from safetensors.torch import load_file

    plain = tiny_model(7).eval()
    plain.load_state_dict(load_file(tmp_path / "out" / "merged.safetensors"))
    torch.testing.assert_close(plain(ids), model(ids), atol=1e-5, rtol=0)


def test_test_stage_with_adapter_checkpoint_on_fresh_model(tmp_path):
    trained, t = _fit(tmp_path / "a", 1, save_to=tmp_path / "x.ckpt")
    fresh = LitTiny()
    t2 = trainer(tmp_path / "b", [LoRACallback(r=2, targets=["q", "v", "mlp"])])
    t2.test(fresh, tiny_loader(), ckpt_path=tmp_path / "x.ckpt", verbose=False)
    for k, v in lora_tensors(trained).items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_fit_then_test_does_not_reinject(tmp_path):
    model = LitTiny()
    t = trainer(tmp_path, [LoRACallback(r=2, targets=["q"])], max_steps=2)
    t.fit(model, tiny_loader())
    t.test(model, tiny_loader(), verbose=False)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == N_LAYERS


def test_patched_module_is_still_picklable(tmp_path):
    import pickle

    model = LitTiny()
    trainer(tmp_path, [LoRACallback(r=2, targets=["q"])], max_steps=1).fit(model, tiny_loader())
    clone = pickle.loads(pickle.dumps(model))
    ids, _ = tiny_batch()
    assert torch.equal(clone(ids), model(ids))
