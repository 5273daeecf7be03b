"""Keep optional quantization back ends' import-time messages off the console of runs that do not use them.

Nothing in the app imports ``torchao`` or ``bitsandbytes`` unless a quantized base is asked for
(:mod:`lora_lightning.quantization` imports them lazily). Two third-party packages import them
unconditionally whenever they are installed (the ``[quant]`` extra, part of ``[dev]``):

* ``transformers`` (5.x): ``transformers.modeling_utils`` -> ``transformers.quantizers`` ->
  ``quantizer_torchao`` imports ``torchao`` when it is installed, i.e. on the first model load
  (``AutoModel*.from_pretrained`` imports the model's module lazily, and with it ``modeling_utils``).
* ``peft``: ``import peft`` imports ``torchao`` (and, before peft 0.22, ``bitsandbytes``) when installed;
  peft >= 0.22 imports ``bitsandbytes`` when it first builds its LoRA layers (``PeftModel.from_pretrained``).

Their import prints lines that say nothing about the run: ``torchao`` logs ``Failed to load
.../torchao/_C_mxfp8...so`` / ``_C_cutlass_90a...so`` (kernels built for CUDA / another Python) and
``Detected no triton``; registering its enums makes ``torch.utils._pytree`` log ``<enum ...> is an Enum
subclass and is now natively supported by torch.compile``; ``bitsandbytes``' CPU back end (on CPUs
with AVX512-BF16) asks the ``kernels`` package for a Hub kernel at import, which logs ``Skipping
publisher trust check for 'kernels-community/...' because Hugging Face Hub is in offline mode`` and
``Failed to load CPU gemm_4bit_forward from kernels-community: ...``.

:func:`quiet_backend_imports` drops exactly those records (matched by logger and message) while the
block that triggers the import runs; every other message, and the same messages outside the block,
pass unchanged. The app wraps its model loads (:func:`lora_lightning.app.models._quiet_transformers`)
its ``import peft`` and its PEFT model loads in it; benchmarks and scripts can do the same.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import re
from collections.abc import Iterator
from types import ModuleType

# logger name -> the messages dropped while a `quiet_backend_imports()` block runs
QUIET_MESSAGES: dict[str, tuple[re.Pattern[str], ...]] = {
    "torchao": (
        re.compile(r"^Failed to load \S*torchao[\\/]_C\w*[^:]*\.so: "),
        re.compile(r"^Skipping import of cpp extensions due to incompatible torch version"),
    ),
    "torchao.kernel.intmm": (
        re.compile(r"^Warning: Detected no triton, on systems without Triton certain kernels will not work"),
    ),
    "torch.utils._pytree": (
        re.compile(r"^<enum '\w+'> is an Enum subclass and is now natively supported by torch\.compile"),
    ),
    "bitsandbytes.backends.cpu.ops": (re.compile(r"^Failed to load CPU gemm_4bit_forward from kernels-community: "),),
    "kernels._internals.hf_hub": (
        re.compile(
            r"^Skipping publisher trust check for 'kernels-community/[\w.-]+' "
            r"because Hugging Face Hub is in offline mode"
        ),
    ),
}


class _DropMessages(logging.Filter):
    def __init__(self, patterns: tuple[re.Pattern[str], ...]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(p.search(message) for p in self.patterns)


@contextlib.contextmanager
def quiet_backend_imports() -> Iterator[None]:
    """Inside the block, drop the import-time lines listed in :data:`QUIET_MESSAGES` (and only those)."""
    installed = [(logging.getLogger(name), _DropMessages(patterns)) for name, patterns in QUIET_MESSAGES.items()]
    for logger, flt in installed:
        logger.addFilter(flt)
    try:
        yield
    finally:
        for logger, flt in installed:
            logger.removeFilter(flt)


def import_quietly(name: str) -> ModuleType:
    """``importlib.import_module(name)`` inside :func:`quiet_backend_imports` (e.g. ``"peft"``)."""
    with quiet_backend_imports():
        return importlib.import_module(name)


def preimport_quietly(*names: str) -> list[str]:
    """Import those of ``names`` that are installed (default: ``transformers.modeling_utils`` and
    ``peft``) inside :func:`quiet_backend_imports`, so that later imports of them print nothing;
    returns the names imported. For benchmarks and scripts that import peft / transformers' models
    themselves."""
    done = []
    for name in names or ("transformers.modeling_utils", "peft"):
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            import_quietly(name)
            done.append(name)
    return done


# Lines of packages the run does use that tell the user nothing about the run, dropped for the app's whole run:
# Lightning's advertisements for its cloud packages (logged once per fit through its rank-zero logger), and
# Lightning 2.6's own call of an API torch 2.13 deprecated (a DeprecationWarning per process that no user setting
# can avoid). Everything else Lightning logs or warns passes unchanged.
RUN_MESSAGES: dict[str, tuple[re.Pattern[str], ...]] = {
    "lightning.pytorch.utilities.rank_zero": (re.compile(r"^💡 Tip: For seamless cloud (logging|uploads)"),),
}
RUN_WARNINGS: tuple[str, ...] = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


def quiet_run() -> None:
    """For the app's process: drop the lines of :data:`RUN_MESSAGES` and :data:`RUN_WARNINGS` (and only those)."""
    import warnings

    for name, patterns in RUN_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.patterns == patterns for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))
    for message in RUN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def without_wandb_anonymous(logger: object) -> object:
    """Lightning's ``WandbLogger`` passes ``anonymous=None`` to ``wandb.init``, and wandb >= 0.22 warns on every
    run that the setting has no effect; leave the key out when it is unset (``None``), so wandb sees its default."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
        del init["anonymous"]
    return logger


__all__ = [
    "QUIET_MESSAGES",
    "RUN_MESSAGES",
    "RUN_WARNINGS",
    "import_quietly",
    "preimport_quietly",
    "quiet_backend_imports",
    "quiet_run",
    "without_wandb_anonymous",
]
