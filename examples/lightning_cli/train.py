"""LoRA on an ordinary LightningModule, configured entirely from YAML with ``LightningCLI``.

    python examples/lightning_cli/train.py fit --config examples/lightning_cli/config.yaml

The model knows nothing about LoRA: ``trainer.callbacks`` in ``config.yaml`` adds
``lora_lightning.LoRACallback`` (``class_path`` + ``init_args``), which injects the adapters
before the optimizer is built. Needs ``jsonargparse[signatures]`` (``lightning[pytorch-extra]``).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyClassifier(pl.LightningModule):
    """Embedding -> one pre-norm attention block with q/k/v/o Linear layers -> mean pool -> head."""

    def __init__(self, vocab: int = 50, d_model: int = 16, n_classes: int = 3, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, d_model)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model) for _ in range(4))
        self.classifier = nn.Linear(d_model, n_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        y = F.scaled_dot_product_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x))
        return self.classifier((x + self.o_proj(y)).mean(1))

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        loss = F.cross_entropy(self(ids), labels)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=self.hparams.lr)


class RandomTokens(pl.LightningDataModule):
    """Random token sequences with random labels (enough to exercise the loop)."""

    def __init__(self, n: int = 32, seq_len: int = 6, vocab: int = 50, n_classes: int = 3, batch_size: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        h = self.hparams
        ids = torch.randint(0, h.vocab, (h.n, h.seq_len), generator=g)
        labels = torch.randint(0, h.n_classes, (h.n,), generator=g)
        return DataLoader(TensorDataset(ids, labels), batch_size=h.batch_size)


def main(args=None, run: bool = True) -> LightningCLI:
    return LightningCLI(TinyClassifier, RandomTokens, args=args, run=run, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
