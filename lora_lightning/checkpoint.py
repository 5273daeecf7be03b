"""Adapter I/O: adapter-only state dicts and ``.safetensors`` files with the LoRA config inside.

An adapter file holds ``lora_A``/``lora_B`` of every adapted matrix (plus trainable biases and
``modules_to_save``) and, in the safetensors metadata, the :class:`LoRAConfig`, the adapted
module names and the base-model fingerprint. Writes are atomic: temp file, fsync, rename.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_dumps
from torch import Tensor, nn

from .config import LoRAConfig
from .errors import AdapterFileError, AdapterMismatchError, LoRAConfigError, MergeStateError
from .fingerprint import base_fingerprint, check_fingerprint
from .injection import (
    adapter_param_names,
    get_lora_state,
    has_lora,
    inject_lora,
    lora_layers,
    plan_injection,
    remove_lora,
)

FORMAT = "lora_lightning"
FORMAT_VERSION = "1"
# fields that change what the adapter weights mean; dropout/init/adapter_dtype do not
STRUCTURAL_FIELDS = ("r", "alpha", "targets", "layers", "bias", "modules_to_save", "rank_pattern", "alpha_pattern", "use_rslora", "variant", "vera_seed")


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
            exc.add_note(f"while writing {str(path)!r}: the previous file there (if any) is unchanged, no partial file was left")
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


def _cpu_contiguous(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


# --------------------------------------------------------------------------- state dicts
def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of an injected model, keyed like ``model.state_dict()`` (no copies)."""
    keys = set(adapter_param_names(model))
    return {k: v for k, v in model.state_dict().items() if k in keys}


