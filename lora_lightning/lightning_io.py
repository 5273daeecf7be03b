"""Lightning checkpoint plumbing: adapter-only ``state_dict`` on save, base weights refilled on load,
and a crash-safe ``CheckpointIO`` (temp file + fsync + rename)."""

from __future__ import annotations

import io
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from .checkpoint import FORMAT_VERSION, adapter_param_names, atomic_write_bytes, check_config_compatible
from .config import LoRAConfig
from .errors import AdapterMismatchError, MergeStateError
from .fingerprint import check_fingerprint
from .injection import get_lora_state, lora_layers

CHECKPOINT_KEY = "lora_lightning"


def lora_checkpoint_info(model: nn.Module) -> dict[str, Any]:
    """What a Lightning checkpoint records about the adapter: config, adapted modules, fingerprint."""
    state = get_lora_state(model)
    return {
        "format_version": FORMAT_VERSION,
        "config": state.config.to_dict(),
        "adapted_modules": list(state.adapted),
        "modules_to_save": list(state.modules_to_save),
        "fingerprint": state.fingerprint,
    }


def filter_to_adapter(checkpoint: dict[str, Any], model: nn.Module) -> None:
    """Keep only adapter tensors in ``checkpoint["state_dict"]`` and record the LoRA info, in place."""
    keys = set(adapter_param_names(model))
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
    checkpoint[CHECKPOINT_KEY] = lora_checkpoint_info(model)


def refill_base_weights(checkpoint: dict[str, Any], model: nn.Module, on_base_mismatch: str = "raise") -> None:
    """Before Lightning loads an adapter-only checkpoint: check it fits, then add the model's own
    base tensors so a strict ``load_state_dict`` succeeds. Full checkpoints pass through unchanged."""
    info = checkpoint.get(CHECKPOINT_KEY)
    if info is None:
        return
    state = get_lora_state(model)
    check_config_compatible(LoRAConfig.from_dict(info["config"]), state.config, source="checkpoint")
    check_fingerprint(info.get("fingerprint"), state.fingerprint, on_base_mismatch, source="checkpoint")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise MergeStateError("cannot load a LoRA checkpoint into a merged model: call unmerge_lora(model) first")
    saved = checkpoint["state_dict"]
    missing = [k for k in adapter_param_names(model) if k not in saved]
    if missing:
        raise AdapterMismatchError(f"the checkpoint lacks {len(missing)} adapter tensor(s), e.g. {missing[:3]}")
    for key, value in model.state_dict().items():
        saved.setdefault(key, value)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic: serialise to memory, write a temp file
    in the target folder, fsync, rename. A crash mid-save leaves the previous file intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getbuffer())
