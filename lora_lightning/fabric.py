"""LoRA in a Lightning Fabric loop (LitGPT and other Fabric users): inject before ``fabric.setup``,
adapter-only checkpoints with the LoRA record, exports from the set-up model.

``h = W0·x + (alpha/r)·B·A·x`` with ``W0`` frozen: only ``A: r x d_in`` and ``B: d_out x r`` (plus
``modules_to_save`` and the biases the config trains) are trained, saved and loaded. The recipe::

    from lora_lightning import LoRAConfig
    import lora_lightning.fabric as lf

    fabric = Fabric(...); fabric.launch()
    model, optimizer = lf.setup(fabric, MyModel(), LoRAConfig(r=8, targets=["q", "v"]),
                                lambda params: torch.optim.AdamW(params, lr=1e-3))
    ...  # train as usual: fabric.backward(loss); optimizer.step()
    lf.save(fabric, "ckpt.pt", model, optimizer, step=step)       # adapters + LoRA record + optimizer
    extra = lf.load(fabric, "ckpt.pt", model, optimizer)          # a fresh run: same base, same setup
    lf.export_adapter(fabric, model, "adapter.safetensors")       # or export_merged(...)

Order matters: :func:`setup` injects the adapters, *then* lets Fabric set the model up (device, precision,
DDP or FSDP2 sharding) and builds the optimizer over the trainable tensors, so the optimizer holds exactly the
adapters and FSDP2 shards them with the layers they adapt. A model already set up by ``fabric.setup`` is
refused (adapters added to it would never reach the optimizer).

A checkpoint is one file ``{"state_dict": adapter tensors, "lora_lightning": the LoRA record (config,
structure of every adapted matrix, base identity), "optimizer_states": [state keyed by parameter name], **extra}``
written through ``fabric.save`` (single device, DDP). Under FSDP2 (``ModelParallelStrategy``) it is written
like Fabric writes that strategy's checkpoints: a folder (``torch.distributed.checkpoint`` shards of the
same entries + ``meta.pt`` with the record and ``extra``; ``save_distributed_checkpoint=True``, the default)
or one file as above. Checkpoints move between process counts, re-sharded to the loading run (tested: DDP's
file and both FSDP2 formats resume on one process, a 1-process file resumes under DDP and under FSDP2).
:func:`load` checks the record before any tensor moves: same adapter structure
(:class:`~lora_lightning.AdapterMismatchError`), same base weights
(:class:`~lora_lightning.BaseModelMismatchError`, or a warning / nothing with ``on_base_mismatch``).

Supported strategies: single device, ``DataParallel``, ``ddp`` (and ``ddp_spawn``), ``ModelParallelStrategy``
(FSDP2; build the model with its layers, inject, and let ``parallelize_fn`` call ``fully_shard``). The
identity check needs the base weights at injection: a model initialised on the meta device
(``fabric.init_module(empty_init=True)``) records no base identity.
"""

from __future__ import annotations

import importlib
import inspect
import io
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer

from .adapter_io import atomic_write_bytes, save_adapter, save_merged_model
from .config import LoRAConfig
from .errors import AdapterFileError, AdapterMismatchError, LoRAConfigError, NotInjectedError
from .injection import adapter_param_names, get_lora_state, has_lora, inject_lora, planned_state
from .lightning.checkpoints import CHECKPOINT_KEY, prepare_for_checkpoint, record_in_checkpoint
from .lightning.compat import (
    fabric_helpers,
    fabric_package,
    is_fabric_wrapper,
    saves_distributed_checkpoint,
    unwrap_fabric,
)
from .lightning.sharded import load_model_parallel_checkpoint
from .plan import AdapterSpec
from .record import ON_MISMATCH, differences
from .sharding import gathered, is_sharded
from .state import CheckpointOptions, attach, lora_handle

if TYPE_CHECKING:
    from lightning.fabric import Fabric

MODEL_KEY = "state_dict"  # the adapter tensors, keyed like the set-up module's state_dict()
OPTIMIZERS_KEY = "optimizer_states"  # one state per optimizer, keyed by parameter name
RESERVED = (MODEL_KEY, OPTIMIZERS_KEY, CHECKPOINT_KEY)
SETUP_HINT = "model, optimizer = lora_lightning.fabric.setup(fabric, model, config, optimizer_factory)"
BASE_MISMATCH_HINT = "pass lora_lightning.fabric.load(..., on_base_mismatch='warn')"
_SUPPORTED = ("SingleDeviceStrategy", "DataParallelStrategy", "DDPStrategy", "ModelParallelStrategy")

