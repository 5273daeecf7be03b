"""The battery's operations for issue 37, items 1 and 2: ``add_weighted_adapter``'s pruning merges (TIES, DARE,
magnitude pruning, and their ``_svd`` forms) and ``safe_merge``.

``weighted_merge`` compares each merged adapter's update with one computed by PEFT's own ``peft.utils.merge_utils``
functions from the adapters' raw tensors (a fused layer part by part, as PEFT merges separate modules; the ``_svd``
forms on ``s_i·ΔW_i`` in PEFT's layout, transposed for GPT-2 Conv1D and embeddings), DARE's masks drawn from the
same seed in the same order; then the merged adapter's outputs with a hand-formula model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re

import torch
from torch import Tensor, nn

from lora_lightning import (
    NonFiniteError,
    add_adapter,
    add_weighted_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    use_adapter,
)

from .cases import Case, randomize
from .operations import (
    Refused,
    _x64,
    adapted,
    assert_unchanged,
    close,
    named_refusal,
    operation,
    out,
    refused_as_expected,
    snapshot,
)
from .references import reference_model

# (combination_type, majority_sign_method): every pruning merge, both sign elections of TIES
MERGES = (
    ("ties", "total"),
    ("ties", "frequency"),
    ("dare_linear", "total"),
    ("dare_ties", "frequency"),
    ("magnitude_prune", "total"),
    ("ties_svd", "frequency"),
    ("dare_linear_svd", "total"),
    ("dare_ties_svd", "total"),
    ("magnitude_prune_svd", "total"),
)
DENSITY = 0.5


def _parts(layer: nn.Module, A: Tensor, B: Tensor, r: int) -> list[tuple[Tensor, Tensor]]:
    """``(A_i, B_i)`` as matrices, one pair per adapted part of a fused layer (one pair otherwise)."""
    A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
    fused = layer.fused
    if fused is None:
        return [(A, B)]
    sizes = [size for part, size in zip(fused.parts, fused.sizes, strict=True) if part in fused.adapted]
    rows = torch.split(B, sizes, dim=0)
    return [(A[i * r : (i + 1) * r], rows[i]) for i in range(len(sizes))]


def _whole(layer: nn.Module, blocks: list[Tensor], d_in: int) -> Tensor:
    """The per-part updates as the whole weight's ``d_out x d_in`` (an unadapted part's rows zero)."""
    fused = layer.fused
    if fused is None:
        return blocks[0]
    rows, i = [], 0
    for part, size in zip(fused.parts, fused.sizes, strict=True):
        if part in fused.adapted:
            rows.append(blocks[i])
            i += 1
        else:
            rows.append(torch.zeros(size, d_in))
    return torch.cat(rows, 0)


def _peft_merge(how: str, tensors: list[Tensor], weights: Tensor, sign: str) -> Tensor:
    from peft.utils import merge_utils as mu

    if how == "ties":
        return mu.ties(tensors, weights, DENSITY, sign)
    if how == "dare_ties":
        return mu.dare_ties(tensors, weights, DENSITY, sign)
    if how == "dare_linear":
        return mu.dare_linear(tensors, weights, DENSITY)
    return mu.magnitude_prune(tensors, weights, DENSITY)


def expected_updates(
    case: Case, model: nn.Module, adapters: list[str], weights: list[float], how: str, sign: str
) -> dict[str, Tensor]:
    """Per LoRA layer, the merged adapter's ``ΔW (d_out x d_in)`` by PEFT's merge_utils, drawing DARE's masks from the
    global generator in PEFT's order: layer by layer, part by part, the A of every adapter, then the B (``_svd``: one
    ``s_i·ΔW_i`` per adapter)."""
    raw: dict[str, dict[str, tuple[Tensor, Tensor, float, int]]] = {}
    for a in adapters:
        with use_adapter(model, a):
            for name, layer in lora_layers(model).items():
                A, B = layer.lora_A.detach().clone().float(), layer.lora_B.detach().clone().float()
                raw.setdefault(name, {})[a] = (A, B, float(layer.scaling), int(layer.r))
    transposed = case.example.kind in ("conv1d", "embedding")  # PEFT's ΔW of these is d_in x d_out
    out: dict[str, Tensor] = {}
    for name, layer in lora_layers(model).items():
        per = [raw[name][a] for a in adapters]
        parts = list(zip(*[_parts(layer, A, B, r) for A, B, _, r in per], strict=True))
        d_in = per[0][0].reshape(per[0][0].shape[0], -1).shape[1]
        blocks = []
        for part in parts:
            if how.endswith("_svd"):
                deltas = [(b @ a) * s for (a, b), (_, _, s, _) in zip(part, per, strict=True)]
                deltas = [d.T for d in deltas] if transposed else deltas
                merged = _peft_merge(how.removesuffix("_svd"), deltas, torch.tensor(weights), sign)
                merged = merged.T if transposed else merged
                U, S, Vh = torch.linalg.svd(merged)
                r = max(r for *_, r in per)
                blocks.append(U[:, :r] @ torch.diag(S[:r]) @ Vh[:r])
            else:
                ws = [w * s for w, (_, _, s, _) in zip(weights, per, strict=True)]
                w_A = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws])
                w_B = torch.tensor([math.sqrt(abs(x)) for x in ws])
                A = _peft_merge(how, [a for a, _ in part], w_A, sign)
                B = _peft_merge(how, [b for _, b in part], w_B, sign)
                blocks.append(B @ A)  # the merged adapter's scaling is 1 (alpha = r)
        out[name] = _whole(layer, blocks, d_in)
    return out


@operation(
    "weighted_merge",
    "add_weighted_adapter ties (total, frequency), dare_linear, dare_ties, magnitude_prune and their _svd forms "
    "(density 0.5): each layer's ΔW equals PEFT's merge_utils on the raw adapters, DARE's masks from the same seed "
    "(fused layers part by part); outputs equal W0 + ΔW by hand; bad density, sign method or unequal ranks change "
    "nothing",
    named_refusal,
)
def op_weighted_merge(case: Case) -> None:
    model, x = adapted(case)
    refused_as_expected(model, lambda: add_adapter(model, "b", {"r": 2}), named_refusal(case))
    add_adapter(model, "c", {"r": 1})
    for name, seed in (("b", 11), ("c", 12)):
        with use_adapter(model, name):
            randomize(model, seed=seed)
    for bad, pattern in (
        (lambda: add_weighted_adapter(model, ["default", "b"], [1, 1], "w", "ties", density=0), r"density=0 must be"),
        (
            lambda: add_weighted_adapter(
                model, ["default", "b"], [1, 1], "w", "ties", density=0.5, majority_sign_method="sum"
            ),
            r"majority_sign_method='sum' is not",
        ),
        (
            lambda: add_weighted_adapter(model, ["default", "c"], [1, 1], "w", "dare_ties", density=0.5),
            r"needs adapters of the same ranks",
        ),
    ):
        with contextlib.suppress(Refused):
            refused_as_expected(model, bad, pattern)
    hand = dataclasses.replace(case, variant="lora")  # the merged adapter: plain LoRA, alpha = r (no rsLoRA)
    for i, (how, sign) in enumerate(MERGES):
        adapters = ["default", "b", "c"] if how.endswith("_svd") else ["default", "b"]
        weights = [0.7, -0.4, 0.5][: len(adapters)]
        torch.manual_seed(100 + i)
        add_weighted_adapter(model, adapters, weights, f"w{i}", how, density=DENSITY, majority_sign_method=sign)
        torch.manual_seed(100 + i)
        expected = expected_updates(case, model, adapters, weights, how, sign)
        with use_adapter(model, f"w{i}"):
            for name, layer in lora_layers(model).items():
                close(layer.delta_weight(), expected[name], f"{how} ({sign}) ΔW of {name}", rtol=1e-5, atol=1e-5)
            close(out(model, x), out(reference_model(hand, model), _x64(x)), f"{how} ({sign}) outputs")


def _plant(layer: nn.Module, value: float) -> None:
    """``value`` in one entry of a trainable adapter tensor that ΔW uses (lora_B, or VeRA's b)."""
    name = "lora_B" if "lora_B" in layer.trainable_names else layer.trainable_names[0]
    with torch.no_grad():
        getattr(layer, name).view(-1)[0] = value


@operation(
    "safe_merge",
    "merge_lora / merge_and_unload(safe_merge=True): a healthy adapter merges as without it (same outputs); with an "
    "inf planted in the last layer's adapter both raise NonFiniteError naming that module, in one line, before any "
    "weight or module changed",
)
def op_safe_merge(case: Case) -> None:
    model, x = adapted(case)
    y = out(model, x)
    twin = copy.deepcopy(model)
    merge_lora(twin, safe_merge=True)
    close(out(twin, x), y, "merge_lora(safe_merge=True)")
    twin = merge_and_unload(twin, safe_merge=True)  # merged already: its merged weights are checked
    close(out(twin, x), y, "merge_and_unload(safe_merge=True)")
    name, layer = list(lora_layers(model).items())[-1]
    _plant(layer, float("inf"))
    for call in (lambda: merge_lora(model, safe_merge=True), lambda: merge_and_unload(model, safe_merge=True)):
        before = snapshot(model)
        try:
            call()
        except NonFiniteError as exc:
            message = str(exc)
            assert "\n" not in message, f"not one line: {message!r}"
            assert re.search(rf"safe_merge: merging into {re.escape(name)} ", message), message
            assert_unchanged(model, before)
        else:
            raise AssertionError(f"safe_merge merged an inf in {name}")
