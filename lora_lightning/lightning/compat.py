"""The one seam between lora_lightning and Lightning's private API, for both packages Lightning ships as:
``lightning.pytorch`` (the ``lightning`` distribution) and ``pytorch_lightning``.

Written and tested for **Lightning 2.4 to 2.6** (``lightning>=2.4,<2.7`` / ``pytorch-lightning>=2.4,<2.7``;
CI runs the Lightning tests on 2.4.0 and on the newest 2.6). Importing the Lightning layer with another
version gives one warning naming the risk. Nothing else in lora_lightning touches a private name of
Lightning; the rest of the Lightning layer uses public hooks and the objects a :class:`Namespace` resolves.

Lightning puts weights into a module, or builds it, in places no public hook reaches. :func:`install`
wraps each of them (each wrapper calls the original; idempotent) so the trained adapters are never
silently lost:

1. ``core.saving._load_state`` — ``MyModule.load_from_checkpoint(path)`` builds a fresh module and loads
   ``state_dict`` into it. For a checkpoint with a LoRA record the module's ``on_load_checkpoint`` is
   followed, for that call only, by :func:`~lora_lightning.lightning.checkpoints.prepare_for_checkpoint`
   (adapters injected from the record, base identity checked, base tensors taken from the module itself).
2. ``_CheckpointConnector.restore_model`` — ``trainer.fit/validate/test/predict(..., ckpt_path=...)``, with or
   without a ``LoRACallback``: the same preparation, right before the strategy loads the state dict.
3. ``_CheckpointConnector.dump_checkpoint`` — every checkpoint of a module with adapters (``ModelCheckpoint``,
   ``trainer.save_checkpoint``, weights-only saves) gets the LoRA record and, by default, only adapter tensors.
4. ``_MultiProcessingLauncher._recover_results_in_main_process`` — ``strategy="ddp_spawn"`` reloads the
   workers' weights with ``strict=False``, which would drop adapter keys: the main process gets the
   ``LoRACallback``'s adapters first (merged if the workers merged).
5. ``ModelParallelStrategy.load_checkpoint`` (FSDP2) — an adapter-only checkpoint is loaded after checking it
   (:mod:`~lora_lightning.lightning.sharded`), instead of failing on missing base tensors.
6. ``trainer.call._call_configure_model`` — a module that builds its layers in ``configure_model`` gets its
   adapters right after it (before the optimizer and before sharding).
7. ``trainer.call._call_setup_hook`` — a module holding several named adapters runs dict-keyed
   dataloaders through their adapters (:mod:`~lora_lightning.lightning.routing`), with or without a callback.

For Lightning Fabric (:mod:`lora_lightning.fabric`) nothing is wrapped; this module only names Fabric's
``_FabricModule`` / ``_FabricOptimizer`` (to refuse injecting after ``fabric.setup`` and to unwrap),
``ModelParallelStrategy._save_distributed_checkpoint`` (which checkpoint format FSDP2 writes) and the FSDP2
checkpoint helpers (:func:`fabric_helpers`).
"""

from __future__ import annotations

import contextvars
import importlib
import inspect
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from packaging.version import Version

from ..errors import LoRAConfigError, TargetNotFoundError
from ..injection import has_lora, lora_layers
from ..registry import register_injection_guard
from ..state import CheckpointOptions

SUPPORTED = (Version("2.4"), Version("2.7"))  # >= first, < second
PACKAGES = ("lightning.pytorch", "pytorch_lightning")
_PATCHED = "_lora_lightning_original"
_WARNED: set[str] = set()

FROM_CHECKPOINT_HINT = "load it with lora_lightning.load_lora_checkpoint(MyModule, path, on_base_mismatch='warn')"
# how the checkpoint being loaded by load_from_checkpoint in this context treats another base (load_lora_checkpoint
# sets it); None: the defaults (see load_options). Not a CheckpointOptions default: one mutable object for every context
LOAD_OPTIONS: contextvars.ContextVar[CheckpointOptions | None] = contextvars.ContextVar(
    "lora_load_options", default=None
)


def load_options() -> CheckpointOptions:
    """The options :data:`LOAD_OPTIONS` holds in this context, else the defaults (another base raises, with the
    hint of ``load_lora_checkpoint``)."""
    options = LOAD_OPTIONS.get()
    return options if options is not None else CheckpointOptions(override_hint=FROM_CHECKPOINT_HINT)


@dataclass(frozen=True)
class Namespace:
    """The public objects of one Lightning package that the Lightning layer uses."""

    name: str  # "lightning.pytorch" or "pytorch_lightning"
    fabric: str  # "lightning.fabric" or "lightning_fabric"
    version: str
    Callback: type
    LightningModule: type
    TorchCheckpointIO: type
    rank_zero_info: Callable[..., Any]
    rank_zero_warn: Callable[..., Any]
    is_overridden: Callable[..., bool]

    def module(self, path: str) -> Any:
        return importlib.import_module(f"{self.name}.{path}" if path else self.name)