OptimizerFactory = Callable[[list[nn.Parameter]], Optimizer]
Optimizers = Optimizer | Sequence[Optimizer] | None


# --------------------------------------------------------------------------- setting up
def unwrap(model: nn.Module) -> nn.Module:
    """The module ``fabric.setup`` was given, which holds the adapters (``_FabricModule.module``); ``model``
    itself if it is no Fabric wrapper. Pass it to the core functions: ``merge_and_unload(unwrap(model))``,
    ``save_adapter(unwrap(model), path)``. Raises :class:`~lora_lightning.LoRAConfigError` if adapters were
    injected into the wrapper after ``fabric.setup`` (the optimizer does not hold them)."""
    if not is_fabric_wrapper(model):
        return model
    handle = lora_handle(model)
    if handle is not None and handle.injected:
        raise LoRAConfigError(_set_up_message("the adapters were injected into a model after fabric.setup"))
    return unwrap_fabric(model)


def inject(model: nn.Module, config: LoRAConfig | Mapping[str, Any]) -> list[AdapterSpec]:
    """:func:`~lora_lightning.inject_lora` for a model that ``fabric.setup`` has not seen yet; returns the adapted
    matrices. Raises :class:`~lora_lightning.LoRAConfigError` for a model that Fabric already set up (a
    ``_FabricModule``, a DDP/FSDP wrapper, FSDP2-sharded weights). Then build the optimizer over the
    parameters that require grad and call ``fabric.setup`` (or use :func:`setup`, which does all three)."""
    _refuse_set_up(model)
    return inject_lora(model, _config(config))


def setup(
    fabric: Fabric,
    model: nn.Module,
    config: LoRAConfig | Mapping[str, Any] | None,
    optimizer_factory: OptimizerFactory,
) -> tuple[Any, Any]:
    """Inject ``config``'s adapters into ``model``, set it up with Fabric, then build the optimizer over its
    trainable tensors and set that up; returns ``(fabric_model, fabric_optimizer)`` like ``fabric.setup``.

    Args:
        fabric: a launched ``Fabric`` (``fabric.launch()`` already called for several devices).
        model: the model, not set up by Fabric yet (its layers built, on CPU or the meta device).
        config: the LoRA config (object or dict). ``None``: ``model`` already holds its adapters (e.g. injected
            and warm-started with :func:`~lora_lightning.load_adapter`); a config given for a model with adapters
            must describe the same ones.
        optimizer_factory: ``params -> optimizer``, called once with the trainable tensors (the adapters, after
            any FSDP2 sharding), e.g. ``lambda params: torch.optim.AdamW(params, lr=1e-3)``.
    """
    _check_strategy(fabric.strategy, "setup")
    _refuse_set_up(model)
    if config is not None:
        config = _config(config)
        if not has_lora(model):
            inject_lora(model, config)
        else:
            diffs = differences(get_lora_state(model), planned_state(model, config), "the model", "this config")
            if diffs:
                raise AdapterMismatchError(
                    f"setup: {type(model).__name__} already holds other LoRA adapters ({'; '.join(diffs)}); pass "
                    "config=None to train the ones it holds, or lora_lightning.remove_lora(model) first"
                )
    elif not has_lora(model):
        raise NotInjectedError(
            f"setup: {type(model).__name__} holds no LoRA adapters and config=None; pass the LoRAConfig to inject"
        )
    fabric_model = fabric.setup_module(model)  # DDP wraps / FSDP2 shards the adapted model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = fabric.setup_optimizers(optimizer_factory(params))
    return fabric_model, optimizer


# --------------------------------------------------------------------------- saving
def lora_state(model: nn.Module, optimizer: Optimizers = None, **extra: Any) -> dict[str, Any]:
    """The checkpoint :func:`save` writes, for ``fabric.save(path, lora_state(model, optimizer, step=...))``
    yourself (single device, DDP): the adapter tensors (references, not copies), the LoRA record, each
    optimizer's state keyed by parameter name, and ``extra``. An FSDP2-sharded model needs :func:`save`."""
    return _lora_state(model, optimizer, extra, "lora_state")


