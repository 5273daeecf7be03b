"""AdaLoRA's rank allocation (Zhang et al. 2023, arXiv 2303.10512, §3.2-3.3, Alg. 1).

Each adapted matrix has ``ΔW = s·P·diag(λ)·Q`` (:class:`AdaLoRALinear`).
After every optimizer step the controller

1. updates, per entry ``w`` of ``P``, ``λ``, ``Q``, the sensitivity ``I = |w·∂L/∂w|`` smoothed as
   ``Ī ← β1·Ī + (1-β1)·I`` and its uncertainty ``Ū ← β2·Ū + (1-β2)·|I - Ī|`` (score ``Ī·Ū``);
2. scores each triplet ``i`` as ``S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``;
3. keeps the ``b(t)`` best triplets of all matrices and zeroes the others' ``λ_i``, with the cubic
   budget ``b(t) = b_T + (b_0 - b_T)·(1 - (t - t_i)/(T - t_f - t_i))³`` between ``t_i`` and ``T - t_f``
   (``b_0 = Σ r``, ``b_T = target_r x matrices``); the final mask is frozen for the last ``t_f`` steps.

Before every optimizer step it adds ``orth_reg · ∇(Σ ||PᵀP - I||²_F + ||QQᵀ - I||²_F)`` to the
gradients — the same as adding the penalty to the loss, without changing the user's ``training_step``.
:class:`~lora_lightning.LoRACallback` drives it through the variant's training hooks; in plain PyTorch
call :meth:`AdaLoRAController.before_optimizer_step` and :meth:`AdaLoRAController.after_optimizer_step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import LoRAConfig, check_fraction, check_rank
from ..errors import LoRAConfigError
from ..layers import LoRALinear, init_random
from ..plan import AdapterSpec
from .base import Variant, register_variant


@dataclass
class AdaLoRAConfig(LoRAConfig):
    """AdaLoRA's schedule: ``r`` is the initial rank per matrix, ``adalora_target_r`` the final average
    rank (total budget ``target_r x matrices``); full budget for the first ``tinit`` fraction of steps,
    cubic decrease, final budget for the last ``tfinal`` fraction; masks recomputed every ``delta_t``
    steps; EMA factors ``beta1``/``beta2`` of importance and uncertainty; ``orth_reg`` weight of
    ``||PᵀP-I||²+||QQᵀ-I||²``; ``total_steps`` (``None`` = the Trainer's estimated stepping batches)."""

    variant: str = "adalora"
    adalora_target_r: int = 4
    adalora_tinit: float = 0.1
    adalora_tfinal: float = 0.2
    adalora_delta_t: int = 1
    adalora_beta1: float = 0.85
    adalora_beta2: float = 0.85
    adalora_orth_reg: float = 0.1
    adalora_total_steps: int | None = None

    def validate(self) -> None:
        super().validate()
        check_rank(self.adalora_target_r, "adalora_target_r")
        if self.adalora_target_r > min([self.r, *self.rank_pattern.values()]):
            raise LoRAConfigError(
                f"adalora_target_r={self.adalora_target_r} exceeds the initial rank r={self.r}: AdaLoRA prunes from r "
                "down to the target, so set adalora_target_r <= r (e.g. r=12, adalora_target_r=8)"
            )
        check_fraction(self.adalora_tinit, "adalora_tinit", "a fraction of the training steps")
        check_fraction(self.adalora_tfinal, "adalora_tfinal", "a fraction of the training steps")
        if self.adalora_tinit + self.adalora_tfinal >= 1.0:
            raise LoRAConfigError(
                f"adalora_tinit + adalora_tfinal = {self.adalora_tinit + self.adalora_tfinal:g} >= 1 leaves no "
                "steps to "
                "prune in: lower them (defaults 0.1 and 0.2)"
            )
        check_rank(self.adalora_delta_t, "adalora_delta_t")
        check_fraction(self.adalora_beta1, "adalora_beta1", "an EMA factor (e.g. 0.85)")
        check_fraction(self.adalora_beta2, "adalora_beta2", "an EMA factor (e.g. 0.85)")
        reg = self.adalora_orth_reg
        if isinstance(reg, bool) or not isinstance(reg, (int, float)) or reg < 0:
            raise LoRAConfigError(f"adalora_orth_reg={reg!r} must be a number >= 0 (PEFT uses 0.5)")
        if self.adalora_total_steps is not None:
            check_rank(self.adalora_total_steps, "adalora_total_steps")


class AdaLoRALinear(LoRALinear):
    """``ΔW = s·P·diag(λ)·Q`` with ``P = lora_B (d_out x r)``, ``λ = lora_E (r)``, ``Q = lora_A (r x d_in)``;
    ``P, Q ~ N(0, 0.02²)``, ``λ = 0``. As factors: ``A' = λ ⊙ Q``, ``B' = P``. :class:`AdaLoRAController`
    zeroes entries of ``λ`` by importance until the total rank budget is met and adds the
    orthogonality penalty's gradient."""

    variant_name = "adalora"
    trainable_names = ("lora_A", "lora_B", "lora_E")
    adapter_names = ("lora_A", "lora_B", "lora_E")

    def __init__(self, base: nn.Linear, *args, generator: torch.Generator | None = None, **kwargs) -> None:
        super().__init__(base, *args, generator=generator, **kwargs)
        self.lora_E = nn.Parameter(torch.zeros(self.r, dtype=self.lora_A.dtype, device=self.lora_A.device))
        for tensor in (self.lora_A, self.lora_B):
            init_random(tensor, lambda t, g: nn.init.normal_(t, std=0.02, generator=g), generator)

    def factors(self) -> tuple[Tensor, Tensor, float]:
        return self.lora_A * self.lora_E[:, None], self.lora_B, self.scaling

    def orthogonality_penalty(self) -> Tensor:
        """``||PᵀP - I||²_F + ||QQᵀ - I||²_F`` (differentiable scalar)."""
        eye = torch.eye(self.r, dtype=self.lora_A.dtype, device=self.lora_A.device)
        return ((self.lora_B.T @ self.lora_B - eye) ** 2).sum() + ((self.lora_A @ self.lora_A.T - eye) ** 2).sum()

    def rank(self) -> int:
        """Entries of ``λ`` not pruned (non-zero)."""
        return int((self.lora_E.detach() != 0).sum())


def adalora_layers(model: nn.Module) -> dict[str, AdaLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoRALinear)}


