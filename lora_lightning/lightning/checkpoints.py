"""Lightning checkpoints with LoRA: adapter-only ``state_dict`` plus the LoRA record on save, the right
model on every load, and a crash-safe ``CheckpointIO``.

Saving (:func:`record_in_checkpoint`, called for every checkpoint of a module with adapters, weights-only
saves too): the checkpoint gets ``checkpoint["lora_lightning"]`` — the
:class:`~lora_lightning.record.LoRAState` (config, adapted modules and their structure, base identity),
whether the adapters were merged, the learnt fusion groups and the named adapters — and, with adapter-only
checkpoints (the default), ``state_dict`` keeps only the adapter tensors.

Loading (:func:`prepare_for_checkpoint`, run after the module's own ``on_load_checkpoint`` and before
Lightning's ``load_state_dict``): a module without adapters gets them injected from the record; a module
with adapters must hold the same adapter structure; the base identity is checked; merged adapters are
unmerged; and the module's own base tensors fill what an adapter-only checkpoint leaves out, so a strict
load succeeds and yields the trained model. A checkpoint without a record loaded into a model with
adapters (a full, non-LoRA checkpoint) is refused with the way to start LoRA from it. Neither function
changes which parameters train.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from ..adapter_io import atomic_write_bytes
from ..errors import AdapterFileError, LoRAConfigError
from ..injection import adapter_param_names, get_lora_state, has_lora, inject_lora, lora_layers, planned_record
from ..merging import is_merged, unmerge_lora
from ..named import has_named_adapters, named_adapters, restore_named_adapters
from ..record import ON_MISMATCH, LoRAState, check_compatible, check_fingerprint
from ..shared_input import set_shared_input_groups, shared_input_groups
from ..state import CheckpointOptions, attach, lora_handle
from .compat import FROM_CHECKPOINT_HINT, LOAD_OPTIONS, load_options

CHECKPOINT_KEY = "lora_lightning"


def checkpoint_options(module: nn.Module) -> CheckpointOptions:
    """How ``module``'s checkpoints are written and read: what its ``LoRACallback`` set, else the defaults
    (adapter-only; another base raises)."""
    handle = lora_handle(module)
    return handle.checkpoint if handle is not None and handle.checkpoint is not None else CheckpointOptions()


def set_checkpoint_options(module: nn.Module, options: CheckpointOptions) -> None:
    attach(module).checkpoint = options


# --------------------------------------------------------------------------- saving
def record_in_checkpoint(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Add the LoRA record; keep only adapter tensors in ``state_dict`` (adapter-only checkpoints)."""
    if not has_lora(module):
        return
    if checkpoint_options(module).adapter_only:
        keys = set(adapter_param_names(module, all_adapters=True))
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
    checkpoint[CHECKPOINT_KEY] = get_lora_state(module).to_dict() | {"merged": is_merged(module)}
    # the learnt shared-input groups: restored on resume, so its first step runs fused as the uninterrupted run's did
    checkpoint[CHECKPOINT_KEY]["shared_input_groups"] = shared_input_groups(module)
    if has_named_adapters(module):
        checkpoint[CHECKPOINT_KEY]["adapters"] = named_adapters(module).to_dict()


# --------------------------------------------------------------------------- loading
def no_record_error(n_tensors: int) -> AdapterFileError:
    return AdapterFileError(
        f"the checkpoint holds no LoRA adapters ({n_tensors} tensors of a full model, saved without "
        "LoRACallback), so it cannot be loaded into a model with adapters. To start LoRA from its weights, load "
        "them first (model = MyModule.load_from_checkpoint(path), or model.load_state_dict(torch.load(path)"
        "['state_dict'])) and fit that model with LoRACallback and no ckpt_path"
    )


