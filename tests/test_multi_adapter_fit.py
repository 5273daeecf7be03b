"""Several named adapters trained in one Trainer.fit (LoRACallback(adapters=[...]))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from conftest import LitTiny, LoRACallback, ModelCheckpoint, tiny_loader, trainer
from lora_lightning import (
    LoRAConfigError,
    active_adapter,
    list_adapters,
    load_adapter,
    read_adapter,
    use_adapter,
)

OPTS = dict(r=2, alpha=4, dropout=0.0, targets=["q", "v"], modules_to_save=["net.classifier"])
SEEDS = {"a": {"init_seed": 11}, "b": {"init_seed": 22}}


class LitTwo(LitTiny):
    """LitTiny whose evaluation steps take ``dataloader_idx`` (Lightning's contract for several loaders)."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        ids, y = batch
        self.log("val_loss", F.cross_entropy(self(ids), y))

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        ids, y = batch
        self.log("test_loss", F.cross_entropy(self(ids), y))

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return active_adapter(self), self(batch[0])


def loaders() -> dict:
    return {"a": tiny_loader(32, 8, seed=1), "b": tiny_loader(32, 8, seed=2)}


def adapter_tensors(model, name: str) -> dict[str, torch.Tensor]:
    with use_adapter(model, name, trainable=True):
        return {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if ("lora_A" in k or "lora_B" in k or "classifier" in k) and "lora_bank" not in k
        }


def fit_alone(tmp_path, name: str, steps: int = 4) -> LitTwo:
    model = LitTwo(seed=0)
    cb = LoRACallback(**OPTS, **SEEDS[name])
    trainer(tmp_path / f"alone-{name}", [cb], max_steps=steps).fit(model, train_dataloaders=loaders()[name])
    return model


def test_each_adapter_trains_exactly_as_alone(tmp_path):
    model = LitTwo(seed=0)
    cb = LoRACallback(**OPTS, adapters=SEEDS)
    trainer(tmp_path / "both", [cb], max_steps=4).fit(model, train_dataloaders=loaders())
    assert list_adapters(model) == ["a", "b"] and active_adapter(model) == "a"
    for name in "ab":
        alone = fit_alone(tmp_path, name)
        got, want = (
            adapter_tensors(model, name),
            {k: v for k, v in alone.state_dict().items() if k in adapter_tensors(model, name)},
        )
        assert got.keys() == want.keys() and len(got) == 2 * 3 * 2 + 2  # q,v A/B in 3 blocks + classifier w/b
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
        start = LitTwo(seed=0).state_dict()["net.classifier.weight"]
        assert not torch.allclose(got["net.classifier.weight"], start)  # it did train
    # the two adapters differ (different data, different init)
    a, b = adapter_tensors(model, "a"), adapter_tensors(model, "b")
    assert not torch.allclose(a["net.layers.0.self_attn.q_proj.lora_A"], b["net.layers.0.self_attn.q_proj.lora_A"])


def test_logs_are_per_adapter_and_validation_is_routed(tmp_path):
    model = LitTwo(seed=0)
    cb = LoRACallback(**OPTS, adapters=SEEDS)
    t = trainer(tmp_path, [cb], max_steps=2, limit_val_batches=2, val_check_interval=2)
    vals = {"a": tiny_loader(16, 8, seed=5), "b": tiny_loader(16, 8, seed=6)}
    t.fit(model, train_dataloaders=loaders(), val_dataloaders=vals)
    metrics = t.callback_metrics
    assert {"a/train_loss", "b/train_loss", "a/val_loss", "b/val_loss"} <= set(metrics)
    model.eval()
    for name in "ab":
        with use_adapter(model, name), torch.no_grad():
            want = torch.stack([F.cross_entropy(model(ids), y) for ids, y in vals[name]]).mean()
        torch.testing.assert_close(metrics[f"{name}/val_loss"], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(metrics["a/val_loss"], metrics["b/val_loss"])
    preds = t.predict(model, dataloaders={"a": vals["a"], "b": vals["b"]})
    assert [p[0][0] for p in preds] == ["a", "b"]


def test_checkpoints_hold_each_adapter_and_resume_exactly(tmp_path):
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1)  # one checkpoint per epoch (4 steps)
    model = LitTwo(seed=0)
    trainer(
        tmp_path, [LoRACallback(**OPTS, adapters=SEEDS), ck], max_steps=-1, max_epochs=1, enable_checkpointing=True
    ).fit(model, train_dataloaders=loaders())
    path = tmp_path / "ck" / "epoch=0-step=4.ckpt"
    state = torch.load(path, weights_only=False)["state_dict"]
    assert any(".lora_bank.b.lora_A" in k for k in state) and not any("embed" in k for k in state)
    loaded = LitTwo.load_from_checkpoint(path)
    for name in "ab":
        for k, v in adapter_tensors(model, name).items():
            torch.testing.assert_close(adapter_tensors(loaded, name)[k], v)
    # resume to epoch 2 == 2 uninterrupted epochs (both adapters' optimizer state restored)
    resumed = LitTwo(seed=0)
    trainer(tmp_path / "r", [LoRACallback(**OPTS, adapters=SEEDS)], max_steps=-1, max_epochs=2).fit(
        resumed, train_dataloaders=loaders(), ckpt_path=path
    )
    straight = LitTwo(seed=0)
    trainer(tmp_path / "s", [LoRACallback(**OPTS, adapters=SEEDS)], max_steps=-1, max_epochs=2).fit(
        straight, train_dataloaders=loaders()
    )
    for name in "ab":
        want = adapter_tensors(straight, name)
        for k, v in adapter_tensors(resumed, name).items():
            torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")


def test_export_writes_one_file_per_adapter(tmp_path):
    model = LitTwo(seed=0)
    cb = LoRACallback(**OPTS, adapters=SEEDS, export_adapter=str(tmp_path / "{name}.safetensors"))
    trainer(tmp_path, [cb], max_steps=2).fit(model, train_dataloaders=loaders())
    for name in "ab":
        _, meta = read_adapter(tmp_path / f"{name}.safetensors")
        assert meta["adapter_name"] == name
        fresh = LitTwo(seed=0)
        from lora_lightning import LoRAConfig, inject_lora

        inject_lora(fresh, LoRAConfig(**OPTS))
        load_adapter(fresh, tmp_path / f"{name}.safetensors")
        ids = loaders()[name].dataset.tensors[0]
        with use_adapter(model, name), torch.no_grad():
            torch.testing.assert_close(fresh(ids), model(ids))


class SharedMetric(LitTwo):
    def __init__(self) -> None:
        super().__init__(seed=0)
        self.acc = MulticlassAccuracy(num_classes=3)

    def training_step(self, batch, batch_idx):
        ids, y = batch
        logits = self(ids)
        self.acc.update(logits, y)
        self.log("acc", self.acc)
        return F.cross_entropy(logits, y)


def _fit(tmp_path, data, model=None, **kwargs) -> None:
    trainer(tmp_path, [LoRACallback(**OPTS, **kwargs)], max_steps=2).fit(model or LitTwo(), train_dataloaders=data)


def test_one_adapter_name():
    """bad input: LoRACallback(adapters=["a"]) (one name) or a repeated name"""
    for names in (["a"], ["a", "a"], ["a", "b.c"]):
        with pytest.raises(LoRAConfigError, match="give two or more distinct names"):
            LoRACallback(**OPTS, adapters=names)


def test_export_path_without_name():
    """bad input: LoRACallback(adapters=[...], export_adapter="x.safetensors") (one path for several adapters)"""
    with pytest.raises(LoRAConfigError, match=r"put \{name\} in the path"):
        LoRACallback(**OPTS, adapters=["a", "b"], export_adapter="x.safetensors")


def test_merge_on_fit_end_with_several_adapters():
    """bad input: LoRACallback(adapters=[...], merge_on_fit_end=True)"""
    with pytest.raises(LoRAConfigError, match="the base holds one merged adapter at a time"):
        LoRACallback(**OPTS, adapters=["a", "b"], merge_on_fit_end=True)


def test_several_adapters_of_a_variant():
    """bad input: LoRACallback(adapters=[...], variant="dora")"""
    with pytest.raises(LoRAConfigError, match="several adapters in one fit are plain LoRA"):
        LoRACallback(**OPTS, adapters=["a", "b"], variant="dora")


def test_single_train_loader_with_several_adapters(tmp_path):
    """bad input: LoRACallback(adapters=["a", "b"]) with one train dataloader (not a dict keyed by adapter)"""
    with pytest.raises(LoRAConfigError, match="routes each training batch by adapter name but got list"):
        _fit(tmp_path, tiny_loader(), adapters=["a", "b"])


def test_train_loader_keyed_by_an_unknown_adapter(tmp_path):
    """bad input: train_dataloaders={"a": ..., "c": ...} for LoRACallback(adapters=["a", "b"])"""
    with pytest.raises(
        LoRAConfigError,
        match=r"loaders for \['a', 'c'\] only: \['b'\] would get no batch .* and \['c'\] are not adapters",
    ):
        _fit(tmp_path, {"a": tiny_loader(), "c": tiny_loader()}, adapters=["a", "b"])


def test_val_loader_keyed_by_an_unknown_adapter(tmp_path):
    """bad input: val_dataloaders={"a": ..., "x": ...} for LoRACallback(adapters=["a", "b"])"""
    with pytest.raises(LoRAConfigError, match=r"dataloader keys \['x'\] are not adapters"):
        trainer(tmp_path, [LoRACallback(**OPTS, adapters=["a", "b"])], max_steps=1).fit(
            LitTwo(), train_dataloaders=loaders(), val_dataloaders={"a": tiny_loader(), "x": tiny_loader()}
        )


def test_single_val_loader_with_several_adapters(tmp_path):
    """bad input: LoRACallback(adapters=["a", "b"]) with one val dataloader during fit"""
    with pytest.raises(
        LoRAConfigError, match="validates each adapter on its own data but got one validation dataloader"
    ):
        trainer(tmp_path, [LoRACallback(**OPTS, adapters=["a", "b"])], max_steps=1).fit(
            LitTwo(), train_dataloaders=loaders(), val_dataloaders=tiny_loader()
        )
    model = LitTwo()  # after fitting, test/predict with one loader run the active adapter
    t = trainer(tmp_path, [LoRACallback(**OPTS, adapters=["a", "b"])], max_steps=1)
    t.fit(model, train_dataloaders=loaders())
    assert "test_loss" in t.test(model, dataloaders=tiny_loader(), verbose=False)[0]


def test_one_metric_object_for_two_adapters(tmp_path):
    """bad input: one torchmetrics object updated and logged by the steps of two adapters"""
    with pytest.raises(LoRAConfigError, match="one torchmetrics object is logged as a/acc and b/acc"):
        _fit(tmp_path, loaders(), SharedMetric(), adapters=["a", "b"])


def test_a_second_fit_with_other_adapters_is_refused(tmp_path):
    """bad input: a second fit of the same module with LoRACallback(adapters=["a", "c"]) after ["a", "b"]"""
    from lora_lightning import AdapterMismatchError

    model = LitTwo(seed=0)
    trainer(tmp_path, [LoRACallback(**OPTS, adapters=["a", "b"])], max_steps=1).fit(model, train_dataloaders=loaders())
    with pytest.raises(AdapterMismatchError, match=r"adapters \['a', 'b'\] vs \['a', 'c'\]"):
        trainer(tmp_path, [LoRACallback(**OPTS, adapters=["a", "c"])], max_steps=1).fit(
            model, train_dataloaders={"a": tiny_loader(), "c": tiny_loader()}
        )
    # same adapters: training continues on both
    before = adapter_tensors(model, "b")
    trainer(tmp_path, [LoRACallback(**OPTS, adapters=["a", "b"])], max_steps=1).fit(model, train_dataloaders=loaders())
    after = adapter_tensors(model, "b")
    assert not torch.allclose(before["net.classifier.weight"], after["net.classifier.weight"])


def test_resuming_a_checkpoint_saved_with_another_active_adapter_trains_both(tmp_path):
    from lora_lightning import set_adapter

    model = LitTwo(seed=0)
    t = trainer(tmp_path, [LoRACallback(**OPTS, adapters=SEEDS)], max_steps=-1, max_epochs=1)
    t.fit(model, train_dataloaders=loaders())
    set_adapter(model, "b")  # the checkpoint records "b" as active: restoring it re-activates "b"
    t.save_checkpoint(tmp_path / "b.ckpt")
    resumed = LitTwo(seed=0)
    trainer(tmp_path / "r", [LoRACallback(**OPTS, adapters=SEEDS)], max_steps=-1, max_epochs=2).fit(
        resumed, train_dataloaders=loaders(), ckpt_path=tmp_path / "b.ckpt"
    )
    set_adapter(model, "a")
    for name in "ab":
        before, after = adapter_tensors(model, name), adapter_tensors(resumed, name)
        assert not torch.allclose(before["net.classifier.weight"], after["net.classifier.weight"]), name
