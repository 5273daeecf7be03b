"""The Lightning layer: :class:`LoRACallback`, adapter-only checkpoints and :class:`AtomicCheckpointIO`.
The only part of lora_lightning that imports Lightning (``import lora_lightning`` alone does not)."""

from .callback import LoRACallback, inject_before_sharding
from .checkpoints import AtomicCheckpointIO
from .patches import install, load_lora_checkpoint

install()

__all__ = ["AtomicCheckpointIO", "LoRACallback", "inject_before_sharding", "load_lora_checkpoint"]
