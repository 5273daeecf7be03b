"""Adapter files: adapter-only state dicts, ``.safetensors`` files with the LoRA record inside,
loading (checked against the model), switching between task adapters, and the merged export.

An adapter file holds the adapter tensors (``lora_A``/``lora_B`` or a variant's own, trainable
biases, ``modules_to_save``) and, in the safetensors metadata, the :class:`~lora_lightning.record.LoRAState`
(config, per-module structure, base fingerprint). Every write is atomic: temp file in the target
folder, fsync, rename, fsync of the folder; a failed write leaves the previous file as it was.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_dumps
from torch import Tensor, nn

from . import registry
from .config import LoRAConfig
from .errors import AdapterFileError, AdapterMismatchError, LoRAConfigError, MergeStateError
from .hotswap import check_name, hotswap_tensors, is_padded, padded_rank, unpadded, unwrap_compiled
from .injection import (
    BANK,
    adapter_param_names,
    get_lora_state,
    has_lora,
    inject_lora,
    lora_layers,
    planned_record,
    planned_state,
    remove_lora,
    set_submodule,
)
from .merging import is_merged, merge_lora, merged_state_dict, unmerge_lora
from .named import active_adapter, add_adapter, delete_adapter, list_adapters, use_adapter
from .record import FORMAT, FORMAT_VERSION, LoRAState, align_names, check_compatible, check_fingerprint
from .sharding import check_not_sharded
from .state import NamedAdapters, lora_handle
from .tokens import token_modules

LOAD_HINT = "pass on_base_mismatch='warn' (or 'ignore') to load_adapter/switch_adapter"


# --------------------------------------------------------------------------- files
def _create_temp(path: Path) -> tuple[int, str]:
    """A new hidden ``.{name}.{random}.tmp`` file beside ``path``. Created with mode 0o666 minus the
    umask, like ``open(path, "wb")`` would (``tempfile.mkstemp`` would make the final file 0o600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the complete new one."""
    path = Path(path)
    if path.is_dir():
        raise AdapterFileError(
            f"{str(path)!r} is a directory; give a file path such as {str(path / 'adapter.safetensors')!r}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # e.g. ENOSPC: say which file, and that nothing was half-written
            exc.add_note(
                f"while writing {str(path)!r}: the previous file there (if any) is unchanged, no partial file was left"
            )
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    return path


def check_output_path(path: str | os.PathLike, what: str) -> Path:
    """Fail now, not after training, if ``path`` cannot be written: a directory, or a folder that
    cannot be created or written. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise AdapterFileError(
            f"{what}={str(path)!r} is a directory; give a file path such as {str(path / 'adapter.safetensors')!r}"
        )
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise AdapterFileError(f"{what}={str(path)!r} cannot be written: {str(parent)!r} is not a writable folder")
    return path


def _cpu_contiguous(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


# --------------------------------------------------------------------------- saving
def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of an injected model, keyed like ``model.state_dict()`` (no copies)."""
    keys = set(adapter_param_names(model))
    return {k: v for k, v in model.state_dict().items() if k in keys}


def adapter_metadata(model: nn.Module) -> dict[str, str]:
    """String metadata describing the adapter: format, the LoRA record, and its config on its own."""
    state = get_lora_state(model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_config": state.config.to_json(),
        "lora_record": json.dumps(state.to_dict(), sort_keys=True),
    }


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    extra_metadata: Mapping[str, str] | None = None,
    adapter_name: str | None = None,
) -> Path:
    """Write the adapter of ``model`` (the active one, or the named ``adapter_name``) to a
    ``.safetensors`` file (atomically); its name is in the metadata. Returns the path.
    A sharded (FSDP2) model: call it inside :func:`~lora_lightning.gathered`."""
    if adapter_name is not None and adapter_name != active_adapter(model):
        with use_adapter(model, adapter_name, trainable=True):
            return save_adapter(model, path, extra_metadata, adapter_name)
    if any(padded_rank(layer) is not None for layer in lora_layers(model).values()):
        with unpadded(model):  # prepared for hot-swapping: the file holds the adapter at its true rank
            return save_adapter(model, path, extra_metadata, adapter_name)
    extra_metadata = {"adapter_name": active_adapter(model), **(extra_metadata or {})}
    adapter = adapter_state_dict(model)
    check_not_sharded(adapter.values(), "save_adapter")
    tensors = _cpu_contiguous(adapter)
    metadata = adapter_metadata(model) | {k: str(v) for k, v in (extra_metadata or {}).items()}
    return atomic_write_bytes(path, safetensors_dumps(tensors, metadata=metadata))


def save_merged_model(
    model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None, submodule: str = ""
) -> Path:
    """Write the merged full model (base keys, ΔW folded in) to ``.safetensors`` atomically.
    A sharded (FSDP2) model: call it inside :func:`~lora_lightning.gathered`."""
    check_not_sharded(model, "save_merged_model")
    tensors = _cpu_contiguous(merged_state_dict(model, submodule))
    meta = {"format": "lora_lightning_merged", "lora_config": get_lora_state(model).config.to_json()}
    return atomic_write_bytes(path, safetensors_dumps(tensors, metadata=meta | dict(metadata or {})))


# --------------------------------------------------------------------------- reading
def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file; clear errors for missing / corrupt / foreign files."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not an adapter file" if path.is_dir() else "does not exist"
        raise AdapterFileError(f"adapter file {str(path)!r} {what}; check the path (adapters end in .safetensors)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(
            f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {exc}. "
            "Re-export the adapter with save_adapter()"
        ) from None
    if metadata.get("format") != FORMAT or "lora_config" not in metadata:
        raise AdapterFileError(
            f"{str(path)!r} is a safetensors file but not a lora_lightning adapter (no 'lora_config' metadata); "
            "for a PEFT adapter directory use import_peft_adapter()"
        )
    return tensors, metadata


def record_from_metadata(metadata: Mapping[str, str], path: str | os.PathLike) -> LoRAState:
    """The :class:`LoRAState` in an adapter file's metadata (this format, or version 1's keys)."""
    try:
        if "lora_record" in metadata:
            return LoRAState.from_dict(json.loads(metadata["lora_record"]))
        return LoRAState.from_dict(
            {
                "config": json.loads(metadata["lora_config"]),
                "adapted_modules": json.loads(metadata.get("adapted_modules") or "[]"),
                "fingerprint": json.loads(metadata.get("base_fingerprint") or "{}"),
            }
        )
    except (LoRAConfigError, ValueError, KeyError, TypeError) as exc:
        raise AdapterFileError(f"{str(path)!r} holds an invalid LoRA record: {exc}") from None


def read_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    """The :class:`LoRAConfig` stored in an adapter file."""
    _, metadata = read_adapter(path)
    return record_from_metadata(metadata, path).config


# --------------------------------------------------------------------------- loading
def _matched_tensors(model: nn.Module, tensors: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """``tensors`` keyed like the model's adapter keys; raises before any change if keys or shapes differ."""
    if any(layer.merged for layer in lora_layers(model).values()):
        raise MergeStateError(
            "the model's adapters are merged into the base weights; loading new adapter weights now would leave "
            "the old ΔW inside W0. Call unmerge_lora(model) first, or use switch_adapter()"
        )
    wanted = adapter_param_names(model)
    mapping = align_names(list(tensors), wanted) or {k: k for k in tensors}
    got = {mapping[k]: v for k, v in tensors.items()}
    missing = [k for k in wanted if k not in got]
    unexpected = [k for k in got if k not in set(wanted)]
    params = model.state_dict()
    shape_errors = [
        f"{k}: {tuple(got[k].shape)} in {source} vs {tuple(params[k].shape)} in model"
        for k in wanted
        if k in got and tuple(got[k].shape) != tuple(params[k].shape)
    ]
    if missing or unexpected or shape_errors:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:3]}")
        if shape_errors:
            parts.append(f"shape mismatch: {'; '.join(shape_errors[:3])}")
        raise AdapterMismatchError(
            f"the {source} does not fit this model ({' | '.join(parts)}). It was made for other targets, ranks or "
            "another architecture: inject with the adapter's own config (load onto a model without adapters)"
        )
    return got


