"""Shared-input fusion: LoRA layers that read the same tensor (q, k and v of an attention block; gate and
up of a Llama-style MLP) computed as one autograd node.

For members ``i = 1..n`` reading ``x (..., d_in)``, with ``A_i (r_i x d_in)``, ``B_i (d_out_i x r_i)``::

    h_i = x · A_iᵀ                                   (N, r_i)
    y_i = x · W_iᵀ + b_i + s_i · h_i · B_iᵀ           bit-identical to the separate layer's output

and the backward, with ``g_i = ∂L/∂y_i`` and ``gh_i = s_i · g_i · B_i``::

    ∂[A_1; ...; A_n] = [gh_1, ..., gh_n]ᵀ · x        one GEMM
    ∂B_i = s_i · (h[:, i]ᵀ · g_i)ᵀ
    ∂x   = Σ g_i · W_i + [gh_1, ..., gh_n] · [A_1; ...; A_n]   accumulated in one buffer

so the backward reads ``x`` once for all the members' ``∂A``, autograd sees one node for the group, and the
input gradients are summed in place instead of by autograd's separate adds. The forward keeps each
member's own thin GEMM so that outputs are bit-identical to the unfused layers' (gradients agree to float
round-off: the sums run in another order).

Nothing is hard-coded by name: a :class:`SharedInputTracker` watches the calls of the plain LoRA Linear
layers of one model. Layers called one after the other with the *same tensor object* form a group (learnt
on the first forward, which runs unfused); from the next forward on, the group's first member computes
every member's output and the others take theirs from a cache keyed by the input tensor's identity. A
member called with any other tensor computes its own output as usual, so a wrong grouping can cost time
but never change a result. A group is used only when, at that call, every member is a plain LoRA layer
(no variant, fused layout, quantized base, routing, merge or disable) and input, base and adapters share a
dtype outside autocast, and autograd is recording (inference runs the separate layers: only the backward
gains). With adapter dropout active, each member keeps its own mask, drawn as ``nn.Dropout``
draws it (same random stream as the separate layers), stored as one byte per element instead of each
layer's fp32 copy of its dropped input; the ``∂A_i`` are then one GEMM each. Under ``torch.compile`` tracing the
layers keep their single-layer node (the tracker's Python bookkeeping would break the graph).

Switch it with ``LoRAConfig(fuse_shared_inputs=False)`` at injection, or :func:`set_shared_input_fusion`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .layers import LoRALinear, one_node_ok
from .layers.function import keep_mask

TRACKER_ATTR = "lora_shared"  # the attribute of each LoRALinear holding its model's tracker


class SharedInputLoRAFunction(torch.autograd.Function):
    """``(y_1, ..., y_n)`` of ``n`` LoRA Linear layers that read the same ``x`` (module docstring).

    ``apply(x, scalings, ranks, keeps, masks, W_1, b_1, A_1, B_1, ..., W_n, b_n, A_n, B_n)``; ``b_i`` may be
    ``None``. With adapter dropout, ``masks[i]`` is member i's boolean keep-mask (shape of ``x``) and
    ``keeps[i]`` its keep probability: the adapter reads ``x_d,i = x·mask_i / keep_i`` exactly as
    ``nn.Dropout`` computes it; ``None`` = no dropout. Saves ``x``, ``h (N x Σr)``, the masks (one byte per
    element, where the separate layers each keep their fp32 ``x_d,i``) and the parameters; outputs nobody
    uses get no gradient work.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        scalings: tuple[float, ...],
        ranks: tuple[int, ...],
        keeps: tuple[float | None, ...],
        masks: tuple[Tensor | None, ...],
        *params: Tensor | None,
    ) -> tuple[Tensor, ...]:
        n = len(scalings)
        weights, biases, As, Bs = params[0::4], params[1::4], params[2::4], params[3::4]
        d_in, lead = x.shape[-1], x.shape[:-1]
        x2 = x.reshape(-1, d_in)
        # each member's h_i on its own (not one x·[A_1;...;A_n]ᵀ GEMM): the outputs are then bit-identical to
        # the separate layers', so a model's output never depends on whether its groups are learnt yet
        hs, outs = [], []
        for i in range(n):
            w, b = weights[i], biases[i]
            # allocated in the final shape, written through a 2-D view: each output is a tensor of its own (not a
            # view), so in-place ops on it are allowed, as on the separate layer's output
            result = x2.new_empty((*lead, w.shape[0]))
            out = result.view(-1, w.shape[0])
            if b is not None:
                torch.addmm(b, x2, w.t(), out=out)
            else:
                torch.mm(x2, w.t(), out=out)
            h_i = torch.mm(_dropped(x2, masks[i], keeps[i]), As[i].t())
            out.addmm_(h_i, Bs[i].t(), alpha=scalings[i])
            hs.append(h_i)
            outs.append(result)
        h = torch.cat(hs, 1)  # (N, Σr), saved for ∂B
        ctx.scalings, ctx.ranks, ctx.keeps, ctx.has_bias = scalings, ranks, keeps, tuple(b is not None for b in biases)
        ctx.mask_at = tuple(i for i in range(n) if masks[i] is not None)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h, *weights, *As, *Bs, *(masks[i] for i in ctx.mask_at))
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        x, h, *rest = ctx.saved_tensors
        scalings, ranks, keeps = ctx.scalings, ctx.ranks, ctx.keeps
        n = len(ranks)
        weights, As, Bs = rest[:n], rest[n : 2 * n], rest[2 * n : 3 * n]
        masks: list[Tensor | None] = [None] * n
        for i, m in zip(ctx.mask_at, rest[3 * n :], strict=True):
            masks[i] = m
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)
        if torch.is_grad_enabled():  # double backward: h inside the graph being built
            h = torch.cat([torch.mm(_dropped(x2, masks[i], keeps[i]), As[i].t()) for i in range(n)], 1)
        need = ctx.needs_input_grad
        P = 5  # index of W_1 among apply's arguments
        out: list[Tensor | None] = [None] * (P + 4 * n)
        ghs, grad_x, offset = [], None, 0
        for i, g in enumerate(grads):
            r, s = ranks[i], scalings[i]
            if g is None:  # output unused: contributes nothing
                ghs.append(x2.new_zeros(x2.shape[0], r))
                offset += r
                continue
            g2 = g.reshape(-1, g.shape[-1])
            gh = torch.mm(g2, Bs[i].t().contiguous().t()) * s  # (N, r_i), B column-major: the fast layout
            ghs.append(gh)
            base = P + 4 * i
            if need[base + 3]:
                out[base + 3] = torch.mm(h[:, offset : offset + r].t(), g2).t() * s
            if need[base]:
                out[base] = torch.mm(g2.t(), x2)
            if ctx.has_bias[i] and need[base + 1]:
                out[base + 1] = g2.sum(0)
            if need[0]:
                grad_x = torch.mm(g2, weights[i]) if grad_x is None else grad_x.addmm_(g2, weights[i])
            offset += r
        want_A = [need[P + 4 * i + 2] for i in range(n)]
        if not ctx.mask_at:  # every member reads x itself: one GEMM for all the ∂A_i, one for their part of ∂x
            gh_cat = torch.cat(ghs, 1)
            if any(want_A):
                grad_A = torch.mm(gh_cat.t(), x2)  # (Σr, d_in)
                offset = 0
                for i in range(n):
                    if want_A[i] and grads[i] is not None:  # an unused output gives None, as the separate layer's would
                        out[P + 4 * i + 2] = grad_A[offset : offset + ranks[i]]
                    offset += ranks[i]
            if need[0]:
                A_cat = torch.cat(As, 0)
                grad_x = torch.mm(gh_cat, A_cat) if grad_x is None else grad_x.addmm_(gh_cat, A_cat)
        else:  # member i read its own x_d,i: ∂A_i = gh_iᵀ·x_d,i, and ∂x gets (gh_i·A_i)·mask_i/keep_i
            for i in range(n):
                if grads[i] is None:
                    continue
                mask, keep = masks[i], keeps[i]
                if want_A[i]:  # the 1/keep scale applied to the small (r_i x d_in) product, not to an N x d_in one
                    if mask is None:
                        out[P + 4 * i + 2] = torch.mm(ghs[i].t(), x2)
                    else:
                        out[P + 4 * i + 2] = torch.mm(ghs[i].t(), x2.mul(mask.reshape(x2.shape))).mul_(1.0 / keep)
                if need[0]:
                    if mask is None:
                        grad_x = torch.mm(ghs[i], As[i]) if grad_x is None else grad_x.addmm_(ghs[i], As[i])
                    else:
                        back = torch.mm(ghs[i] * (1.0 / keep), As[i]).mul_(mask.reshape(x2.shape))
                        grad_x = back if grad_x is None else grad_x.add_(back)
        if need[0] and grad_x is not None:
            out[0] = grad_x.view(x.shape)
        return tuple(out)


