"""Lightning checkpoints with LoRA: adapter-only ``state_dict`` plus the LoRA record on save, the
right model on every load, and a crash-safe ``CheckpointIO``.

Saving (the module's ``on_save_checkpoint``, so ``weights_only`` saves too): the checkpoint gets
``checkpoint["lora_lightning"]`` — the :class:`~lora_lightning.record.LoRAState` (config, adapted
modules and their structure, base fingerprint) and whether the adapters were merged — and, with
adapter-only checkpoints (the default), ``state_dict`` keeps only the adapter tensors.

Loading (:func:`prepare_for_checkpoint`, run after the module's own ``on_load_checkpoint`` and
before Lightning's ``load_state_dict``): a module without adapters gets them injected from the
record; a module with adapters must hold the same adapter structure; the fingerprint is checked;
merged adapters are unmerged; and the module's own base tensors fill what an adapter-only
checkpoint leaves out, so a strict load succeeds and yields the trained model. A checkpoint
without a record loaded into a model with adapters (a full, non-LoRA checkpoint) is refused with
the way to start LoRA from it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from ..adapter_io import adapter_param_names, atomic_write_bytes, planned_state
from ..errors import AdapterFileError
from ..injection import get_lora_state, has_lora, inject_lora, lora_layers
from ..merging import is_merged, unmerge_lora
from ..named import has_named_adapters, named_adapters, restore_named_adapters
from ..record import LoRAState, check_compatible, check_fingerprint
from ..shared_input import set_shared_input_groups, shared_input_groups

CHECKPOINT_KEY = "lora_lightning"
_OPTIONS = "_lora_lightning_options"
_HOOKED = "_lora_lightning_hooks"


@dataclass
class CheckpointOptions:
    """How a module's checkpoints are written and read; set on the module by ``LoRACallback``."""

    adapter_only: bool = True
    on_base_mismatch: str = "raise"
    # what the user sets to load a checkpoint trained on other base weights, in the words of the path in use
    override_hint: str = "attach LoRACallback(on_base_mismatch='warn') to the Trainer"


def checkpoint_options(module: nn.Module) -> CheckpointOptions:
    return getattr(module, _OPTIONS, None) or CheckpointOptions()


def set_checkpoint_options(module: nn.Module, options: CheckpointOptions) -> None:
    object.__setattr__(module, _OPTIONS, options)


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


class _ModuleHook:
    """``after`` for one module (picklable: a module reference and a module-level function)."""

    def __init__(self, module: nn.Module, fn: Callable[[nn.Module, dict], None]) -> None:
        self.module, self.fn = module, fn

    def __call__(self, checkpoint: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        self.fn(self.module, checkpoint)


def wrap_after(module: nn.Module, hook: str, after: Callable[..., None]) -> None:
    object.__setattr__(module, hook, _RunAfter(getattr(module, hook), after))


def ensure_checkpoint_hooks(module: nn.Module) -> None:
    """Make ``module``'s checkpoints carry the LoRA record (adapter-only by default) and make loading
    any checkpoint into it go through :func:`prepare_for_checkpoint`. Idempotent."""
    if getattr(module, _HOOKED, False):
        return
    object.__setattr__(module, _HOOKED, True)
    wrap_after(module, "on_save_checkpoint", _ModuleHook(module, record_in_checkpoint))
    wrap_after(module, "on_load_checkpoint", _ModuleHook(module, prepare_for_checkpoint))


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


def prepare_for_checkpoint(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Ready ``module`` for Lightning's ``load_state_dict(checkpoint["state_dict"])`` (see module doc)."""
    options = checkpoint_options(module)
    record = checkpoint.get(CHECKPOINT_KEY)
    state_dict = checkpoint.setdefault("state_dict", {})
    if record is None:
        adapter_keys = [f"{n}.{leaf}" for n, layer in lora_layers(module).items() for leaf in layer.adapter_names]
        if adapter_keys and not any(k in state_dict for k in adapter_keys):
            raise no_record_error(len(state_dict))
        return
    saved = LoRAState.from_dict(record)
    base_keys = [k for k in module.state_dict() if k not in set(adapter_param_names(module, all_adapters=True) if has_lora(module) else [])]
    full = bool(base_keys) and all(k in state_dict for k in base_keys)  # the checkpoint brings its own base
    if not has_lora(module):
        planned = planned_state(module, saved.config)
        check_compatible(saved, planned, source="checkpoint")
        if not full:
            check_fingerprint(saved.fingerprint, planned.fingerprint, options.on_base_mismatch, "checkpoint", options.override_hint)
        inject_lora(module, saved.config)
        ensure_checkpoint_hooks(module)  # its later checkpoints stay adapter-only, with the record
        restore_named_adapters(module, record.get("adapters"))
    else:
        if record.get("adapters") and any(layer.merged for layer in lora_layers(module).values()):
            unmerge_lora(module)
        restore_named_adapters(module, record.get("adapters"))  # activates the checkpoint's active adapter
        state = get_lora_state(module)
        check_compatible(saved, state, source="checkpoint")
        if not full:
            check_fingerprint(saved.fingerprint, state.fingerprint, options.on_base_mismatch, "checkpoint", options.override_hint)
        if any(layer.merged for layer in lora_layers(module).values()):
            unmerge_lora(module)  # the checkpoint's adapters replace these; the base must be W0 again
    if record.get("shared_input_groups"):
        set_shared_input_groups(module, record["shared_input_groups"])
    if full:  # its base tensors are loaded as saved: merged if they were merged when saved
        for layer in lora_layers(module).values():
            layer.merged = bool(record.get("merged", False))
        return
    for key, value in module.state_dict().items():
        state_dict.setdefault(key, value)


# --------------------------------------------------------------------------- writing
class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic: serialise to memory, write a temp file
    in the target folder, fsync, rename. A crash mid-save leaves the previous file intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getbuffer())