def adapter_metadata(model: nn.Module) -> dict[str, str]:
    """String metadata describing the adapter: format, config, adapted modules, fingerprint."""
    state = get_lora_state(model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_config": state.config.to_json(),
        "adapted_modules": json.dumps(state.adapted),
        "base_fingerprint": json.dumps(state.fingerprint),
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write the adapter of ``model`` to a ``.safetensors`` file (atomically). Returns the path."""
    tensors = _cpu_contiguous(adapter_state_dict(model))
    metadata = adapter_metadata(model) | {k: str(v) for k, v in (extra_metadata or {}).items()}
    return atomic_write_bytes(path, safetensors_dumps(tensors, metadata=metadata))


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file; clear errors for missing / corrupt / foreign files."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file {str(path)!r} does not exist; check the path (adapters end in .safetensors)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
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


def read_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    """The :class:`LoRAConfig` stored in an adapter file."""
    _, metadata = read_adapter(path)
    return LoRAConfig.from_json(metadata["lora_config"])


def check_config_compatible(saved: LoRAConfig, current: LoRAConfig, source: str = "adapter") -> None:
    """Raise :class:`AdapterMismatchError` naming each structural field that differs."""
    diffs = {k: v for k, v in saved.differences(current).items() if k in STRUCTURAL_FIELDS}
    if diffs:
        text = "; ".join(f"{k}: {a!r} in {source} vs {b!r} in model" for k, (a, b) in diffs.items())
        raise AdapterMismatchError(
            f"the {source} was made with a different LoRA config ({text}); use the same LoRA settings, "
            "or start from a model without adapters so the saved config is used"
        )


def _align_keys(saved: list[str], wanted: list[str]) -> dict[str, str]:
    """Map saved keys onto the model's, allowing one consistent prefix added or removed
    (e.g. ``model.bert...`` from a LightningModule vs ``bert...`` in the bare model)."""
    if set(saved) == set(wanted):
        return {k: k for k in saved}
    wanted_set = set(wanted)
    for s in saved[:1]:
        for w in wanted:
            if w.endswith("." + s):
                prefix = w[: -len(s)]
                mapped = {k: prefix + k for k in saved}
            elif s.endswith("." + w):
                cut = len(s) - len(w)
                if not all(k[:cut] == s[:cut] for k in saved):
                    continue
                mapped = {k: k[cut:] for k in saved}
            else:
                continue
            if set(mapped.values()) == wanted_set:
                return mapped
    return {k: k for k in saved}


def load_adapter_state(model: nn.Module, tensors: Mapping[str, Tensor], source: str = "adapter") -> None:
    """Copy adapter tensors into an injected model after checking keys and shapes."""
    if any(layer.merged for layer in lora_layers(model).values()):
        raise MergeStateError(
            "the model's adapters are merged into the base weights; loading new adapter weights now would leave "
            "the old ΔW inside W0. Call unmerge_lora(model) first, or use switch_adapter()"
        )
    wanted = adapter_param_names(model)
    mapping = _align_keys(list(tensors), wanted)
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
    with torch.no_grad():
        for k in wanted:
            params[k].copy_(got[k].to(device=params[k].device, dtype=params[k].dtype))


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    on_base_mismatch: str = "raise",
) -> LoRAConfig:
    """Load an adapter file into ``model``.

    A model without adapters is injected with the file's config first; a model with adapters
    must have the same structural config. The base fingerprint is checked (``on_base_mismatch``:
    ``raise`` | ``warn`` | ``ignore``). Returns the adapter's config.
    """
    tensors, metadata = read_adapter(path)
    try:
        saved = LoRAConfig.from_json(metadata["lora_config"])
    except (LoRAConfigError, ValueError) as exc:
        raise AdapterFileError(f"{str(path)!r} holds an invalid LoRA config: {exc}") from None
    name = f"adapter {Path(path).name}"
    fingerprint = json.loads(metadata.get("base_fingerprint") or "{}")
    if has_lora(model):
        check_config_compatible(saved, get_lora_state(model).config, source=name)
        check_fingerprint(fingerprint, get_lora_state(model).fingerprint, on_base_mismatch, source=name)
        load_adapter_state(model, tensors, source=name)
        return saved
    # fresh model: check everything before modifying it, undo the injection if the weights don't fit
    specs = plan_injection(model, saved)
    check_fingerprint(fingerprint, base_fingerprint(model, [s.name for s in specs]), on_base_mismatch, source=name)
    inject_lora(model, saved)
    try:
        load_adapter_state(model, tensors, source=name)
    except BaseException:
        remove_lora(model)
        raise
    return saved


def merged_state_dict(model: nn.Module, submodule: str = "") -> dict[str, Tensor]:
    """The base architecture's state dict with every ΔW folded in (the model is not modified).

    Keys are those of the model before injection; ``lora_A``/``lora_B`` are dropped. With
    ``submodule`` (e.g. ``"model"`` inside a LightningModule) only that module's tensors are
    kept, keyed relative to it, ready for the bare network's ``load_state_dict``.
    """
    layers = lora_layers(model)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf in getattr(layers[owner], "lora_state_names", ("lora_A", "lora_B")):
            continue
        if owner in layers and leaf == "weight" and hasattr(layers[owner], "merged_base_weight"):
            value = layers[owner].merged_base_weight()  # variants: DoRA's W', a dequantized (NF4/int8) base
        elif owner in layers and leaf == layers[owner].base_weight_name and not layers[owner].merged:
            # stored layout: transposed for GPT-2 Conv1D, in_proj_weight for nn.MultiheadAttention
            value = (value.float() + layers[owner].stored_delta_weight().to(value.device)).to(value.dtype)
        out[key] = value
    if submodule:
        model.get_submodule(submodule)  # clear AttributeError for a wrong name
        prefix = submodule + "."
        out = {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}
    return out


def save_merged_model(
    model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None, submodule: str = ""
) -> Path:
    """Write the merged full model (base keys, ΔW folded in) to ``.safetensors`` atomically."""
    tensors = _cpu_contiguous(merged_state_dict(model, submodule))
    meta = {"format": "lora_lightning_merged", "lora_config": get_lora_state(model).config.to_json()}
    return atomic_write_bytes(path, safetensors_dumps(tensors, metadata=meta | dict(metadata or {})))