def _dropped(x2: Tensor, mask: Tensor | None, keep: float | None) -> Tensor:
    """``x2 · mask / keep`` as ``nn.Dropout`` computes it (``x.mul(mask).mul_(1/keep)``); ``x2`` without a mask."""
    if mask is None:
        return x2
    return x2.mul(mask.reshape(x2.shape)).mul_(1.0 / keep)


def _in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (where checkpointing recomputes)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _inputs_state(layer: LoRALinear, x: Tensor) -> tuple[Any, ...]:
    """What a precomputed output of ``layer`` for ``x`` depends on: the tensors it read (identity and in-place
    version: an optimizer step or ``load_state_dict`` bumps it) and whether its dropout was active."""
    tensors = (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B)
    return tuple((id(t), t._version) if t is not None else None for t in tensors) + (layer.lora_dropout.training,)


def _plain_member(layer: nn.Module) -> bool:
    """A layer the fused node computes exactly: plain LoRA on a Linear with an adapter of its own, unfused
    layout, unquantized base."""
    return (
        type(layer) is LoRALinear
        and layer.fused is None
        and getattr(layer, "quantize_base", None) is None
        and layer.lora_tie is None
    )


def _ready(layer: LoRALinear, x: Tensor) -> bool:
    """Whether ``layer`` would take its one-node path for ``x`` now (plain, unmerged, unrouted, one dtype)."""
    return (
        not layer.merged
        and layer.quantize_base is None
        and not layer.lora_disabled
        and layer.lora_route is None
        and layer.lora_A.requires_grad  # a frozen A (LoRA-FA): the layer's own node keeps no input, this one would
        and one_node_ok(x, layer.weight, layer.lora_A, layer.lora_B)
    )


