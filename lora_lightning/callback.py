"""``LoRACallback``: LoRA for any LightningModule, as a Trainer callback.

Timing (``Trainer._run``): ``setup`` hooks -> ``configure_model`` -> checkpoint restore ->
``strategy.setup`` (optimizers built, DDP/FSDP wrap) -> ``on_fit_start``. The callback injects
in ``setup`` — or right after ``configure_model`` when the module builds its layers there — so
the optimizer only ever sees the adapter parameters and DDP wraps the adapted model.
Injecting in ``on_fit_start`` would be too late.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

from .checkpoint import check_config_compatible, load_adapter, save_adapter, save_merged_model
from .config import LoRAConfig
from .errors import LoRAConfigError, NonFiniteError
from .fingerprint import ON_MISMATCH
from .injection import count_parameters, get_lora_state, has_lora, inject_lora
from .lightning_io import AtomicCheckpointIO, filter_to_adapter, lora_checkpoint_info, refill_base_weights
from .merging import merge_lora

_PATCHED = "_lora_lightning_patched"


class _RunAfter:
    """Instance-level hook wrapper: runs the module's original hook, then ``after``.

    A class rather than a closure so the patched module stays picklable; ``__wrapped__`` keeps
    Lightning's ``is_overridden`` answering as for the original hook.
    """

    def __init__(self, original: Callable[..., Any], after: Callable[..., None]) -> None:
        self.__wrapped__ = original
        self.after = after

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.__wrapped__(*args, **kwargs)
        self.after(*args, **kwargs)
        return result


def _wrap_after(module: pl.LightningModule, hook: str, after: Callable[..., None]) -> None:
    object.__setattr__(module, hook, _RunAfter(getattr(module, hook), after))


class LoRACallback(Callback):
    """Inject rank-r adapters ``W0 + (alpha/r)·B·A`` when fitting is set up, train only them,
    and keep Lightning checkpoints adapter-only.

    LoRA options are those of :class:`~lora_lightning.LoRAConfig`, given as a config object/dict
    or as keyword arguments (convenient from YAML / ``LightningCLI``). Other options:

    Args:
        adapter_only_checkpoints: checkpoints hold only adapter tensors (+ ``modules_to_save``)
            and the LoRA config; resuming refills the base weights from the model itself.
        atomic_checkpoints: replace the default checkpoint writer by :class:`AtomicCheckpointIO`.
        init_adapter: ``.safetensors`` adapter loaded right after injection (warm start / eval).
        merge_on_fit_end: fold the adapters into the base weights when ``fit`` ends.
        export_adapter: write the adapter to this ``.safetensors`` path when ``fit`` ends.
        export_merged: write the merged full model to this ``.safetensors`` path when ``fit`` ends.
        export_module: attribute path of the network inside the LightningModule (e.g. ``"model"``):
            the merged export is keyed relative to it, loadable by the bare network.
        on_base_mismatch: ``raise`` | ``warn`` | ``ignore`` when a loaded adapter/checkpoint was
            trained on other base weights.
        check_finite: raise :class:`~lora_lightning.NonFiniteError` naming the step as soon as the
            training loss (before ``backward``, so the adapters stay finite) or a trainable parameter
            (after the optimizer step, before any checkpoint callback runs) is NaN/inf. Lightning's
            ``detect_anomaly`` finds the op that made a NaN but is slow and checks no parameters;
            ``EarlyStopping(check_finite=True)`` only looks at a validation metric, after
            ``ModelCheckpoint`` may already have saved NaN adapters. Costs one scalar device sync
            per step (plus one all-reduce under DDP/FSDP so every rank stops together).
    """

    def __init__(
        self,
        config: LoRAConfig | Mapping[str, Any] | None = None,
        *,
        r: int | None = None,
        alpha: float | None = None,
        dropout: float | None = None,
        targets: list[str] | None = None,
        layers: list[int] | None = None,
        bias: str | None = None,
        modules_to_save: list[str] | None = None,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        use_rslora: bool | None = None,
        init: str | None = None,
        adapter_dtype: str | None = None,
        variant: str | None = None,
        adapter_only_checkpoints: bool = True,
        atomic_checkpoints: bool = True,
        init_adapter: str | None = None,
        merge_on_fit_end: bool = False,
        export_adapter: str | None = None,
        export_merged: str | None = None,
        export_module: str = "",
        on_base_mismatch: str = "raise",
        check_finite: bool = True,
        verbose: bool = True,
    ) -> None:
        if on_base_mismatch not in ON_MISMATCH:
            raise LoRAConfigError(f"on_base_mismatch={on_base_mismatch!r} must be one of {ON_MISMATCH}")
        overrides = {
            k: v
            for k, v in dict(
                r=r, alpha=alpha, dropout=dropout, targets=targets, layers=layers, bias=bias,
                modules_to_save=modules_to_save, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                use_rslora=use_rslora, init=init, adapter_dtype=adapter_dtype, variant=variant,
            ).items()
            if v is not None
        }
        base = config.to_dict() if isinstance(config, LoRAConfig) else dict(config or {})
        self.config = LoRAConfig.from_dict(base | overrides)
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self.atomic_checkpoints = atomic_checkpoints
        self.init_adapter = init_adapter
        self.merge_on_fit_end = merge_on_fit_end
        self.export_adapter = export_adapter
        self.export_merged = export_merged
        self.export_module = export_module
        self.on_base_mismatch = on_base_mismatch
        self.check_finite = check_finite
        self.verbose = verbose
        self._trainable: list[tuple[str, torch.Tensor]] = []
        self._batch_idx = 0
        self.variant_hooks: Any = None  # AdaLoRA's pruning schedule (lora_lightning.adalora), else None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.atomic_checkpoints and type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if getattr(pl_module, _PATCHED, False):
            return
        object.__setattr__(pl_module, _PATCHED, True)
        if self.adapter_only_checkpoints:
            _wrap_after(pl_module, "on_save_checkpoint", functools.partial(filter_to_adapter, model=pl_module))
        _wrap_after(
            pl_module,
            "on_load_checkpoint",
            functools.partial(refill_base_weights, model=pl_module, on_base_mismatch=self.on_base_mismatch),
        )
        if is_overridden("configure_model", pl_module):
            # the layers may not exist yet: inject right after configure_model (still before the optimizer)
            _wrap_after(pl_module, "configure_model", functools.partial(self._inject, pl_module))
        else:
            self._inject(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainable = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        from .adalora import variant_hooks

        self.variant_hooks = variant_hooks(trainer, pl_module, self.config)
        counts = count_parameters(pl_module)
        params = {"lora": self.config.to_dict(), **counts.as_dict()}
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
        if self.verbose:
            state = get_lora_state(pl_module)
            rank_zero_info(
                f"LoRA: {len(state.adapted)} matrices adapted (targets={self.config.targets}, r={self.config.r}, "
                f"alpha={self.config.alpha:g}); trainable {counts.trainable:,} of {counts.total:,} parameters "
                f"({100 * counts.trainable_fraction:.3f}%)"
            )

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.variant_hooks is not None:  # AdaLoRA: add the orthogonality penalty's gradient
            self.variant_hooks.on_before_optimizer_step(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not self.check_finite:
            return
        local_ok = bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(local_ok, all=True):
            value = f"{loss.detach().float().mean().item()}" if not local_ok else "non-finite on another rank"
            raise NonFiniteError(
                f"the training loss is {value} at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                f"batch {self._batch_idx}); stopped before backward, so the adapters and every checkpoint saved so "
                "far are finite. Lower the learning rate, clip gradients (Trainer(gradient_clip_val=...)) or check the "
                "data/loss for inf and NaN; LoRACallback(check_finite=False) turns this check off"
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # runs before ModelCheckpoint's hook (Lightning moves checkpoint callbacks last)
        if self.variant_hooks is not None:  # AdaLoRA: importance update + pruning after the optimizer step
            self.variant_hooks.on_train_batch_end(trainer, pl_module)
        if not self.check_finite or not self._trainable:
            return
        flags = torch.stack([torch.isfinite(p.detach()).all() for _, p in self._trainable])
        local_ok = bool(flags.all())
        if not trainer.strategy.reduce_boolean_decision(local_ok, all=True):
            bad = [n for (n, _), ok in zip(self._trainable, flags.tolist()) if not ok]
            where = f"{len(bad)} tensor(s), e.g. {bad[:3]}" if bad else "a tensor on another rank"
            raise NonFiniteError(
                f"trainable parameters became NaN/inf after global step {trainer.global_step} (epoch "
                f"{trainer.current_epoch}, batch {batch_idx}): {where}, although the loss was finite (an exploding "
                "update, or a NaN gradient from e.g. sqrt/log/division at 0 in the loss). Stopped before this step was "
                "checkpointed. Lower the learning rate or clip gradients (Trainer(gradient_clip_val=...)); "
                "Trainer(detect_anomaly=True) finds the op that made a NaN gradient; "
                "LoRACallback(check_finite=False) turns this check off"
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.variant_hooks is not None:  # AdaLoRA: log and keep the final rank per layer
            self.variant_hooks.on_fit_end(trainer, pl_module)
        if self.export_adapter and trainer.is_global_zero:
            save_adapter(pl_module, Path(self.export_adapter))
        if self.merge_on_fit_end:
            merge_lora(pl_module)
        if self.export_merged and trainer.is_global_zero:
            save_merged_model(pl_module, Path(self.export_merged), submodule=self.export_module)
        trainer.strategy.barrier("lora_fit_end")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = LoRAConfig.from_dict(state_dict["config"])
        check_config_compatible(saved, self.config, source="checkpoint")

    # ---------------------------------------------------------------- helpers
    def _inject(self, pl_module: pl.LightningModule) -> None:
        if has_lora(pl_module):
            # re-entry (fit then test, or configure_model called again): the adapters are already there
            check_config_compatible(get_lora_state(pl_module).config, self.config, source="model")
            return
        inject_lora(pl_module, self.config)
        if self.init_adapter:
            load_adapter(pl_module, self.init_adapter, on_base_mismatch=self.on_base_mismatch)

    def lora_info(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The LoRA record stored in checkpoints (config, adapted modules, fingerprint)."""
        return lora_checkpoint_info(pl_module)
