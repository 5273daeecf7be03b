"""Conv LoRA on a real image task: a small CNN pretrained on digits 0-4 adapted to digits 5-9.

    python examples/conv_lora_digits.py                # 3 seeds, prints a markdown table
    python examples/conv_lora_digits.py --quick        # a smoke run (CI)

Data: scikit-learn's bundled handwritten digits (UCI optdigits test set, 1,797 8x8 images, shipped in
the scikit-learn wheel: no download). Task A is digits 0-4, task B digits 5-9. The CNN (three 3x3
convolutions and a linear head, 15k parameters) is pretrained on task A, then adapted to task B from
``--shots`` images per class with a Lightning Trainer, three ways on the same data and seeds:

* ``LoRACallback(targets=["conv1", "conv2", "conv3"], modules_to_save=["head"])``: rank-r adapters on
  the convolutions (A a convolution with the layer's kernel, B 1x1) plus a new head;
* full fine-tuning of every weight;
* the head only (the frozen pretrained features).

Accuracy is measured on the task-B images held out from training (the same split for every run).
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import LoRACallback, count_parameters


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return self.head(x.mean((2, 3)))


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)


def split(shots: int, seed: int = 0):
    """Task A (0-4) train images; task B (5-9): ``shots`` training images per class and the rest held out."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    a = (y < 5).nonzero().squeeze(1)
    b_train, b_test = [], []
    for c in range(5, 10):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        b_train.append(idx[:shots])
        b_test.append(idx[shots:])
    bt, bs = torch.cat(b_train), torch.cat(b_test)
    return (x[a], y[a]), (x[bt], y[bt] - 5), (x[bs], y[bs] - 5)


def fit(module: pl.LightningModule, data, epochs: int, callbacks=()) -> None:
    loader = DataLoader(TensorDataset(*data), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    ).fit(module, loader)


@torch.no_grad()
def accuracy(net: nn.Module, data) -> float:
    net.eval()
    return float((net(data[0]).argmax(1) == data[1]).float().mean())


def pretrained(task_a, epochs: int, seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    net = SmallCNN()
    fit(Classifier(net, lr=3e-3), task_a, epochs)
    return net


def adapt(base: SmallCNN, method: str, train_b, epochs: int, seed: int, r: int) -> tuple[SmallCNN, int]:
    torch.manual_seed(seed)
    net = SmallCNN()
    net.load_state_dict(base.state_dict())
    net.head.reset_parameters()  # a new head for the new classes
    callbacks = []
    if method == "lora":
        callbacks = [
            LoRACallback(r=r, alpha=2 * r, targets=["conv1", "conv2", "conv3"], modules_to_save=["head"], verbose=False)
        ]
    elif method == "head_only":
        for name, p in net.named_parameters():
            p.requires_grad_(name.startswith("head."))
    module = Classifier(net, lr={"lora": 1e-2, "full": 3e-3, "head_only": 1e-2}[method])
    fit(module, train_b, epochs, callbacks)
    return net, count_parameters(module).trainable if method == "lora" else sum(
        p.numel() for p in net.parameters() if p.requires_grad
    )


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--shots", type=int, default=20, help="task-B training images per class")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pre_epochs, epochs = (2, 2) if args.quick else (30, 60)
    task_a, train_b, test_b = split(args.shots)
    base = pretrained(task_a, pre_epochs)
    results: dict[str, list[float]] = {}
    trainable: dict[str, int] = {}
    for method in ("lora", "full", "head_only"):
        for seed in range(1, args.seeds + 1):
            net, n = adapt(base, method, train_b, epochs, seed, args.rank)
            results.setdefault(method, []).append(100 * accuracy(net, test_b))
            trainable[method] = n
    total = sum(p.numel() for p in SmallCNN().parameters())
    lines = [
        f"Task A (0-4) accuracy of the pretrained CNN on its training images: {100 * accuracy(base, task_a):.1f}%; "
        f"task B (5-9): {len(train_b[1])} training images ({args.shots} per class), {len(test_b[1])} held out; "
        f"{args.seeds} seeds; {total:,} parameters in the CNN.",
        "",
        "| method | trainable parameters | task-B accuracy % (mean ± std) | per seed |",
        "|---|---|---|---|",
    ]
    for method, accs in results.items():
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        name = {
            "lora": f"LoRA r={args.rank} on conv1-3 + new head",
            "full": "full fine-tuning",
            "head_only": "head only",
        }[method]
        lines.append(
            f"| {name} | {trainable[method]:,} | {statistics.mean(accs):.1f} ± {spread:.1f} | "
            f"{', '.join(f'{a:.1f}' for a in accs)} |"
        )
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
