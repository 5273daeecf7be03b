"""Quantized frozen base weights for QLoRA-style training (Dettmers et al. 2023, arXiv 2305.14314).

A storage format for a ``d_out x d_in`` base weight, dequantized on the fly in forward (the adapters
stay in full precision and are the only trainable tensors); ``LoRAConfig(quantize_base=...)``:

* ``nf4`` — 4-bit NormalFloat in blocks of 64 values, each block scaled by its absmax; the absmax
  scalers themselves quantized to int8 ("double quantization"). torchao's ``NF4Tensor``; CPU and GPU.
* ``int8`` — pure PyTorch: symmetric per-output-row int8, ``W ≈ q · s[:, None]``, ``s = max|W_row|/127``.
* ``bnb-nf4`` / ``bnb-fp4`` — bitsandbytes' 4-bit formats (``quantize_4bit`` in blocks of 64 with
  double-quantized absmax), the storage PEFT and LitGPT use for QLoRA; run on the CPU too.
* ``bnb-int8`` — bitsandbytes' row-wise int8 (``int8_vectorwise_quant``, LLM.int8's weight format).

Each format registers a :class:`Quantizer` in :data:`QUANTIZERS`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from .errors import LoRAConfigError

NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256
BNB_BLOCK = 64


class Quantizer:
    """A storage format: ``quantize(W) -> (stored, state)``, ``dequantize(stored, state) -> W'``; ``state``
    is a per-row scale tensor, a bitsandbytes ``QuantState`` or ``None``."""

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
                f"quantize_base={self.name!r} stores blocks of {self.block} values; {name} has {numel}, not a multiple: "
                "use quantize_base='int8' or other targets"
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
    name, requires, block = "nf4", "torchao", NF4_BLOCK

    def load(self) -> None:
        torchao_nf4()

    def quantize(self, w: Tensor) -> tuple[Tensor, Any]:
        return torchao_nf4()(w, NF4_BLOCK, _scaler_block(w.numel() // NF4_BLOCK)), None

    def dequantize(self, stored: Tensor, state: Any, dtype: torch.dtype) -> Tensor:
        return stored.get_original_weight().to(dtype)

    def nbytes(self, stored: Tensor, state: Any) -> int:  # 4-bit codes + int8 scalers + fp32 factors
        parts = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean")
        return sum(getattr(stored, p).numel() * getattr(stored, p).element_size() for p in parts)

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
        return bitsandbytes_functional().quantize_4bit(w, blocksize=BNB_BLOCK, quant_type=self.quant_type, compress_statistics=True)

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


QUANTIZERS: dict[str, Quantizer] = {q.name: q for q in (TorchaoNF4(), RowInt8(), Bnb4bit("nf4"), Bnb4bit("fp4"), BnbInt8())}


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
    if method not in QUANTIZERS:
        raise LoRAConfigError(f"quantize_base={method!r} is not one of {[None, *QUANTIZERS]}")
    return QUANTIZERS[method]


def quantize(weight: Tensor, method: str) -> tuple[Tensor, Any]:
    """``weight (d_out x d_in, float)`` -> ``(stored tensor, state)`` in ``method``'s format."""
    return quantizer(method).quantize(weight.detach().float().contiguous())


def dequantize(stored: Tensor, state: Any, method: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize`: a dense ``d_out x d_in`` tensor in ``dtype``."""
    return quantizer(method).dequantize(stored, state, dtype)


def quantization_error_bound(weight: Tensor, method: str) -> Tensor:
    """Per-element bound of ``|dequantize(quantize(W)) - W|`` (``d_out x d_in``)."""
    return quantizer(method).error_bound(weight.detach().float())