def _lora_state(model: nn.Module, optimizer: Optimizers, extra: Mapping[str, Any], what: str) -> dict[str, Any]:
    module = unwrap(model)
    if is_sharded(module):
        raise LoRAConfigError(
            f"{what}: the model is sharded (FSDP2, ModelParallelStrategy), so its tensors are per-rank shards; "
            "write the checkpoint with lora_lightning.fabric.save(fabric, path, model, optimizer, ...)"
        )
    _check_extra(extra)
    optimizers = _raw_optimizers(optimizer)
    _check_optimizers_hold_adapters(module, optimizers, what)
    keys = adapter_param_names(module, all_adapters=True)
    state = module.state_dict()
    checkpoint: dict[str, Any] = {MODEL_KEY: {k: state[k] for k in keys}}
    record_in_checkpoint(module, checkpoint)
    if optimizers:
        checkpoint[OPTIMIZERS_KEY] = [_named_optimizer_state(module, opt) for opt in optimizers]
    return checkpoint | dict(extra)


def save(fabric: Fabric, path: str | os.PathLike, model: nn.Module, optimizer: Optimizers = None, **extra: Any) -> Path:
    """Write an adapter-only checkpoint of ``model`` (and ``optimizer``'s state) to ``path``: on every rank, like
    ``fabric.save``. ``extra``: anything else to keep (step, scheduler state, RNG state), returned by :func:`load`.
    Returns ``path``. Format: see the module docstring (FSDP2: a folder unless the strategy has
    ``save_distributed_checkpoint=False``)."""
    _check_strategy(fabric.strategy, "save")
    module = unwrap(model)
    if not is_sharded(module):
        fabric.save(path, _lora_state(model, optimizer, extra, "save"))
        return Path(path)
    _check_extra(extra)
    optimizers = _raw_optimizers(optimizer)
    _check_optimizers_hold_adapters(module, optimizers, "save")
    path = Path(fabric.broadcast(str(path)))
    helpers = fabric_helpers(fabric_package(fabric))
    record: dict[str, Any] = {MODEL_KEY: {}}
    record_in_checkpoint(module, record)
    keys = set(adapter_param_names(module, all_adapters=True))
    if saves_distributed_checkpoint(fabric.strategy):
        _save_sharded_folder(
            fabric,
            path,
            module,
            optimizers,
            keys,
            {CHECKPOINT_KEY: record[CHECKPOINT_KEY], **extra},
            helpers.metadata_filename,
        )
    else:
        _save_gathered_file(fabric, path, module, optimizers, keys, {CHECKPOINT_KEY: record[CHECKPOINT_KEY], **extra})
    fabric.barrier()
    return path


def _save_sharded_folder(
    fabric: Any,
    path: Path,
    module: nn.Module,
    optimizers: list[Optimizer],
    keys: set[str],
    metadata: dict[str, Any],
    metadata_filename: str,
) -> None:
    """``torch.distributed.checkpoint`` shards of the adapter tensors (``state_dict.<key>``) and optimizer states
    (``optimizer_<i>``), plus ``meta.pt`` (record and extras) from rank 0: the layout of Lightning's
    ``ModelParallelStrategy`` checkpoints."""
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    if fabric.is_global_zero:
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
    fabric.barrier()
    state: dict[str, Any] = {MODEL_KEY: {k: v for k, v in get_model_state_dict(module).items() if k in keys}}
    for i, opt in enumerate(optimizers):
        state[f"optimizer_{i}"] = get_optimizer_state_dict(module, opt)
    dcp_save(state, checkpoint_id=path)
    if fabric.is_global_zero:
        torch.save(metadata, path / metadata_filename)


