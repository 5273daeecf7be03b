"""What an adapter records about the model it was made for, and the one check that it fits a model.

An injected model carries a :class:`LoRAState`: the config, the structure of every adapted matrix
(kind, shape, rank, alpha, scaling, fused blocks), the fully trained ``modules_to_save`` and the
identity of the base. Adapter files and Lightning checkpoints store the same record, and everything
that loads an adapter calls :func:`check_compatible`: it compares what the adapter *is* (the resolved
set of adapted modules and their structure), not how its config spelled the targets, so
``['v', 'q']``, ``['q', 'v']`` and ``['q_proj', 'v_proj']`` are the same adapter on a Llama block.

**Base identity** (:func:`base_fingerprint`): a SHA-256 of the bytes of *every* base tensor (each
parameter and buffer of the state dict that the adapter does not hold: adapted or not), so a base
that differs in a single element, adapted layer or not, is told apart. A float32 (float64) tensor
also records the hashes of its bfloat16 and float16 casts (and float32), so the same base cast to a
lower precision matches exactly; a float16 base against a bfloat16 one (neither is the other's cast)
falls back to 16 sampled values per adapted matrix compared within one bfloat16 step. Hashing runs on
every core; benchmarks/RESULTS.md gives its cost on a 1.1B-parameter model.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .config import LoRAConfig
from .errors import AdapterMismatchError, BaseModelMismatchError, LoRAConfigError
from .plan import first_match, module_weight, summarize_names, target_module

FORMAT = "lora_lightning"
FORMAT_VERSION = "3"
SAMPLES_PER_MATRIX = 16
SAMPLE_RTOL = 2.0**-7
SAMPLE_ATOL = 1e-7
ON_MISMATCH = ("raise", "warn", "ignore")
STRUCTURE_KEYS = ("kind", "d_out", "d_in", "r", "alpha", "scaling", "parts")
# the casts whose hashes a tensor records, by its own dtype (a lower precision is a cast of a higher one)
_CASTS: dict[torch.dtype, tuple[torch.dtype, ...]] = {
    torch.float64: (torch.float32, torch.bfloat16, torch.float16),
    torch.float32: (torch.bfloat16, torch.float16),
}
_DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


# --------------------------------------------------------------------------- base identity
def _sha256(t: Tensor) -> str:
    """SHA-256 of the tensor's bytes, its first 128 bits in hex (collisions are as unlikely as ever needed here)."""
    data = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(memoryview(data.view(torch.uint8).numpy())).hexdigest()[:32]


def tensor_identity(t: Tensor) -> dict[str, Any]:
    """``{"dtype", "shape", "sha256": {dtype: hex}}``: the hash of ``t``'s bytes in its own dtype and in each
    lower-precision cast (:data:`_CASTS`)."""
    full = getattr(t, "full_tensor", None)  # a sharded DTensor: the whole tensor
    t = (full() if callable(full) else t).detach()
    hashes = {_DTYPE_NAMES.get(t.dtype, str(t.dtype).replace("torch.", "")): _sha256(t)}
    for cast in _CASTS.get(t.dtype, ()):
        hashes[_DTYPE_NAMES[cast]] = _sha256(t.to(cast))
    return {
        "dtype": _DTYPE_NAMES.get(t.dtype, str(t.dtype).replace("torch.", "")),
        "shape": list(t.shape),
        "sha256": hashes,
    }


