"""Several named adapters trained in one ``Trainer.fit``: each batch runs through the adapter it names.

``LoRACallback(adapters=["rt", "trec"])`` wraps the module's step methods (instance attributes, like the
other hooks this layer installs, so the class is untouched and the module stays picklable):

* ``training_step``: the batch is a dict keyed by adapter names — what Lightning's ``CombinedLoader``
  yields for ``train_dataloaders={"rt": loader_a, "trec": loader_b}`` — and the step runs the module's
  own ``training_step`` once per entry with that adapter active (``use_adapter(..., trainable=True)``).
  The returned loss is the sum: the adapters' tensors are disjoint, so each gets exactly the gradient
  of its own task's loss (global-norm gradient clipping is the one thing that still couples them).
* ``validation_step`` / ``test_step`` / ``predict_step``: dataloaders given as a dict keyed by adapter
  names run each loader through its adapter (``dataloader_idx`` -> key); outside ``fit`` a single loader
  runs through the active adapter (inside ``fit`` it is refused: which adapter would it score?).
* Inside a routed step ``self.log("val_acc", ...)`` is logged as ``"<adapter>/val_acc"`` (without
  Lightning's ``/dataloader_idx_<i>`` suffix), and ``active_adapter(self)`` names the adapter, so a
  module keeps per-task state (heads, torchmetrics objects) keyed by it. One torchmetrics object logged
  for two adapters would silently accumulate both tasks' batches: that raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import lightning.pytorch as pl
import torch
from torchmetrics import Metric

from ..errors import LoRAConfigError
from ..named import use_adapter

_ROUTED = "_lora_lightning_routed_steps"
_STEPS = {"training_step": None, "validation_step": "val_dataloaders", "test_step": "test_dataloaders",
          "predict_step": "predict_dataloaders"}


class _RoutedStep:
    """Instance-level wrapper of one step method; asks the module's current ``LoRACallback`` for the
    adapters to route to (none: the original step, unchanged)."""

    def __init__(self, module: pl.LightningModule, method: str, callback_of: Callable[[pl.LightningModule], Any]) -> None:
        self.__wrapped__ = getattr(module, method)
        self.module, self.method, self.callback_of = module, method, callback_of

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        callback = self.callback_of(self.module)
        names = getattr(callback, "adapters", None)
        if not names:
            return self.__wrapped__(*args, **kwargs)
        if self.method == "training_step":
            return self._train(callback, list(names), *args, **kwargs)
        name = self._adapter_for_loader(list(names), *args, **kwargs)
        if name is None:
            return self.__wrapped__(*args, **kwargs)
        with routed(self.module, name, callback):
            return self.__wrapped__(*args, **kwargs)

    def _train(self, callback: Any, names: list[str], batch: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(batch, Mapping) or not batch or not set(batch) <= set(names):
            got = f"a dict with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else type(batch).__name__
            raise LoRAConfigError(
                f"LoRACallback(adapters={names}) routes each training batch by adapter name but got {got}: pass "
                f"trainer.fit(model, train_dataloaders={{{', '.join(repr(n) + ': loader' for n in names)}}}) "
                "(a dict of dataloaders, combined by Lightning's CombinedLoader)"
            )
        losses: list[torch.Tensor] = []
        outputs: dict[str, Any] = {}
        for name in names:
            if batch.get(name) is None:  # CombinedLoader(mode="max_size"): this loader is exhausted
                continue
            with routed(self.module, name, callback):
                out = self.__wrapped__(batch[name], *args, **kwargs)
            outputs[name] = out
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if isinstance(loss, torch.Tensor):
                losses.append(loss)
        if not self.module.automatic_optimization:
            return None
        if not losses:
            return None
        total = torch.stack(losses).sum() if len(losses) > 1 else losses[0]
        return {"loss": total, **{f"{n}/output": o for n, o in outputs.items()}}

    def _adapter_for_loader(self, names: list[str], *args: Any, **kwargs: Any) -> str | None:
        trainer = self.module._trainer
        loaders = getattr(trainer, _STEPS[self.method], None) if trainer is not None else None
        if not isinstance(loaders, Mapping):
            if trainer is not None and trainer.state.fn == "fit":
                raise LoRAConfigError(
                    f"LoRACallback(adapters={names}) validates each adapter on its own data but got one validation "
                    f"dataloader: pass val_dataloaders={{{', '.join(repr(n) + ': loader' for n in names)}}}"
                )
            return None  # validate/test/predict after fitting: the active adapter
        keys = list(loaders)
        unknown = [k for k in keys if k not in names]
        if unknown:
            raise LoRAConfigError(
                f"{self.method}: dataloader keys {unknown} are not adapters of LoRACallback(adapters={names}); key "
                "each dataloader by the adapter that should run it"
            )
        idx = kwargs.get("dataloader_idx", args[2] if len(args) > 2 else 0)
        return keys[idx]


@contextmanager
def routed(module: pl.LightningModule, name: str, callback: Any) -> Iterator[None]:
    """Run the block with adapter ``name`` active (every adapter keeps its ``requires_grad``) and the
    module's ``log`` prefixing ``"<name>/"``."""
    original = module.__dict__.get("log")
    log = module.log

    def prefixed(key: str, value: Any, *args: Any, **kwargs: Any) -> None:
        callback.check_metric_owner(value, name, key)
        kwargs["add_dataloader_idx"] = False
        log(f"{name}/{key}", value, *args, **kwargs)

    object.__setattr__(module, "log", prefixed)
    try:
        with use_adapter(module, name, trainable=True):
            yield
    finally:
        if original is None:
            module.__dict__.pop("log", None)
        else:
            object.__setattr__(module, "log", original)


class MetricOwners:
    """Which adapter each logged torchmetrics object belongs to (one fit)."""

    def __init__(self) -> None:
        self.owner: dict[int, tuple[str, str]] = {}

    def check(self, value: Any, name: str, key: str) -> None:
        if not isinstance(value, Metric):
            return
        seen = self.owner.setdefault(id(value), (name, key))
        if seen[0] != name:
            raise LoRAConfigError(
                f"one torchmetrics object is logged as {seen[0]}/{seen[1]} and {name}/{key}: it accumulates both "
                "adapters' batches, so both values would be wrong. Keep one metric per adapter, e.g. "
                "self.metrics[active_adapter(self)] with a ModuleDict keyed by adapter name"
            )


def route_steps(module: pl.LightningModule, callback_of: Callable[[pl.LightningModule], Any]) -> None:
    """Install the routing wrappers on ``module`` once (idempotent)."""
    if getattr(module, _ROUTED, False):
        return
    object.__setattr__(module, _ROUTED, True)
    for method in _STEPS:
        if callable(getattr(module, method, None)):
            object.__setattr__(module, method, _RoutedStep(module, method, callback_of))


def check_adapter_names(names: Sequence[str] | Mapping[str, Any] | None) -> list[str] | None:
    if names is None:
        return None
    listed = list(names)
    if len(listed) < 2 or len(set(listed)) != len(listed) or not all(isinstance(n, str) and n and "." not in n and "/" not in n for n in listed):
        raise LoRAConfigError(
            f"adapters={listed!r}: give two or more distinct names without '.' or '/' (one adapter: leave adapters unset)"
        )
    return listed


__all__ = ["routed", "route_steps", "MetricOwners", "check_adapter_names"]