def load_adapter_state(model: nn.Module, tensors: Mapping[str, Tensor], source: str = "adapter") -> None:
    """Copy adapter tensors into an injected model after checking keys and shapes."""
    got = _matched_tensors(model, tensors, source)
    params = model.state_dict()
    with torch.no_grad():
        for k, v in got.items():
            params[k].copy_(v.to(device=params[k].device, dtype=params[k].dtype))


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    on_base_mismatch: str = "raise",
    adapter_name: str | None = None,
) -> LoRAConfig:
    """Load an adapter file into ``model``; returns the adapter's config.

    A model without adapters is injected with the file's config first; a model with adapters must
    hold the same adapter structure. The base fingerprint is checked (``on_base_mismatch``:
    ``raise`` | ``warn`` | ``ignore``). Nothing changes when anything does not fit. The tensors are
    copied into the existing ones (no module is re-created: a compiled model keeps its graph).
    ``adapter_name``: load into that named adapter instead of the active one, adding it (inactive) if
    the model does not hold it yet. An adapter prepared with :func:`~lora_lightning.prepare_for_hotswap` is
    loaded by :func:`hotswap_adapter` (any rank up to the padded one, any alpha).
    """
    if has_lora(model) and is_padded(model, adapter_name or active_adapter(model)):
        return hotswap_adapter(model, path, adapter_name=adapter_name, on_base_mismatch=on_base_mismatch)
    tensors, metadata = read_adapter(path)
    saved = record_from_metadata(metadata, path)
    name = f"adapter {Path(path).name}"
    if adapter_name is not None and has_lora(model) and adapter_name != active_adapter(model):
        added = adapter_name not in list_adapters(model)
        if added:
            add_adapter(model, adapter_name, saved.config)
        try:
            with use_adapter(model, adapter_name, trainable=True):
                return load_adapter(model, path, on_base_mismatch=on_base_mismatch)
        except BaseException:
            if added:
                delete_adapter(model, adapter_name)
            raise
    if has_lora(model):
        state = get_lora_state(model)
        check_compatible(saved, state, source=name)
        check_fingerprint(saved.fingerprint, state.fingerprint, on_base_mismatch, name, LOAD_HINT)
        load_adapter_state(model, tensors, source=name)
        return saved.config
    plan, planned = planned_record(model, saved.config)
    check_compatible(saved, planned, source=name)
    check_fingerprint(saved.fingerprint, planned.fingerprint, on_base_mismatch, name, LOAD_HINT)
    inject_lora(model, saved.config, plan)
    try:
        load_adapter_state(model, tensors, source=name)
    except BaseException:
        remove_lora(model)
        raise
    return saved.config