def prepare_for_checkpoint(
    module: nn.Module, checkpoint: dict[str, Any], options: CheckpointOptions | None = None
) -> None:
    """Ready ``module`` for Lightning's ``load_state_dict(checkpoint["state_dict"])`` (see module doc).
    ``options``: how a base mismatch is treated when the module has no options of its own (a fresh module
    of ``load_from_checkpoint``)."""
    handle = lora_handle(module)
    if handle is None or handle.checkpoint is None:
        options = options or load_options()
    else:
        options = handle.checkpoint
    record = checkpoint.get(CHECKPOINT_KEY)
    state_dict = checkpoint.setdefault("state_dict", {})
    if record is None:
        adapter_keys = [f"{n}.{leaf}" for n, layer in lora_layers(module).items() for leaf in layer.adapter_names]
        if adapter_keys and not any(k in state_dict for k in adapter_keys):
            raise no_record_error(len(state_dict))
        return
    saved = LoRAState.from_dict(record)
    base_keys = [
        k
        for k in module.state_dict()
        if k not in set(adapter_param_names(module, all_adapters=True) if has_lora(module) else [])
    ]
    full = bool(base_keys) and all(k in state_dict for k in base_keys)  # the checkpoint brings its own base
    grads = {p: p.requires_grad for p in module.parameters()}
    if not has_lora(module):
        plan, planned = planned_record(module, saved.config)
        check_compatible(saved, planned, source="checkpoint")
        if not full:
            check_fingerprint(
                saved.fingerprint, planned.fingerprint, options.on_base_mismatch, "checkpoint", options.override_hint
            )
        inject_lora(module, saved.config, plan)
        restore_named_adapters(module, record.get("adapters"))
    else:
        if record.get("adapters") and any(layer.merged for layer in lora_layers(module).values()):
            unmerge_lora(module)
        restore_named_adapters(module, record.get("adapters"))  # activates the checkpoint's active adapter
        state = get_lora_state(module)
        check_compatible(saved, state, source="checkpoint")
        if not full:
            check_fingerprint(
                saved.fingerprint, state.fingerprint, options.on_base_mismatch, "checkpoint", options.override_hint
            )
        if any(layer.merged for layer in lora_layers(module).values()):
            unmerge_lora(module)  # the checkpoint's adapters replace these; the base must be W0 again
        for p in module.parameters():  # loading weights does not change what trains
            if p in grads:
                p.requires_grad_(grads[p])
    if record.get("shared_input_groups"):
        set_shared_input_groups(module, record["shared_input_groups"])
    if full:  # its base tensors are loaded as saved: merged if they were merged when saved
        for layer in lora_layers(module).values():
            layer.merged = bool(record.get("merged", False))
        return
    for key, value in module.state_dict().items():
        state_dict.setdefault(key, value)


# --------------------------------------------------------------------------- writing
class AtomicSave:
    """``save_checkpoint`` whose local writes are atomic: serialise to memory, write a temp file in the target
    folder, fsync, rename. A crash mid-save leaves the previous file intact. Mixed into each Lightning
    package's ``TorchCheckpointIO`` (:class:`lora_lightning.AtomicCheckpointIO`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # type: ignore[misc]
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getbuffer())


__all__ = [
    "AtomicSave",
    "CHECKPOINT_KEY",
    "checkpoint_options",
    "load_lora_checkpoint",
    "no_record_error",
    "prepare_for_checkpoint",
    "record_in_checkpoint",
    "set_checkpoint_options",
]


def load_lora_checkpoint(cls: type, checkpoint_path: Any, *, on_base_mismatch: str = "raise", **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(checkpoint_path, **kwargs)`` with a chosen ``on_base_mismatch``
    (``raise`` | ``warn`` | ``ignore``) for a LoRA checkpoint trained on other base weights."""
    if on_base_mismatch not in ON_MISMATCH:
        raise LoRAConfigError(f"on_base_mismatch={on_base_mismatch!r} must be one of {ON_MISMATCH}")
    token = LOAD_OPTIONS.set(CheckpointOptions(on_base_mismatch=on_base_mismatch, override_hint=FROM_CHECKPOINT_HINT))
    try:
        return cls.load_from_checkpoint(checkpoint_path, **kwargs)  # type: ignore[attr-defined]
    finally:
        LOAD_OPTIONS.reset(token)
