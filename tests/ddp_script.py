"""Standalone DDP / FSDP2 run for ``tests/test_distributed.py`` (not collected by pytest).

Lightning's subprocess launcher re-runs this very script once per extra rank, so it must be
runnable on its own::

    python tests/ddp_script.py OUTDIR --devices 2 --epochs 1 [--resume-epochs 2] [--ckpt PATH] [--tag NAME]
        [--strategy ddp|fsdp2] [--format sharded|file] [--resume-from TAG=PATH ...] [--num-nodes N] [--variant V]

It also runs as one "node" of a multi-node job started by torchrun (``--num-nodes 2 --devices 1``, one
launcher per node): Lightning then takes ranks and world size from TorchElastic's environment.

Trains ``LitTiny`` with ``LoRACallback`` on the CPU (gloo) and writes, under ``OUTDIR``:

* ``{tag}-rank{R}.pt``: every rank's adapter tensors (and global step, world size, node / local rank and the
  cluster environment Lightning chose) after ``fit``, ``R`` the global rank;
* ``{tag}-ckpt/``: what ``ModelCheckpoint`` wrote (``save_top_k=1``: one file);
* ``{tag}-adapter.safetensors``: the callback's adapter export (and, for fsdp2, ``{tag}-merged.safetensors``);
* ``writes-rank{R}.log``: one line per atomic file write global rank ``R`` made (path), so the test
  can tell *which* rank wrote the checkpoint and the export.

``--resume-epochs K`` then resumes, in the same processes, from the checkpoint just written and
trains up to ``K`` epochs in total (tag ``resumed``): a 2-rank resume without paying for a second
launch. ``--resume-from TAG=PATH`` resumes from a given checkpoint instead (a 1-process resume of a
2-process run). Used by ``tests/test_distributed.py``, which checks the results against single-process runs.

``--strategy fsdp2``: Lightning's ``ModelParallelStrategy`` with ``LitSharded`` (``fully_shard`` per
block in ``configure_model``); ``--format`` picks its checkpoint format (a sharded folder or one file).
Every rank gathers the full adapter tensors for its record; the record also lists, per rank, which
parameters are trainable, sharded and hold optimizer state.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

torch.set_num_threads(1)  # 2 ranks on 2 cores: no oversubscription

import lora_lightning.adapter_io as ll_checkpoint  # noqa: E402
import lora_lightning.lightning.checkpoints as ll_io  # noqa: E402
from conftest import PACKAGE, LitSharded, LitTiny, LoRACallback, ModelCheckpoint, tiny_loader, trainer  # noqa: E402
from lora_lightning import gathered, is_sharded  # noqa: E402

LORA = dict(r=2, targets=["q", "v", "mlp"])


def _log_writes(out: Path) -> None:
    """Record every atomic write of this process (checkpoint and adapter export) in a per-rank log."""
    original = ll_checkpoint.atomic_write_bytes

    def logged(path, data):
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        with open(out / f"writes-rank{rank}.log", "a") as fh:
            fh.write(f"{Path(path).relative_to(out)}\n")
        return original(path, data)

    ll_checkpoint.atomic_write_bytes = logged
    ll_io.atomic_write_bytes = logged


def _strategy(name: str, devices: int, fmt: str, num_nodes: int = 1):
    if name == "fsdp2":
        import importlib

        ModelParallelStrategy = importlib.import_module(f"{PACKAGE}.strategies").ModelParallelStrategy

        return ModelParallelStrategy(
            data_parallel_size=devices * num_nodes,
            tensor_parallel_size=1,
            save_distributed_checkpoint=(fmt == "sharded"),
        )
    return name if devices * num_nodes > 1 else "auto"


def _rank_view(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What this rank holds: trainable / sharded parameter names and the parameters with optimizer state."""
    from torch.distributed.tensor import DTensor

    names = {id(p): n for n, p in model.named_parameters()}
    with_state = sorted(names[id(p)] for p, st in optimizer.state.items() if st)
    state_sharded = all(isinstance(t, DTensor) for p, st in optimizer.state.items() for t in st.values() if t.dim() > 0)
    return {
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "sharded": sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor)),
        "local_numel": {
            n: (p.to_local() if isinstance(p, DTensor) else p).numel() for n, p in model.named_parameters()
        },
        "with_optimizer_state": with_state,
        "optimizer_state_sharded": state_sharded,
    }