def hotswap_adapter(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Tensor],
    *,
    config: LoRAConfig | Mapping[str, Any] | None = None,
    adapter_name: str | None = None,
    on_base_mismatch: str = "raise",
) -> LoRAConfig:
    """Swap an adapter of rank ``r <= target_rank`` (any alpha) into a model prepared with
    :func:`~lora_lightning.prepare_for_hotswap`, compiled or not, without ``torch.compile`` recompiling: its
    tensors are written into the padded ones and its scaling into the scaling tensors. Returns its config.

    ``source``: an adapter file (``save_adapter``), or adapter tensors keyed like ``adapter_state_dict`` with
    ``config`` (a :class:`LoRAConfig`, or a dict of its options) saying their ranks and alphas. ``model``: the
    prepared model or its ``torch.compile`` wrapper. ``adapter_name``: swap into that named adapter (prepared
    too) instead of the active one. The adapter must adapt the same modules in the same layouts, with the same
    variant, dropout, bias and ``modules_to_save``; anything else is refused in one line before any change.
    """
    model = unwrap_compiled(model)
    name = check_name(model, adapter_name)
    if isinstance(source, Mapping):
        if config is None:
            raise LoRAConfigError(
                "hotswap_adapter(model, tensors): pass config=LoRAConfig(...) (or a dict of its options) giving the "
                "tensors' ranks and alphas"
            )
        if isinstance(config, Mapping):
            config = LoRAConfig.from_dict(dict(config))
        tensors, saved, what = dict(source), planned_state(model, config), "the given tensors"
    else:
        tensors, metadata = read_adapter(source)
        saved, what = record_from_metadata(metadata, source), f"adapter {Path(source).name}"
    if name != active_adapter(model):
        with use_adapter(model, name, trainable=True):
            hotswap_tensors(model, tensors, saved, source=what, on_base_mismatch=on_base_mismatch, hint=LOAD_HINT)
    else:
        hotswap_tensors(model, tensors, saved, source=what, on_base_mismatch=on_base_mismatch, hint=LOAD_HINT)
    return saved.config


