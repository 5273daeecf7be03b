"""The Lightning layer: :class:`LoRACallback`, adapter-only checkpoints and :class:`AtomicCheckpointIO`.
The only part of lora_lightning that imports Lightning (``import lora_lightning`` alone does not)."""

from .callback import LoRACallback
from .checkpoints import AtomicCheckpointIO
from .patches import install, load_lora_checkpoint

install()

__all__ = ["AtomicCheckpointIO", "LoRACallback", "load_lora_checkpoint"]
