"""Parameters named by ``target_parameters`` (PEFT's option): the 3-D expert stacks of transformers' MoE layers
(Mixtral, Qwen-MoE, GPT-OSS: ``experts.gate_up_proj``, ``experts.down_proj``), or any 2-D weight a module reads
as ``self.<name>``, adapted exactly as PEFT's ``lora.ParamWrapper`` adapts them.

A 3-D parameter ``[E, d1, d2]`` holds ``E`` experts. transformers stores Mixtral's and Qwen-MoE's ``d_out x d_in``
(its forward computes ``F.linear(x, W[e])``, ``x·W[e]ᵀ``) and GPT-OSS's ``d_in x d_out`` (``x @ W[e]``, the experts
module says ``is_transposed = True``); PEFT reads the same flag. Every expert gets its own adapter of rank ``r``,
``ΔW_e = s·B_e·A_e`` (``A_e: r x d_in``, ``B_e: d_out x r``), as PEFT does. The adapter is stored as a fused layer
whose parts are the experts: ``lora_A`` stacks the ``A_e`` (``E·r x d_in``, PEFT's ``lora_A`` exactly) and
``lora_B`` the ``B_e`` (``E·d_out x r``; PEFT's ``lora_B`` is ``d_out x r·E`` with column ``j·E + e`` holding
column ``j`` of ``B_e``), so the expert stack seen as one ``E·d_out x d_in`` matrix gets the block update
``[B_0·A_0; ...; B_{E-1}·A_{E-1}]`` and merging, files, named adapters and their combinations work as for any
fused layer. A 2-D parameter is one ``d_out x d_in`` matrix (PEFT's ``num_experts = 1``).

The LoRA layer takes the parameter's place as the owner's child of the same name (the parameter moves into it, as
its ``weight``). A guard on the owner keeps the owner's ``state_dict`` keys as they were (``experts.gate_up_proj``,
not ``experts.gate_up_proj.weight``) and, around each forward of the owner, shows it ``W + s·B·A`` (one ``baddbmm``
in the weight's dtype, as PEFT's ``_LoraFactorsProxy``) under the parameter's name, so the owner's own forward
(eager, ``grouped_mm``, ...) runs unchanged. ``named_parameters()`` lists the weight as ``<owner>.<name>.weight``.

What PEFT refuses on a parameter is refused here too, in one line: adapter dropout (there is no input to drop
from a weight), variants other than plain LoRA / rsLoRA, quantized bases, mixed batches; also tying, and two
targets holding one tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LoRAConfigError
from ..plan import FusedSlices, ParamTarget, target_module
from .base import LayerKind, LoRALayer, register_layer_kind


def expert_layout(owner: nn.Module, param: Tensor) -> tuple[int, int, int, bool]:
    """``(experts, d_out, d_in, is_transposed)`` of a 2-D or 3-D parameter of ``owner``, PEFT's reading: a 3-D
    ``[E, d1, d2]`` is ``E`` experts of ``d1 x d2`` = ``d_out x d_in``, or ``d_in x d_out`` when the owner says
    ``is_transposed`` (transformers' flag for GPT-OSS-style experts); a 2-D one is one ``d_out x d_in`` matrix."""
    if param.dim() == 3:
        experts, d1, d2 = (int(n) for n in param.shape)
        transposed = bool(getattr(owner, "is_transposed", False))
        return (experts, d2, d1, True) if transposed else (experts, d1, d2, False)
    d_out, d_in = (int(n) for n in param.shape)
    return 1, d_out, d_in, False


def _adaptable(param: Any) -> bool:
    return isinstance(param, Tensor) and param.dim() in (2, 3) and param.is_floating_point()


class LoRAExperts(LoRALayer, nn.Module):
    """A frozen 2-D or 3-D parameter (``weight``: ``[E, d_out, d_in]``, or ``[E, d_in, d_out]`` when
    ``is_transposed``) plus one adapter per expert, ``ΔW_e = s·B_e·A_e``, stacked as a fused layer: ``lora_A``
    (``E·r x d_in``), ``lora_B`` (``E·d_out x r``). Its owner's forward reads :meth:`effective_weight` through the
    kind's guard; the layer itself is not called."""

    lora_kind = "experts"

    def __init__(self, base: ParamTarget, r: int, alpha: float, *, fused: FusedSlices | None = None, **options: Any):
        """``base``: the parameter target; ``fused``: the experts as parts (planned by the kind's ``row_blocks``);
        ``options``: those of :meth:`LoRALayer._init_lora` but ``dropout``, which must be 0."""
        name = options.get("name") or base.name
        if not isinstance(base, ParamTarget) or not _adaptable(base.param):
            raise LoRAConfigError(f"{name} is not a 2-D or 3-D floating-point parameter; LoRAExperts adapts those")
        if options.get("dropout", 0.0) > 0:
            raise LoRAConfigError(
                f"dropout={options['dropout']} cannot apply to {name}: a parameter's update is folded into the weight "
                "(W + s·B·A) before the module reads it, so there is no adapter input to drop (PEFT refuses it too); "
                "set dropout=0"
            )
        nn.Module.__init__(self)
        param = base.param
        experts, d_out, d_in, transposed = expert_layout(base.owner, param)
        self.param_name = base.param_name
        self.param_order = tuple(base.owner._parameters)  # the owner's parameters before any moved (PEFT nests so)
        self.num_experts, self.expert_out, self.is_transposed = experts, d_out, transposed
        self.in_features, self.out_features = d_in, experts * d_out
        self.weight = param
        self._init_lora(d_in, experts * d_out, param, r, alpha, fused=fused, **options)

    # ---------------------------------------------------------------- the update
    def _factors3(self, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """``(B3 [E, d_out, r], A3 [E, r, d_in])`` from the stacked ``A``, ``B`` (one pair for a 2-D weight)."""
        e = self.num_experts
        return B.reshape(e, -1, B.shape[-1]), A.reshape(e, -1, A.shape[-1])

    def _stored(self, delta3: Tensor) -> Tensor:
        """``[E, d_out, d_in]`` updates in the stored weight's layout."""
        if self.weight.dim() == 2:
            return delta3[0]
        return delta3.transpose(-2, -1) if self.is_transposed else delta3

    def live_delta_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """Differentiable ``ΔW`` as the ``E·d_out x d_in`` block column ``[s·B_e·A_e]_e`` (one batched product)."""
        A, B, s = self.lora_A, self.lora_B, self.scaling
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        B3, A3 = self._factors3(A, B)
        return (torch.bmm(B3, A3) * s).reshape(self.out_features, self.in_features)

    def stored_delta_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        delta = self.delta_weight(dtype).reshape(self.num_experts, self.expert_out, self.in_features)
        return self._stored(delta)

    def effective_weight(self) -> Tensor:
        """What the owner's forward reads as the parameter: ``W`` when the adapter is off (merged, disabled), else
        ``W + (s·B)·A`` per expert, one ``baddbmm`` (``addmm`` for a 2-D weight) in the weight's dtype with autocast
        off, as PEFT folds it (PEFT scales the product instead: equal up to round-off, bit-equal when ``s`` is a
        power of two); differentiable in ``A`` and ``B``."""
        W = self.weight
        if self.adapter_off():
            return W
        s = self.scaling
        # s·B first, whether s is a number or a 0-dim tensor (prepare_for_hotswap: not a constant of a compiled
        # graph), so a prepared adapter computes what the unprepared one did
        A, B = self.lora_A.to(W.dtype), self.lora_B.to(W.dtype) * (s.to(W.dtype) if isinstance(s, Tensor) else s)
        with torch.autocast(device_type=W.device.type, enabled=False):
            if W.dim() == 2:
                return torch.addmm(W, B, A)
            B3, A3 = self._factors3(A, B)
            if self.is_transposed:
                return torch.baddbmm(W, A3.mT, B3.mT)
            return torch.baddbmm(W, B3, A3)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        raise RuntimeError(
            f"a LoRAExperts layer stands for the parameter {self.param_name!r} of its module and is not called; call "
            "the module (its forward reads W + ΔW under that name)"
        )

    # --------------------------------------------------------- merge/unmerge
    def _add_delta(self, sign: float) -> None:
        W = self.weight
        with torch.no_grad():
            A, B, s = self.lora_A.detach(), self.lora_B.detach(), float(self.scaling)
            if A.dtype == B.dtype == W.dtype and A.device == W.device:  # in place, one batched GEMM
                if W.dim() == 2:
                    W.addmm_(B, A, alpha=sign * s)
                    return
                B3, A3 = self._factors3(A, B)
                view = W.transpose(-2, -1) if self.is_transposed else W
                view.baddbmm_(B3, A3, alpha=sign * s)
                return
            wide = torch.float64 if W.dtype == torch.float64 else torch.float32
            delta = self.stored_delta_weight(wide).to(W.device)
            if W.dtype in (torch.float32, torch.float64):
                W.add_(delta, alpha=sign)
            else:  # low-precision base: the sum in fp32, rounded once
                W.copy_((W.to(wide) + sign * delta).to(W.dtype))

    def to_base(self) -> nn.Parameter:
        """The parameter (merged or not): ``remove_lora`` sets it back on the owner under its name, which drops this
        layer from the owner's children."""
        return self.weight

    def extra_repr(self) -> str:
        shape = tuple(self.weight.shape)
        layout = ", is_transposed=True" if self.is_transposed else ""
        return f"{self.param_name}: {shape}, experts={self.num_experts}{layout}, " + self.lora_extra_repr()


class _Call:
    """``guard.<method>(...)`` as an object of its own (a hook torch writes an attribute on), picklable."""

    def __init__(self, guard: ParameterGuard, method: str) -> None:
        self.guard, self.method = guard, method

    def __call__(self, *args: Any) -> Any:
        return getattr(self.guard, self.method)(*args)


class ParameterGuard:
    """Keeps an owner of adapted parameters computing with them and saving them as before: around each forward
    it shows ``W + ΔW`` (:meth:`LoRAExperts.effective_weight`) under each parameter's name (an instance attribute,
    which ``nn.Module`` attribute lookup finds first), and it keeps the ``state_dict`` key of each parameter its
    own name (``owner.<name>``, not ``owner.<name>.weight``) when saving and loading. Picklable; ``remove()`` undoes
    it and puts the owner's parameters back in their order."""

    def __init__(self, owner: nn.Module, leaves: Sequence[str], order: Sequence[str]) -> None:
        self.owner, self.leaves, self.order = owner, tuple(leaves), tuple(order)
        self.handles = [
            owner.register_forward_pre_hook(self.show_adapted),
            owner.register_forward_hook(self.hide_adapted, always_call=True),
            owner.register_state_dict_post_hook(_Call(self, "rename_saved")),  # it tags the hook: no bound method
            owner.register_load_state_dict_pre_hook(self.rename_loaded),
        ]

    def _layers(self, owner: nn.Module) -> dict[str, LoRAExperts]:
        return {leaf: m for leaf in self.leaves if isinstance(m := owner._modules.get(leaf), LoRAExperts)}

    def show_adapted(self, owner: nn.Module, args: Any) -> None:
        weights = {leaf: layer.effective_weight() for leaf, layer in self._layers(owner).items()}
        owner.__dict__.update(weights)

    def hide_adapted(self, owner: nn.Module, args: Any, output: Any) -> None:
        for leaf in self.leaves:
            owner.__dict__.pop(leaf, None)

    def rename_saved(self, owner: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        """The owner's keys (the last ones saved) as the base had them: each parameter under its own name, in the
        owner's order, then the adapters' tensors."""
        owned = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
        for leaf in self._layers(owner):
            if f"{prefix}{leaf}.weight" in owned:
                owned[prefix + leaf] = owned.pop(f"{prefix}{leaf}.weight")
        for leaf in self.order:
            if prefix + leaf in owned:
                state_dict[prefix + leaf] = owned.pop(prefix + leaf)
        state_dict.update(owned)

    def rename_loaded(self, owner: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for leaf in self._layers(owner):
            key = f"{prefix}{leaf}.weight"
            if prefix + leaf in state_dict and key not in state_dict:
                state_dict[key] = state_dict.pop(prefix + leaf)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.hide_adapted(self.owner, (), None)
        params = self.owner._parameters
        held = dict(params)
        params.clear()
        params.update({k: held.pop(k) for k in self.order if k in held})
        params.update(held)


class ExpertsKind(LayerKind):
    """A parameter named by ``target_parameters`` (a :class:`ParamTarget`): 2-D, or 3-D MoE experts
    (``d_out = E·d_out_e``, one fused part per expert). Not quantizable, tieable or routable; PEFT's
    ``ParamWrapper`` layout on export and import."""

    name, layer_class = "experts", LoRAExperts
    description = "a 2-D/3-D parameter named by target_parameters (MoE experts)"
    whole_module = False
    parameter = True

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, ParamTarget) and _adaptable(module.param)

    def _layout(self, module: nn.Module) -> tuple[int, int, int, bool]:
        if isinstance(module, LoRAExperts):
            return module.num_experts, module.expert_out, module.in_features, module.is_transposed
        return expert_layout(module.owner, module.param)  # type: ignore[arg-type]

    def dims(self, module: nn.Module) -> tuple[int, int]:
        experts, d_out, d_in, _ = self._layout(module)
        return experts * d_out, d_in

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight if isinstance(module, LoRAExperts) else module.param  # type: ignore[return-value]

    def row_blocks(self, module: nn.Module) -> FusedSlices | None:
        if self.weight(module).dim() != 3:
            return None
        experts, d_out, _, _ = self._layout(module)
        parts = tuple(f"expert{e}" for e in range(experts))
        return FusedSlices(parts, (d_out,) * experts, parts)

    def build(self, base: nn.Module, spec: Any, layer_class: type | None = None, **options: Any) -> LoRALayer:
        return LoRAExperts(base, fused=spec.fused, **options)  # type: ignore[arg-type]

    def guards(self, model: nn.Module, names: Sequence[str]) -> list[Any]:
        owners: dict[int, tuple[nn.Module, list[str], tuple[str, ...]]] = {}
        for name in names:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            layer = owner._modules.get(leaf)
            if isinstance(layer, LoRAExperts):
                owners.setdefault(id(owner), (owner, [], layer.param_order))[1].append(leaf)
        return [ParameterGuard(owner, leaves, order) for owner, leaves, order in owners.values()]

    def peft_tensors(self, layer: LoRALayer) -> dict[str, Tensor]:
        """PEFT's ``ParamWrapper`` layout: ``lora_A`` as ours, ``lora_B`` ``d_out x r·E`` with ``B_e``'s column ``j`` at
        ``j·E + e``."""
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        experts = layer.num_experts  # type: ignore[attr-defined]
        if experts > 1:
            r = B.shape[1]
            B = B.reshape(experts, -1, r).permute(1, 2, 0).reshape(-1, r * experts)
        return {"lora_A.weight": A, "lora_B.weight": B}

    def peft_rank(self, layer: LoRALayer) -> int:
        return int(layer.r)  # PEFT's r is per expert (its lora_A has r·E rows)

    def from_peft(self, layer: LoRALayer, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """PEFT's ``lora_A``, ``lora_B`` of this parameter in this layer's layout (inverse of :meth:`peft_tensors`)."""
        experts = layer.num_experts  # type: ignore[attr-defined]
        if experts > 1 and B.dim() == 2 and B.shape[1] % experts == 0:
            r = B.shape[1] // experts
            B = B.reshape(B.shape[0], r, experts).permute(2, 0, 1).reshape(-1, r)
        return A, B


def peft_module_names(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """``{parameter target: PEFT module name}`` for the parameter targets among ``names`` (adapted or not): PEFT wraps
    the targeted parameters of one module in nested ``ParamWrapper``s in the order the module registered them, so
    the first is ``<owner>.base_layer...base_layer`` (one ``base_layer`` per later one) and the last ``<owner>``."""
    by_owner: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        module = target_module(model, name)
        if isinstance(module, LoRAExperts):
            order, leaf = module.param_order, module.param_name
        elif isinstance(module, ParamTarget):
            order, leaf = tuple(module.owner._parameters), module.param_name
        else:
            continue
        by_owner.setdefault(name.rpartition(".")[0], []).append((order.index(leaf), name))
    out = {}
    for owner, members in by_owner.items():
        ordered = [name for _, name in sorted(members)]
        for i, name in enumerate(ordered):
            out[name] = ".".join(([owner] if owner else []) + ["base_layer"] * (len(ordered) - 1 - i))
    return out


register_layer_kind(ExpertsKind())
