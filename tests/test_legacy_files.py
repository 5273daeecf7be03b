"""Adapter files and Lightning checkpoints written by lora_lightning before this version (at commit 3c1a28f:
records of format 2, base fingerprint by sampled values, state in attributes of the model) still load and
give the outputs they gave then (tests/data/legacy_3c1a28f, made by make_legacy.py there)."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import LitTiny, LoRACallback, tiny_batch, tiny_loader, tiny_model, trainer
from lora_lightning import has_lora, load_adapter, read_adapter_config

DATA = Path(__file__).resolve().parent / "data" / "legacy_3c1a28f"
IDS = tiny_batch()[0]


def test_an_adapter_file_of_3c1a28f_loads_and_gives_its_outputs():
    model = tiny_model(0)
    config = load_adapter(model, DATA / "adapter.safetensors")
    assert config.r == 4 and read_adapter_config(DATA / "adapter.safetensors").targets == ["q", "v"]
    with torch.no_grad():
        assert torch.equal(model(IDS), torch.load(DATA / "expected_adapter.pt")["adapter"])


def test_an_adapter_file_of_3c1a28f_still_refuses_another_base():
    import pytest

    from lora_lightning import BaseModelMismatchError

    with pytest.raises(BaseModelMismatchError, match="different base weights"):
        load_adapter(tiny_model(1), DATA / "adapter.safetensors")


def test_a_checkpoint_of_3c1a28f_loads_evaluates_and_resumes(tmp_path):
    expected = torch.load(DATA / "expected_ckpt.pt")["ckpt"]
    loaded = LitTiny.load_from_checkpoint(DATA / "adapter_only.ckpt").eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS), expected)
    fresh = LitTiny(seed=0)
    trainer(tmp_path, [], max_steps=1).test(
        fresh, tiny_loader(), ckpt_path=str(DATA / "adapter_only.ckpt"), verbose=False
    )
    fresh.eval()
    with torch.no_grad():
        assert has_lora(fresh) and torch.equal(fresh(IDS), expected)
    resumed = LitTiny(seed=0)
    cb = LoRACallback(r=2, targets=["q", "v"], modules_to_save=["net.classifier"], verbose=False)
    run = trainer(tmp_path / "resume", [cb], max_steps=5)
    run.fit(resumed, tiny_loader(), ckpt_path=str(DATA / "adapter_only.ckpt"))
    assert run.global_step == 5
