"""The Lightning layer for ``lightning.pytorch``: :class:`LoRACallback`, adapter-only checkpoints and
:class:`AtomicCheckpointIO` (``pytorch_lightning`` users: :mod:`lora_lightning.pytorch_lightning`, the same
classes made on that package). The only part of lora_lightning that imports Lightning; its use of
Lightning's private API is in :mod:`.compat`. The classes are made, and the package's wrappers installed,
on first use (``import lora_lightning`` does it as soon as ``lightning.pytorch`` is imported)."""

from typing import Any

from .callback import inject_before_sharding
from .checkpoints import load_lora_checkpoint


def __getattr__(name: str) -> Any:
    if name in ("LoRACallback", "AtomicCheckpointIO", "LoRAMonitor"):
        from .package import layer

        return layer("lightning.pytorch")[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AtomicCheckpointIO", "LoRACallback", "LoRAMonitor", "inject_before_sharding", "load_lora_checkpoint"]