class SharedInputTracker:
    """Learns which plain LoRA Linear layers of one model read the same tensor, and runs them as one node.

    One tracker per injected model, set as ``layer.lora_shared`` on every plain LoRA Linear layer.
    ``groups`` maps a group's first member to the members in call order.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.groups: dict[nn.Module, list[nn.Module]] = {}
        self.member_of: dict[nn.Module, nn.Module] = {}  # layer -> its group's first member
        self._last: tuple[weakref.ref, list[nn.Module]] | None = None  # learning: the last input and its readers
        # outputs waiting for their member, with the state of what they were computed from
        self._cache: tuple[weakref.ref, dict[nn.Module, tuple[Tensor, tuple[Any, ...]]]] | None = None
        # groups learnt but not run yet: they start at a leader call outside a backward pass, so the recompute
        # of an activation-checkpointed forward that ran unfused runs unfused as well
        self._pending: set[nn.Module] = set()
        self.fused_calls = 0  # group computations (for tests and profiles)

    # pickling / deepcopy: the runtime state (weak references, cached outputs) is not part of the model
    def __getstate__(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "groups": self.groups,
            "member_of": self.member_of,
            "fused_calls": 0,
            "_pending": set(self._pending),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._last, self._cache = None, None

    def reset(self) -> None:
        """Forget the learnt groups (they are learnt again on the next forward)."""
        self.groups.clear()
        self.member_of.clear()
        self._pending.clear()
        self._last, self._cache = None, None

    def add_group(self, members: Sequence[nn.Module]) -> None:
        """Make ``members`` (in call order) one group, taking them out of any group they were in."""
        for m in members:
            old = self.member_of.pop(m, None)
            if old is not None and old in self.groups:
                for other in self.groups.pop(old):
                    self.member_of.pop(other, None)
        self.groups[members[0]] = list(members)
        self._pending.add(members[0])
        for m in members:
            self.member_of[m] = members[0]

    def forward(self, layer: LoRALinear, x: Tensor) -> Tensor | None:
        """``layer``'s output for ``x`` through its group, or ``None`` when the layer runs on its own."""
        if not self.enabled or torch.compiler.is_compiling():
            return None
        cache = self._cache
        if cache is not None and layer in cache[1]:
            out, state = cache[1].pop(layer)
            # only the output computed for this very tensor, with the parameters as they are now (a member the
            # forward skipped and that is called later, after an optimizer step, computes its own)
            if cache[0]() is x and state == _inputs_state(layer, x) and _ready(layer, x):
                return out
        leader = self.member_of.get(layer)
        if leader is None:
            self._learn(layer, x)
            return None
        if leader is not layer or not torch.is_grad_enabled():
            return None  # without autograd there is no backward to fuse: the separate layers cost less
        if layer in self._pending:
            if _in_backward():  # an activation-checkpointing recompute must save what its forward saved
                return None
            self._pending.discard(layer)
        members = self.groups[layer]
        if not all(_ready(m, x) for m in members):
            return None
        outs = self._run(members, x)
        self._cache = (
            weakref.ref(x),
            {m: (o, _inputs_state(m, x)) for m, o in zip(members[1:], outs[1:], strict=True)},
        )
        self.fused_calls += 1
        return outs[0]

    def _learn(self, layer: nn.Module, x: Tensor) -> None:
        last = self._last
        if last is not None and last[0]() is x and layer not in last[1]:
            last[1].append(layer)
            self.add_group(last[1])
            return
        self._last = (weakref.ref(x), [layer])

    @staticmethod
    def _run(members: Sequence[LoRALinear], x: Tensor) -> tuple[Tensor, ...]:
        params: list[Tensor | None] = []
        keeps: list[float | None] = []
        masks: list[Tensor | None] = []
        for m in members:
            params += [m.weight, m.bias, m.lora_A, m.lora_B]
            if m.dropout_p > 0 and m.lora_dropout.training:
                # the draw nn.Dropout makes (same shape, same order of members): the same random stream as unfused
                keep = 1.0 - m.dropout_p
                keeps.append(keep)
                masks.append(keep_mask(x, keep))
            else:
                keeps.append(None)
                masks.append(None)
        scalings = tuple(float(m.scaling) for m in members)
        ranks = tuple(int(m.lora_A.shape[0]) for m in members)
        return SharedInputLoRAFunction.apply(x, scalings, ranks, tuple(keeps), tuple(masks), *params)


