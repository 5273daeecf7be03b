"""Several named adapters in one ``Trainer`` run: each batch runs through the adapter it names.

The module's step methods are wrapped once, for that instance only (through its
:class:`~lora_lightning.state.LoRAHandle`, so the class is untouched and the module stays picklable):

* ``training_step`` (with ``LoRACallback(adapters=["rt", "trec"])``): the batch is a dict keyed by adapter
  names — what Lightning's ``CombinedLoader`` yields for ``train_dataloaders={"rt": loader_a, "trec":
  loader_b}`` — and the step runs the module's own ``training_step`` once per entry with that adapter active
  (``use_adapter(..., trainable=True)``). The returned loss is the sum: the adapters' tensors are disjoint, so
  each gets exactly the gradient of its own task's loss; gradient clipping by norm is applied per adapter
  (:func:`clip_per_adapter`), so each adapter trains exactly as it would alone.
* ``validation_step`` / ``test_step`` / ``predict_step``: dataloaders given as a dict keyed by adapter names
  run each loader through its adapter (``dataloader_idx`` -> key) — during the fit, and afterwards with or
  without the callback (a module loaded from a multi-adapter checkpoint routes the same way). Inside a fit
  with ``adapters=[...]`` a single loader is refused (which adapter would it score?).
* Inside a routed step ``self.log("val_acc", ...)`` is logged as ``"<adapter>/val_acc"`` (without Lightning's
  ``/dataloader_idx_<i>`` suffix), and ``active_adapter(self)`` names the adapter, so a module keeps per-task
  state (heads, torchmetrics objects) keyed by it. One torchmetrics object logged for two adapters would
  silently accumulate both tasks' batches: that raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from ..errors import LoRAConfigError, NonFiniteError
from ..named import adapter_tensors, has_named_adapters, list_adapters, use_adapter
from ..state import attach, lora_handle
from .compat import lora_callback, trainer_of

_STEPS = {
    "training_step": None,
    "validation_step": "val_dataloaders",
    "test_step": "test_dataloaders",
    "predict_step": "predict_dataloaders",
}


class MetricOwners:
    """Which adapter each logged torchmetrics object belongs to (one run)."""

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


class _RoutedStep:
    """Instance-level wrapper of one step method: routes by adapter name when the run trains several adapters
    (``LoRACallback(adapters=...)``) or the module holds several and is given dict dataloaders keyed by them;
    otherwise the original step, unchanged."""

    def __init__(self, module: nn.Module, method: str, original: Any, owners: MetricOwners) -> None:
        self.__wrapped__ = original
        self.module, self.method, self.owners = module, method, owners

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        callback = lora_callback(trainer_of(self.module))
        training = list(getattr(callback, "adapters", None) or [])
        if self.method == "training_step":
            return self._train(callback, training, *args, **kwargs) if training else self.__wrapped__(*args, **kwargs)
        name = self._adapter_for_loader(training, *args, **kwargs)
        if name is None:
            return self.__wrapped__(*args, **kwargs)
        with routed(self.module, name, self.owners):
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
            with routed(self.module, name, self.owners):
                out = self.__wrapped__(batch[name], *args, **kwargs)
            outputs[name] = out
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if isinstance(loss, torch.Tensor):
                if getattr(callback, "check_finite", False) and not bool(torch.isfinite(loss.detach()).all()):
                    trainer = trainer_of(self.module)
                    raise NonFiniteError(
                        f"the training loss of adapter {name!r} is {loss.detach().float().mean().item()} at global "
                        f"step {getattr(trainer, 'global_step', '?')}; stopped before backward, so every adapter and "
                        "every checkpoint saved so far is finite. Lower the learning rate, clip gradients or check "
                        "that adapter's data; LoRACallback(check_finite=False) turns this check off"
                    )
                losses.append(loss)
        if not self.module.automatic_optimization:
            return None
        if not losses:
            return None
        total = torch.stack(losses).sum() if len(losses) > 1 else losses[0]
        return {"loss": total, **{f"{n}/output": o for n, o in outputs.items()}}

    def _adapter_for_loader(self, training: list[str], *args: Any, **kwargs: Any) -> str | None:
        trainer = trainer_of(self.module)
        loaders = getattr(trainer, _STEPS[self.method], None) if trainer is not None else None
        if not isinstance(loaders, Mapping):
            if training and trainer is not None and trainer.state.fn == "fit":
                raise LoRAConfigError(
                    f"LoRACallback(adapters={training}) validates each adapter on its own data but got one validation "
                    f"dataloader: pass val_dataloaders={{{', '.join(repr(n) + ': loader' for n in training)}}}"
                )
            return None  # one loader: the active adapter
        keys = list(loaders)
        names = training or (list_adapters(self.module) if has_named_adapters(self.module) else [])
        unknown = [k for k in keys if k not in names]
        if unknown:
            if training:
                raise LoRAConfigError(
                    f"{self.method}: dataloader keys {unknown} are not adapters of LoRACallback(adapters={training}); "
                    "key each dataloader by the adapter that should run it"
                )
            if len(unknown) < len(keys):  # some keys name adapters, others do not: which adapter scores those?
                raise LoRAConfigError(
                    f"{self.method}: dataloader keys {keys} name adapters {[k for k in keys if k in names]} and also "
                    f"{unknown}, which are not adapters of the model ({names}); key every loader by an adapter name, "
                    "or none of them (the active adapter then runs all)"
                )
            return None  # a dict of loaders unrelated to adapters: the active adapter
        idx = kwargs.get("dataloader_idx", args[2] if len(args) > 2 else 0)
        return keys[idx]


@contextmanager
def routed(module: nn.Module, name: str, owners: MetricOwners) -> Iterator[None]:
    """Run the block with adapter ``name`` active (every adapter keeps its ``requires_grad``) and the
    module's ``log`` prefixing ``"<name>/"``."""
    original = module.__dict__.get("log")
    log = module.log

    def prefixed(key: str, value: Any, *args: Any, **kwargs: Any) -> None:
        owners.check(value, name, key)
        kwargs["add_dataloader_idx"] = False
        log(f"{name}/{key}", value, *args, **kwargs)

    module.__dict__["log"] = prefixed  # for the block only
    try:
        with use_adapter(module, name, trainable=True):
            yield
    finally:
        if original is None:
            module.__dict__.pop("log", None)
        else:
            module.__dict__["log"] = original


