"""Two task adapters trained in one ``Trainer.fit`` vs each trained alone.

The embedded model (all-MiniLM-L6-v2) with one classification head of 6 outputs; a task reads the
first ``num_labels`` logits (Rotten Tomatoes: 2, TREC: 6), so the same network serves both tasks and
both protocols. The recipe is the main job's LoRA recipe (q,k,v,o, r=8, alpha=16, dropout 0.1, AdamW
lr 2e-3, 6% warmup then linear decay, 3 epochs, batch 32, max_length 64); the data are the app's
``conf/data`` splits (3,000 training texts per task, the fixed split, batch order from the seed).

* ``together``: ``LoRACallback(adapters=["rotten_tomatoes", "trec"])``, ``train_dataloaders`` a dict of
  both tasks (94 batches each per epoch, so both adapters get the same 282 steps as alone).
* ``alone``: ``LoRACallback()`` on one task.

Each run is scored on its task's test split with the weights at the end of training (no checkpoint
selection, same protocol for both). Run by hand (about an hour on two cores)::

    python -m experiments two-tasks run --seeds 0 1 2 --jobs 2
    python -m experiments two-tasks report     # -> experiments/results/two_tasks.md
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results" / "two_tasks"
TASKS = {"rotten_tomatoes": 2, "trec": 6}
RECIPE = dict(r=8, alpha=16, dropout=0.1, targets=["q", "k", "v", "o"])
LR, EPOCHS = 2e-3, 3


def datamodule(task: str, seed: int) -> Any:
    cfg = OmegaConf.load(ROOT / "conf" / "data" / f"{task}.yaml")
    cfg.tokenizer, cfg.shuffle_seed = "default", seed
    dm = instantiate(cfg, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


def multitask_module(tasks: list[str]) -> Any:
    from lora_lightning import active_adapter
    from lora_lightning.app.models import SequenceClassifier

    class MultiTaskClassifier(SequenceClassifier):
        """One 6-way head; the step's task is the active adapter (or the only task)."""

        def __init__(self) -> None:
            super().__init__("default", num_labels=max(TASKS.values()), lr=LR)
            self.tasks = tasks
            self.task_acc = nn.ModuleDict(
                {
                    f"{s}_{t}": MulticlassAccuracy(num_classes=TASKS[t], average="micro")
                    for t in tasks
                    for s in ("val", "test")
                }
            )

        def task(self) -> str:
            return self.tasks[0] if len(self.tasks) == 1 else active_adapter(self)

        def _task_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
            task = self.task()
            logits = self(**{k: v for k, v in batch.items() if k != "labels"})[:, : TASKS[task]]
            loss = F.cross_entropy(logits, batch["labels"])
            self.log(f"{stage}_loss", loss, on_step=stage == "train", on_epoch=True, batch_size=len(logits))
            if stage != "train":
                acc = self.task_acc[f"{stage}_{task}"]
                acc.update(logits, batch["labels"])
                self.log(f"{stage}_acc", acc, on_epoch=True, batch_size=len(logits))
            return loss

        def training_step(self, batch, batch_idx):
            return self._task_step(batch, "train")

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            return self._task_step(batch, "val")

        def test_step(self, batch, batch_idx, dataloader_idx=0):
            return self._task_step(batch, "test")

    return MultiTaskClassifier()


