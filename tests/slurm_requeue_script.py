"""A fit as a SLURM job runs it, for ``tests/test_multinode.py`` (not collected by pytest)::

    python tests/slurm_requeue_script.py OUTDIR ROOT [--preempt-at STEP] [--ckpt PATH] [--tag NAME]

Trains ``LitTiny`` with ``LoRACallback`` for 8 steps (2 epochs of 4) with ``default_root_dir=ROOT``. The test
sets the environment of a SLURM batch job (``SLURM_JOB_ID``, ``SLURM_NTASKS``, ...) so that Lightning picks
its ``SLURMEnvironment`` with auto-requeue, and puts a fake ``scontrol`` first on ``PATH`` that records its
arguments.

``--preempt-at STEP``: after optimizer step ``STEP`` the run does what SLURM does to a pre-empted job: it
sends itself the requeue signal Lightning handles (``SIGUSR1``; Lightning then writes ``ROOT/hpc_ckpt_1.ckpt``
and calls ``scontrol requeue <job id>``), and is then killed (``SIGKILL``). Before that it records the
adapters it had at that step. Without it the run is the requeued job: Lightning finds the HPC checkpoint in
``ROOT`` and resumes from it. Records under ``OUTDIR``: ``{tag}-start.pt`` (global step and adapters when
training starts), ``{tag}-end.pt`` (after fit), ``preempted.pt`` (at the pre-emption).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

torch.set_num_threads(1)

from conftest import LitTiny, LoRACallback, pl, tiny_loader, trainer  # noqa: E402


def adapters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".lora_" in k}


class Record(pl.Callback):
    def __init__(self, out: Path, tag: str, preempt_at: int | None) -> None:
        self.out, self.tag, self.preempt_at = out, tag, preempt_at

    def on_train_start(self, trainer, pl_module) -> None:
        env = type(trainer._accelerator_connector.cluster_environment).__name__  # SingleDeviceStrategy has none
        record = {"global_step": trainer.global_step, "adapter": adapters(pl_module), "environment": env}
        torch.save(record, self.out / f"{self.tag}-start.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.preempt_at:
            return
        torch.save({"global_step": trainer.global_step, "adapter": adapters(pl_module)}, self.out / "preempted.pt")
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning signal before pre-emption / time limit
        time.sleep(1.0)  # Python runs the handler at the next bytecode; the sleep is interrupted by it
        os.kill(os.getpid(), signal.SIGKILL)  # then the job is gone

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(
            {"global_step": trainer.global_step, "adapter": adapters(pl_module)}, self.out / f"{self.tag}-end.pt"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("root", type=Path)
    parser.add_argument("--preempt-at", type=int, default=None)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--tag", default="run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = LitTiny(seed=0)
    callbacks = [
        LoRACallback(r=2, targets=["q", "v", "mlp"], verbose=False),
        Record(args.out, args.tag, args.preempt_at),
    ]
    t = trainer(args.root, callbacks, max_steps=8, max_epochs=-1)
    t.fit(model, tiny_loader(n=32, batch_size=8), ckpt_path=args.ckpt)


if __name__ == "__main__":
    main()