@cache
def namespace(name: str) -> Namespace:
    """The :class:`Namespace` of ``lightning.pytorch`` or ``pytorch_lightning`` (imports it)."""
    if name not in PACKAGES:
        raise ValueError(f"unknown Lightning package {name!r}; one of {PACKAGES}")
    pl = importlib.import_module(name)
    utilities = importlib.import_module(f"{name}.utilities")
    helpers = importlib.import_module(f"{name}.utilities.model_helpers")
    io = importlib.import_module(f"{name}.plugins.io")
    version = getattr(pl, "__version__", None) or importlib.import_module(name.split(".")[0]).__version__
    ns = Namespace(
        name=name,
        fabric="lightning.fabric" if name == "lightning.pytorch" else "lightning_fabric",
        version=str(version),
        Callback=pl.Callback,
        LightningModule=pl.LightningModule,
        TorchCheckpointIO=io.TorchCheckpointIO,
        rank_zero_info=utilities.rank_zero_info,
        rank_zero_warn=utilities.rank_zero_warn,
        is_overridden=helpers.is_overridden,
    )
    check_version(ns)
    return ns


def check_version(ns: Namespace) -> None:
    """One warning per package when its version lies outside the range the private wrappers were written for."""
    version = Version(ns.version)
    if not SUPPORTED[0] <= Version(version.base_version) < SUPPORTED[1] and ns.name not in _WARNED:
        _WARNED.add(ns.name)
        warnings.warn(
            f"lora_lightning's Lightning layer was written and tested for {ns.name} {SUPPORTED[0]} to <{SUPPORTED[1]}, "
            f"and {ns.version} is installed: it wraps private Lightning functions (checkpoint loading and saving, "
            "ddp_spawn, FSDP2 resume), so check that load_from_checkpoint and resuming give the trained adapters, or "
            f"install {'lightning' if ns.name == 'lightning.pytorch' else 'pytorch-lightning'}>=2.4,<2.7",
            stacklevel=3,
        )


def trainer_of(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or ``None`` (no error when detached)."""
    return getattr(module, "_trainer", None)


def lora_callback(trainer: Any) -> Any:
    """The ``LoRACallback`` among the trainer's callbacks (either package's), or ``None``."""
    return next((c for c in getattr(trainer, "callbacks", None) or () if getattr(c, "is_lora_callback", False)), None)


@dataclass(frozen=True)
class Hooks:
    """What the wrappers call: the Lightning layer's own functions (public, in the modules above this one)."""

    checkpoint_key: str
    prepare_for_checkpoint: Callable[..., None]  # (module, checkpoint, options=None)
    record_in_checkpoint: Callable[..., None]  # (module, checkpoint)
    route_steps: Callable[..., None]  # (module)
    load_model_parallel_checkpoint: Callable[..., Any]  # (strategy, path, weights_only, FabricHelpers)


@dataclass(frozen=True)
class FabricHelpers:
    """Lightning Fabric's private checkpoint helpers, for the FSDP2 resume (:mod:`.sharded`)."""

    is_sharded_checkpoint: Callable[[Path], bool]
    is_full_checkpoint: Callable[[Path], bool]
    load_checkpoint: Callable[..., Any]
    metadata_filename: str


