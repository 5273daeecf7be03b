"""LoRA+ (lr_B = λ·lr_A) on the user's own optimizer and schedulers, through the callback and in plain PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import LitTiny, lora_tensors, tiny_batch, tiny_loader, tiny_model, trainer
from lora_lightning import LoRACallback, LoRAConfig, LoRAConfigError, inject_lora, lora_layers
from lora_lightning.loraplus import apply_loraplus, loraplus_parameters

LORA = dict(r=2, targets=["q", "v"])


class LitScheduled(LitTiny):
    """AdamW (betas, weight decay) with linear warmup then decay, stepped every batch."""

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            [p for p in self.parameters() if p.requires_grad], lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * max(0.0, 1 - s / 10))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class RecordGroups(Callback):
    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_callback_gives_B_its_own_group_with_ratio_times_the_lr_at_every_step(tmp_path):
    model, record = LitScheduled(), RecordGroups()
    trainer(tmp_path, [LoRACallback(**LORA, loraplus_lr_ratio=16), record], max_steps=8).fit(model, tiny_loader())
    opt = model.trainer.optimizers[0]
    groups = opt.param_groups
    assert len(groups) == 2
    b_ids = {id(p) for p in loraplus_parameters(model)}
    assert {id(p) for p in groups[1]["params"]} == b_ids and not b_ids & {id(p) for p in groups[0]["params"]}
    assert groups[1]["betas"] == (0.8, 0.95) and groups[1]["weight_decay"] == 0.1  # everything else copied
    assert len(record.lrs) == 8
    for step, (lr_a, lr_b) in enumerate(record.lrs):
        expected = 1e-2 * min(1.0, (step + 1) / 3) * max(0.0, 1 - step / 10)  # the user's schedule, by hand
        assert lr_a == pytest.approx(expected, rel=1e-12) and lr_b == pytest.approx(16 * expected, rel=1e-12)


def test_first_adam_step_moves_B_ratio_times_further_than_A(tmp_path):
    """Adam's first update is lr·sign(gradient) per element: |ΔB| = λ·lr, |ΔA| = lr (weight decay aside)."""
    model = LitTiny(lr=1e-3)
    torch.manual_seed(0)
    cb = LoRACallback(**LORA, loraplus_lr_ratio=16)
    run = trainer(tmp_path, [cb], max_steps=1)
    run.fit(model, tiny_loader())
    layer = next(iter(lora_layers(model).values()))
    moved_b = layer.lora_B.detach().abs()  # B started at 0
    assert moved_b[moved_b > 0].median().item() == pytest.approx(16e-3, rel=1e-3)
    plain = LitTiny(lr=1e-3)
    torch.manual_seed(0)
    trainer(tmp_path, [LoRACallback(**LORA)], max_steps=1).fit(plain, tiny_loader())
    plain_b = next(iter(lora_layers(plain).values())).lora_B.detach().abs()
    assert plain_b[plain_b > 0].median().item() == pytest.approx(1e-3, rel=1e-3)


def test_resume_with_loraplus_continues_bit_for_bit(tmp_path):
    kw = dict(**LORA, loraplus_lr_ratio=16)
    straight, first, resumed = LitScheduled(), LitScheduled(), LitScheduled()
    torch.manual_seed(1)
    trainer(tmp_path, [LoRACallback(**kw)], max_steps=-1, max_epochs=2).fit(straight, tiny_loader())
    torch.manual_seed(1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)
    trainer(tmp_path, [LoRACallback(**kw), ckpt], max_steps=-1, max_epochs=1, enable_checkpointing=True).fit(
        first, tiny_loader()
    )
    trainer(tmp_path, [LoRACallback(**kw)], max_steps=-1, max_epochs=2).fit(
        resumed, tiny_loader(), ckpt_path=str(tmp_path / "c" / "last.ckpt")
    )
    for k, v in lora_tensors(straight).items():
        torch.testing.assert_close(lora_tensors(resumed)[k], v, atol=0, rtol=0)


@pytest.mark.parametrize("make", ["onecycle", "sequential"])
def test_plain_pytorch_schedulers_keep_the_ratio(make):
    model = tiny_model(0)
    inject_lora(model, LoRAConfig(**LORA))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    if make == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=12)
    else:
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=9)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[3])
    assert apply_loraplus(opt, model, 4.0, [sched]) == 6
    ids, y = tiny_batch()
    for _ in range(11):
        ratio = opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"]
        assert ratio == pytest.approx(4.0, rel=1e-9)
        opt.zero_grad()
        F.cross_entropy(model(ids), y).backward()
        opt.step()
        sched.step()


def test_non_positive_ratio_is_refused():
    """bad input: `LoRACallback(loraplus_lr_ratio=0)`"""
    with pytest.raises(LoRAConfigError, match=r"loraplus_lr_ratio=0 must be a positive number"):
        LoRACallback(**LORA, loraplus_lr_ratio=0)


def test_loraplus_with_a_variant_without_B_is_refused_at_setup(tmp_path):
    """bad input: `LoRACallback(variant="vera", loraplus_lr_ratio=16)` (VeRA trains no B)"""
    with pytest.raises(LoRAConfigError, match="hold no trainable lora_B .*variant='vera'"):
        trainer(
            tmp_path, [LoRACallback(variant="vera", r=2, targets=["q", "v"], loraplus_lr_ratio=16)], max_steps=1
        ).fit(LitTiny(), tiny_loader())
