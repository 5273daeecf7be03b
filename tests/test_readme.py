"""The README's Python examples run as written (with a tiny LightningModule and data module
standing in for the user's ``MyLightningModule`` and ``dm``), and do what the text says."""

import re
from pathlib import Path

import lightning.pytorch as pl
import torch

from lora_lightning import LoRALinear, lora_layers
from conftest import LitTiny, tiny_loader, tiny_model

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 2, "README lost its Python examples"
    return blocks


class TinyData(pl.LightningDataModule):
    def train_dataloader(self):
        return tiny_loader()

    def val_dataloader(self):
        return tiny_loader(seed=2)


def test_callback_example_trains_exports_and_writes_adapter_only_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = {"MyLightningModule": LitTiny, "dm": TinyData()}
    exec(python_blocks()[0], ns)  # noqa: S102 - the README's own example
    model, trainer = ns["model"], ns["trainer"]
    assert trainer.current_epoch == 3
    layers = lora_layers(model)
    assert layers and all(isinstance(m, LoRALinear) for m in layers.values())
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"q_proj", "v_proj"}
    assert (tmp_path / "adapter.safetensors").stat().st_size > 0
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts, "the default ModelCheckpoint wrote nothing"
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)["state_dict"]
    assert state and all("lora_" in k or ".classifier." in k for k in state), sorted(state)[:5]


def test_plain_pytorch_example_saves_and_merges(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model()
    ids = torch.randint(0, 50, (4, 6))
    base = model(ids).detach()
    ns = {"model": model}
    exec(python_blocks()[1], ns)  # noqa: S102
    assert (tmp_path / "task_a.safetensors").stat().st_size > 0
    layers = lora_layers(model)
    assert len(layers) == 2 * len(model.layers) and all(m.merged for m in layers.values())
    torch.testing.assert_close(model(ids), base)  # B = 0 until trained: merged == base