def base_identity(
    model: nn.Module, exclude: Iterable[str] = (), drop_rows: Mapping[str, list[int]] | None = None
) -> dict[str, dict[str, Any]] | None:
    """:func:`tensor_identity` of every state-dict tensor of ``model`` not in ``exclude`` (the adapter's own:
    ``modules_to_save``, trained biases); ``drop_rows``: ``{key: rows}`` left out of a tensor (the rows trainable
    tokens replace). ``None`` if a tensor is on the meta device. Hashes run in threads."""
    skip = set(exclude)
    drop = dict(drop_rows or {})
    tensors: dict[str, Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key in skip or not isinstance(value, Tensor):
            continue
        if value.is_meta:
            return None
        if key in drop:
            keep = torch.ones(value.shape[0], dtype=torch.bool, device=value.device)
            keep[drop[key]] = False
            value = value.detach()[keep]
        tensors[key] = value
    if not tensors:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(len(tensors), os.cpu_count() or 1))) as pool:
        return dict(zip(tensors, pool.map(tensor_identity, tensors.values()), strict=True))


def base_fingerprint(
    model: nn.Module, names: list[str], exclude: Iterable[str] = (), drop_rows: Mapping[str, list[int]] | None = None
) -> dict[str, Any]:
    """``{"names", "shapes", "samples", "tensors"}``: the adapted modules (names sorted) and their weights'
    shapes, 16 sampled values of each (the cross-precision fallback; ``None`` on the meta device) and the
    :func:`base_identity` of every base tensor but ``exclude`` (and the ``drop_rows``). Compute it before merging
    or quantizing (the record keeps it)."""
    ordered = sorted(names)
    shapes, samples = [], []
    for name in ordered:
        weight = module_weight(target_module(model, name))  # .weight; an nn.MultiheadAttention's in_proj_weight
        shapes.append(list(weight.shape))
        if weight.is_meta:
            samples = None
            continue
        full = getattr(weight, "full_tensor", None)  # a sharded DTensor: sample the whole matrix
        flat = (full() if callable(full) else weight).detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, SAMPLES_PER_MATRIX, device=flat.device).long()
        if samples is not None:
            samples.append([float(v) for v in flat[idx].float().cpu()])
    out = {"names": ordered, "shapes": shapes, "samples": samples, "tensors": base_identity(model, exclude, drop_rows)}
    return out | ({"dropped_rows": {k: list(v) for k, v in drop_rows.items()}} if drop_rows else {})


def identity_exclusions(
    model: nn.Module, config: LoRAConfig, adapted: Iterable[str], modules_to_save: Iterable[str]
) -> list[str]:
    """State-dict keys of ``model`` that are the adapter's, not the base's: the ``modules_to_save`` tensors
    and the biases ``config.bias`` trains."""
    roots = tuple(f"{m}." for m in modules_to_save)
    adapted_set = set(adapted)
    out = []
    for key in model.state_dict(keep_vars=True):
        owner, _, leaf = key.rpartition(".")
        trained_bias = leaf == "bias" and (
            config.bias == "all" or (config.bias == "lora_only" and owner in adapted_set)
        )
        if key.startswith(roots) or trained_bias:
            out.append(key)
    return out


def align_names(saved: list[str], wanted: list[str]) -> dict[str, str] | None:
    """Map saved module/key names onto the model's, allowing one consistent prefix added or removed
    (``model.bert...`` in a LightningModule vs ``bert...`` in the bare network); ``None`` if the two
    sets do not correspond."""
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
    return None


def _samples_differ(a: list[float], b: list[float]) -> bool:
    if len(a) != len(b):  # not sampled alike (a foreign or edited record): nothing shows the weights are the same
        return True
    return any(abs(x - y) > SAMPLE_RTOL * max(abs(x), abs(y)) + SAMPLE_ATOL for x, y in zip(a, b, strict=True))


def _key_map(saved_names: list[str], mapping: Mapping[str, str]) -> tuple[str, str]:
    """``(saved prefix, model prefix)`` relating the saved state-dict keys to the model's (``model.`` inside a
    LightningModule vs the bare network), from one adapted module's two names."""
    for s_name in saved_names[:1]:
        c_name = mapping[s_name]
        n = 0
        while n < min(len(s_name), len(c_name)) and s_name[len(s_name) - 1 - n] == c_name[len(c_name) - 1 - n]:
            n += 1
        return s_name[: len(s_name) - n], c_name[: len(c_name) - n]
    return "", ""


