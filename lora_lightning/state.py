"""The one object that holds everything lora_lightning knows about an adapted model.

:class:`LoRAHandle` is attached once, as ``model._lora``, and every function of the core (and of the
Lightning layer) reads and writes it instead of leaving attributes of its own on the user's modules:

* ``record``: the :class:`~lora_lightning.record.LoRAState` of the active adapter (config, adapted
  modules and their structure, ``modules_to_save``, base identity); ``None`` before injection;
* ``adapters``: the named adapters (:class:`NamedAdapters`: which one is active, each one's config);
* ``originals``: the ``modules_to_save`` values at injection (``disable_adapter`` and new named adapters
  start from them);
* ``tracker``: the shared-input fusion tracker (its learnt groups);
* ``guards``: what keeps the model right while adapters are in it (``nn.TransformerEncoder`` fast paths);
* ``checkpoint``: how checkpoints of this model are written and read (:class:`CheckpointOptions`);
* ``wrapped``: methods of the module that the Lightning layer wraps, with their originals.

The handle travels with the model (``copy.deepcopy``, ``pickle``, ``ddp_spawn``) because it lives in
the module's ``__dict__``. Only :func:`attach` and :meth:`LoRAHandle.wrap_method` write attributes on a
user's module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .config import LoRAConfig
from .errors import NotInjectedError
from .record import LoRAState

HANDLE_ATTR = "_lora"
DEFAULT = "default"


@dataclass
class NamedAdapters:
    """Which adapters a model holds (in the order they were added) and which one is active."""

    active: str = DEFAULT
    configs: dict[str, LoRAConfig] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"active": self.active, "configs": {n: c.to_dict() for n, c in self.configs.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> NamedAdapters:
        return cls(data["active"], {n: LoRAConfig.from_dict(c) for n, c in data["configs"].items()})


@dataclass
class CheckpointOptions:
    """How a model's checkpoints are written and read: adapter tensors only (the default), and what a
    checkpoint trained on other base weights does (``raise`` | ``warn`` | ``ignore``); ``override_hint`` says,
    in the words of the API in use, how a user sets it."""

    adapter_only: bool = True
    on_base_mismatch: str = "raise"
    override_hint: str = "attach LoRACallback(on_base_mismatch='warn') to the Trainer"


@dataclass(eq=False)
class LoRAHandle:
    """Everything lora_lightning holds about one model (see the module docstring)."""

    record: LoRAState | None = None
    adapters: NamedAdapters | None = None
    originals: dict[str, Tensor] = field(default_factory=dict)
    tracker: Any = None
    guards: list[Any] = field(default_factory=list)
    checkpoint: CheckpointOptions | None = None
    wrapped: dict[str, Any] = field(default_factory=dict)

    # --------------------------------------------------------------- adapters
    @property
    def injected(self) -> bool:
        return self.record is not None

    def named(self) -> NamedAdapters:
        """The named adapters (a model injected once holds one, ``"default"``)."""
        if self.record is None:
            raise NotInjectedError("the model has no LoRA adapters")
        if self.adapters is None:
            self.adapters = NamedAdapters(DEFAULT, {DEFAULT: self.record.config})
        return self.adapters

    def clear(self) -> None:
        """Forget the adapters (``remove_lora``); what the Lightning layer set up stays."""
        for guard in self.guards:
            guard.remove()
        self.record, self.adapters, self.originals, self.tracker, self.guards = None, None, {}, None, []

    # ------------------------------------------------------------ wrapped methods
    def wrap_method(self, module: nn.Module, name: str, make: Callable[[Any], Any]) -> None:
        """Replace ``module.<name>`` (for this instance only) by ``make(current)``, once; the original is kept
        here (``unwrap_methods`` restores it)."""
        if name in self.wrapped:
            return
        self.wrapped[name] = module.__dict__.get(name)
        module.__dict__[name] = make(getattr(module, name))

    def unwrap_methods(self, module: nn.Module) -> None:
        for name, original in self.wrapped.items():
            if original is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = original
        self.wrapped.clear()


def lora_handle(model: nn.Module) -> LoRAHandle | None:
    """The handle of ``model`` (``None`` if lora_lightning never touched it)."""
    handle = model.__dict__.get(HANDLE_ATTR)
    return handle if isinstance(handle, LoRAHandle) else None


def attach(model: nn.Module) -> LoRAHandle:
    """The handle of ``model``, created (and attached as ``model._lora``) if it has none."""
    handle = lora_handle(model)
    if handle is None:
        handle = LoRAHandle()
        object.__setattr__(model, HANDLE_ATTR, handle)  # not a submodule or parameter: nn.Module's checks are moot
    return handle


def get_lora_state(model: nn.Module) -> LoRAState:
    """The record of ``model``'s active adapter; :class:`NotInjectedError` if it has none."""
    handle = lora_handle(model)
    if handle is None or handle.record is None:
        inner = [
            n for n, m in model.named_modules() if n and (h := lora_handle(m)) is not None and h.record is not None
        ]
        where = f" (adapters were injected into submodule {inner[0]!r}: pass that module)" if inner else ""
        raise NotInjectedError(
            f"{type(model).__name__} has no LoRA adapters{where}; call inject_lora(model, LoRAConfig(...)) "
            "or attach LoRACallback to the Trainer first"
        )
    return handle.record


def injected_handle(model: nn.Module) -> LoRAHandle:
    """The handle of an injected model (:class:`NotInjectedError` otherwise)."""
    get_lora_state(model)
    return lora_handle(model)  # type: ignore[return-value]


__all__ = [
    "CheckpointOptions",
    "DEFAULT",
    "HANDLE_ATTR",
    "LoRAHandle",
    "NamedAdapters",
    "attach",
    "get_lora_state",
    "injected_handle",
    "lora_handle",
]
