"""``nn.MultiheadAttention``: LoRA on the q/k/v blocks of ``in_proj_weight = [Wq; Wk; Wv]`` and on ``out_proj``,
whose weights ``F.multi_head_attention_forward`` reads directly, so the attention module itself is replaced by
a host that adds the deltas (and that keeps ``nn.TransformerEncoderLayer``'s fast path off while unmerged)."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LoRAConfigError
from ..plan import FusedSlices
from .base import LayerKind, LoRALayer, is_lora_layer, plain_attrs, rebuild, register_layer_kind

MHA_PARTS = ("q", "k", "v")


class LoRAMultiheadAttention(LoRALayer, nn.Module):
    """``nn.MultiheadAttention`` with LoRA on the q/k/v blocks of ``in_proj_weight = [Wq; Wk; Wv]``
    (``3E x E``) and, when ``out_proj`` is a :class:`LoRALinear`, on ``Wo``.

    ``forward`` calls ``F.multi_head_attention_forward`` with ``in_proj_weight + ΔW_in`` and
    ``out_proj.weight + ΔW_o`` (the ``d_out x d_in`` deltas are materialised; adapter dropout is
    not applied here). The original parameters keep their names (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj.weight`` ...), so state-dict keys stay compatible;
    ``to_base()`` returns a plain ``nn.MultiheadAttention`` (whose fast path then works again).
    With no q/k/v adapters the module has no ``lora_A``/``lora_B`` and only hosts ``out_proj`` (or
    guards the fast path of the ``nn.TransformerEncoderLayer`` around adapted MLP layers).
    """

    lora_kind = "mha"
    base_weight_name = "in_proj_weight"
    # used by nn.TransformerEncoderLayer's fast path (taken once every adapter is merged)
    merge_masks = nn.MultiheadAttention.merge_masks

    def __init__(
        self, base: nn.MultiheadAttention, parts: Sequence[str] = (), r: int = 8, alpha: float = 16.0, **options: Any
    ) -> None:
        """``parts``: the in-projection blocks to adapt (none: only host ``out_proj``); ``options``: those
        of :meth:`LoRALayer._init_lora` (adapter dropout is not applied here)."""
        nn.Module.__init__(self)
        self._base_cls = type(base)
        self._base_attrs = plain_attrs(base) | {"_qkv_same_embed_dim": base._qkv_same_embed_dim}
        self.__dict__.update(plain_attrs(base))
        self._same_dim = bool(base._qkv_same_embed_dim)
        self._guarded: tuple[weakref.ref, ...] = ()
        for pname, param in base._parameters.items():
            self.register_parameter(pname, param)
        self.out_proj = base.out_proj
        self.merged = False
        self.in_features = self.out_features = self.embed_dim
        name = options.get("name", "")
        bad = sorted(set(parts) - set(MHA_PARTS))
        if bad:
            raise LoRAConfigError(f"nn.MultiheadAttention in-projection parts are {MHA_PARTS}; got {bad}")
        if parts and not self._same_dim:
            raise LoRAConfigError(
                f"{name or 'this nn.MultiheadAttention'} has kdim/vdim != embed_dim (separate q/k/v_proj_weight); "
                "LoRA on its q/k/v is not supported, target only 'o' (out_proj) there"
            )
        if parts:
            if options.get("dropout", 0.0) > 0:
                warnings.warn(
                    f"LoRA dropout={options['dropout']} is not applied to the nn.MultiheadAttention adapters of "
                    f"{name!r} (their ΔW is folded into the projection weights at each forward)",
                    stacklevel=3,
                )
            e = self.embed_dim
            fused = FusedSlices(MHA_PARTS, (e, e, e), tuple(p for p in MHA_PARTS if p in parts))
            self._init_lora(e, 3 * e, self.in_proj_weight, r, alpha, fused=fused, **options)

    def guard_fast_path(self, layers: Sequence[LoRALayer]) -> None:
        """Report ``_qkv_same_embed_dim = False`` while any of ``layers`` (the adapted layers of the
        surrounding ``nn.TransformerEncoderLayer``) is unmerged: its fast path reads the base weights."""
        self._guarded = tuple(weakref.ref(layer) for layer in layers)

    @property
    def _qkv_same_embed_dim(self) -> bool:  # type: ignore[override]
        """Read by ``nn.TransformerEncoder(Layer)`` to pick its fused fast path, which reads the weights
        directly and would skip unmerged adapters: report False until every adapter is merged."""
        return self._same_dim and not self.has_unmerged_adapters()

    def has_unmerged_adapters(self) -> bool:
        layers = [self, self.out_proj] + [ref() for ref in self._guarded]
        return any(layer is not None and is_lora_layer(layer) and not layer.merged for layer in layers)

    def _base_weight_view(self) -> Tensor:
        return self.in_proj_weight

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Same contract as ``nn.MultiheadAttention.forward`` (its slow path, adapters added)."""
        if query.is_nested:
            raise RuntimeError(
                "nested-tensor input reached a LoRA nn.MultiheadAttention; build nn.TransformerEncoder with "
                "enable_nested_tensor=False, or merge_and_unload() the adapters for fast-path inference"
            )
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if self.batch_first and is_batched:  # keep the "is" relations the functional relies on
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        in_w = self.in_proj_weight
        if is_lora_layer(self) and not self.adapter_off():
            in_w = in_w + self.live_delta_weight(self.lora_A.dtype).to(in_w.dtype)
        out_w = self.out_proj.weight
        if is_lora_layer(self.out_proj) and not self.out_proj.adapter_off():
            out_w = out_w + self.out_proj.live_delta_weight(self.out_proj.lora_A.dtype).to(out_w.dtype)
        separate = {}
        if not self._same_dim:
            separate = dict(
                use_separate_proj_weight=True,
                q_proj_weight=self.q_proj_weight,
                k_proj_weight=self.k_proj_weight,
                v_proj_weight=self.v_proj_weight,
            )
        attn_output, attn_weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            in_w,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            out_w,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            **separate,
        )
        if self.batch_first and is_batched:
            return attn_output.transpose(1, 0), attn_weights
        return attn_output, attn_weights

    def to_base(self) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` with this module's (possibly merged) parameters."""
        params = {k: v for k, v in self._parameters.items() if k not in self.state_names}
        return rebuild(self._base_cls, self._base_attrs, params, {"out_proj": self.out_proj})  # type: ignore[return-value]

    def extra_repr(self) -> str:
        own = self.lora_extra_repr() if is_lora_layer(self) else "no q/k/v adapters"
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, " + own


def _inside(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".") if prefix else True


def _encoder_layers_with(model: nn.Module, names: Iterable[str]) -> list[str]:
    names = list(names)
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.TransformerEncoderLayer) and any(_inside(s, n) for s in names)
    ]


class NestedTensorGuard:
    """Keeps an ``nn.TransformerEncoder`` from turning padded input into nested tensors while it holds
    adapters (its nested fast path reads the base weights), and reproduces what that path gives at padded
    positions (zeros), so the adapted model computes what the base computes. Picklable; ``remove()`` undoes it."""

    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        self.encoder = encoder
        self.pad: Tensor | None = None
        encoder.use_nested_tensor = False
        self.handles = [
            encoder.register_forward_pre_hook(self.note_padding, with_kwargs=True),
            encoder.layers[-1].register_forward_hook(self.zero_padding),
            encoder.register_forward_hook(self.forget_padding),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.encoder.use_nested_tensor = True

    def note_padding(self, enc: nn.Module, args: tuple, kwargs: dict) -> None:
        src = args[0] if args else kwargs.get("src")
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        padding = args[2] if len(args) > 2 else kwargs.get("src_key_padding_mask")
        if padding is not None and isinstance(src, Tensor):
            padding = F._canonical_mask(
                mask=padding,
                mask_name="src_key_padding_mask",
                other_type=F._none_or_dtype(mask),
                other_name="mask",
                target_type=src.dtype,
            )
        self.pad = padding.logical_not().logical_not() if _would_use_nested_tensor(enc, src, mask, padding) else None

    def zero_padding(self, layer: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        return None if self.pad is None else output.masked_fill(self.pad[..., None], 0.0)

    def forget_padding(self, enc: nn.Module, args: tuple, output: Any) -> None:
        self.pad = None

    def __getstate__(self) -> dict[str, Any]:
        return {"encoder": self.encoder, "handles": self.handles, "pad": None}


def _would_use_nested_tensor(enc: nn.Module, src: Any, mask: Any, padding: Any) -> bool:
    """The conditions under which ``nn.TransformerEncoder.forward`` (torch 2.x) converts to nested tensors."""
    first = enc.layers[0]
    if (
        not torch.backends.mha.get_fastpath_enabled()
        or first.training
        or not isinstance(src, Tensor)
        or src.dim() != 3
        or padding is None
        or src.is_nested
        or mask is not None
        or torch.is_autocast_enabled()
    ):
        return False
    if getattr(enc, "mask_check", True) and (
        torch.compiler.is_compiling() or not torch._nested_tensor_from_mask_left_aligned(src, padding.logical_not())
    ):
        return False
    attn = first.self_attn
    tensor_args = (
        src,
        attn.in_proj_weight,
        attn.in_proj_bias,
        attn.out_proj.weight,
        attn.out_proj.bias,
        first.norm1.weight,
        first.norm1.bias,
        first.norm2.weight,
        first.norm2.bias,
        first.linear1.weight,
        first.linear1.bias,
        first.linear2.weight,
        first.linear2.bias,
    )
    if torch.overrides.has_torch_function(tensor_args) or src.device.type not in ("cpu", "cuda", "xpu"):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensor_args if t is not None))


class MultiheadAttentionKind(LayerKind):
    """``nn.MultiheadAttention``: its q/k/v blocks are targets (``in_proj_weight``, ``3E x E``), the module itself
    is not; ``out_proj`` is a Linear target of its own, read directly by the attention, so an attention around
    any adapted layer is replaced by a :class:`LoRAMultiheadAttention` host. No PEFT layout (PEFT adapts it
    differently)."""

    name, description, layer_class = "mha", "nn.MultiheadAttention (q/k/v)", LoRAMultiheadAttention
    whole_module = False
    fused_parts = MHA_PARTS

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return 3 * int(module.embed_dim), int(module.embed_dim)

    def weight(self, module: nn.Module) -> Tensor:
        weight = module.in_proj_weight
        return weight if weight is not None else module.q_proj_weight

    def check_parts(self, module: nn.Module, name: str, parts: list[str]) -> None:
        if not getattr(module, "_same_dim", module._qkv_same_embed_dim):
            raise LoRAConfigError(
                f"{name} is an nn.MultiheadAttention with kdim/vdim != embed_dim (separate q/k/v_proj_weight); LoRA on "
                f"its {sorted(parts)} is not supported: target only 'o' (its out_proj) there"
            )

    def build(self, base: nn.Module, spec: Any, layer_class: type | None = None, **options: Any) -> LoRALayer:
        return LoRAMultiheadAttention(base, parts=spec.parts if spec is not None else (), **options)

    def hosts(self, model: nn.Module, names: Sequence[str]) -> list[str]:
        """Attention modules to replace by hosts: those holding an adapted ``out_proj``, and the attention of
        every ``nn.TransformerEncoderLayer`` holding adapters (its fast path reads the base weights)."""
        out = []
        for name in names:
            parent = name.rpartition(".")[0]
            if isinstance(model.get_submodule(parent) if parent else model, nn.MultiheadAttention):
                out.append(parent)
        out += [f"{enc_layer}.self_attn" for enc_layer in _encoder_layers_with(model, names)]
        return list(dict.fromkeys(out))

    def guards(self, model: nn.Module, names: Sequence[str]) -> list[Any]:
        """Keep ``nn.TransformerEncoder(Layer)`` fast paths off while adapters inside them are unmerged."""
        for enc_layer in _encoder_layers_with(model, names):
            layer = model.get_submodule(enc_layer)
            layer.self_attn.guard_fast_path([m for m in layer.modules() if is_lora_layer(m)])
        out = []
        for enc_name, enc in model.named_modules():
            if (
                isinstance(enc, nn.TransformerEncoder)
                and any(_inside(s, enc_name) for s in names)
                and getattr(enc, "use_nested_tensor", False)
            ):
                out.append(NestedTensorGuard(enc))
        return out

    def peft_tensors(self, layer: LoRALayer) -> dict[str, Tensor]:
        raise LoRAConfigError(
            "adapters inside nn.MultiheadAttention have no PEFT equivalent layout; merge them (merge_and_unload) or "
            "save with save_adapter() instead"
        )


register_layer_kind(MultiheadAttentionKind())