def identity_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], prefixes: tuple[str, str] = ("", "")
) -> tuple[list[str], list[str], int]:
    """``(differing keys, keys compared only by samples, keys compared)`` between two :func:`base_identity`
    records (saved keys, mapped with ``prefixes``). Tensors present on one side only are not compared (the
    structure checks see architecture differences)."""
    s_prefix, c_prefix = prefixes
    differ, unverifiable, compared = [], [], 0
    for key, s in saved.items():
        if not key.startswith(s_prefix):
            continue
        c = current.get(c_prefix + key[len(s_prefix) :])
        if c is None:
            continue
        compared += 1
        if list(s["shape"]) != list(c["shape"]):
            differ.append(key)
        elif s["dtype"] == c["dtype"]:
            if s["sha256"][s["dtype"]] != c["sha256"][c["dtype"]]:
                differ.append(key)
        elif c["dtype"] in s["sha256"]:  # the model holds a lower-precision cast of the saved base
            if s["sha256"][c["dtype"]] != c["sha256"][c["dtype"]]:
                differ.append(key)
        elif s["dtype"] in c["sha256"]:  # the adapter was trained on a cast of this base
            if c["sha256"][s["dtype"]] != s["sha256"][s["dtype"]]:
                differ.append(key)
        else:
            unverifiable.append(key)  # float16 vs bfloat16: neither is the other's cast
    return differ, unverifiable, compared


def check_fingerprint(
    saved: Mapping[str, Any] | None,
    current: Mapping[str, Any] | None,
    on_mismatch: str = "raise",
    source: str = "adapter",
    override_hint: str = "pass on_base_mismatch='warn' or 'ignore'",
) -> None:
    """Compare a saved fingerprint with the model's. Other module names or shapes always raise
    :class:`AdapterMismatchError`; other base values raise :class:`BaseModelMismatchError`, warn or pass
    according to ``on_mismatch``; ``override_hint`` says how the caller's user sets it."""
    if on_mismatch not in ON_MISMATCH:
        raise LoRAConfigError(f"on_base_mismatch={on_mismatch!r} must be one of {ON_MISMATCH}")
    if not saved or not current:
        return
    s_names, c_names = list(saved.get("names", [])), list(current.get("names", []))
    mapping = align_names(s_names, c_names)
    if mapping is None:
        only_s = sorted(set(s_names) - set(c_names))
        only_c = sorted(set(c_names) - set(s_names))
        raise AdapterMismatchError(
            f"the {source} adapts other modules than the model has: only in {source}: {only_s[:3]}"
            f"{' ...' if len(only_s) > 3 else ''}; only in model: {only_c[:3]}{' ...' if len(only_c) > 3 else ''}. "
            "It was trained on another architecture: load it onto the model it was trained on"
        )
    c_index = {n: i for i, n in enumerate(c_names)}
    s_shapes, c_shapes = saved.get("shapes", []), current.get("shapes", [])
    diffs = [
        f"{n}: {list(s_shapes[i])} in {source} vs {list(c_shapes[c_index[mapping[n]]])} in model"
        for i, n in enumerate(s_names)
        if list(s_shapes[i]) != list(c_shapes[c_index[mapping[n]]])
    ]
    if diffs:
        raise AdapterMismatchError(
            f"the {source} was trained on a base with other adapted matrices: {'; '.join(diffs[:4])}"
            + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else "")
            + ". It belongs to another architecture or model size: load it onto the model it was trained on"
        )
    differ: list[str] = []
    s_tensors, c_tensors = saved.get("tensors"), current.get("tensors")
    check_samples, compared = True, 0
    if s_tensors is not None and c_tensors is not None:
        prefixes = _key_map(s_names, mapping)
        s_rows, c_rows = saved.get("dropped_rows") or {}, current.get("dropped_rows") or {}
        if s_rows or c_rows:  # a token table hashed without other rows on each side (other named adapters' rows)
            s_prefix, c_prefix = prefixes
            s_tensors = {
                k: v for k, v in s_tensors.items() if s_rows.get(k) == c_rows.get(c_prefix + k[len(s_prefix) :])
            }
        differ, unverifiable, compared = identity_differences(s_tensors, c_tensors, prefixes)
        check_samples = bool(unverifiable)
    s_samples, c_samples = saved.get("samples"), current.get("samples")
    if check_samples and s_samples and c_samples:  # a version-2 record, or float16 vs bfloat16
        differ += [n for i, n in enumerate(s_names) if _samples_differ(s_samples[i], c_samples[c_index[mapping[n]]])]
        compared = compared or len(s_names)
    if not differ:
        return
    msg = (
        f"the {source} was trained on different base weights: {len(differ)} of {compared} base tensor(s) hold other "
        f"values (e.g. {differ[0]}), with the same names and shapes. Load it onto the base model it was trained on, "
        f"or {override_hint} if this is intended"
    )
    if on_mismatch == "raise":
        raise BaseModelMismatchError(msg)
    if on_mismatch == "warn":
        warnings.warn(msg, stacklevel=3)


