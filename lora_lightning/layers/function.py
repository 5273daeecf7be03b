"""The one autograd node of an adapted linear map: base and low-rank products together, backward written out.

The forward never materialises ``B'·A'`` (``d_out x d_in``): base and low-rank products run as one autograd
node (:class:`LoRALinearFunction`, benchmarks/OPTIMIZATIONS.md §3); only inputs that node cannot take (mixed
dtypes, autocast, quantized or sharded weights) take the composed formula
``F.linear(x, W0, b) + s·(dropout(x)·A'ᵀ)·B'ᵀ`` (:meth:`~lora_lightning.layers.LoRALayer.lora_forward`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def one_node_ok(x: Tensor, weight: Tensor, A: Tensor, B: Tensor) -> bool:
    """Whether :class:`LoRALinearFunction` can take these inputs: one dtype for input, base weight and
    adapters, plain (not quantized, sharded or nested) tensors, no autocast, a non-empty input."""
    w = weight.data if isinstance(weight, nn.Parameter) else weight
    return (
        type(x) is Tensor
        and type(w) is Tensor
        and not x.is_nested
        and x.dtype == weight.dtype == A.dtype == B.dtype
        and x.dim() >= 1
        and x.numel() > 0
        and not torch.is_autocast_enabled(x.device.type)
    )


class LoRALinearFunction(torch.autograd.Function):
    """``y = x·W0ᵀ + b + s·(x_d·Aᵀ)·Bᵀ`` as one autograd node, with its backward written out.

    Shapes: ``x, x_d (..., d_in)`` (``x_d`` = ``dropout(x)``; ``None`` means ``x`` itself), ``W0 (d_out x d_in)``,
    ``A (R x d_in)``, ``B (d_out x R)``. Backward, with ``g = ∂L/∂y`` flattened to ``(N, d_out)``:
    ``gh = s·g·B``, ``∂A = ghᵀ·x_d``, ``∂B = s·(hᵀ·g)ᵀ``, ``∂x = g·W0 (+ gh·A)``. Saved for the backward:
    ``h = x_d·Aᵀ`` (N x R) and the parameters, plus ``x_d`` only while ``A`` trains (LoRA-FA: none of the input)
    and ``x`` only while ``W0`` trains.

    Same function as ``F.linear(x, W0, b) + s·F.linear(F.linear(x_d, A), B)``, but autograd sees one
    node instead of five, the low-rank update is added into the base output in place, and every
    skinny (r-wide) product uses the fast GEMM layout (``hᵀ·g`` instead of ``gᵀ·h``: ~5x on one CPU
    core for r=8). ``W0``'s gradient is computed only when it requires grad.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        x_d: Tensor | None,
        weight: Tensor,
        bias: Tensor | None,
        lora_A: Tensor,
        lora_B: Tensor,
        scaling: float | Tensor,
    ) -> Tensor:
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)
        xd2 = x2 if x_d is None else x_d.reshape(-1, d_in)
        # the output is allocated in its final shape and written through a 2-D view, so the node returns a
        # tensor of its own (not a view): in-place ops on it (relu_, *=) are then allowed, as on F.linear's output
        result = x2.new_empty((*x.shape[:-1], weight.shape[0]))
        out = result.view(-1, weight.shape[0])
        if bias is not None:
            torch.addmm(bias, x2, weight.t(), out=out)
        else:
            torch.mm(x2, weight.t(), out=out)
        h = torch.mm(xd2, lora_A.t())
        if isinstance(scaling, Tensor):  # a 0-dim tensor (prepare_for_hotswap): changing it must not recompile
            out.addmm_(h * scaling, lora_B.t())
        else:
            out.addmm_(h, lora_B.t(), alpha=scaling)
        ctx.same, ctx.scaling, ctx.has_bias = x_d is None, scaling, bias is not None
        # inputs only (plus h, N x R), so a create_graph backward can rebuild a differentiable graph. The adapted
        # input x_d is kept only for ∂A: with lora_A frozen (LoRA-FA) the node keeps h = x_d·Aᵀ (R values per token)
        # and no input at all; x is kept only when W0 itself trains (or x is x_d and ∂A is needed)
        keep_xd = lora_A.requires_grad
        ctx.save_for_backward(
            x if weight.requires_grad or (x_d is None and keep_xd) else None,
            x_d if keep_xd else None,
            h,
            weight,
            lora_A,
            lora_B,
        )
        return result

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, x_d, h, weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        adapted = x if ctx.same else x_d  # None when lora_A is frozen: only h was kept
        xd2 = None if adapted is None else adapted.reshape(-1, lora_A.shape[-1])
        if torch.is_grad_enabled():  # double backward: recompute h inside the graph being built
            if xd2 is None:
                raise RuntimeError(
                    "create_graph backward through a LoRA layer whose lora_A is frozen (variant='lora_fa'): the layer "
                    "kept only x·Aᵀ, not its input; use variant='lora' for higher-order gradients"
                )
            h = torch.mm(xd2, lora_A.t())
        g2 = grad.reshape(-1, grad.shape[-1])
        # r-wide products in the layouts BLAS handles well (B is d_out x R, row-major)
        gh = torch.mm(g2, lora_B.t().contiguous().t()) * s
        grad_A = torch.mm(gh.t(), xd2) if ctx.needs_input_grad[4] else None
        grad_B = torch.mm(h.t(), g2).t() * s if ctx.needs_input_grad[5] else None
        grad_x = grad_xd = None
        lead = grad.shape[:-1]
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g2, weight)
            if ctx.same:
                grad_x = grad_x.addmm_(gh, lora_A)
            grad_x = grad_x.view(*lead, grad_x.shape[-1])
        if not ctx.same and ctx.needs_input_grad[1]:
            grad_xd = torch.mm(gh, lora_A).view(*lead, lora_A.shape[-1])
        grad_w = torch.mm(g2.t(), x.reshape(-1, lora_A.shape[-1])) if ctx.needs_input_grad[2] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, grad_xd, grad_w, grad_b, grad_A, grad_B, None


def keep_mask(x: Tensor, keep: float) -> Tensor:
    """A boolean keep-mask of ``x``'s shape drawn as ``nn.Dropout`` draws it (``bernoulli_(keep)``: the same random
    stream), one byte per element."""
    return torch.empty_like(x, dtype=torch.bool, memory_format=torch.contiguous_format).bernoulli_(keep)


class MaskedDropout(torch.autograd.Function):
    """``nn.Dropout``'s ``x·mask/keep`` (the same random draws), keeping the mask as one byte per element for the
    backward where ``nn.Dropout`` on the CPU keeps a float32 one. For adapters whose node keeps no input
    (``lora_A`` frozen): the mask is then the only input-sized tensor of the adapter path."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        keep = 1.0 - p
        mask = keep_mask(x, keep)
        ctx.keep = keep
        ctx.save_for_backward(mask)
        return x.mul(mask).mul_(1.0 / keep)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return grad.mul(mask).mul_(1.0 / ctx.keep), None
