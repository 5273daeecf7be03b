"""Quantized frozen base weights for QLoRA-style training (Dettmers et al. 2023, arXiv 2305.14314).

Two storage formats for a ``d_out x d_in`` base weight, both dequantized on the fly in forward
(the adapters stay in full precision and are the only trainable tensors):

* ``nf4`` — 4-bit NormalFloat in blocks of 64 values, each block scaled by its absmax; the
  absmax scalers are themselves quantized to int8 in blocks ("double quantization"). Backed by
  ``torchao``'s ``NF4Tensor`` (``torchao.quantization.to_nf4``), which works on CPU. About
  0.53 bytes per value (vs 4 for fp32).
* ``int8`` — pure PyTorch: symmetric per-output-row int8, ``W ≈ q · s[:, None]`` with
  ``s = max|W_row| / 127``. 1 byte per value + 4 bytes per row. Used when torchao is missing.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .errors import LoRAConfigError

# the storage formats quantize_base accepts
QUANTIZERS = ("nf4", "int8")
NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256


@functools.lru_cache(maxsize=1)
def torchao_nf4() -> Any:
    """``torchao``'s ``to_nf4`` (imported lazily: torchao takes seconds to import)."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import to_nf4
    except Exception as exc:  # ImportError, or a torchao built for another torch
        raise LoRAConfigError(
            f"quantize_base='nf4' needs torchao ({type(exc).__name__}: {exc}); `pip install torchao` "
            "or use quantize_base='int8' (pure PyTorch)"
        ) from None
    return to_nf4


def nf4_available() -> bool:
    try:
        torchao_nf4()
        return True
    except LoRAConfigError:
        return False


def _scaler_block(n_blocks: int) -> int:
    """The largest divisor of ``n_blocks`` that is <= 256 (torchao needs an exact division)."""
    for size in range(min(NF4_SCALER_BLOCK, n_blocks), 0, -1):
        if n_blocks % size == 0:
            return size
    return 1  # pragma: no cover


def quantize(weight: Tensor, method: str) -> tuple[Tensor, Tensor | None]:
    """``weight (d_out x d_in, float)`` -> ``(stored tensor, per-row scale or None)``.

    ``nf4``: an ``NF4Tensor`` (scale inside it). ``int8``: ``(int8 d_out x d_in, float32 d_out)``.
    """
    if method not in QUANTIZERS:
        raise LoRAConfigError(f"quantize_base={method!r} is not one of {QUANTIZERS}")
    w = weight.detach().float().contiguous()
    if method == "nf4":
        if w.numel() % NF4_BLOCK:
            raise LoRAConfigError(
                f"NF4 quantizes blocks of {NF4_BLOCK} values but this weight has {w.numel()} ({tuple(w.shape)}); "
                "use quantize_base='int8' for it, or exclude it from the targets"
            )
        return torchao_nf4()(w, NF4_BLOCK, _scaler_block(w.numel() // NF4_BLOCK)), None
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(stored: Tensor, scale: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize`: a dense ``d_out x d_in`` tensor in ``dtype``."""
    if scale is not None:
        return (stored.float() * scale[:, None]).to(dtype)
    if hasattr(stored, "get_original_weight"):  # torchao NF4Tensor
        return stored.get_original_weight().to(dtype)
    return stored.to(dtype)


def storage_bytes(stored: Tensor, scale: Tensor | None = None) -> int:
    """Bytes actually held by a (possibly quantized) weight, including its scales."""
    if hasattr(stored, "quantized_data"):  # NF4Tensor: 4-bit codes + int8 scalers + fp32 factors
        parts = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean")
        return sum(getattr(stored, p).numel() * getattr(stored, p).element_size() for p in parts)
    total = stored.numel() * stored.element_size()
    if scale is not None:
        total += scale.numel() * scale.element_size()
    return total


def quantization_error_bound(weight: Tensor, method: str) -> Tensor:
    """Per-element bound of ``|dequantize(quantize(W)) - W|`` (``d_out x d_in``).

    ``int8``: half a step, ``s/2`` per row. ``nf4``: the largest gap between neighbouring NF4
    levels (0.3038 at the ends of ``[-1, 1]``) times the block absmax, halved, with room for
    the int8 double-quantization of the absmax (|Δabsmax| <= range/254 per scaler block).
    """
    w = weight.detach().float()
    if method == "int8":
        return (w.abs().amax(dim=1, keepdim=True) / 127.0 / 2.0 + 1e-7).expand_as(w)
    blocks = w.reshape(-1, NF4_BLOCK).abs().amax(dim=1, keepdim=True)
    spread = blocks.max() - blocks.min()
    bound = blocks * (0.3038 / 2) + spread / 254.0 + 1e-6
    return bound.expand(-1, NF4_BLOCK).reshape(w.shape)
