"""Quantized frozen base weights for QLoRA-style training (Dettmers et al. 2023, arXiv 2305.14314).

A storage format for a ``d_out x d_in`` base weight, dequantized on the fly in forward (the adapters
stay in full precision and are the only trainable tensors); ``LoRAConfig(quantize_base=...)``:

* ``nf4`` — 4-bit NormalFloat in blocks of 64 values, each block scaled by its absmax; the absmax
  scalers themselves quantized to int8 ("double quantization"). torchao's ``NF4Tensor``; CPU and GPU.
* ``int8`` — pure PyTorch: symmetric per-output-row int8, ``W ≈ q · s[:, None]``, ``s = max|W_row|/127``.
* ``bnb-nf4`` / ``bnb-fp4`` — bitsandbytes' 4-bit formats (``quantize_4bit`` in blocks of 64 with
  double-quantized absmax), the storage PEFT and LitGPT use for QLoRA; run on the CPU too.
* ``bnb-int8`` — bitsandbytes' row-wise int8 (``int8_vectorwise_quant``, LLM.int8's weight format).

Each format is a :class:`Quantizer` registered with :func:`register_quantizer` (in
:mod:`lora_lightning.registry`); a new format is one subclass and one call, and is then accepted by
``LoRAConfig(quantize_base=...)``, listed by the Hydra app and checked by the conformance battery.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import registry
from .errors import LoRAConfigError

NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256
BNB_BLOCK = 64


class Quantizer:
    """A storage format: ``quantize(W) -> (stored, state)``, ``dequantize(stored, state) -> W'``; ``state``
    is a per-row scale tensor, a dict of tensors (kept as buffers beside the weight), a bitsandbytes
    ``QuantState`` or ``None``."""

    name = ""
    requires = ""  # the package it needs, for error messages

    block = 0  # a blockwise format stores weights in blocks of this many values (0: any size)

    def load(self) -> None:
        """Import the package the format needs (raising an install hint if it is missing)."""

    def check(self, numel: int, name: str) -> None:
        """Raise :class:`LoRAConfigError` if a weight of ``numel`` values cannot be stored (before any change)."""
        self.load()
        if self.block and numel % self.block:
            raise LoRAConfigError(
                f"quantize_base={self.name!r} stores blocks of {self.block} values; {name} has {numel}, not a "
                "multiple: use quantize_base='int8' or other targets"
            )

    def quantize(self, w: Tensor) -> tuple[Tensor, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def dequantize(self, stored: Tensor, state: Any, dtype: torch.dtype) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def nbytes(self, stored: Tensor, state: Any) -> int:
        """Bytes held for one weight: the stored values and their scales (a format's shared lookup table,
        bitsandbytes' 16-entry ``code``, is not counted per weight)."""
        tensors = [stored]
        for part in (state, getattr(state, "state2", None)):
            if isinstance(part, Tensor):
                tensors.append(part)
            elif part is not None:
                tensors += [t for k, t in vars(part).items() if isinstance(t, Tensor) and k != "code"]
        return sum(t.numel() * t.element_size() for t in tensors)

    def error_bound(self, w: Tensor) -> Tensor:  # pragma: no cover - abstract
        """A per-element bound of ``|dequantize(quantize(W)) - W|``."""
        raise NotImplementedError


def _nf4_bound(w: Tensor, block: int) -> Tensor:
    """Half the largest gap between neighbouring NF4 levels (0.3038 at the ends of [-1, 1]) times the block
    absmax, with room for the int8 double-quantization of the absmax (|Δabsmax| <= range/254)."""
    blocks = w.reshape(-1, block).abs().amax(dim=1, keepdim=True)
    bound = blocks * (0.3038 / 2) + (blocks.max() - blocks.min()) / 254.0 + 1e-6
    return bound.expand(-1, block).reshape(w.shape)


class TorchaoNF4(Quantizer):
    """torchao's NF4 (``to_nf4``), stored as plain tensors — the packed 4-bit codes (``uint8``, two per byte) and,
    as ``state``, the double-quantized block scalers, their factors and mean, the 16-level code and the shape —
    not as torchao's ``NF4Tensor`` subclass, so ``copy.deepcopy``, ``state_dict()`` clones, ``.to()`` and pickling
    work on every weight shape (``NF4Tensor.clone`` re-quantizes with its default scaler block of 256 and fails
    on weights with fewer blocks). :meth:`dequantize` is ``NF4Tensor.get_original_weight`` written out."""

    name, requires, block = "nf4", "torchao", NF4_BLOCK

    def load(self) -> None:
        torchao_nf4()

    def quantize(self, w: Tensor) -> tuple[Tensor, Any]:
        t = torchao_nf4()(w, NF4_BLOCK, _scaler_block(w.numel() // NF4_BLOCK))
        state = {
            "scalers": t.quantized_scalers,
            "factor": t.quantization_factor,
            "mean": t.scaler_mean.reshape(1),
            "code": t.nf4,
            "shape": torch.tensor(list(w.shape), dtype=torch.long),
        }
        return t.quantized_data, state

    def dequantize(self, stored: Tensor, state: Any, dtype: torch.dtype) -> Tensor:
        scalers_q, factor = state["scalers"], state["factor"]
        per_block = scalers_q.numel() // factor.numel()
        scalers = (scalers_q.view(-1, per_block) / factor.unsqueeze(-1)).flatten().to(state["mean"].dtype) + state[
            "mean"
        ]
        repeated = scalers.unsqueeze(-1).expand(scalers.numel(), NF4_BLOCK // 2).flatten()
        code = state["code"]
        first, second = code[(stored >> 4).long()] * repeated, code[(stored & 0b1111).long()] * repeated
        shape = tuple(int(n) for n in state["shape"].tolist())
        return torch.stack([first, second], dim=-1).reshape(shape).to(dtype)

    def nbytes(self, stored: Tensor, state: Any) -> int:  # 4-bit codes + int8 scalers + fp32 factors and mean
        parts = [stored, state["scalers"], state["factor"], state["mean"]]
        return sum(t.numel() * t.element_size() for t in parts)

    def error_bound(self, w: Tensor) -> Tensor:
        return _nf4_bound(w, NF4_BLOCK)


class RowInt8(Quantizer):
    name = "int8"

    def quantize(self, w: Tensor) -> tuple[Tensor, Any]:
        scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale

    def dequantize(self, stored: Tensor, state: Any, dtype: torch.dtype) -> Tensor:
        return (stored.float() * state[:, None]).to(dtype)

    def error_bound(self, w: Tensor) -> Tensor:  # half a step per row
        return (w.abs().amax(dim=1, keepdim=True) / 127.0 / 2.0 + 1e-7).expand_as(w)


class Bnb4bit(Quantizer):
    requires, block = "bitsandbytes", BNB_BLOCK

    def __init__(self, quant_type: str) -> None:
        self.quant_type, self.name = quant_type, f"bnb-{quant_type}"

    def load(self) -> None:
        bitsandbytes_functional()

    def quantize(self, w: Tensor) -> tuple[Tensor, Any]:
        return bitsandbytes_functional().quantize_4bit(
            w, blocksize=BNB_BLOCK, quant_type=self.quant_type, compress_statistics=True
        )

    def dequantize(self, stored: Tensor, state: Any, dtype: torch.dtype) -> Tensor:
        return bitsandbytes_functional().dequantize_4bit(stored, state).to(dtype)

    def error_bound(self, w: Tensor) -> Tensor:
        """One gap between neighbouring levels times the block absmax (bitsandbytes does not always round to
        the nearest level: measured errors reach 0.156 of the absmax for NF4, over half its widest gap
        0.3038; FP4's widest gap is 0.3333, between 2/3 and 1), plus the double-quantized absmax's error."""
        gap = 0.3038 if self.quant_type == "nf4" else 0.3333
        blocks = w.reshape(-1, BNB_BLOCK).abs().amax(dim=1, keepdim=True)
        bound = blocks * gap * (1 + 1e-3) + 1e-6
        return bound.expand(-1, BNB_BLOCK).reshape(w.shape)


class BnbInt8(Quantizer):
    name, requires = "bnb-int8", "bitsandbytes"

    def load(self) -> None:
        bitsandbytes_functional()

    def quantize(self, w: Tensor) -> tuple[Tensor, Any]:
        stored, row_stats, _ = bitsandbytes_functional().int8_vectorwise_quant(w)
        return stored, row_stats

    def dequantize(self, stored: Tensor, state: Any, dtype: torch.dtype) -> Tensor:
        return bitsandbytes_functional().int8_vectorwise_dequant(stored, state).to(dtype)

    def error_bound(self, w: Tensor) -> Tensor:
        return (w.abs().amax(dim=1, keepdim=True) / 127.0 / 2.0 + 1e-6).expand_as(w)


def register_quantizer(fmt: Quantizer) -> Quantizer:
    """Register a storage format under ``fmt.name`` (``LoRAConfig(quantize_base=fmt.name)``)."""
    if not isinstance(fmt, Quantizer) or not fmt.name:
        raise TypeError(f"register_quantizer takes a Quantizer instance with a name, got {fmt!r}")
    if fmt.name in registry.QUANTIZERS and type(registry.QUANTIZERS[fmt.name]) is not type(fmt):
        raise LoRAConfigError(f"quantize_base name {fmt.name!r} is already registered; choose another name")
    registry.QUANTIZERS[fmt.name] = fmt
    registry.notify()
    return fmt


for _fmt in (TorchaoNF4(), RowInt8(), Bnb4bit("nf4"), Bnb4bit("fp4"), BnbInt8()):
    register_quantizer(_fmt)
QUANTIZERS = registry.QUANTIZERS  # name -> format (the registry's own dict)


def _optional(import_fn: Callable[[], Any], method: str, package: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return import_fn()
    except Exception as exc:  # ImportError, or a build for another torch
        raise LoRAConfigError(
            f"quantize_base={method!r} needs {package} ({type(exc).__name__}: {exc}); `pip install {package}` or use "
            "quantize_base='int8' (pure PyTorch)"
        ) from None


@functools.lru_cache(maxsize=1)
def torchao_nf4() -> Any:
    """``torchao``'s ``to_nf4`` (imported lazily: torchao takes seconds to import)."""

    def load() -> Any:
        from torchao.quantization import to_nf4

        return to_nf4

    return _optional(load, "nf4", "torchao")


@functools.lru_cache(maxsize=1)
def bitsandbytes_functional() -> Any:
    """``bitsandbytes.functional`` (imported lazily)."""

    def load() -> Any:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional

    return _optional(load, "bnb-nf4", "bitsandbytes")


def available(method: str) -> bool:
    """Whether ``method``'s package imports here."""
    try:
        QUANTIZERS[method].check(BNB_BLOCK * NF4_BLOCK, "probe")
        return True
    except LoRAConfigError:
        return False


def _scaler_block(n_blocks: int) -> int:
    """The largest divisor of ``n_blocks`` that is <= 256 (torchao needs an exact division)."""
    for size in range(min(NF4_SCALER_BLOCK, n_blocks), 0, -1):
        if n_blocks % size == 0:
            return size
    return 1  # pragma: no cover


def quantizer(method: str) -> Quantizer:
    """The registered format ``method``."""
    return registry.quantizer(method)


def quantize(weight: Tensor, method: str) -> tuple[Tensor, Any]:
    """``weight (d_out x d_in, float)`` -> ``(stored tensor, state)`` in ``method``'s format."""
    return quantizer(method).quantize(weight.detach().float().contiguous())


def dequantize(stored: Tensor, state: Any, method: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize`: a dense ``d_out x d_in`` tensor in ``dtype``."""
    return quantizer(method).dequantize(stored, state, dtype)


def quantization_error_bound(weight: Tensor, method: str) -> Tensor:
    """Per-element bound of ``|dequantize(quantize(W)) - W|`` (``d_out x d_in``)."""
    return quantizer(method).error_bound(weight.detach().float())