def route_steps(module: nn.Module, force: bool = False) -> None:
    """Wrap ``module``'s step methods for routing (once; recorded in its handle) when it holds several named
    adapters, or ``force`` (a ``LoRACallback(adapters=...)`` run). A repeated call starts a new metric record."""
    handle = lora_handle(module)
    routed_already = handle is not None and "training_step" in handle.wrapped
    if not routed_already and not (force or has_named_adapters(module)):
        return
    handle = attach(module)
    if routed_already:
        owners = getattr(module.__dict__.get("training_step"), "owners", None)
        if isinstance(owners, MetricOwners):
            owners.owner.clear()
        return
    owners = MetricOwners()
    for method in _STEPS:
        if callable(getattr(module, method, None)):
            handle.wrap_method(module, method, lambda original, m=method: _RoutedStep(module, m, original, owners))


def clip_per_adapter(module: nn.Module, names: Sequence[str], max_norm: float, norm_type: float = 2.0) -> None:
    """Clip the gradient of each adapter to ``max_norm`` on its own (``torch.nn.utils.clip_grad_norm_`` per
    adapter), and every other trainable parameter as one more group: with several adapters in one fit, each is
    then clipped exactly as when it is trained alone."""
    seen: set[int] = set()
    for name in names:
        params = [p for p in adapter_tensors(module, name) if p.grad is not None]
        seen.update(id(p) for p in adapter_tensors(module, name))
        if params:
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
    rest = [p for p in module.parameters() if p.grad is not None and id(p) not in seen]
    if rest:
        torch.nn.utils.clip_grad_norm_(rest, max_norm, norm_type=norm_type)


def check_adapter_names(names: Sequence[str] | Mapping[str, Any] | None) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        raise LoRAConfigError(
            f"adapters={names!r}: give a list of two or more names, e.g. ['a', 'b'] (a string is one name)"
        )
    listed = list(names)
    if (
        len(listed) < 2
        or len(set(listed)) != len(listed)
        or not all(isinstance(n, str) and n and "." not in n and "/" not in n for n in listed)
    ):
        raise LoRAConfigError(
            f"adapters={listed!r}: give two or more distinct names without '.' or '/' (one adapter: leave adapters "
            "unset)"
        )
    return listed


__all__ = ["MetricOwners", "check_adapter_names", "clip_per_adapter", "route_steps", "routed"]
