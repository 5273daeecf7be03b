"""Choosing ranks from a trainable-parameter budget (the paper's Table 5 protocol).

A rank-r adapter on a ``d_out x d_in`` matrix costs ``r·(d_in + d_out)`` parameters, so for a
budget ``P`` spread uniformly over the targeted matrices ``r = floor(P / Σ(d_in + d_out))``.
On GPT-3 the paper's 18M budget gives r=8 on one matrix type, 4 on two and 2 on four.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .config import LoRAConfig
from .errors import LoRAConfigError
from .injection import plan_injection


def cost_per_rank(model: nn.Module, config: LoRAConfig) -> int:
    """``Σ (d_in + d_out)`` over the matrices ``config`` targets: the parameters of one rank."""
    unit = dataclasses.replace(config, r=1, rank_pattern={})
    return sum(s.d_in + s.d_out for s in plan_injection(model, unit))


def rank_for_budget(model: nn.Module, config: LoRAConfig, budget: int) -> int:
    """The largest uniform rank whose adapters fit in ``budget`` trainable parameters."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise LoRAConfigError(f"budget={budget!r} must be a positive number of parameters")
    per_rank = cost_per_rank(model, config)
    r = budget // per_rank
    if r < 1:
        raise LoRAConfigError(
            f"budget={budget} is below the cost of rank 1 on targets {config.targets} ({per_rank} parameters); "
            f"raise lora.budget to at least {per_rank} or adapt fewer matrices"
        )
    return r


def allocate_ranks(
    model: nn.Module,
    config: LoRAConfig,
    budget: int,
    scores: dict[str, float] | None = None,
    max_rank: int | None = None,
) -> dict[str, int]:
    """Layer-wise ranks for ``budget`` trainable parameters, as a ``rank_pattern``.

    Matrix ``i`` (``d_out x d_in``, cost ``c_i = d_in + d_out`` per rank) gets a parameter share
    proportional to ``scores[i]`` (any non-negative importance, e.g. AdaLoRA's final ranks or
    ``||ΔW||`` of a pilot run; default ``c_i``, which gives every matrix the same rank), i.e.
    ``r_i ≈ budget · score_i / Σ score · 1/c_i``, at least 1 and at most ``min(d_in, d_out, max_rank)``.
    Ranks are floored, then the leftover budget is spent one rank at a time on the matrix
    furthest below its share. ``Σ r_i·c_i <= budget`` always holds.

    Returns ``{"re:<escaped full name>": r_i}``: pass it as ``LoRAConfig(rank_pattern=...)``.
    """
    import math
    import re

    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise LoRAConfigError(f"budget={budget!r} must be a positive number of parameters")
    specs = plan_injection(model, dataclasses.replace(config, r=1, rank_pattern={}))
    costs = {s.name: s.d_in + s.d_out for s in specs}
    caps = {s.name: min(s.d_in, s.d_out, max_rank or s.d_in) for s in specs}
    floor_cost = sum(costs.values())
    if budget < floor_cost:
        raise LoRAConfigError(
            f"budget={budget} is below rank 1 on every targeted matrix ({floor_cost} parameters); raise the budget or "
            "target fewer matrices"
        )
    if scores is None:
        scores = dict(costs)
    unknown = sorted(set(scores) - set(costs))
    if unknown:
        raise LoRAConfigError(f"scores name modules that are not targeted: {unknown[:3]}; targeted: {sorted(costs)[:5]}")
    weights = {n: float(scores.get(n, 0.0)) for n in costs}
    if any(w < 0 or not math.isfinite(w) for w in weights.values()) or sum(weights.values()) <= 0:
        raise LoRAConfigError("scores must be finite, non-negative and not all zero")
    total = sum(weights.values())
    ideal = {n: budget * weights[n] / total / costs[n] for n in costs}
    ranks = {n: max(1, min(caps[n], int(ideal[n]))) for n in costs}
    spent = sum(ranks[n] * costs[n] for n in costs)
    while True:  # spend the remainder on the matrix furthest below its ideal rank
        open_ = [n for n in costs if ranks[n] < caps[n] and spent + costs[n] <= budget]
        if not open_:
            break
        n = max(open_, key=lambda k: (ideal[k] - ranks[k], -costs[k]))
        ranks[n] += 1
        spent += costs[n]
    return {"re:" + re.escape(n): r for n, r in ranks.items()}
