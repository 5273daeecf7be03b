"""Four places where Lightning puts weights into a module without any hook a callback could use,
wrapped so that the trained adapters are never silently lost:

1. ``MyModule.load_from_checkpoint(path)`` builds a fresh module and loads ``state_dict`` into it
   (``lightning.pytorch.core.saving._load_state``). For a checkpoint with a LoRA record, the module's
   ``on_load_checkpoint`` is followed, during that call, by
   :func:`~lora_lightning.lightning.checkpoints.prepare_for_checkpoint`: the adapters are injected from
   the record, the fingerprint checked and the base tensors taken from the module's own construction.
2. ``trainer.validate/test/predict/fit(model, ckpt_path=...)`` with no ``LoRACallback`` attached
   (``_CheckpointConnector.restore_model``): the same preparation.
3. ``strategy="ddp_spawn"``: the main process reloads the workers' weights with ``strict=False``
   (``_MultiProcessingLauncher._recover_results_in_main_process``), which drops adapter keys its module
   lacks. The main process gets the ``LoRACallback``'s adapters first (merged if the workers merged).
4. ``ModelParallelStrategy.load_checkpoint`` (FSDP2) asks an adapter-only checkpoint for every base
   tensor; for a module with adapters :func:`~lora_lightning.lightning.sharded.load_model_parallel_checkpoint`
   loads what the checkpoint holds, after checking it.

:func:`install` runs once, when ``lora_lightning.lightning`` is imported; ``import lora_lightning``
imports it as soon as Lightning itself is imported (before or after). Each wrapper calls the
original; ``lightning>=2.4,<2.7`` is what the tests cover.
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.core import saving
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.utilities import rank_zero_warn

from ..errors import TargetNotFoundError
from ..injection import has_lora, lora_layers
from .callback import LoRACallback
from .checkpoints import (
    CHECKPOINT_KEY,
    CheckpointOptions,
    _OPTIONS,
    ensure_checkpoint_hooks,
    prepare_for_checkpoint,
    set_checkpoint_options,
)
from .sharded import load_model_parallel_checkpoint

_FROM_CHECKPOINT_HINT = "load it with lora_lightning.load_lora_checkpoint(MyModule, path, on_base_mismatch='warn')"
_load_options: contextvars.ContextVar[CheckpointOptions] = contextvars.ContextVar(
    "lora_load_options", default=CheckpointOptions(override_hint=_FROM_CHECKPOINT_HINT)
)
_PATCHED = "_lora_lightning_original"


def load_lora_checkpoint(cls: type[LightningModule], checkpoint_path: Any, *, on_base_mismatch: str = "raise", **kwargs: Any) -> LightningModule:
    """``cls.load_from_checkpoint(checkpoint_path, **kwargs)`` with a chosen ``on_base_mismatch``
    (``raise`` | ``warn`` | ``ignore``) for a LoRA checkpoint trained on other base weights."""
    token = _load_options.set(CheckpointOptions(on_base_mismatch=on_base_mismatch, override_hint=_FROM_CHECKPOINT_HINT))
    try:
        return cls.load_from_checkpoint(checkpoint_path, **kwargs)
    finally:
        _load_options.reset(token)


def _load_state(cls: Any, checkpoint: dict[str, Any], strict: bool | None = None, **kwargs: Any) -> Any:
    original = getattr(_load_state, _PATCHED)
    if CHECKPOINT_KEY not in checkpoint or not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        return original(cls, checkpoint, strict=strict, **kwargs)
    own = cls.__dict__.get("on_load_checkpoint")
    user_hook = cls.on_load_checkpoint

    def on_load_checkpoint(self: LightningModule, ckpt: dict[str, Any]) -> None:
        user_hook(self, ckpt)
        if getattr(self, _OPTIONS, None) is None:
            set_checkpoint_options(self, _load_options.get())
        prepare_for_checkpoint(self, ckpt)

    cls.on_load_checkpoint = on_load_checkpoint  # for this call only: the instance does not exist yet
    try:
        return original(cls, checkpoint, strict=strict, **kwargs)
    finally:
        if own is None:
            del cls.on_load_checkpoint
        else:
            cls.on_load_checkpoint = own


def _restore_model(self: _CheckpointConnector) -> None:
    checkpoint, module = self._loaded_checkpoint, self.trainer.lightning_module
    if checkpoint and module is not None and (CHECKPOINT_KEY in checkpoint or has_lora(module)):
        ensure_checkpoint_hooks(module)  # a no-op when a LoRACallback set the module up
    return getattr(_restore_model, _PATCHED)(self)


def _recover_results_in_main_process(self: _MultiProcessingLauncher, worker_output: Any, trainer: Any) -> None:
    callback = next((c for c in trainer.callbacks if isinstance(c, LoRACallback)), None)
    module = trainer.lightning_module
    fitted = worker_output.weights_path is not None
    if callback is not None and fitted:
        callback._attach(module)  # later checkpoints of the main process stay adapter-only
        try:
            callback._prepare(module, "fit")  # the adapters the workers trained, so strict=False keeps their keys
        except TargetNotFoundError:  # layers built in configure_model, which never ran here
            callback = None
            rank_zero_warn(
                "ddp_spawn: the main process's module has no layers to adapt (built in configure_model?), so it "
                "keeps its untrained state, as Lightning does; load the exported adapter or the checkpoint instead"
            )
    getattr(_recover_results_in_main_process, _PATCHED)(self, worker_output, trainer)
    if callback is not None and fitted:
        for layer in lora_layers(module).values():  # the workers' weights came merged iff they merged at fit end
            layer.merged = callback.merge_on_fit_end


def _load_model_parallel_checkpoint(self: ModelParallelStrategy, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
    module = self.lightning_module
    if module is None or not has_lora(module):
        return getattr(_load_model_parallel_checkpoint, _PATCHED)(self, checkpoint_path, weights_only)
    return load_model_parallel_checkpoint(self, Path(self.broadcast(checkpoint_path)), weights_only)


def _wrap(owner: Any, name: str, wrapper: Any) -> None:
    current = getattr(owner, name)
    if getattr(current, _PATCHED, None) is not None:
        return  # already installed
    setattr(wrapper, _PATCHED, current)
    setattr(owner, name, wrapper)


def install() -> None:
    """Install the four wrappers (idempotent)."""
    _wrap(saving, "_load_state", _load_state)
    _wrap(_CheckpointConnector, "restore_model", _restore_model)
    _wrap(_MultiProcessingLauncher, "_recover_results_in_main_process", _recover_results_in_main_process)
    _wrap(ModelParallelStrategy, "load_checkpoint", _load_model_parallel_checkpoint)
