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
