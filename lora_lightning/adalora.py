"""AdaLoRA's rank allocation (Zhang et al. 2023, arXiv 2303.10512, §3.2-3.3, Alg. 1).

Each adapted matrix has ``ΔW = s·P·diag(λ)·Q`` (:class:`~lora_lightning.variants.AdaLoRALinear`).
After every optimizer step the controller

1. updates, per entry ``w`` of ``P``, ``λ``, ``Q``, the sensitivity ``I = |w·∂L/∂w|`` smoothed as
   ``Ī ← β1·Ī + (1-β1)·I`` and its uncertainty ``Ū ← β2·Ū + (1-β2)·|I - Ī|`` (score ``Ī·Ū``);
2. scores each triplet ``i`` as ``S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``;
3. keeps the ``b(t)`` best triplets of all matrices and zeroes the others' ``λ_i``, with the cubic
   budget ``b(t) = b_T + (b_0 - b_T)·(1 - (t - t_i)/(T - t_f - t_i))³`` between ``t_i`` and ``T - t_f``
   (``b_0 = Σ r``, ``b_T = target_r x matrices``); the final mask is frozen for the last ``t_f`` steps.

Before every optimizer step it adds ``orth_reg · ∇(Σ ||PᵀP - I||²_F + ||QQᵀ - I||²_F)`` to the
gradients — the same as adding the penalty to the loss, without changing the user's ``training_step``.
:class:`~lora_lightning.LoRACallback` owns a controller when ``variant='adalora'``; in plain PyTorch
call :meth:`AdaLoRAController.before_optimizer_step` and :meth:`AdaLoRAController.after_optimizer_step`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .config import LoRAConfig
from .errors import LoRAConfigError
from .variants import AdaLoRALinear


def orthogonality_penalty(model: nn.Module) -> Tensor:
    """``Σ_layers ||PᵀP - I||²_F + ||QQᵀ - I||²_F`` over the AdaLoRA layers of ``model``."""
    layers = adalora_layers(model)
    if not layers:
        raise LoRAConfigError("the model has no AdaLoRA layers: inject with LoRAConfig(variant='adalora')")
    return torch.stack([layer.orthogonality_penalty() for layer in layers.values()]).sum()


def adalora_layers(model: nn.Module) -> dict[str, AdaLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoRALinear)}


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
            for p, g in zip(params, grads):
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
            name: self._score(name, "lora_E") + self._score(name, "lora_A").mean(1) + self._score(name, "lora_B").mean(0)
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


__all__ = ["AdaLoRAController", "adalora_layers", "cubic_budget", "orthogonality_penalty"]


class AdaLoRAHooks:
    """The Lightning side of :class:`AdaLoRAController`, driven by :class:`~lora_lightning.LoRACallback`:
    the penalty gradient in ``on_before_optimizer_step``, importance update + pruning in
    ``on_train_batch_end`` once per optimizer step, final ranks logged in ``on_fit_end``
    (``adalora/rank/<module>``) and kept in :attr:`final_ranks` (``{module: rank}``)."""

    def __init__(self, trainer: Any, pl_module: nn.Module, config: LoRAConfig) -> None:
        estimated = trainer.estimated_stepping_batches
        total = int(estimated) if estimated not in (None, float("inf")) else None
        self.controller = AdaLoRAController(pl_module, config, total)
        self.last_step = trainer.global_step
        self.penalty: float | None = None
        self.final_ranks: dict[str, int] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module) -> None:
        penalty = self.controller.before_optimizer_step()
        self.penalty = None if penalty is None else float(penalty)

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        step = trainer.global_step
        if step == self.last_step:  # gradient accumulation: no optimizer step in this batch
            return
        self.last_step = step
        n_allocations = len(self.controller.history)
        total = self.controller.after_optimizer_step(step)
        metrics: dict[str, float] = {"adalora/total_rank": float(total)}
        if self.penalty is not None:
            metrics["adalora/orth_penalty"] = self.penalty
        if len(self.controller.history) != n_allocations:
            metrics["adalora/budget"] = float(self.controller.history[-1]["budget"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self.final_ranks = self.controller.ranks()
        metrics = {f"adalora/rank/{n}": float(r) for n, r in self.final_ranks.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def summary(self) -> dict[str, Any]:
        ranks = self.final_ranks or self.controller.ranks()
        return {"adalora_ranks": ranks, "adalora_total_rank": sum(ranks.values())}


def variant_hooks(trainer: Any, pl_module: nn.Module, config: LoRAConfig) -> AdaLoRAHooks | None:
    """The training-time hooks a variant needs (AdaLoRA only), or ``None``."""
    return AdaLoRAHooks(trainer, pl_module, config) if config.variant == "adalora" else None
