"""Shared by the multi-process tests (``test_distributed.py``, ``test_multinode.py``): launching
``tests/ddp_script.py``, the single-process reference runs the multi-process results are checked
against, and the adapter comparisons.

Lightning gives every DDP training loader a ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED
or 0)``: in epoch ``e`` the ranks together take ``randperm(32, seed + e)`` in order (rank ``r``
gets positions ``r::2``), so step ``i`` sees positions ``8i..8i+7`` of that permutation.
:class:`EpochPermutation` hands one process exactly those batches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from conftest import N_LAYERS, LitTiny, LoRACallback, randomize_adapters, tiny_loader, trainer
from lora_lightning import LoRAConfig, inject_lora, save_adapter

SCRIPT = Path(__file__).with_name("ddp_script.py")
REPO = SCRIPT.parent.parent
LORA = dict(r=2, targets=["q", "v", "mlp"])  # must match ddp_script.LORA
N_ADAPTER_TENSORS = N_LAYERS * 4 * 2  # q, v, up, down per block; A and B each
STEPS_PER_EPOCH = 4  # 32 samples: 2 ranks x batch 4, or 1 process x batch 8


def lora_tensors(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".lora_" in k}


def assert_adapters_close(a: dict, b: dict, atol: float = 2e-5) -> None:
    assert a.keys() == b.keys() and len(a) == N_ADAPTER_TENSORS
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def launch(out: Path, *args: str) -> float:
    """Run ``tests/ddp_script.py OUT *args`` in a clean environment; returns the seconds it took."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *args],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"run {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return time.perf_counter() - start


def initial_adapter(out: Path) -> Path:
    model = LitTiny(seed=0)
    inject_lora(model, LoRAConfig(**LORA))
    randomize_adapters(model)  # B != 0: every adapter tensor gets a gradient from step 1
    return save_adapter(model, out / "init.safetensors")


class EpochPermutation(Sampler):
    """All ranks' ``DistributedSampler(shuffle=True, seed=0)`` indices of an epoch, in one stream."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def single_process_fit(
    root: Path, epochs: int, init: Path | None = None, ckpt: Path | None = None, variant: str | None = None
):
    """LitTiny on one process with the data order of 2 ranks (``variant``: as ``ddp_script.py --variant``)."""
    model = LitTiny(seed=0)
    options = LORA | ({"variant": variant, "init_seed": 0} if variant else {})
    cb = LoRACallback(**options, init_adapter=str(init) if init else None, verbose=False)
    t = trainer(root, [cb], max_steps=-1, max_epochs=epochs)
    data = tiny_loader(n=32).dataset
    t.fit(model, DataLoader(data, batch_size=8, sampler=EpochPermutation(len(data))), ckpt_path=ckpt)
    return model, t


def free_port() -> int:
    """A TCP port nothing listens on now (for a rendezvous endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """This environment without the variables a launcher sets (a test run under a launcher must not leak them)."""
    drop = (
        "LOCAL_RANK",
        "NODE_RANK",
        "RANK",
        "GROUP_RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "PL_GLOBAL_SEED",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("TORCHELASTIC_", "SLURM_"))}
    env["PYTHONWARNINGS"] = "ignore"
    return env
