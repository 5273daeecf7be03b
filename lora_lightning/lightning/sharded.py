"""Resuming a module sharded by Lightning's ``ModelParallelStrategy`` (FSDP2) from an adapter-only
checkpoint.

The strategy's own ``load_checkpoint`` asks the checkpoint for every tensor of the model
(``get_model_state_dict`` then ``torch.distributed.checkpoint.load``, strict), so an adapter-only
checkpoint fails with ``Missing key in checkpoint state_dict: state_dict.<base weight>``. For a
module with adapters, :func:`load_model_parallel_checkpoint` first checks the checkpoint (the LoRA
record is there, the adapter structure matches, every adapter tensor is present), then loads the
tensors it holds and the optimizer states, in both of the strategy's formats: a sharded directory
(``save_distributed_checkpoint=True``, the default) and a single file. The files are re-sharded
to the loading run's processes, so a 2-process checkpoint resumes on 1 process and vice versa.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFileError
from ..injection import adapter_param_names, get_lora_state
from ..record import LoRAState, check_compatible
from .checkpoints import CHECKPOINT_KEY, no_record_error
from .compat import FabricHelpers

_STATE = "state_dict"


def check_sharded_checkpoint(module: torch.nn.Module, record: dict[str, Any] | None, saved_keys: set[str]) -> None:
    """Refuse a checkpoint that cannot restore ``module``'s adapters, before any tensor is loaded."""
    if record is None:
        raise no_record_error(len(saved_keys))
    check_compatible(LoRAState.from_dict(record), get_lora_state(module), source="checkpoint")
    missing = sorted(set(adapter_param_names(module)) - saved_keys)
    if missing:
        raise AdapterFileError(
            f"the checkpoint lacks {len(missing)} adapter tensor(s) of this model (e.g. {missing[:3]}): it was written "
            "by another model or cut short; resume from a checkpoint this model's run wrote"
        )


def load_model_parallel_checkpoint(
    strategy: Any, path: Path, weights_only: bool | None, fabric: FabricHelpers
) -> dict[str, Any]:
    """``ModelParallelStrategy.load_checkpoint`` for a module with adapters; returns the remaining
    checkpoint entries (epoch, loops, callbacks, the LoRA record) like the original. ``fabric``: Lightning
    Fabric's checkpoint helpers (:mod:`.compat` resolves them)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, module = strategy.model, strategy.lightning_module
    if fabric.is_sharded_checkpoint(path):
        metadata = torch.load(path / fabric.metadata_filename, weights_only=weights_only)
        stored = FileSystemReader(path).read_metadata().state_dict_metadata
        saved_keys = {k[len(_STATE) + 1 :] for k in stored if k.startswith(_STATE + ".")}
        check_sharded_checkpoint(module, metadata.get(CHECKPOINT_KEY), saved_keys)
        wanted = {_STATE: {k: v for k, v in get_model_state_dict(model).items() if k in saved_keys}}
        dcp_load(wanted, checkpoint_id=path)
        set_model_state_dict(model, wanted[_STATE], options=StateDictOptions(strict=False))
        for idx, optimizer in enumerate(strategy.optimizers):
            key = f"optimizer_{idx}"
            optimizer_state = {key: get_optimizer_state_dict(model, optimizer)}
            dcp_load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(
                model, optimizer, optim_state_dict=optimizer_state[key], options=StateDictOptions(cpu_offload=True)
            )
        return metadata
    if fabric.is_full_checkpoint(path):
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        check_sharded_checkpoint(module, checkpoint.get(CHECKPOINT_KEY), set(checkpoint.get(_STATE, {})))
        del checkpoint
        # the adapter tensors are all there (checked): let Lightning load what the file holds
        state = {_STATE: model, **{f"optimizer_{i}": opt for i, opt in enumerate(strategy.optimizers)}}
        return fabric.load_checkpoint(
            path, state, strict=False, optimizer_states_from_list=True, weights_only=weights_only
        )
    raise AdapterFileError(
        f"{str(path)!r} is neither a sharded checkpoint folder nor a checkpoint file; check ckpt_path"
    )