def orthogonality_penalty(model: nn.Module) -> Tensor:
    """``Σ_layers ||PᵀP - I||²_F + ||QQᵀ - I||²_F`` over the AdaLoRA layers of ``model``."""
    layers = adalora_layers(model)
    if not layers:
        raise LoRAConfigError("the model has no AdaLoRA layers: inject with LoRAConfig(variant='adalora')")
    return torch.stack([layer.orthogonality_penalty() for layer in layers.values()]).sum()


def cubic_budget(step: int, total_steps: int, initial: int, target: int, tinit: int, tfinal: int) -> int:
    """Total rank kept at ``step``: ``initial`` until ``tinit``, cubic decay, ``target`` after ``total - tfinal``."""
    if step <= tinit:
        return initial
    if step > total_steps - tfinal:
        return target
    span = max(1, total_steps - tfinal - tinit)
    coeff = 1.0 - (step - tinit) / span
    return int((initial - target) * coeff**3 + target)


class AdaLoRAController:
    """Importance-driven pruning of ``λ`` toward ``adalora_target_r x matrices`` total rank."""

    def __init__(self, model: nn.Module, config: LoRAConfig, total_steps: int | None = None) -> None:
        self.layers = adalora_layers(model)
        if not self.layers:
            raise LoRAConfigError("AdaLoRAController needs AdaLoRA layers: inject with LoRAConfig(variant='adalora')")
        total = config.adalora_total_steps or total_steps
        if not total or total < 1:
            raise LoRAConfigError(
                "AdaLoRA needs the number of training steps for its budget schedule: set lora.adalora_total_steps "
                "(or Trainer(max_steps=...) / max_epochs so it can be estimated)"
            )
        self.config = config
        self.total_steps = int(total)
        self.tinit = int(config.adalora_tinit * self.total_steps)
        self.tfinal = int(config.adalora_tfinal * self.total_steps)
        self.initial_budget = sum(layer.r for layer in self.layers.values())
        self.target_budget = config.adalora_target_r * len(self.layers)
        self.ipt: dict[tuple[str, str], Tensor] = {}
        self.unc: dict[tuple[str, str], Tensor] = {}
        self.masks: dict[str, Tensor] = {}
        self.final = False
        self.history: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- hooks
    def before_optimizer_step(self) -> Tensor | None:
        """Add ``orth_reg · ∇penalty`` to the gradients of ``P`` and ``Q``. Returns the penalty."""
        weight = float(self.config.adalora_orth_reg)
        if weight == 0.0:
            return None
        params = [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]
        with torch.enable_grad():
            penalty = torch.stack([layer.orthogonality_penalty() for layer in self.layers.values()]).sum()
            grads = torch.autograd.grad(weight * penalty, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if p.grad is None:
                    p.grad = g.detach().clone()
                else:
                    p.grad.add_(g)
        return penalty.detach()

    @torch.no_grad()
    def update_importance(self) -> None:
        """EMA of sensitivity ``|w·∇w|`` and uncertainty for every entry of P, λ, Q (needs ``.grad``)."""
        b1, b2 = self.config.adalora_beta1, self.config.adalora_beta2
        for name, layer in self.layers.items():
            for pname in ("lora_A", "lora_B", "lora_E"):
                p = getattr(layer, pname)
                if p.grad is None:
                    continue
                ipt = (p * p.grad).abs().float()
                key = (name, pname)
                if key not in self.ipt:
                    self.ipt[key], self.unc[key] = torch.zeros_like(ipt), torch.zeros_like(ipt)
                self.ipt[key].mul_(b1).add_(ipt, alpha=1 - b1)
                self.unc[key].mul_(b2).add_((ipt - self.ipt[key]).abs(), alpha=1 - b2)

    def _score(self, name: str, pname: str) -> Tensor:
        key = (name, pname)
        p = getattr(self.layers[name], pname)
        if key not in self.ipt:
            return torch.zeros(p.shape, device=p.device)
        return self.ipt[key] * self.unc[key]

    def triplet_scores(self) -> dict[str, Tensor]:
        """``S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` per layer (``r``)."""
        return {
            name: self._score(name, "lora_E")
            + self._score(name, "lora_A").mean(1)
            + self._score(name, "lora_B").mean(0)
            for name in self.layers
        }

    def budget(self, step: int) -> int:
        return cubic_budget(step, self.total_steps, self.initial_budget, self.target_budget, self.tinit, self.tfinal)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> int:
        """Update importances, re-allocate the budget of ``step`` (1-based count of optimizer steps) and
        zero the pruned ``λ`` entries. Returns the total rank kept."""
        if not self.final:
            self.update_importance()
            budget = self.budget(step)
            final = step > self.total_steps - self.tfinal
            if step > self.tinit and (final or step % self.config.adalora_delta_t == 0):
                self._allocate(budget)
                self.final = final
        self.apply_masks()
        return self.total_rank()

    def _allocate(self, budget: int) -> None:
        scores = self.triplet_scores()
        names = list(scores)
        flat = torch.cat([scores[n].flatten().cpu() for n in names])
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[torch.topk(flat, min(budget, flat.numel())).indices] = True
        start = 0
        for n in names:
            r = scores[n].numel()
            self.masks[n] = keep[start : start + r].to(self.layers[n].lora_E.device)
            start += r
        self.history.append({"budget": budget, "ranks": {n: int(m.sum()) for n, m in self.masks.items()}})

    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, mask in self.masks.items():
            self.layers[name].lora_E.masked_fill_(~mask, 0.0)

    def ranks(self) -> dict[str, int]:
        """Current rank per layer: entries kept by the mask (all ``r`` before the first pruning)."""
        return {n: int(self.masks[n].sum()) if n in self.masks else layer.r for n, layer in self.layers.items()}

    def total_rank(self) -> int:
        return sum(self.ranks().values())


class AdaLoRAHooks:
    """:class:`AdaLoRAController` as a variant's training hooks: the penalty gradient before every
    optimizer step, importance update + pruning after it, the final ranks at the end
    (``adalora/rank/<module>``, kept in :attr:`final_ranks`)."""

    def __init__(self, model: nn.Module, config: AdaLoRAConfig, total_steps: int | None) -> None:
        self.controller = AdaLoRAController(model, config, total_steps)
        self.final_ranks: dict[str, int] = {}
        self._penalty: float | None = None

    def before_optimizer_step(self) -> dict[str, float]:
        penalty = self.controller.before_optimizer_step()
        self._penalty = None if penalty is None else float(penalty)
        return {}

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        n_allocations = len(self.controller.history)
        metrics: dict[str, float] = {"adalora/total_rank": float(self.controller.after_optimizer_step(step))}
        if self._penalty is not None:
            metrics["adalora/orth_penalty"] = self._penalty
        if len(self.controller.history) != n_allocations:
            metrics["adalora/budget"] = float(self.controller.history[-1]["budget"])
        return metrics

    def at_end(self) -> dict[str, float]:
        self.final_ranks = self.controller.ranks()
        return {f"adalora/rank/{n}": float(r) for n, r in self.final_ranks.items()}

    def summary(self) -> dict[str, Any]:
        ranks = self.final_ranks or self.controller.ranks()
        return {"adalora_ranks": ranks, "adalora_total_rank": sum(ranks.values())}


@register_variant("adalora")
class AdaLoRA(Variant):
    """Trainable ``r·(d_in + d_out) + r`` per matrix (``P``, ``Q`` and ``λ``)."""

    config_class = AdaLoRAConfig
    layer_class = AdaLoRALinear

    @classmethod
    def num_params(cls, spec: AdapterSpec, config: LoRAConfig) -> int:
        return super().num_params(spec, config) + spec.r

    @classmethod
    def edits_gradients(cls, config: LoRAConfig) -> bool:
        return True  # the orthogonality penalty's gradient is added to .grad

    @classmethod
    def training_hooks(cls, model: nn.Module, config: LoRAConfig, total_steps: int | None) -> AdaLoRAHooks:
        assert isinstance(config, AdaLoRAConfig)
        return AdaLoRAHooks(model, config, total_steps)
