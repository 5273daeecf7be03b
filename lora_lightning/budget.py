"""Choosing ranks from a trainable-parameter budget (the paper's Table 5 protocol).

Every count comes from the variant's exact :meth:`~lora_lightning.variants.Variant.num_params`: a
plain rank-r adapter on a ``d_out x d_in`` matrix costs ``r·(d_in + d_out)`` (a fused matrix
``r·(n·d_in + Σ size_i)`` for ``n`` adapted blocks), DoRA adds ``d_out``, VeRA costs ``r + d_out``.
For a budget ``P`` spread uniformly, ``r`` is the largest rank whose adapters fit in ``P``. On GPT-3 the
paper's 18M budget gives r=8 on one matrix type, 4 on two and 2 on four.
"""

from __future__ import annotations

import dataclasses
import math
import re

from torch import nn

from .config import LoRAConfig
from .errors import LoRAConfigError
from .plan import AdapterSpec, Target, first_match, resolve_targets
from .registry import variant as get_variant


def _check_budget(budget: object) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise LoRAConfigError(f"budget={budget!r} must be a positive number of parameters")


def _specs_at(targets: list[Target], config: LoRAConfig, ranks: dict[str, int]) -> list[AdapterSpec]:
    variant = get_variant(config.variant)
    out = []
    for t in targets:
        alpha, scaling = variant.alpha_and_scaling(
            config, max(1, ranks[t.name]), float(first_match(config.alpha_pattern, t.name) or config.alpha)
        )
        out.append(t.spec(ranks[t.name], alpha, scaling, config))
    return out


def adapter_cost(model: nn.Module, config: LoRAConfig, r: int) -> int:
    """Trainable adapter parameters of ``config``'s targets at a uniform rank ``r`` (exact, any variant)."""
    targets = resolve_targets(model, config)
    return sum(s.num_params for s in _specs_at(targets, config, {t.name: r for t in targets}))


def cost_per_rank(model: nn.Module, config: LoRAConfig) -> int:
    """The parameters one more rank costs on every targeted matrix: ``Σ (n·d_in + d_out)`` for plain LoRA."""
    return adapter_cost(model, config, 1) - adapter_cost(model, config, 0)


def rank_for_budget(model: nn.Module, config: LoRAConfig, budget: int) -> int:
    """The largest uniform rank whose adapters fit in ``budget`` trainable parameters."""
    _check_budget(budget)
    targets = resolve_targets(model, config)
    fixed, unit = adapter_cost(model, config, 0), cost_per_rank(model, config)
    if fixed + unit > budget:
        raise LoRAConfigError(
            f"budget={budget} is below the cost of rank 1 on targets {config.targets} ({fixed + unit} parameters); "
            f"raise lora.budget to at least {fixed + unit} or adapt fewer matrices"
        )
    r = (budget - fixed) // unit if unit else min(t.max_rank for t in targets)
    return int(min(r, min(t.max_rank for t in targets)))


def allocate_ranks(
    model: nn.Module,
    config: LoRAConfig,
    budget: int,
    scores: dict[str, float] | None = None,
    max_rank: int | None = None,
) -> dict[str, int]:
    """Layer-wise ranks for ``budget`` trainable parameters, as a ``rank_pattern``.

    Matrix ``i`` costs ``f_i + r_i·c_i`` parameters (the variant's exact count: ``c_i = n·d_in + d_out``,
    ``f_i = 0`` for plain LoRA) and gets a share of what the fixed costs leave proportional to
    ``scores[i]`` (any non-negative importance, e.g. AdaLoRA's final ranks or ``||ΔW||`` of a pilot
    run; default ``c_i``, which gives every matrix the same rank), i.e. ``r_i ≈ B·score_i/Σscore/c_i``,
    at least 1 and at most ``min(d_in, d_out, max_rank)``. Ranks are floored, then the leftover is spent
    one rank at a time on the matrix furthest below its share. ``Σ (f_i + r_i·c_i) <= budget`` always.

    Returns ``{"re:<escaped full name>": r_i}``: pass it as ``LoRAConfig(rank_pattern=...)``.
    """
    _check_budget(budget)
    targets = resolve_targets(model, config)
    zero = {s.name: s.num_params for s in _specs_at(targets, config, {t.name: 0 for t in targets})}
    one = {s.name: s.num_params for s in _specs_at(targets, config, {t.name: 1 for t in targets})}
    costs = {n: one[n] - zero[n] for n in one}
    caps = {t.name: min(t.max_rank, max_rank or t.max_rank) for t in targets}
    if any(c <= 0 for c in costs.values()):
        raise LoRAConfigError(f"variant={config.variant!r} has no per-rank cost to allocate; use rank_for_budget()")
    spendable = budget - sum(zero.values())
    if spendable < sum(costs.values()):
        raise LoRAConfigError(
            f"budget={budget} is below rank 1 on every targeted matrix ({sum(one.values())} parameters); raise the "
            "budget or target fewer matrices"
        )
    if scores is None:
        scores = dict(costs)
    unknown = sorted(set(scores) - set(costs))
    if unknown:
        raise LoRAConfigError(
            f"scores name modules that are not targeted: {unknown[:3]}; targeted: {sorted(costs)[:5]}"
        )
    weights = {n: float(scores.get(n, 0.0)) for n in costs}
    if any(w < 0 or not math.isfinite(w) for w in weights.values()) or sum(weights.values()) <= 0:
        raise LoRAConfigError("scores must be finite, non-negative and not all zero")
    total = sum(weights.values())
    ideal = {n: spendable * weights[n] / total / costs[n] for n in costs}
    ranks = {n: max(1, min(caps[n], int(ideal[n]))) for n in costs}
    spent = sum(ranks[n] * costs[n] for n in costs)
    while True:  # spend the remainder on the matrix furthest below its ideal rank
        open_ = [n for n in costs if ranks[n] < caps[n] and spent + costs[n] <= spendable]
        if not open_:
            break
        n = max(open_, key=lambda k: (ideal[k] - ranks[k], -costs[k]))
        ranks[n] += 1
        spent += costs[n]
    pattern = {"re:" + re.escape(n): r for n, r in ranks.items()}
    dataclasses.replace(config, rank_pattern=pattern)  # the variant's own check (VeRA has one shared rank)
    return pattern
