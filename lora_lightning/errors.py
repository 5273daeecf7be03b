"""Every exception lora_lightning raises for input a user can get wrong. Each message names the
problem and the fix in one line. All derive from :class:`LoRAError`, so ``except LoRAError``
catches every one of them (the Hydra app turns them into one ``error: ...`` line)."""

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
    """An adapter file or checkpoint is missing, truncated, corrupt or not what it was taken for."""


class BaseModelMismatchError(AdapterMismatchError):
    """The adapter was trained on a different base model (fingerprint mismatch)."""


class NonFiniteError(LoRAError, FloatingPointError):
    """The training loss or an adapter parameter became NaN/inf (``LoRACallback(check_finite=True)``)."""


class NoAdapterGradientError(LoRAError, RuntimeError):
    """A training step ended with adapters that received no gradient (e.g. reentrant checkpointing)."""


class AnalysisInputError(LoRAError, ValueError):
    """A §7 analysis function got a tensor or index it cannot use."""


class DataError(LoRAError, ValueError):
    """The app's data source or column setting is wrong; the message names the problem and the fix."""


class ModelLoadError(LoRAError, OSError):
    """The app could not load a model or tokenizer offline; the message says what was tried and the fix."""


class AppConfigError(LoRAError, ValueError):
    """A setting of the Hydra app is inconsistent (e.g. an unknown ``lora.method``)."""
