"""Exceptions raised for inputs a user can get wrong. Each message names the problem and the fix."""

from __future__ import annotations


class LoRAError(Exception):
    """Base class of every error raised by lora_lightning."""


class LoRAConfigError(LoRAError, ValueError):
    """A LoRA option has an invalid value (rank <= 0, alpha <= 0, dropout outside [0, 1), ...)."""


class TargetNotFoundError(LoRAError, ValueError):
    """A target pattern matched no adaptable module; the message lists the candidates."""


class RankTooLargeError(LoRAConfigError):
    """``r`` exceeds ``min(d_in, d_out)`` of a targeted matrix."""


class AlreadyInjectedError(LoRAError, RuntimeError):
    """LoRA adapters are already present; injecting again would stack them."""


class NotInjectedError(LoRAError, RuntimeError):
    """An operation needs a model with LoRA adapters, and this one has none."""


class MergeStateError(LoRAError, RuntimeError):
    """Merge of an already merged adapter, or unmerge of an unmerged one."""


class AdapterMismatchError(LoRAError, ValueError):
    """An adapter (file or checkpoint) does not fit the model: other targets, ranks or shapes."""


class AdapterFileError(LoRAError, OSError):
    """An adapter file is missing, truncated, corrupt or not written by lora_lightning."""


class BaseModelMismatchError(AdapterMismatchError):
    """The adapter was trained on a different base model (fingerprint mismatch)."""


class NonFiniteError(LoRAError, FloatingPointError):
    """The training loss or an adapter parameter became NaN/inf (``LoRACallback(check_finite=True)``)."""