def run_one(
    mode: str, tasks: list[str], seed: int, threads: int, smoke: bool = False, results: Path = RESULTS
) -> dict[str, Any]:
    """One run; ``smoke``: 2 training batches, 1 evaluation batch, 1 epoch (the CI check)."""
    import lightning.pytorch as pl

    from lora_lightning import LoRACallback, count_parameters

    torch.set_num_threads(threads)
    pl.seed_everything(seed, workers=True, verbose=False)
    dms = {t: datamodule(t, seed) for t in tasks}
    model = multitask_module(tasks)
    head = sorted({n.rpartition(".")[0] for n in model.head_parameter_names})
    out = results / f"{mode}-{'+'.join(tasks)}-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = dict(RECIPE, modules_to_save=head, init_seed=seed)
    if mode == "together":
        callback = LoRACallback(**options, adapters=tasks, export_adapter=str(out / "{name}.safetensors"))
    else:
        callback = LoRACallback(**options, export_adapter=str(out / f"{tasks[0]}.safetensors"))
    limits = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1) if smoke else {}
    trainer = pl.Trainer(
        **({"max_epochs": EPOCHS} | limits),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    pick = (
        (lambda f: {t: getattr(dms[t], f)() for t in tasks})
        if mode == "together"
        else (lambda f: getattr(dms[tasks[0]], f)())
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=pick("train_dataloader"), val_dataloaders=pick("val_dataloader"))
    fit_seconds = time.perf_counter() - start
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if "val_acc" in k}
    tested = trainer.test(model, dataloaders=pick("test_dataloader"), verbose=False)
    test = {k: float(v) for per_loader in tested for k, v in per_loader.items() if "test_acc" in k}
    key = (lambda t, m: f"{t}/{m}") if mode == "together" else (lambda t, m: m)
    row = {
        "mode": mode,
        "seed": seed,
        "tasks": tasks,
        "steps": trainer.global_step,
        "fit_seconds": round(fit_seconds, 1),
        "threads": threads,
        "trainable": count_parameters(model).trainable,
        "test_acc": {t: test[key(t, "test_acc")] for t in tasks},
        "val_acc": {t: val[key(t, "val_acc")] for t in tasks},
    }
    (out / "summary.json").write_text(json.dumps(row, indent=2))
    return row


def planned(seeds: list[int]) -> list[tuple[str, list[str], int]]:
    jobs = []
    for seed in seeds:
        jobs.append(("together", list(TASKS), seed))
        jobs += [("alone", [t], seed) for t in TASKS]
    return jobs


def run_all(seeds: list[int], jobs: int) -> None:
    """Each run in its own process (one thread each), ``jobs`` at a time; finished runs are skipped."""
    todo = [j for j in planned(seeds) if not (RESULTS / f"{j[0]}-{'+'.join(j[1])}-{j[2]}" / "summary.json").exists()]

    def launch(job: tuple[str, list[str], int]) -> int:
        mode, tasks, seed = job
        cmd = [sys.executable, "-m", "experiments", "two-tasks", "one", mode, ",".join(tasks), str(seed)]
        log = RESULTS / f"{mode}-{'+'.join(tasks)}-{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as fh:
            return subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)

    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(launch, todo))
    if any(codes):
        raise SystemExit(f"{sum(map(bool, codes))} run(s) failed; see {RESULTS}/*.log")


def report(results: Path = RESULTS, out: Path = RESULTS.parent / "two_tasks.md") -> str:
    from experiments.stats import MARGIN, Stat, tost, welch  # noqa: PLC0415 (scipy: only the report needs it)

    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*/summary.json"))]
    lines = [
        "# Two task adapters in one fit vs each alone",
        "",
        "Generated by `python -m experiments two-tasks report` from experiments/results/two_tasks/*/summary.json.",
        "Test accuracy (%) of the weights at the end of training, mean ± sample std over seeds; Welch's t-test of",
        f"together - alone, and TOST equivalence within ±{MARGIN} points (p < 0.05: equivalent).",
        "",
        "| task | alone | together | together - alone (95% CI) | Welch p | TOST p | paired diffs per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        alone = {r["seed"]: r["test_acc"][task] for r in rows if r["mode"] == "alone" and r["tasks"] == [task]}
        both = {r["seed"]: r["test_acc"][task] for r in rows if r["mode"] == "together"}
        a, b = Stat.of(alone.values()), Stat.of(both.values())
        w = welch(b, a)
        paired = ", ".join(f"{100 * (both[s] - alone[s]):+.2f}" for s in sorted(set(alone) & set(both)))
        lines.append(
            f"| {task} | {a.mean:.2f} ± {a.std:.2f} (n={a.n}) | {b.mean:.2f} ± {b.std:.2f} (n={b.n}) | "
            f"{w.diff:+.2f} ({w.ci[0]:+.2f}, {w.ci[1]:+.2f}) | {w.p:.2f} | {tost(w, MARGIN):.3f} | {paired} |"
        )
    secs = {m: [r["fit_seconds"] for r in rows if r["mode"] == m] for m in ("alone", "together")}
    if secs["alone"] and secs["together"]:
        lines += [
            "",
            f"Fit time (one thread per run, two runs at a time): alone {sum(secs['alone']) / len(secs['alone']):.0f} "
            f"s per task, together {sum(secs['together']) / len(secs['together']):.0f} s for both tasks.",
        ]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text
