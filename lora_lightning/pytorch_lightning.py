"""The Lightning layer for the ``pytorch_lightning`` package (``pip install pytorch-lightning``): the same
:class:`LoRACallback` and :class:`AtomicCheckpointIO` as :mod:`lora_lightning.lightning`, made on
``pytorch_lightning.Callback``, for ``pytorch_lightning.Trainer``::

    import pytorch_lightning as pl
    from lora_lightning.pytorch_lightning import LoRACallback

    pl.Trainer(callbacks=[LoRACallback(r=8, targets=["q", "v"])]).fit(model)
"""

from typing import Any

from .lightning.callback import inject_before_sharding
from .lightning.checkpoints import load_lora_checkpoint


def __getattr__(name: str) -> Any:
    if name in ("LoRACallback", "AtomicCheckpointIO", "LoRAMonitor"):
        from .lightning.package import layer

        return layer("pytorch_lightning")[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AtomicCheckpointIO", "LoRACallback", "LoRAMonitor", "inject_before_sharding", "load_lora_checkpoint"]