def _save_gathered_file(
    fabric: Any, path: Path, module: nn.Module, optimizers: list[Optimizer], keys: set[str], metadata: dict[str, Any]
) -> None:
    """One file with the full adapter tensors and optimizer states (gathered on every rank, written by rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    with gathered(module, keys):
        tensors = {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items() if k in keys}
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    states = [get_optimizer_state_dict(module, opt, options=full) for opt in optimizers]
    if fabric.is_global_zero:
        checkpoint = {MODEL_KEY: tensors, **({OPTIMIZERS_KEY: states} if states else {}), **metadata}
        if path.is_dir():
            shutil.rmtree(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getbuffer())


# --------------------------------------------------------------------------- loading
def load(
    fabric: Fabric,
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: Optimizers = None,
    *,
    on_base_mismatch: str = "raise",
    weights_only: bool | None = None,
) -> dict[str, Any]:
    """Restore the adapters (and ``optimizer``'s state) of a checkpoint :func:`save` wrote into a model set up by
    :func:`setup` with the same LoRA config; returns the checkpoint's other entries (the ``extra`` of
    :func:`save`). On every rank, like ``fabric.load``.

    Checked before any tensor is loaded: the checkpoint holds a LoRA record
    (:class:`~lora_lightning.AdapterFileError`), the same adapter structure
    (:class:`~lora_lightning.AdapterMismatchError`), the same base weights
    (:class:`~lora_lightning.BaseModelMismatchError`; ``on_base_mismatch``: ``raise`` | ``warn`` | ``ignore``),
    every adapter tensor, optimizers built like the saving run's. ``weights_only``: as in ``fabric.load``.
    """
    if on_base_mismatch not in ON_MISMATCH:
        raise LoRAConfigError(f"on_base_mismatch={on_base_mismatch!r} must be one of {ON_MISMATCH}")
    _check_strategy(fabric.strategy, "load")
    module = unwrap(model)
    if not has_lora(module):
        raise NotInjectedError(
            f"load: {type(module).__name__} holds no LoRA adapters; set it up with the checkpoint's LoRA config "
            f"first ({SETUP_HINT}), then load"
        )
    optimizers = _raw_optimizers(optimizer)
    _check_optimizers_hold_adapters(module, optimizers, "load")
    path = Path(fabric.broadcast(str(path)))
    helpers = fabric_helpers(fabric_package(fabric))
    options = CheckpointOptions(True, on_base_mismatch, BASE_MISMATCH_HINT)
    if not path.exists():
        raise AdapterFileError(
            f"load: the checkpoint {str(path)!r} does not exist; pass the path lora_lightning.fabric.save wrote"
        )
    if helpers.is_sharded_checkpoint(path):
        from torch.distributed.checkpoint import FileSystemReader

        metadata = torch.load(path / helpers.metadata_filename, weights_only=weights_only)
        stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        saved = {k[len(MODEL_KEY) + 1 :] for k in stored if k.startswith(MODEL_KEY + ".")}
        _check_record(module, metadata.get(CHECKPOINT_KEY), saved, sorted(metadata), path, options)
        saved_optimizers = {k.split(".", 1)[0] for k in stored if k.startswith("optimizer_")}
        _check_optimizer_count(optimizers, len(saved_optimizers), path)
        remaining = load_model_parallel_checkpoint(_Target(module, module, optimizers), path, weights_only, helpers)
        return {k: v for k, v in remaining.items() if k not in RESERVED}
    if not path.is_file():
        raise AdapterFileError(
            f"load: {str(path)!r} is a folder but no sharded checkpoint (no {helpers.metadata_filename}); pass the "
            "path lora_lightning.fabric.save wrote"
        )
    if is_sharded(module):
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
    else:  # Lightning < 2.5's fabric.load has no weights_only: torch.load's default there
        takes = "weights_only" in inspect.signature(fabric.load).parameters
        checkpoint = fabric.load(path, **({"weights_only": weights_only} if takes else {}))
    tensors = checkpoint.get(MODEL_KEY)
    saved = set(tensors) if isinstance(tensors, Mapping) else set()
    _check_record(module, checkpoint.get(CHECKPOINT_KEY), saved, sorted(checkpoint), path, options)
    states = checkpoint.get(OPTIMIZERS_KEY) or []
    _check_optimizer_count(optimizers, len(states), path)
    if is_sharded(module):  # FSDP2 and one file: Lightning's loader puts the full tensors into the shards
        del checkpoint
        remaining = load_model_parallel_checkpoint(_Target(module, module, optimizers), path, weights_only, helpers)
        return {k: v for k, v in remaining.items() if k not in RESERVED}
    states = states[: len(optimizers)]  # none given: the adapters only
    for opt, state in zip(optimizers, states, strict=True):
        _check_groups(module, opt, state, path)
    _load_tensors(module, tensors, path)
    for opt, state in zip(optimizers, states, strict=True):
        _load_named_optimizer_state(module, opt, state)
    return {k: v for k, v in checkpoint.items() if k not in RESERVED}


@dataclass
class _Target:
    """What :func:`~lora_lightning.lightning.sharded.load_model_parallel_checkpoint` reads of a Trainer strategy."""

    model: nn.Module
    lightning_module: nn.Module
    optimizers: list[Optimizer] = field(default_factory=list)


def _check_record(
    module: nn.Module, record: Any, saved: set[str], entries: list[str], path: Path, options: CheckpointOptions
) -> None:
    """Refuse a checkpoint that cannot restore ``module``'s adapters, before any tensor is loaded: no LoRA
    record, another adapter structure, another base (``options.on_base_mismatch``), adapter tensors missing."""
    if not isinstance(record, Mapping):
        raise AdapterFileError(
            f"load: {str(path)!r} holds no LoRA record (entries {entries[:5]}): it is no checkpoint of "
            "lora_lightning.fabric.save (a full model's fabric.save?). To start LoRA from a full model's weights, "
            f"load them into the model before setup (model.load_state_dict(...)), then {SETUP_HINT}"
        )
    handle = attach(module)
    kept = handle.checkpoint
    handle.checkpoint = options  # how this load treats another base
    try:
        prepare_for_checkpoint(module, {MODEL_KEY: dict.fromkeys(saved), CHECKPOINT_KEY: dict(record)})
    finally:
        handle.checkpoint = kept
    missing = sorted(set(adapter_param_names(module, all_adapters=True)) - saved)
    if missing:
        raise AdapterFileError(
            f"load: {str(path)!r} lacks {len(missing)} adapter tensor(s) of this model (e.g. {missing[:3]}): it was "
            "written by another model or cut short; load a checkpoint this model's run wrote"
        )


def _check_optimizer_count(optimizers: list[Optimizer], saved: int, path: Path) -> None:
    if optimizers and saved != len(optimizers):
        raise AdapterFileError(
            f"load: {str(path)!r} holds {saved} optimizer state(s) and {len(optimizers)} optimizer(s) were given; pass "
            "the optimizers the saving run passed to lora_lightning.fabric.save (or none, to load the adapters only)"
        )


def _load_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Copy the checkpoint's tensors into ``module`` (no other tensor is touched)."""
    own = module.state_dict()
    unexpected = sorted(k for k in tensors if k not in own)
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in tensors.items()
        if k in own and v.shape != own[k].shape
    ]
    if unexpected or wrong:
        raise AdapterMismatchError(
            f"load: {str(path)!r} does not fit this model (unexpected keys {unexpected[:3]}; shapes {wrong[:3]}): "
            "it was saved from another model; load it into the model it was trained with"
        )
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v.to(device=own[k].device, dtype=own[k].dtype))


