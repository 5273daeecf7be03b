"""``LoRACallback``: LoRA for any LightningModule, as a Trainer callback — written once, for both Lightning
packages (``lightning.pytorch`` and ``pytorch_lightning``: :mod:`lora_lightning.lightning` and
:mod:`lora_lightning.pytorch_lightning` each make the class from :class:`CallbackImpl` and their
package's ``Callback``).

Timing (``Trainer._run``): ``setup`` hooks -> ``configure_model`` -> checkpoint restore ->
``strategy.setup`` (precision cast, optimizers built, DDP wrap) -> ``on_fit_start`` -> restore of the
optimizer states. The callback injects in ``setup`` — or right after ``configure_model`` when the module
builds its layers there — so a restored checkpoint finds the adapters, the optimizer only ever sees the
adapter parameters and DDP wraps the adapted model. LoRA+ splits the optimizer's groups in
``on_fit_start``, before a resumed run restores the optimizer states into them.

A module may meet several fits, callbacks and checkpoints (fit then test, a second fit, a new
callback on the same module). The callback looks at what the module holds: adapters of the same
structure are reused (unmerged for training if they were merged), other adapters are an error
before anything runs (or replaced with ``replace_existing=True``), and ``init_adapter`` is applied
once per module.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
import weakref
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import registry
from ..adapter_io import check_output_path, load_adapter, read_adapter, save_adapter, save_merged_model
from ..config import LoRAConfig, all_option_defaults
from ..errors import AdapterMismatchError, LoRAConfigError, NoAdapterGradientError, NonFiniteError, TargetNotFoundError
from ..gradients import adapters_without_grad, make_inputs_require_grad, uses_activation_checkpointing
from ..injection import (
    adapter_param_names,
    count_parameters,
    get_lora_state,
    has_lora,
    inject_lora,
    lora_layers,
    mark_trainable,
    planned_state,
    remove_lora,
)
from ..loraplus import apply_loraplus, check_ratio
from ..merging import merge_lora, unmerge_lora
from ..named import adapter_tensors, add_adapter, named_adapters, set_adapter, set_trainable_adapters, use_adapter
from ..plan import Plan, plan_injection
from ..record import ON_MISMATCH, differences
from ..sharding import gathered, is_sharded
from ..state import CheckpointOptions, attach
from .checkpoints import CHECKPOINT_KEY, set_checkpoint_options
from .compat import Namespace, lora_callback
from .routing import check_adapter_names, clip_per_adapter, route_steps
from .sharded import check_sharded_checkpoint

_HALF_PRECISIONS = ("16-true", "bf16-true", "transformer-engine")
_BNB_FORMATS = {
    "_NF4Linear": "bnb-nf4",
    "_NF4DQLinear": "bnb-nf4",
    "_FP4Linear": "bnb-fp4",
    "_FP4DQLinear": "bnb-fp4",
    "_Linear8bitLt": "bnb-int8",
    "_Int8LinearInference": "bnb-int8",
}


def inject_before_sharding(pl_module: Any) -> None:
    """Call in ``configure_model`` between building the layers and sharding them (FSDP2's ``fully_shard``)
    when the model is built there: the attached ``LoRACallback`` injects its adapters now, so they are
    sharded with the layers they adapt. (Layers built in ``__init__`` need nothing: the callback injects
    before ``configure_model`` runs.)"""
    callback = lora_callback(getattr(pl_module, "_trainer", None))
    if callback is None:
        raise LoRAConfigError(
            f"inject_before_sharding: no LoRACallback is attached to {type(pl_module).__name__}'s Trainer; add "
            "LoRACallback(...) to Trainer(callbacks=[...])"
        )
    callback._prepare(pl_module, callback._stage)


def bitsandbytes_format(plugin: Any) -> str | None:
    """The ``quantize_base`` matching a Lightning ``BitsandbytesPrecision`` plugin (``None`` for other plugins)."""
    if type(plugin).__name__ != "BitsandbytesPrecision":
        return None
    return _BNB_FORMATS.get(getattr(getattr(plugin, "_linear_cls", None), "__name__", ""), "bnb-nf4")


def shield_from_bitsandbytes(plugin: Any, module: Any) -> None:
    """``BitsandbytesPrecision.convert_module`` swaps every ``nn.Linear`` for a bitsandbytes layer, which would
    replace the LoRA layers (``nn.Linear`` subclasses) and drop their adapters: list them in its
    ``ignore_modules``. Their frozen bases are quantized by ``quantize_base`` instead."""
    plugin.ignore_modules = set(plugin.ignore_modules) | set(lora_layers(module))


# --------------------------------------------------------------------------- DeepSpeed (docs/distributed.md)
_DS_HALF = ("16-mixed", "bf16-mixed", "16-true", "bf16-true")


def deepspeed_refusal(callback: Any, config: Mapping[str, Any] | None, precision: str) -> str | None:
    """Why ``LoRACallback`` refuses this ``DeepSpeedStrategy`` config (one line naming the setting and the fix),
    or ``None``: the callback guarantees ZeRO stages 0-2 without parameter offload and with one adapter."""
    zero = dict((config or {}).get("zero_optimization") or {})
    stage = int(zero.get("stage", 0) or 0)
    offload = [k for k in ("offload_param", "offload_optimizer") if (zero.get(k) or {}).get("device", "none") != "none"]
    if stage == 3:
        return (
            "DeepSpeed ZeRO stage 3 partitions the parameters as the model is built and wrapped, so the callback "
            "cannot guarantee injection, exports, merges and resumes; use DeepSpeedStrategy(stage=2) or FSDP2 "
            "(ModelParallelStrategy + fully_shard)"
        )
    if offload or zero.get("cpu_offload"):
        return (
            f"DeepSpeed {offload[0] if offload else 'cpu_offload'} is not verified with LoRA adapters; drop it "
            "(DeepSpeedStrategy(stage=2) without offload_optimizer / offload_parameters) or use FSDP2"
        )
    if callback.adapters:
        return (
            f"LoRACallback(adapters={callback.adapters}) swaps adapter tensors between modules, which DeepSpeed's "
            "flattened optimizer buffers do not follow; use DDP or one process to train several adapters"
        )
    if callback.loraplus_lr_ratio not in (None, 1):
        return (
            "loraplus_lr_ratio: DeepSpeed builds its optimizer before the callback could split lora_B into its own "
            "group; drop loraplus_lr_ratio and give lora_B its own parameter group in configure_optimizers"
        )
    variant = registry.variant(callback.config.variant)
    if variant.edits_gradients(callback.config):
        switch = f" (or {variant.gradient_edit_switch})" if variant.gradient_edit_switch else ""
        return (
            f"variant={callback.config.variant!r} changes the adapters' .grad before each optimizer step, and "
            f"DeepSpeed keeps the gradients in ZeRO's buffers; use DDP or FSDP2{switch}"
        )
    if callback.config.quantize_base is not None:
        return f"quantize_base={callback.config.quantize_base!r}: DeepSpeed casts every parameter; use DDP or FSDP2"
    if callback.config.adapter_dtype is not None and precision in _DS_HALF:
        return (
            f"adapter_dtype={callback.config.adapter_dtype!r} with precision={precision!r}: DeepSpeed casts every "
            "parameter, the adapters too, to the half dtype; drop adapter_dtype or train in precision='32-true'"
        )
    return None


def prepare_deepspeed(callback: Any, trainer: Any) -> bool:
    """Under Lightning's ``DeepSpeedStrategy`` (returns whether it is one): refuse what :func:`deepspeed_refusal`
    names, before anything changes; with adapter-only checkpoints set ``exclude_frozen_parameters=True`` (DeepSpeed
    writes its own checkpoint folder, which the checkpoint dict's filtering does not reach) and resume through
    :func:`_load_deepspeed_checkpoint`."""
    strategy = trainer.strategy
    if not isinstance(strategy, callback._ns.module("strategies").DeepSpeedStrategy):
        return False
    why = deepspeed_refusal(callback, strategy.config, str(trainer.precision))
    if why is not None:
        raise LoRAConfigError(f"LoRACallback with DeepSpeedStrategy: {why}")
    if callback.adapter_only_checkpoints and not strategy.exclude_frozen_parameters:
        strategy.exclude_frozen_parameters = True  # the folder holds only the trainable (adapter) tensors
    if not hasattr(strategy.load_checkpoint, "_lora_original"):
        original = strategy.load_checkpoint

        def load_checkpoint(path: Any, *args: Any, **kwargs: Any) -> Any:
            return _load_deepspeed_checkpoint(strategy, original, path, *args, **kwargs)

        load_checkpoint._lora_original = original  # type: ignore[attr-defined]
        strategy.load_checkpoint = load_checkpoint  # this strategy object only
    return True


def _load_deepspeed_checkpoint(strategy: Any, original: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
    """``DeepSpeedStrategy.load_checkpoint`` for a module with adapters: the folder's LoRA record and adapter
    tensors are checked first; a folder without the frozen base (``exclude_frozen_parameters``) is loaded
    non-strictly, so the module keeps its own base weights."""
    module, folder = strategy.lightning_module, Path(path)
    tag = (folder / "latest").read_text().strip() if (folder / "latest").is_file() else "checkpoint"
    files = sorted((folder / tag).glob("mp_rank_*_model_states.pt")) if folder.is_dir() else []
    if module is None or not has_lora(module) or not files:
        return original(path, *args, **kwargs)  # not a DeepSpeed folder: Lightning's own error
    saved = torch.load(files[0], map_location="cpu", weights_only=False)
    keys = set(saved.get("module") or {})
    check_sharded_checkpoint(module, saved.get(CHECKPOINT_KEY), keys)
    strict = module.strict_loading
    module.strict_loading = strict and set(module.state_dict()) <= keys
    try:
        return original(path, *args, **kwargs)
    finally:
        module.strict_loading = strict


class _GradientWatch:
    """Which trainable adapter tensors get a gradient in one backward, seen by tensor hooks: DeepSpeed's ZeRO moves
    each gradient into its own buffers and sets ``.grad`` to ``None``, so ``.grad`` cannot tell."""

    def __init__(self, module: Any) -> None:
        self.seen: set[str] = set()
        self.tensors = {
            f"{n}.{leaf}": getattr(layer, leaf)
            for n, layer in lora_layers(module).items()
            for leaf in layer.trainable_names
            if getattr(layer, leaf).requires_grad
        }
        self.handles = [t.register_hook(lambda g, name=name: self.seen.add(name)) for name, t in self.tensors.items()]

    def missing(self) -> list[str]:
        for handle in self.handles:
            handle.remove()
        return [name for name in self.tensors if name not in self.seen]


class _ClipPerAdapter:
    """The module's ``configure_gradient_clipping`` under ``LoRACallback(adapters=...)``: clipping by norm is done
    per adapter (each adapter clipped as when trained alone); clipping by value, and other modules, as before."""

    def __init__(self, module: Any, original: Any) -> None:
        self.__wrapped__ = original
        self.module = module

    def __call__(self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None) -> None:
        callback = lora_callback(getattr(self.module, "_trainer", None))
        names = getattr(callback, "adapters", None)
        if not names or gradient_clip_val is None or str(gradient_clip_algorithm or "norm") != "norm":
            return self.__wrapped__(
                optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
            )
        clip_per_adapter(self.module, names, float(gradient_clip_val))
        return None


class CallbackImpl:
    """Inject rank-r adapters ``W0 + (alpha/r)·B·A`` when fitting is set up, train only them, and keep
    Lightning checkpoints adapter-only (with the LoRA record, so every load gives the trained model).

    LoRA options are those of :class:`~lora_lightning.LoRAConfig` and of every registered variant
    (``r``, ``alpha``, ``targets``, ..., ``vera_seed``, ``adalora_target_r``), given as a config
    object/dict or as keyword arguments (convenient from YAML / ``LightningCLI``); a keyword given
    as ``None`` leaves the config's value. Other options:

    Args:
        adapter_only_checkpoints: checkpoints hold only adapter tensors (+ ``modules_to_save``) and
            the LoRA record; loading refills the base weights from the model itself.
        atomic_checkpoints: replace the default checkpoint writer by :class:`AtomicCheckpointIO`.
        init_adapter: ``.safetensors`` adapter loaded right after injection (warm start / eval); read
            and checked at setup, applied once per module.
        merge_on_fit_end: fold the adapters into the base weights when ``fit`` ends (a later fit
            unmerges them again; a later test/validate with ``ckpt_path`` loads into the unmerged model).
        export_adapter: write the adapter to this ``.safetensors`` path when ``fit`` ends (checked to be
            writable at setup).
        export_merged: write the merged full model to this ``.safetensors`` path when ``fit`` ends (checked to
            be writable at setup).
        export_module: attribute path of the network inside the LightningModule (e.g. ``"model"``):
            the merged export is keyed relative to it, loadable by the bare network.
        on_base_mismatch: ``raise`` | ``warn`` | ``ignore`` when a loaded adapter/checkpoint was
            trained on other base weights.
        replace_existing: the module already holds adapters of another structure (an earlier fit
            with other settings): replace them with new ones instead of raising.
        inputs_require_grad: make the activations entering adapted blocks require grad, which
            reentrant activation checkpointing needs for the adapters to get any gradient. ``"auto"``
            does it when a Hugging Face submodule has gradient checkpointing on, and otherwise stops
            the first step that leaves every adapter without a gradient with an error naming this.
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024): ``B`` (of every adapter) trains with this many times the
            learning rate of the parameter group it is in (16 in the paper), in the optimizer and LR schedulers
            your ``configure_optimizers`` returns — same class, same other hyperparameters, one schedule; the
            ratio holds at every step under every scheduler of ``torch.optim.lr_scheduler``.
        adapters: train several named adapters in this one fit (two or more names, or a dict name ->
            option overrides such as ``{"a": {}, "b": {"r": 4}}``; same targets for all). Give the
            dataloaders as dicts keyed by these names: each training batch runs through its adapter and the
            losses add up; validation/test/predict loaders run through theirs; ``self.log("x")`` inside a
            step logs ``"<name>/x"`` and ``active_adapter(self)`` names the adapter. Every adapter has its
            own checkpoint entries; ``export_adapter`` / ``export_merged`` must contain ``{name}``. Gradient
            clipping by norm (``Trainer(gradient_clip_val=...)``) applies to each adapter on its own, so each
            trains exactly as alone; a train loader is needed for every adapter.
        verbose: log one line describing the adapters and the trainable parameters when fitting starts.
        check_finite: raise :class:`~lora_lightning.NonFiniteError` naming the step as soon as the
            training loss (before ``backward``, so the adapters stay finite) or a trainable parameter
            (after the optimizer step, before any checkpoint callback runs) is NaN/inf. Costs one
            scalar device sync per step (plus one all-reduce under DDP/FSDP so every rank stops together).
    """

    is_lora_callback: ClassVar[bool] = True  # how the Lightning layer finds it among a trainer's callbacks
    _ns: ClassVar[Namespace]  # the Lightning package this class was made for
    _atomic_io: ClassVar[type]  # that package's AtomicCheckpointIO

    def __init__(
        self,
        config: LoRAConfig | Mapping[str, Any] | None = None,
        *,
        adapter_only_checkpoints: bool = True,
        atomic_checkpoints: bool = True,
        init_adapter: str | None = None,
        merge_on_fit_end: bool = False,
        export_adapter: str | None = None,
        export_merged: str | None = None,
        export_module: str = "",
        on_base_mismatch: str = "raise",
        replace_existing: bool = False,
        inputs_require_grad: bool | str = "auto",
        loraplus_lr_ratio: float | None = None,
        check_finite: bool = True,
        adapters: list[str] | Mapping[str, Mapping[str, Any]] | None = None,
        verbose: bool = True,
        **lora_options: Any,
    ) -> None:
        if on_base_mismatch not in ON_MISMATCH:
            raise LoRAConfigError(f"on_base_mismatch={on_base_mismatch!r} must be one of {ON_MISMATCH}")
        if inputs_require_grad not in (True, False, "auto"):
            raise LoRAConfigError(f"inputs_require_grad={inputs_require_grad!r} must be True, False or 'auto'")
        base = config.to_dict() if isinstance(config, LoRAConfig) else dict(config or {})
        self.config = LoRAConfig.from_dict(base | {k: v for k, v in lora_options.items() if v is not None})
        self.adapter_only_checkpoints, self.atomic_checkpoints = adapter_only_checkpoints, atomic_checkpoints
        self.init_adapter, self.on_base_mismatch, self.replace_existing = (
            init_adapter,
            on_base_mismatch,
            replace_existing,
        )
        self.merge_on_fit_end, self.export_adapter, self.export_merged = merge_on_fit_end, export_adapter, export_merged
        self.export_module = export_module
        self.inputs_require_grad, self.check_finite, self.verbose = inputs_require_grad, check_finite, verbose
        self.loraplus_lr_ratio = None if loraplus_lr_ratio is None else check_ratio(loraplus_lr_ratio)
        self.adapters = check_adapter_names(adapters)
        self.adapter_configs: dict[str, LoRAConfig] = {}
        if self.adapters:
            overrides = adapters if isinstance(adapters, Mapping) else {}
            for name in self.adapters:
                self.adapter_configs[name] = LoRAConfig.from_dict(
                    self.config.to_dict() | dict(overrides.get(name) or {})
                )
            self._check_multi_options()
        self.variant_hooks: Any = None  # a variant's training hooks (AdaLoRA's rank schedule), else None
        self._trainable: list[tuple[str, torch.Tensor]] = []
        self._batch_idx = 0
        self._last_step = -1
        self._grad_checked = False
        self._optimized: tuple[str, set[int]] | None = None  # (active adapter, ids of the optimizers' parameters)
        self._input_hooks: list[Any] = []
        self._stage = "fit"
        self._bnb_plugin: Any = None
        self._init_applied: weakref.WeakSet = weakref.WeakSet()
        self._deepspeed = False  # the trainer's strategy is DeepSpeed (checked in setup)
        self._grad_watch: _GradientWatch | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._deepspeed = prepare_deepspeed(self, trainer)  # refuses what DeepSpeed would break, before any change
        if self.atomic_checkpoints and type(trainer.strategy.checkpoint_io) is self._ns.TorchCheckpointIO:
            trainer.strategy.checkpoint_io = self._atomic_io()
        if stage == "fit":  # fail now, not after training
            for what in ("export_adapter", "export_merged"):
                if getattr(self, what):
                    check_output_path(getattr(self, what), what)
        if self.init_adapter:
            read_adapter(self.init_adapter)  # a missing or foreign file fails before the model changes
        fmt = bitsandbytes_format(trainer.precision_plugin)
        self._bnb_plugin = trainer.precision_plugin if fmt is not None else None
        if fmt is not None and self.config.quantize_base is None:
            self.config = dataclasses.replace(self.config, quantize_base=fmt)  # the adapted bases, quantized alike
            self._ns.rank_zero_info(
                f"LoRA: BitsandbytesPrecision: the adapted base weights are stored as quantize_base={fmt!r}"
            )
        self._attach(pl_module)
        self._stage = stage
        if self.adapters:
            route_steps(pl_module, force=True)
            if not self._ns.is_overridden("configure_gradient_clipping", pl_module):
                attach(pl_module).wrap_method(
                    pl_module, "configure_gradient_clipping", lambda original: _ClipPerAdapter(pl_module, original)
                )
        if has_lora(pl_module):
            self._prepare(pl_module, stage)
            return
        plan = self._plan(pl_module)
        if plan is not None:
            self._prepare(pl_module, stage, plan)
        elif not self._ns.is_overridden("configure_model", pl_module):
            plan_injection(pl_module, self.config)  # raises: the targets match nothing, and nothing will build them
        # else: configure_model builds the layers; the Lightning layer prepares the module right after it

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not self.adapters:
            return
        loaders = getattr(trainer.fit_loop, "_combined_loader", None)
        keys = list(getattr(loaders, "iterables", {}) or {}) if loaders is not None else []
        if keys and isinstance(getattr(loaders, "iterables", None), Mapping):
            missing = [n for n in self.adapters if n not in keys]
            unknown = [k for k in keys if k not in self.adapters]
            if missing or unknown:
                what = [f"{missing} would get no batch and stay untrained"] if missing else []
                what += [f"{unknown} are not adapters of this callback"] if unknown else []
                raise LoRAConfigError(
                    f"LoRACallback(adapters={self.adapters}) but train_dataloaders has loaders for {keys} only: "
                    f"{' and '.join(what)}. Give one loader per adapter, keyed by its name "
                    f"(train_dataloaders={{{', '.join(repr(n) + ': loader' for n in self.adapters)}}})"
                )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        state = get_lora_state(pl_module)
        if self.adapters and is_sharded(pl_module):
            raise LoRAConfigError(
                f"LoRACallback(adapters={self.adapters}) with sharded (FSDP2) parameters: routing swaps adapter "
                "tensors between modules, which sharding does not allow; train several adapters with DDP or one process"
            )
        if self.merge_on_fit_end and is_sharded(pl_module):
            raise LoRAConfigError(
                "LoRACallback(merge_on_fit_end=True) cannot merge into sharded (FSDP2) weights in place; set "
                "merge_on_fit_end=False and export_merged='merged.safetensors' (gathered and written by rank 0)"
            )
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio != 1:
            self._apply_loraplus(trainer, pl_module)
        self._trainable = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        self._last_step, self._grad_checked, self._optimized = trainer.global_step, False, None
        total = trainer.estimated_stepping_batches
        self.variant_hooks = registry.variant(state.config.variant).training_hooks(
            pl_module, state.config, int(total) if total not in (None, float("inf")) else None
        )
        self._remove_input_hooks()
        if self.inputs_require_grad is True or (
            self.inputs_require_grad == "auto" and uses_activation_checkpointing(pl_module)
        ):
            self._input_hooks = make_inputs_require_grad(pl_module)
        precision = str(trainer.precision)
        if precision in _HALF_PRECISIONS and state.config.adapter_dtype is None:
            self._ns.rank_zero_warn(
                f"precision={precision!r} casts the adapters to the half-precision dtype; set "
                "LoRACallback(adapter_dtype='float32') to keep fp32 adapters on the half-precision base (the QLoRA "
                "recipe)"
            )
        counts = count_parameters(pl_module)
        for logger in trainer.loggers:
            logger.log_hyperparams({"lora": state.config.to_dict(), **counts.as_dict()})
        if self.verbose:
            self._ns.rank_zero_info(
                f"LoRA: {state.describe()}; trainable {counts.trainable:,} of {counts.total:,} parameters "
                f"({100 * counts.trainable_fraction:.3f}%)"
            )

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if self._grad_checked:
            return
        self._grad_checked = True
        watch, self._grad_watch = self._grad_watch, None
        missing = watch.missing() if watch is not None else adapters_without_grad(pl_module)
        trainable = sum(len(layer.trainable_names) for layer in lora_layers(pl_module).values())
        if missing and len(missing) == trainable:
            raise NoAdapterGradientError(
                self._no_gradient_message(f"no adapter received a gradient ({len(missing)} tensors, e.g. {missing[0]})")
            )
        if missing:
            self._ns.rank_zero_warn(
                f"{len(missing)} adapter tensor(s) got no gradient in the first step (unused in forward?), e.g. "
                f"{missing[:3]}"
            )

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._check_optimizer_holds_the_adapters(trainer, pl_module)
        if self.variant_hooks is not None:
            self._log(trainer, self.variant_hooks.before_optimizer_step())

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        if not loss.requires_grad:
            raise NoAdapterGradientError(self._no_gradient_message("the training loss does not require grad"))
        if self._deepspeed and not self._grad_checked and self._grad_watch is None:
            self._grad_watch = _GradientWatch(pl_module)  # DeepSpeed leaves no .grad to look at
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

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # runs before ModelCheckpoint's hook (Lightning moves checkpoint callbacks last)
        if self.variant_hooks is not None and trainer.global_step != self._last_step:  # an optimizer step happened
            self._log(trainer, self.variant_hooks.after_optimizer_step(trainer.global_step))
        self._last_step = trainer.global_step
        if not self.check_finite or not self._trainable:
            return
        flags = torch.stack([torch.isfinite(p.detach()).all() for _, p in self._trainable])
        local_ok = bool(flags.all())
        if not trainer.strategy.reduce_boolean_decision(local_ok, all=True):
            bad = [n for (n, _), ok in zip(self._trainable, flags.tolist(), strict=True) if not ok]
            where = f"{len(bad)} tensor(s), e.g. {bad[:3]}" if bad else "a tensor on another rank"
            raise NonFiniteError(
                f"trainable parameters became NaN/inf after global step {trainer.global_step} (epoch "
                f"{trainer.current_epoch}, batch {batch_idx}): {where}, although the loss was finite (an exploding "
                "update, or a NaN gradient from e.g. sqrt/log/division at 0 in the loss). Stopped before this step was "
                "checkpointed. Lower the learning rate or clip gradients (Trainer(gradient_clip_val=...)); "
                "Trainer(detect_anomaly=True) finds the op that made a NaN gradient; "
                "LoRACallback(check_finite=False) turns this check off"
            )

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.variant_hooks is not None:
            self._log(trainer, self.variant_hooks.at_end())
        sharded = is_sharded(pl_module)  # FSDP2: every rank gathers the full tensors, rank 0 writes them
        if self.adapters:
            for name in self.adapters:  # one file per adapter (routing and merging are refused when sharded)
                with use_adapter(pl_module, name, trainable=True):
                    if trainer.is_global_zero and self.export_adapter:
                        save_adapter(pl_module, Path(self.export_adapter.format(name=name)))
                    if trainer.is_global_zero and self.export_merged:
                        save_merged_model(
                            pl_module, Path(self.export_merged.format(name=name)), submodule=self.export_module
                        )
            trainer.strategy.barrier("lora_fit_end")
            return
        if self.export_adapter:
            with gathered(pl_module, adapter_param_names(pl_module)) if sharded else nullcontext():
                if trainer.is_global_zero:
                    save_adapter(pl_module, Path(self.export_adapter))
        if self.merge_on_fit_end:
            merge_lora(pl_module)
        if self.export_merged:
            with gathered(pl_module) if sharded else nullcontext():
                if trainer.is_global_zero:
                    save_merged_model(pl_module, Path(self.export_merged), submodule=self.export_module)
        trainer.strategy.barrier("lora_fit_end")

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._remove_input_hooks()

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (``ddp_spawn`` sends the Trainer to its workers): run-time handles are dropped."""
        state = self.__dict__.copy()
        state.update(
            _init_applied=None, _input_hooks=[], variant_hooks=None, _trainable=[], _optimized=None, _grad_watch=None
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_applied = weakref.WeakSet()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"config": self.config.to_dict()}
        if self.adapters:
            state["adapters"] = {n: c.to_dict() for n, c in self.adapter_configs.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the module's checkpoint record (checked before this runs) is authoritative."""

    def _check_multi_options(self) -> None:
        names = self.adapters or []
        for what in ("export_adapter", "export_merged"):
            path = getattr(self, what)
            if path and "{name}" not in path:
                raise LoRAConfigError(
                    f"{what}={path!r} with adapters={names}: put {{name}} in the path (e.g. "
                    "'out/{name}.safetensors') to write one file per adapter"
                )
        if self.merge_on_fit_end:
            raise LoRAConfigError(
                f"merge_on_fit_end=True with adapters={names}: the base holds one merged adapter at a time; use "
                "export_merged='merged-{name}.safetensors' or merge_lora after set_adapter"
            )
        if self.init_adapter:
            raise LoRAConfigError(
                f"init_adapter with adapters={names}: warm-start each adapter with load_adapter(model, path, "
                "adapter_name=...) before fit"
            )
        if self.config.variant != "lora":
            raise LoRAConfigError(
                f"adapters={names} with variant={self.config.variant!r}: several adapters in one fit are plain LoRA "
                "(variant='lora')"
            )

    # ---------------------------------------------------------------- helpers
    def _attach(self, pl_module: Any) -> None:
        """Make this callback decide how ``pl_module``'s checkpoints are written and read."""
        set_checkpoint_options(
            pl_module,
            CheckpointOptions(
                self.adapter_only_checkpoints, self.on_base_mismatch, "pass LoRACallback(on_base_mismatch='warn')"
            ),
        )

    def _plan(self, pl_module: Any) -> Plan | None:
        """The injection plan of this callback's config on ``pl_module``, or ``None`` if its targets match nothing
        (yet: a module building its layers in ``configure_model``)."""
        try:
            return plan_injection(pl_module, self.adapter_configs[self.adapters[0]] if self.adapters else self.config)
        except TargetNotFoundError:
            return None

    def _prepare(self, pl_module: Any, stage: str = "fit", plan: Plan | None = None) -> None:
        """Give ``pl_module`` this callback's adapters: reuse the ones it holds if they have the same
        structure (unmerged for training), else inject (replacing others only when asked); apply
        ``init_adapter`` once."""
        if self.adapters:
            self._prepare_named(pl_module)
        elif has_lora(pl_module):
            state = get_lora_state(pl_module)
            diffs = differences(state, planned_state(pl_module, self.config), "the model", "this LoRACallback")
            if diffs:
                if not self.replace_existing:
                    raise AdapterMismatchError(
                        f"{type(pl_module).__name__} already holds LoRA adapters ({state.describe()}) and this "
                        f"LoRACallback asks for other ones ({'; '.join(diffs)}). Keep the same LoRA settings to "
                        "continue training them, pass LoRACallback(replace_existing=True) to replace them with new "
                        "adapters, or call remove_lora(model) first"
                    )
                if any(layer.merged for layer in lora_layers(pl_module).values()):
                    unmerge_lora(pl_module)
                remove_lora(pl_module)
                self._inject(pl_module)
            else:
                merged = any(layer.merged for layer in lora_layers(pl_module).values())
                if merged and (stage == "fit" or self._needs_init(pl_module)):
                    unmerge_lora(pl_module)  # merged by merge_on_fit_end: train / load into the adapters again
                self._apply_init_adapter(pl_module)
                mark_trainable(pl_module, state)
        else:
            self._inject(pl_module, plan)
        if getattr(self, "_bnb_plugin", None) is not None:
            shield_from_bitsandbytes(self._bnb_plugin, pl_module)

    def _prepare_named(self, pl_module: Any) -> None:
        """``adapters=[...]``: the module holds exactly these named adapters, all trainable."""
        names = self.adapters or []
        if has_lora(pl_module):
            held = named_adapters(pl_module)
            diffs = [] if list(held.configs) == names else [f"adapters {list(held.configs)} vs {names}"]
            for name in names:
                if not diffs and held.configs[name].to_dict() != self.adapter_configs[name].to_dict():
                    diffs.append(f"adapter {name!r} has other options")
            if diffs and not self.replace_existing:
                raise AdapterMismatchError(
                    f"{type(pl_module).__name__} already holds LoRA adapters and this LoRACallback asks for others "
                    f"({'; '.join(diffs)}). Keep the same adapters to continue training them, pass "
                    "LoRACallback(replace_existing=True) to replace them, or call remove_lora(model) first"
                )
            if any(layer.merged for layer in lora_layers(pl_module).values()):
                unmerge_lora(pl_module)
            if diffs:
                remove_lora(pl_module)
        if not has_lora(pl_module):
            for name in names:
                add_adapter(pl_module, name, self.adapter_configs[name])
            set_adapter(pl_module, names[0])
        set_trainable_adapters(pl_module, names)

    def _inject(self, pl_module: Any, plan: Plan | None = None) -> None:
        inject_lora(pl_module, self.config, plan)
        try:
            self._apply_init_adapter(pl_module)
        except BaseException:
            remove_lora(pl_module)  # a bad init_adapter leaves the module as it was
            raise

    def _needs_init(self, pl_module: Any) -> bool:
        return bool(self.init_adapter) and pl_module not in self._init_applied

    def _apply_init_adapter(self, pl_module: Any) -> None:
        if self._needs_init(pl_module):
            load_adapter(pl_module, self.init_adapter, on_base_mismatch=self.on_base_mismatch)
            self._init_applied.add(pl_module)

    def _apply_loraplus(self, trainer: Any, pl_module: Any) -> None:
        """Split every optimizer's groups: ``B`` tensors (of every adapter) at ``ratio`` times their group's
        learning rate, at every step of every scheduler (:func:`lora_lightning.loraplus.apply_loraplus`). Runs
        before a resumed fit restores the optimizer states, so those load into the same groups they were saved from."""
        ratio = self.loraplus_lr_ratio
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        moved = sum(apply_loraplus(opt, pl_module, ratio, schedulers) for opt in trainer.optimizers)
        if not moved:
            raise LoRAConfigError(
                f"loraplus_lr_ratio={ratio} but the optimizers from configure_optimizers hold no trainable lora_B "
                f"(variant={get_lora_state(pl_module).config.variant!r} or a custom parameter list): drop "
                "loraplus_lr_ratio or pass the adapters to the optimizer"
            )

    def _check_optimizer_holds_the_adapters(self, trainer: Any, pl_module: Any) -> None:
        """Raise when the adapter(s) meant to train are not in the optimizer (``set_adapter`` after it was built):
        checked whenever the active adapter changes."""
        if not trainer.optimizers or not has_lora(pl_module):
            return
        active = named_adapters(pl_module).active
        if self._optimized is not None and self._optimized[0] == active:
            return
        held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        for attr in ("bit16_groups", "bf16_groups", "fp16_groups") if self._deepspeed else ():
            held |= {id(p) for opt in trainer.optimizers for group in getattr(opt, attr, None) or () for p in group}
        self._optimized = (active, held)
        for name in self.adapters or [active]:
            missing = [p for p in adapter_tensors(pl_module, name) if p.requires_grad and id(p) not in held]
            if missing:
                raise LoRAConfigError(
                    f"adapter {name!r} is active but the optimizer holds none of its {len(missing)} trainable "
                    "tensor(s) (set_adapter after configure_optimizers built the optimizer?), so nothing of it would "
                    "train. Activate the adapter before trainer.fit, or train several adapters with "
                    "LoRACallback(adapters=[...])"
                )

    @staticmethod
    def _no_gradient_message(what: str) -> str:
        return (
            f"{what} in the first training step: with a frozen base, reentrant activation checkpointing "
            "(torch.utils.checkpoint(..., use_reentrant=True), HF gradient_checkpointing_enable()) cuts the adapters "
            "off from the loss. Set LoRACallback(inputs_require_grad=True) or use use_reentrant=False"
        )

    def _remove_input_hooks(self) -> None:
        for handle in self._input_hooks:
            handle.remove()
        self._input_hooks = []

    @staticmethod
    def _log(trainer: Any, metrics: dict[str, float]) -> None:
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


def _lora_option_parameters() -> list[inspect.Parameter]:
    """One keyword per LoRA option (shared and every registered variant's), typed ``T | None``."""
    hints: dict[str, Any] = {}
    for cls in [LoRAConfig, *registry.VARIANT_CONFIGS.values()]:
        for name, hint in typing.get_type_hints(cls).items():
            hints.setdefault(name, hint)
    return [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=hints[name] | None)
        for name in all_option_defaults()
    ]


def with_lora_keywords(init: Any) -> None:
    """``LoRACallback.__init__``'s visible signature lists every LoRA option (LightningCLI / jsonargparse
    read it), derived from the config and the variant registry so the two cannot drift."""
    sig = inspect.signature(CallbackImpl.__init__)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in params}
    params += [p for p in _lora_option_parameters() if p.name not in taken]
    init.__signature__ = sig.replace(parameters=params)


def make_callback_class(ns: Namespace, atomic_io: type, module: str) -> type:
    """``LoRACallback`` for one Lightning package: :class:`CallbackImpl` on that package's ``Callback``,
    importable as ``<module>.LoRACallback`` (so ``ddp_spawn`` can pickle it)."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        CallbackImpl.__init__(self, *args, **kwargs)

    __init__.__doc__ = CallbackImpl.__init__.__doc__
    cls = type(
        "LoRACallback",
        (CallbackImpl, ns.Callback),
        {
            "__init__": __init__,
            "__module__": module,
            "__qualname__": "LoRACallback",
            "__doc__": CallbackImpl.__doc__,
            "_ns": ns,
            "_atomic_io": atomic_io,
        },
    )
    with_lora_keywords(cls.__init__)
    registry.ON_REGISTER.append(lambda: with_lora_keywords(cls.__init__))  # a variant registered later adds its options
    return cls


__all__ = ["CallbackImpl", "bitsandbytes_format", "inject_before_sharding", "make_callback_class"]