def attach_tracker(layers: Sequence[nn.Module], enabled: bool = True) -> SharedInputTracker:
    """A new tracker set on the plain LoRA Linear layers among ``layers`` (injection calls this)."""
    tracker = SharedInputTracker(enabled)
    for layer in layers:
        if _plain_member(layer):
            layer.lora_shared = tracker
    return tracker


def set_shared_input_fusion(model: nn.Module, enabled: bool) -> int:
    """Turn shared-input fusion on or off for every adapted layer of ``model``; returns how many layers
    can take part. Results are the same either way (up to float round-off: one GEMM instead of several)."""
    trackers = {id(t): t for t in (getattr(m, TRACKER_ATTR, None) for m in model.modules()) if t is not None}
    for tracker in trackers.values():
        tracker.enabled = enabled
        tracker.reset()
    return sum(1 for m in model.modules() if getattr(m, TRACKER_ATTR, None) is not None)


def shared_input_groups(model: nn.Module) -> list[list[str]]:
    """The learnt groups as module names, e.g. ``[['...query', '...key', '...value'], ...]`` (empty before
    the first forward)."""
    names = {m: n for n, m in model.named_modules()}
    trackers = {id(t): t for t in (getattr(m, TRACKER_ATTR, None) for m in model.modules()) if t is not None}
    return [[names.get(m, "?") for m in members] for t in trackers.values() for members in t.groups.values()]


def set_shared_input_groups(model: nn.Module, groups: Sequence[Sequence[str]]) -> int:
    """Set the groups by module name (as :func:`shared_input_groups` returns them), so the next forward already
    runs fused: checkpoints record the groups and resuming restores them, which keeps a resumed run
    bit-identical to an uninterrupted one. Names that are not plain LoRA Linear layers of one tracker are
    skipped (the groups are a speed hint, never needed for a right result). Returns the groups set."""
    modules = dict(model.named_modules())
    done = 0
    for names in groups:
        members = [modules.get(n) for n in names]
        trackers = {id(getattr(m, TRACKER_ATTR, None)) for m in members}
        if len(members) < 2 or None in members or len(trackers) != 1 or getattr(members[0], TRACKER_ATTR, None) is None:
            continue
        getattr(members[0], TRACKER_ATTR).add_group(members)
        done += 1
    return done