# --------------------------------------------------------------------------- optimizer states
def _param_names(module: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}


def _named_optimizer_state(module: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` keyed by parameter name instead of position (the format of
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``), so any strategy can load it."""
    names = _param_names(module)
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = optimizer.state_dict()
    return {
        "state": {order[i]: s for i, s in state["state"].items()},
        "param_groups": [g | {"params": [order[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def _check_groups(module: nn.Module, optimizer: Optimizer, state: Mapping[str, Any], path: Path) -> None:
    names = _param_names(module)
    ours = [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]
    saved = [list(g["params"]) for g in state["param_groups"]]
    if ours != saved:
        raise AdapterFileError(
            f"load: the optimizer's parameter groups ({[len(g) for g in ours]} tensors) differ from those "
            f"{str(path)!r} was saved with ({[len(g) for g in saved]}): build the optimizer as the saving run did "
            "(same optimizer_factory)"
        )


def _load_named_optimizer_state(module: nn.Module, optimizer: Optimizer, state: Mapping[str, Any]) -> None:
    """Load a state of :func:`_named_optimizer_state` (checked by :func:`_check_groups`) into ``optimizer``."""
    names = _param_names(module)
    index = {names[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    optimizer.load_state_dict(
        {
            "state": {index[n]: s for n, s in state["state"].items()},
            "param_groups": [dict(g) | {"params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
        }
    )


def _raw_optimizers(optimizer: Optimizers) -> list[Optimizer]:
    if optimizer is None:
        return []
    listed = [optimizer] if isinstance(optimizer, Optimizer) else list(optimizer)
    return [unwrap_fabric(o) for o in listed]


def _check_optimizers_hold_adapters(module: nn.Module, optimizers: list[Optimizer], what: str) -> None:
    """Every trainable adapter tensor is in one of ``optimizers`` (else it was built before injection or sharding)."""
    if not optimizers:
        return
    held = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
    keys = set(adapter_param_names(module))
    trainable = [n for n, p in module.named_parameters() if n in keys and p.requires_grad]
    missing = [n for n, p in module.named_parameters() if n in keys and p.requires_grad and id(p) not in held]
    if missing:
        raise LoRAConfigError(
            f"{what}: the optimizer holds {len(trainable) - len(missing)} of the model's {len(trainable)} trainable "
            f"adapter tensors (e.g. {missing[:2]} missing): it was built before the adapters were injected (or before "
            f"fabric.setup sharded them), so they never train. Inject first: {SETUP_HINT}"
        )


# --------------------------------------------------------------------------- exports
def export_adapter(fabric: Fabric, model: nn.Module, path: str | os.PathLike) -> Path:
    """:func:`~lora_lightning.save_adapter` of a set-up model: the full adapter tensors (gathered on every rank
    under FSDP2), written by rank 0. Call it on every rank. Returns ``path``."""
    module = unwrap(model)
    with gathered(module, adapter_param_names(module)) if is_sharded(module) else nullcontext():
        if fabric.is_global_zero:
            save_adapter(module, path)
    fabric.barrier()
    return Path(path)


def export_merged(fabric: Fabric, model: nn.Module, path: str | os.PathLike, submodule: str = "") -> Path:
    """:func:`~lora_lightning.save_merged_model` of a set-up model: the base architecture's tensors with
    ``W0 + (alpha/r)·B·A`` folded in (gathered on every rank under FSDP2), written by rank 0; the model is not
    changed. Call it on every rank. Returns ``path``."""
    module = unwrap(model)
    with gathered(module) if is_sharded(module) else nullcontext():
        if fabric.is_global_zero:
            save_merged_model(module, path, submodule=submodule)
    fabric.barrier()
    return Path(path)


# --------------------------------------------------------------------------- checks
def _config(config: LoRAConfig | Mapping[str, Any]) -> LoRAConfig:
    return config if isinstance(config, LoRAConfig) else LoRAConfig.from_dict(dict(config))


def _set_up_message(what: str) -> str:
    return (
        f"{what}: the optimizer Fabric set up cannot hold adapters added now, so they would never train; inject "
        f"before fabric.setup: {SETUP_HINT}"
    )


def _refuse_set_up(model: nn.Module) -> None:
    """Refuse a model that ``fabric.setup`` (or DDP / FSDP) already wrapped or sharded."""
    if is_fabric_wrapper(model):
        what = f"the model is already set up by fabric.setup (a {type(model).__name__})"
        raise LoRAConfigError(_set_up_message(what))
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    wrapped = next(
        (
            n or "the model"
            for n, m in model.named_modules()
            if is_fabric_wrapper(m)
            or isinstance(m, (DataParallel, DistributedDataParallel))
            or type(m).__name__ == "FullyShardedDataParallel"
        ),
        None,
    )
    if wrapped is not None:
        raise LoRAConfigError(_set_up_message(f"{wrapped} is already wrapped for distributed training"))
    if is_sharded(model):
        raise LoRAConfigError(_set_up_message("the model is already sharded (FSDP2 DTensor weights)"))


def _check_strategy(strategy: Any, what: str) -> None:
    strategies = importlib.import_module(f"{fabric_package(strategy)}.strategies")
    if not isinstance(strategy, tuple(getattr(strategies, name) for name in _SUPPORTED)):
        raise LoRAConfigError(
            f"{what}: lora_lightning.fabric supports the strategies single device, dp, ddp / ddp_spawn and "
            f"ModelParallelStrategy (FSDP2), not {type(strategy).__name__}: use Fabric(strategy='ddp') or "
            "ModelParallelStrategy(parallelize_fn=...) to shard"
        )


def _check_extra(extra: Mapping[str, Any]) -> None:
    taken = sorted(set(extra) & set(RESERVED))
    if taken:
        raise LoRAConfigError(
            f"save: extra entries {taken} would overwrite the checkpoint's own; name them otherwise "
            f"(reserved: {list(RESERVED)})"
        )


__all__ = [
    "BASE_MISMATCH_HINT",
    "MODEL_KEY",
    "OPTIMIZERS_KEY",
    "OptimizerFactory",
    "export_adapter",
    "export_merged",
    "inject",
    "load",
    "lora_state",
    "save",
    "setup",
    "unwrap",
]