# --------------------------------------------------------------------------- the wrappers
def _wrap(owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    current = getattr(owner, name)
    if getattr(current, _PATCHED, None) is not None:
        return  # already installed
    wrapper = make(current)
    setattr(wrapper, _PATCHED, current)
    setattr(owner, name, wrapper)


def _fabric_load_checkpoint(raw: Callable[..., Any]) -> Callable[..., Any]:
    """Fabric's ``_load_checkpoint`` with one signature: ``weights_only`` exists from Lightning 2.5 on (2.4 loads
    with torch's default)."""
    takes_weights_only = "weights_only" in inspect.signature(raw).parameters

    def load(
        path: Path,
        state: dict[str, Any],
        strict: bool = True,
        optimizer_states_from_list: bool = False,
        weights_only: bool | None = None,
    ) -> Any:
        extra = {"weights_only": weights_only} if takes_weights_only else {}
        return raw(path, state, strict=strict, optimizer_states_from_list=optimizer_states_from_list, **extra)

    return load


def install(ns: Namespace, hooks: Hooks) -> None:
    """Install the seven wrappers of the module docstring into ``ns``'s package (idempotent)."""
    saving = ns.module("core.saving")
    connector = ns.module("trainer.connectors.checkpoint_connector")._CheckpointConnector
    launcher = ns.module("strategies.launchers.multiprocessing")._MultiProcessingLauncher
    model_parallel = ns.module("strategies").ModelParallelStrategy
    call = ns.module("trainer.call")
    fabric_mp = importlib.import_module(f"{ns.fabric}.strategies.model_parallel")
    fabric_load = importlib.import_module(f"{ns.fabric}.utilities.load")
    LightningModule = ns.LightningModule

    def load_state(original: Callable[..., Any]) -> Callable[..., Any]:
        def _load_state(cls: Any, checkpoint: dict[str, Any], strict: bool | None = None, **kwargs: Any) -> Any:
            if hooks.checkpoint_key not in checkpoint or not (
                isinstance(cls, type) and issubclass(cls, LightningModule)
            ):
                return original(cls, checkpoint, strict=strict, **kwargs)
            own = cls.__dict__.get("on_load_checkpoint")
            user_hook = cls.on_load_checkpoint

            def on_load_checkpoint(self: Any, ckpt: dict[str, Any]) -> None:
                user_hook(self, ckpt)
                hooks.prepare_for_checkpoint(self, ckpt, load_options())

            cls.on_load_checkpoint = on_load_checkpoint  # for this call only: the instance does not exist yet
            try:
                return original(cls, checkpoint, strict=strict, **kwargs)
            finally:
                if own is None:
                    del cls.on_load_checkpoint
                else:
                    cls.on_load_checkpoint = own

        return _load_state

    def restore_model(original: Callable[..., Any]) -> Callable[..., Any]:
        def _restore_model(self: Any) -> Any:
            checkpoint, module = self._loaded_checkpoint, self.trainer.lightning_module
            if not checkpoint or module is None or not (hooks.checkpoint_key in checkpoint or has_lora(module)):
                return original(self)
            strategy = self.trainer.strategy
            load = strategy.load_model_state_dict

            def load_prepared(ckpt: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
                hooks.prepare_for_checkpoint(
                    module, ckpt, CheckpointOptions()
                )  # after the module's own on_load_checkpoint
                return load(ckpt, *args, **kwargs)

            strategy.load_model_state_dict = load_prepared  # for this call only (an attribute of the strategy object)
            try:
                return original(self)
            finally:
                strategy.__dict__.pop("load_model_state_dict", None)

        return _restore_model

    def dump_checkpoint(original: Callable[..., Any]) -> Callable[..., Any]:
        def _dump_checkpoint(self: Any, *args: Any, **kwargs: Any) -> dict:
            checkpoint = original(self, *args, **kwargs)
            module = self.trainer.lightning_module
            if module is not None and has_lora(module):
                hooks.record_in_checkpoint(module, checkpoint)
            return checkpoint

        return _dump_checkpoint

    def recover(original: Callable[..., Any]) -> Callable[..., Any]:
        def _recover_results_in_main_process(self: Any, worker_output: Any, trainer: Any) -> None:
            callback = lora_callback(trainer)
            module = trainer.lightning_module
            fitted = worker_output.weights_path is not None
            if callback is not None and fitted:
                try:
                    callback._prepare(
                        module, "fit"
                    )  # the adapters the workers trained, so strict=False keeps their keys
                except TargetNotFoundError:  # layers built in configure_model, which never ran here
                    callback = None
                    ns.rank_zero_warn(
                        "ddp_spawn: the main process's module has no layers to adapt (built in configure_model?), so "
                        "it keeps its untrained state, as Lightning does; load the exported adapter or the checkpoint "
                        "instead"
                    )
            original(self, worker_output, trainer)
            if callback is not None and fitted:
                for layer in lora_layers(
                    module
                ).values():  # the workers' weights came merged iff they merged at fit end
                    layer.merged = callback.merge_on_fit_end

        return _recover_results_in_main_process

    def load_checkpoint(original: Callable[..., Any]) -> Callable[..., Any]:
        def _load_checkpoint(self: Any, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
            module = self.lightning_module
            if module is None or not has_lora(module):
                return original(self, checkpoint_path, weights_only)
            helpers = FabricHelpers(
                fabric_mp._is_sharded_checkpoint,
                fabric_mp._is_full_checkpoint,
                _fabric_load_checkpoint(fabric_mp._load_checkpoint),
                fabric_load._METADATA_FILENAME,
            )
            return hooks.load_model_parallel_checkpoint(
                self, Path(self.broadcast(checkpoint_path)), weights_only, helpers
            )

        return _load_checkpoint

    def configure_model(original: Callable[..., Any]) -> Callable[..., Any]:
        def _call_configure_model(trainer: Any) -> None:
            original(trainer)
            callback = lora_callback(trainer)
            module = trainer.lightning_module
            if callback is not None and ns.is_overridden("configure_model", module):
                callback._prepare(module, callback._stage)  # layers built in configure_model get their adapters now

        return _call_configure_model

    def setup_hook(original: Callable[..., Any]) -> Callable[..., Any]:
        def _call_setup_hook(trainer: Any) -> None:
            original(trainer)
            module = trainer.lightning_module
            if module is not None:
                hooks.route_steps(module)  # a no-op for modules without several named adapters

        return _call_setup_hook

    _wrap(saving, "_load_state", load_state)
    _wrap(connector, "restore_model", restore_model)
    _wrap(connector, "dump_checkpoint", dump_checkpoint)
    _wrap(launcher, "_recover_results_in_main_process", recover)
    _wrap(model_parallel, "load_checkpoint", load_checkpoint)
    _wrap(call, "_call_configure_model", configure_model)
    _wrap(call, "_call_setup_hook", setup_hook)


# --------------------------------------------------------------------------- Lightning Fabric (lora_lightning.fabric)
FABRIC_PACKAGES = ("lightning.fabric", "lightning_fabric")


def fabric_package(obj: Any) -> str:
    """``"lightning.fabric"`` or ``"lightning_fabric"``: the Fabric package ``obj`` (a ``Fabric``, a strategy, a
    wrapper) comes from."""
    return "lightning_fabric" if type(obj).__module__.split(".")[0] == "lightning_fabric" else "lightning.fabric"


def _fabric_wrappers() -> tuple[type, ...]:
    """``_FabricModule`` and ``_FabricOptimizer`` of every Fabric package that is already imported (an object
    cannot come from a package that was never imported)."""
    found: list[type] = []
    for package in FABRIC_PACKAGES:
        wrappers = sys.modules.get(f"{package}.wrappers")
        if wrappers is not None:
            found += [wrappers._FabricModule, wrappers._FabricOptimizer]
    return tuple(found)


def is_fabric_wrapper(obj: Any) -> bool:
    """Whether ``obj`` is what ``fabric.setup`` returns: a ``_FabricModule`` or a ``_FabricOptimizer``."""
    wrappers = _fabric_wrappers()
    return bool(wrappers) and isinstance(obj, wrappers)


def refuse_fabric_wrapper(model: Any) -> None:
    """Injection guard (``registry.INJECTION_GUARDS``): ``inject_lora`` on what ``fabric.setup`` returned would add
    adapters that the optimizer Fabric set up does not hold."""
    if is_fabric_wrapper(model):
        raise LoRAConfigError(
            f"the model is already set up by fabric.setup (a {type(model).__name__}): adapters injected now would not "
            "be in its optimizer and would never train; inject before fabric.setup, e.g. "
            "lora_lightning.fabric.setup(fabric, model, config, optimizer_factory)"
        )


register_injection_guard(refuse_fabric_wrapper)


def unwrap_fabric(obj: Any) -> Any:
    """The object ``fabric.setup`` was given (``_FabricModule.module``, ``_FabricOptimizer.optimizer``); ``obj``
    itself when it is no Fabric wrapper."""
    from torch import nn

    if not is_fabric_wrapper(obj):
        return obj
    return obj.module if isinstance(obj, nn.Module) else obj.optimizer


def saves_distributed_checkpoint(strategy: Any) -> bool:
    """Whether a Fabric ``ModelParallelStrategy`` writes sharded checkpoint folders (its
    ``save_distributed_checkpoint``, the default) rather than one file."""
    return bool(getattr(strategy, "_save_distributed_checkpoint", True))


def fabric_helpers(package: str = "lightning.fabric") -> FabricHelpers:
    """Fabric's FSDP2 checkpoint helpers (:class:`FabricHelpers`) from ``package`` (``lightning.fabric`` or
    ``lightning_fabric``)."""
    if package not in FABRIC_PACKAGES:
        raise ValueError(f"unknown Fabric package {package!r}; one of {FABRIC_PACKAGES}")
    fabric_mp = importlib.import_module(f"{package}.strategies.model_parallel")
    fabric_load = importlib.import_module(f"{package}.utilities.load")
    return FabricHelpers(
        fabric_mp._is_sharded_checkpoint,
        fabric_mp._is_full_checkpoint,
        _fabric_load_checkpoint(fabric_mp._load_checkpoint),
        fabric_load._METADATA_FILENAME,
    )


__all__ = [
    "FABRIC_PACKAGES",
    "FROM_CHECKPOINT_HINT",
    "FabricHelpers",
    "Hooks",
    "LOAD_OPTIONS",
    "Namespace",
    "PACKAGES",
    "SUPPORTED",
    "fabric_helpers",
    "fabric_package",
    "install",
    "is_fabric_wrapper",
    "load_options",
    "lora_callback",
    "namespace",
    "saves_distributed_checkpoint",
    "trainer_of",
    "unwrap_fabric",
]
