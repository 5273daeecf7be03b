"""A cheap fingerprint of the base weights an adapter was trained on.

An adapter only makes sense on the exact base it was trained with; loading it onto another
checkpoint of the same architecture silently gives garbage. The fingerprint records the
shape of every adapted matrix and a SHA-256 of 16 evenly spaced values per matrix, rounded to
bfloat16 so the same weights stored in fp32 / bf16 / fp16 hash alike. Computed once at
injection (before any merge), it costs microseconds even for billion-parameter models.
"""

from __future__ import annotations

import hashlib
import warnings

import torch
from torch import nn

from .errors import AdapterMismatchError, BaseModelMismatchError
from .layers import primary_weight

SAMPLES_PER_MATRIX = 16
ON_MISMATCH = ("raise", "warn", "ignore")


def base_fingerprint(model: nn.Module, names: list[str]) -> dict:
    """``{"names": [...], "shapes": [[d_out, d_in], ...], "sha256": hex or None}`` of the named weights.

    Names are sorted; the hash covers only values (in that order), so adding or removing a
    common prefix (a LightningModule wrapping the same network) does not change it.
    """
    ordered = sorted(names)
    shapes: list[list[int]] = []
    digest = hashlib.sha256()
    hashable = True
    for name in ordered:
        weight = primary_weight(model.get_submodule(name))  # .weight, or an nn.MultiheadAttention's in_proj_weight
        shapes.append(list(weight.shape))
        if weight.is_meta:
            hashable = False
            continue
        flat = weight.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, SAMPLES_PER_MATRIX, device=flat.device).long()
        sample = flat[idx].float().to(torch.bfloat16).view(torch.int16).cpu()
        digest.update(sample.numpy().tobytes())
    return {"names": ordered, "shapes": shapes, "sha256": digest.hexdigest() if hashable else None}


def check_fingerprint(saved: dict | None, current: dict | None, on_mismatch: str = "raise", source: str = "adapter") -> None:
    """Compare a saved fingerprint with the model's; shape differences always raise.

    ``on_mismatch`` (``raise`` | ``warn`` | ``ignore``) decides what a differing weight hash does.
    """
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_base_mismatch={on_mismatch!r} must be one of {ON_MISMATCH}")
    if not saved or not current:
        return
    s_shapes, c_shapes = saved.get("shapes", []), current.get("shapes", [])
    if s_shapes != c_shapes:
        s_names, c_names = saved.get("names", []), current.get("names", [])
        diffs = [
            f"{sn}: {ss} in {source} vs {cn}: {cs} in model"
            for sn, ss, cn, cs in zip(s_names, s_shapes, c_names, c_shapes)
            if ss != cs
        ]
        if len(s_shapes) != len(c_shapes):
            diffs.insert(0, f"{len(s_shapes)} adapted matrices in {source} vs {len(c_shapes)} in model")
        raise AdapterMismatchError(
            f"the {source} was trained on a base with other adapted matrices: {'; '.join(diffs[:4])}"
            + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else "")
            + ". It belongs to another architecture or model size: load it onto the model it was trained on"
        )
    if saved.get("sha256") and current.get("sha256") and saved["sha256"] != current["sha256"]:
        msg = (
            f"the {source} was trained on different base weights (fingerprint {saved['sha256'][:12]} vs "
            f"model {current['sha256'][:12]}): same shapes, other values. Load it onto the base model it was "
            "trained on, or pass on_base_mismatch='warn'/'ignore' if this is intended"
        )
        if on_mismatch == "raise":
            raise BaseModelMismatchError(msg)
        if on_mismatch == "warn":
            warnings.warn(msg, stacklevel=3)