def run(
    out: Path,
    devices: int,
    epochs: int,
    batch: int,
    strategy: str,
    ckpt: str | None,
    tag: str,
    init: str | None,
    fmt: str = "sharded",
    num_nodes: int = 1,
) -> None:
    """One ``fit``; every rank then saves its adapter tensors to ``OUT/{tag}-rank{R}.pt``."""
    fsdp2 = strategy == "fsdp2"
    model = LitSharded(seed=0) if fsdp2 else LitTiny(seed=0)
    exports = dict(export_adapter=str(out / f"{tag}-adapter.safetensors"))
    if fsdp2:
        exports["export_merged"] = str(out / f"{tag}-merged.safetensors")
    callbacks = [
        LoRACallback(**LORA, init_adapter=init, verbose=False, **exports),
        ModelCheckpoint(dirpath=out / f"{tag}-ckpt", save_top_k=1),
    ]
    t = trainer(
        out / tag,
        callbacks,
        devices=devices,
        num_nodes=num_nodes,
        strategy=_strategy(strategy, devices, fmt, num_nodes),
        max_steps=-1,
        max_epochs=epochs,
        enable_checkpointing=True,
    )
    t.fit(model, tiny_loader(n=32, batch_size=batch), ckpt_path=ckpt)
    record = {
        "global_step": t.global_step,
        "world_size": t.world_size,
        "global_rank": t.global_rank,
        "node_rank": t.node_rank,
        "local_rank": t.local_rank,
        "num_nodes": t.num_nodes,
        "environment": type(t.strategy.cluster_environment).__name__,
        "env": {
            k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")
        },
    }
    if fsdp2:
        record |= _rank_view(model, t.optimizers[0]) | {"sharded_after_fit": is_sharded(model)}
    with gathered(model):  # FSDP2: the full tensors on every rank (a no-op under DDP)
        record["adapter"] = {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}
        if fsdp2:
            record["base"] = {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    torch.save(record, out / f"{tag}-rank{t.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1, help="Trainer(num_nodes=): >1 under torchrun --nnodes")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4, help="per-rank batch size")
    parser.add_argument("--strategy", default="ddp", help="ddp, or fsdp2 (ModelParallelStrategy)")
    parser.add_argument(
        "--format", action="append", choices=["sharded", "file"], help="fsdp2 checkpoint format(s): one run each"
    )
    parser.add_argument(
        "--refusals", action="store_true", help="fsdp2: also run the cases that must refuse, and LitShardedLate"
    )
    parser.add_argument("--resume-from", action="append", default=[], help="TAG=PATH: resume from PATH, record as TAG")
    parser.add_argument("--ckpt", default=None, help="resume the first fit from this checkpoint")
    parser.add_argument("--tag", default="train")
    parser.add_argument(
        "--variant", default=None, help="LoRACallback(variant=...) with init_seed=0 (the same A on every rank)"
    )
    parser.add_argument(
        "--init", default=None, help="init_adapter: the same start on every rank and in the reference run"
    )
    parser.add_argument(
        "--resume-epochs",
        type=int,
        default=0,
        help="then, in the same processes (process group reused), resume from the checkpoint just written "
        "and train up to this many epochs in total",
    )
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    _log_writes(out)
    formats = args.format or ["sharded"]
    if args.variant:
        LORA.update(variant=args.variant, init_seed=0)

    def fit(epochs: int, ckpt: str | None, tag: str, fmt: str) -> None:
        run(out, args.devices, epochs, args.batch, args.strategy, ckpt, tag, args.init, fmt, args.num_nodes)

    for spec in args.resume_from:
        tag, path = spec.split("=", 1)
        fit(args.resume_epochs, path, tag, formats[0])
    if args.refusals:
        refusals(out, args.devices, args.batch, args.init)
    if args.resume_from or args.refusals:
        return
    for fmt in formats:
        tag = args.tag if len(formats) == 1 else f"{args.tag}-{fmt}"
        fit(args.epochs, args.ckpt, tag, fmt)
        if args.resume_epochs:
            (ckpt,) = sorted((out / f"{tag}-ckpt").glob("*.ckpt"))
            fit(args.resume_epochs, str(ckpt), "resumed" if tag == "train" else f"{tag}-resumed", fmt)


def refusals(out: Path, devices: int, batch: int, init: str | None) -> None:
    """FSDP2 cases beyond the plain fit, recorded in ``OUT/refusals-rank{R}.pt``: a network built and sharded
    in ``configure_model`` with ``inject_before_sharding`` (trains), without it (must refuse), and
    ``merge_on_fit_end=True`` on a sharded model (must refuse)."""
    from conftest import LitShardedLate

    result: dict = {}
    for case, module, options in (
        ("late", LitShardedLate(seed=0), {}),
        ("late_without_inject", LitShardedLate(seed=0, call_inject=False), {}),
        ("merge_on_fit_end", LitSharded(seed=0), {"merge_on_fit_end": True}),
    ):
        t = trainer(
            out / case,
            [LoRACallback(**LORA, init_adapter=init, verbose=False, **options)],
            devices=devices,
            strategy=_strategy("fsdp2", devices, "sharded"),
            max_steps=-1,
            max_epochs=1,
        )
        try:
            t.fit(module, tiny_loader(n=32, batch_size=batch))
        except Exception as exc:  # noqa: BLE001 - recorded for the test to check
            result[case] = f"{type(exc).__name__}: {exc}"
            continue
        with gathered(module):
            result[case] = {k: v.detach().clone() for k, v in module.state_dict().items() if ".lora_" in k}
    torch.save(result, out / f"refusals-rank{int(os.environ.get('LOCAL_RANK', 0))}.pt")


if __name__ == "__main__":
    main()