@contextmanager
def unchanged_on_error(model: nn.Module) -> Iterator[None]:
    """Undo every adapter change made inside the block if it raises: the LoRA modules, their tensors,
    merged state and merged base weights, the model's handle and ``requires_grad`` flags come back exactly."""
    handle = lora_handle(model)
    kept = None
    if handle is not None and handle.record is not None:
        named = handle.adapters
        kept = (
            handle.record,
            None if named is None else NamedAdapters(named.active, dict(named.configs)),
            handle.originals,
            handle.tracker,
        )
    modules = dict(model.named_modules(remove_duplicate=False))  # every module object and every name it has
    banks = [(m, m._modules[BANK]) for m in modules.values() if BANK in m._modules]  # remove_lora drops them
    layers = lora_layers(model)
    merged = {n: layer.merged for n, layer in layers.items()}
    # adapter tensors always; a base weight only if merged (unmerge + merge is exact only to round-off)
    snapshot = [
        (getattr(layer, leaf), getattr(layer, leaf).detach().clone())
        for n, layer in layers.items()
        for leaf in layer.state_names + ((layer.base_weight_name,) if layer.merged else ())
        if isinstance(getattr(layer, leaf, None), Tensor)
    ]
    tokens = token_modules(model)  # trainable token rows (and the table, if they are merged into it)
    token_merged = {n: (t.token_merged, t.token_original) for n, t in tokens.items()}
    snapshot += [
        (getattr(t, leaf), getattr(t, leaf).detach().clone())
        for t in tokens.values()
        for leaf in ("token_rows", "token_indices") + (("weight",) if t.token_merged else ())
    ]
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        yield
    except BaseException:
        if has_lora(model):
            remove_lora(model)
        for name, module in sorted(modules.items(), key=lambda nm: nm[0].count(".")):  # parents first
            if name and model.get_submodule(name) is not module:
                set_submodule(model, name, module)
        for module, bank in banks:
            module._modules[BANK] = bank
        if kept is not None and handle is not None:
            handle.record, handle.adapters, handle.originals, handle.tracker = kept
            adapted = list(handle.record.modules)
            handle.guards = [g for kind in registry.LAYER_KINDS.values() for g in kind.guards(model, adapted)]
            with torch.no_grad():
                for tensor, value in snapshot:
                    tensor.copy_(value)
            for n, layer in lora_layers(model).items():
                layer.merged = merged[n]
            for n, t in token_modules(model).items():
                t.token_merged, t.token_original = token_merged[n]
            for p, g in grads.items():
                p.requires_grad_(g)
        raise


def switch_adapter(model: nn.Module, path: str | os.PathLike, *, on_base_mismatch: str = "raise") -> nn.Module:
    """Replace the current adapter by the one in ``path``, keeping the merged/unmerged state.

    An adapter of another structure (targets, ranks, variant) replaces the LoRA layers. Everything is
    checked before the model changes, and on any error the model is exactly as before.
    """
    if not has_lora(model):
        load_adapter(model, path, on_base_mismatch=on_base_mismatch)
        return model
    tensors, metadata = read_adapter(path)
    saved = record_from_metadata(metadata, path)
    name = f"adapter {Path(path).name}"
    state = get_lora_state(model)
    try:
        check_compatible(saved, state, source=name)
        same = True
    except AdapterMismatchError:
        same = False
    target = state if same else planned_state(model, saved.config)
    if not same:
        check_compatible(saved, target, source=name)
    check_fingerprint(saved.fingerprint, target.fingerprint, on_base_mismatch, name, LOAD_HINT)
    was_merged = is_merged(model)
    with unchanged_on_error(model):
        if was_merged:
            unmerge_lora(model)
        if not same:
            remove_lora(model)
            inject_lora(model, saved.config)
        load_adapter_state(model, tensors, source=name)
        if was_merged:
            merge_lora(model)
    return model