# --------------------------------------------------------------------------- the record
@dataclass
class LoRAState:
    """What injection recorded on the model (and what adapter files and checkpoints store): the
    config, ``{module: structure}`` of every adapted matrix, the ``modules_to_save``, the base
    fingerprint and ``tokens``: ``{module: row indices}`` of the trainable tokens (``trainable_token_indices``
    resolved; the modules reading them through a tied weight are not listed)."""

    config: LoRAConfig
    modules: dict[str, dict[str, Any]]
    modules_to_save: list[str]
    fingerprint: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)

    @property
    def adapted(self) -> list[str]:
        return list(self.modules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "modules": {n: dict(s) for n, s in self.modules.items()},
            "modules_to_save": list(self.modules_to_save),
            "fingerprint": dict(self.fingerprint),
        } | ({"tokens": {n: list(i) for n, i in self.tokens.items()}} if self.tokens else {})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoRAState:
        """Read a record (this version, or version 1: config + names, structure derived from the config)."""
        config = LoRAConfig.from_dict(data["config"], drop_other_variant_defaults=True)
        modules = data.get("modules")
        if modules is None:  # version 1 stored only the names
            modules = {}
            for name in data.get("adapted_modules", []):
                r = int(first_match(config.rank_pattern, name) or config.r)
                alpha = float(first_match(config.alpha_pattern, name) or config.alpha)
                modules[name] = {"r": r, "alpha": alpha, "scaling": config.scaling_for(r, alpha)}
        fingerprint = dict(data.get("fingerprint") or {})
        tokens = {n: [int(i) for i in idx] for n, idx in (data.get("tokens") or {}).items()}
        return cls(
            config, {n: dict(s) for n, s in modules.items()}, list(data.get("modules_to_save", [])), fingerprint, tokens
        )

    def describe(self) -> str:
        """``'12 matrices (r=8 on q,v: ...)'``: what the adapters are, for log lines and errors."""
        ranks = sorted({s.get("r") for s in self.modules.values()})
        r_text = f"r={ranks[0]}" if len(ranks) == 1 else f"r in {ranks}"
        names = summarize_names(self.modules, 6)
        rows = "".join(f"; trainable token rows {list(i)} of {n}" for n, i in self.tokens.items())
        return f"{len(self.modules)} matrices, {r_text}, variant={self.config.variant!r} ({names}){rows}"


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def differences(saved: LoRAState, current: LoRAState, source: str = "adapter", against: str = "model") -> list[str]:
    """Each difference that changes what the saved adapter weights mean, as ``"r: 4 in <source> vs 8 in
    <against>"``: variant and its structural options, the adapted modules (as resolved, not as spelled),
    their rank / alpha / scaling / fused blocks, ``bias``, ``modules_to_save`` and the trainable token rows. Shapes
    are left to :func:`check_fingerprint`. Raises :class:`AdapterMismatchError` outright when the same targets name
    other modules (another architecture)."""
    diffs: list[str] = []
    sc, cc = saved.config, current.config

    def differ(name: str, a: Any, b: Any) -> None:
        diffs.append(f"{name}: {a!r} in {source} vs {b!r} in {against}")

    if sc.variant != cc.variant:
        differ("variant", sc.variant, cc.variant)
    else:
        for name in type(cc).structural_options:
            if getattr(sc, name, None) != getattr(cc, name, None):
                differ(name, getattr(sc, name, None), getattr(cc, name, None))
    mapping = align_names(saved.adapted, current.adapted)
    if mapping is None:
        only_s = sorted(set(saved.adapted) - set(current.adapted))
        only_c = sorted(set(current.adapted) - set(saved.adapted))
        modules = "; ".join(
            f"only in {where}: {names[:3]}{' ...' if len(names) > 3 else ''}"
            for where, names in ((source, only_s), (against, only_c))
            if names
        )
        spelled = [(c.targets, getattr(c, "target_parameters", []), c.layers) for c in (sc, cc)]
        if spelled[0] == spelled[1]:
            raise AdapterMismatchError(
                f"the {source} adapts modules this model does not have ({modules}): the same targets "
                f"{sc.targets!r} (target_parameters {spelled[0][1]!r}) name other modules here, so it was trained on "
                "another architecture. Load it onto the model it was trained on"
            )
        diffs.append(f"targets: {sc.targets!r} in {source} vs {cc.targets!r} in {against} ({modules})")
        if spelled[0][1] != spelled[1][1]:
            differ("target_parameters", spelled[0][1], spelled[1][1])
        for key in ("r", "alpha"):  # per-module ranks cannot be paired up; the configs' can
            if getattr(sc, key) != getattr(cc, key):
                differ(key, getattr(sc, key), getattr(cc, key))
    else:
        for key in ("r", "alpha", "scaling", "parts", "kind"):
            bad = [
                (s[key], current.modules[mapping[n]][key])
                for n, s in saved.modules.items()
                if key in s
                and key in current.modules[mapping[n]]
                and not _close(s[key], current.modules[mapping[n]][key])
            ]
            if not bad:
                continue
            if key == "scaling":
                if not any(d.startswith(("r:", "alpha:")) for d in diffs):  # else implied by r or alpha
                    differ(
                        *(
                            ("use_rslora", sc.use_rslora, cc.use_rslora)
                            if sc.use_rslora != cc.use_rslora
                            else ("scaling", *bad[0])
                        )
                    )
            elif key in ("r", "alpha"):
                differ(key, *bad[0])
            else:
                differ(f"{key} of {len(bad)} module(s)", *bad[0])
    if sc.bias != cc.bias:
        differ("bias", sc.bias, cc.bias)
    if (saved.modules_to_save or current.modules_to_save) and align_names(
        saved.modules_to_save, current.modules_to_save
    ) is None:
        differ("modules_to_save", saved.modules_to_save, current.modules_to_save)
    if saved.tokens or current.tokens:
        names = align_names(list(saved.tokens), list(current.tokens))
        if names is None or any(list(i) != list(current.tokens[names[n]]) for n, i in saved.tokens.items()):
            differ("trainable token rows", saved.tokens, current.tokens)
    return diffs


def check_compatible(saved: LoRAState, current: LoRAState, source: str = "adapter") -> None:
    """Raise :class:`AdapterMismatchError` listing :func:`differences` between a saved adapter and the model."""
    diffs = differences(saved, current, source)
    if diffs:
        raise AdapterMismatchError(
            f"the {source} was made with a different LoRA config ({'; '.join(diffs)}); use the same LoRA settings, "
            "or start from a model without adapters so the saved config is used"
        )
