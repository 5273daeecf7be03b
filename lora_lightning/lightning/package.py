"""Makes the Lightning layer for one Lightning package: its ``LoRACallback`` and ``AtomicCheckpointIO``
classes, and the wrappers of :mod:`.compat` installed into it — once per package, on first use.
:mod:`lora_lightning.lightning` serves ``lightning.pytorch``, :mod:`lora_lightning.pytorch_lightning`
serves ``pytorch_lightning``."""

from __future__ import annotations

from functools import cache

from .callback import make_callback_class
from .checkpoints import CHECKPOINT_KEY, AtomicSave, prepare_for_checkpoint, record_in_checkpoint
from .compat import Hooks, install, namespace
from .monitor import make_monitor_class
from .routing import route_steps
from .sharded import load_model_parallel_checkpoint

HOOKS = Hooks(CHECKPOINT_KEY, prepare_for_checkpoint, record_in_checkpoint, route_steps, load_model_parallel_checkpoint)
MODULES = {"lightning.pytorch": "lora_lightning.lightning", "pytorch_lightning": "lora_lightning.pytorch_lightning"}


@cache
def layer(package: str) -> dict[str, type]:
    """``{"LoRACallback": ..., "AtomicCheckpointIO": ..., "LoRAMonitor": ...}`` for ``package``
    (``"lightning.pytorch"`` or ``"pytorch_lightning"``), importable from its lora_lightning module; installs the
    package's wrappers."""
    ns = namespace(package)
    module = MODULES[package]
    atomic_io = type(
        "AtomicCheckpointIO",
        (AtomicSave, ns.TorchCheckpointIO),
        {
            "__module__": module,
            "__qualname__": "AtomicCheckpointIO",
            "__doc__": f"{ns.name}'s ``TorchCheckpointIO`` with atomic local writes (temp file, fsync, rename).",
        },
    )
    callback = make_callback_class(ns, atomic_io, module)
    install(ns, HOOKS)
    return {"LoRACallback": callback, "AtomicCheckpointIO": atomic_io, "LoRAMonitor": make_monitor_class(ns, module)}


__all__ = ["HOOKS", "MODULES", "layer"]
