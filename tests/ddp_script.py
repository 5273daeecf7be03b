"""Standalone DDP run for ``tests/test_distributed.py`` (not collected by pytest).

Lightning's subprocess launcher re-runs this very script once per extra rank, so it must be
runnable on its own::

    python tests/ddp_script.py OUTDIR --devices 2 --epochs 1 [--resume-epochs 2] [--ckpt PATH] [--tag NAME]

Trains ``LitTiny`` with ``LoRACallback`` on the CPU (gloo) and writes, under ``OUTDIR``:

* ``{tag}-rank{R}.pt``: every rank's adapter tensors (and global step) after ``fit``;
* ``{tag}-ckpt/``: what ``ModelCheckpoint`` wrote (``save_top_k=1``: one file);
* ``{tag}-adapter.safetensors``: the callback's adapter export;
* ``writes-rank{R}.log``: one line per atomic file write this rank made (path), so the test
  can tell *which* rank wrote the checkpoint and the export.

``--resume-epochs K`` then resumes, in the same processes, from the checkpoint just written and
trains up to ``K`` epochs in total (tag ``resumed``): a 2-rank resume without paying for a second
launch. Used by ``tests/test_distributed.py``, which checks the results against single-process runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

torch.set_num_threads(1)  # 2 ranks on 2 cores: no oversubscription

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import lora_lightning.adapter_io as ll_checkpoint  # noqa: E402
import lora_lightning.lightning.checkpoints as ll_io  # noqa: E402
from lora_lightning import LoRACallback  # noqa: E402
from conftest import LitTiny, tiny_loader, trainer  # noqa: E402

LORA = dict(r=2, targets=["q", "v", "mlp"])


def _log_writes(out: Path) -> None:
    """Record every atomic write of this process (checkpoint and adapter export) in a per-rank log."""
    original = ll_checkpoint.atomic_write_bytes

    def logged(path, data):
        rank = os.environ.get("LOCAL_RANK", "0")
        with open(out / f"writes-rank{rank}.log", "a") as fh:
            fh.write(f"{Path(path).relative_to(out)}\n")
        return original(path, data)

    ll_checkpoint.atomic_write_bytes = logged
    ll_io.atomic_write_bytes = logged


def run(
    out: Path, devices: int, epochs: int, batch: int, strategy: str, ckpt: str | None, tag: str, init: str | None
) -> None:
    """One ``fit``; every rank then saves its adapter tensors to ``OUT/{tag}-rank{R}.pt``."""
    model = LitTiny(seed=0)
    callbacks = [
        LoRACallback(**LORA, init_adapter=init, export_adapter=str(out / f"{tag}-adapter.safetensors"), verbose=False),
        ModelCheckpoint(dirpath=out / f"{tag}-ckpt", save_top_k=1),
    ]
    t = trainer(
        out / tag,
        callbacks,
        devices=devices,
        strategy=strategy if devices > 1 else "auto",
        max_steps=-1,
        max_epochs=epochs,
        enable_checkpointing=True,
    )
    t.fit(model, tiny_loader(n=32, batch_size=batch), ckpt_path=ckpt)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}
    record = {"adapter": tensors, "global_step": t.global_step, "world_size": t.world_size}
    torch.save(record, out / f"{tag}-rank{t.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4, help="per-rank batch size")
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--ckpt", default=None, help="resume the first fit from this checkpoint")
    parser.add_argument("--tag", default="train")
    parser.add_argument("--init", default=None, help="init_adapter: the same start on every rank and in the reference run")
    parser.add_argument(
        "--resume-epochs", type=int, default=0,
        help="then, in the same processes (process group reused), resume from the checkpoint just written "
        "and train up to this many epochs in total",
    )
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    _log_writes(out)
    run(out, args.devices, args.epochs, args.batch, args.strategy, args.ckpt, args.tag, args.init)
    if args.resume_epochs:
        (ckpt,) = sorted((out / f"{args.tag}-ckpt").glob("*.ckpt"))
        run(out, args.devices, args.resume_epochs, args.batch, args.strategy, str(ckpt), "resumed", args.init)


if __name__ == "__main__":
    main()
