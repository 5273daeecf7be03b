"""Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are ``DTensor``
shards, one slice per rank.

LoRA and FSDP2 fit together when the adapters exist *before* ``fully_shard`` runs: each adapter
tensor is then sharded like any other parameter, and the frozen base and the trainable adapters
never share a flat buffer (the FSDP1 memory problem). Writing an adapter or a merged model needs
the full tensors: :func:`gathered` puts them in place for the duration of a ``with`` block. It is
a collective (every rank must enter it); write the file on one rank::

    with gathered(model, adapter_param_names(model)):
        if rank == 0:
            save_adapter(model, "adapter.safetensors")
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import LoRAConfigError


def _is_dtensor(t: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(t, DTensor)


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is a ``DTensor`` (FSDP2 / tensor parallel)."""
    return any(_is_dtensor(t) for t in module.parameters()) or any(_is_dtensor(t) for t in module.buffers())


def check_not_sharded(tensors: nn.Module | Iterable[torch.Tensor], what: str) -> None:
    """Raise if a module (or the given tensors) holds sharded tensors: ``what`` needs the full tensors."""
    if isinstance(tensors, nn.Module):
        tensors = [*tensors.parameters(), *tensors.buffers()]
    if any(_is_dtensor(t) for t in tensors):
        raise LoRAConfigError(
            f"{what}: the model is sharded (DTensor parameters from fully_shard); gather the full tensors first, on "
            "every rank: `with lora_lightning.gathered(model): ...` (write the file on one rank inside it)"
        )


@contextmanager
def gathered(module: nn.Module, names: Iterable[str] | None = None) -> Iterator[nn.Module]:
    """Inside the block, ``module``'s sharded parameters and buffers (those named in ``names``, state-dict
    keys; all if ``None``) are replaced by detached full tensors; on exit the shards are put back
    unchanged. A collective: call it on every rank, in the same order. Memory: the gathered tensors
    in full on every rank (pass ``names`` to gather only the adapter)."""
    wanted = None if names is None else set(names)
    swapped: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
    try:
        for prefix, sub in module.named_modules():
            for store, is_param in ((sub._parameters, True), (sub._buffers, False)):
                for leaf, tensor in list(store.items()):
                    key = f"{prefix}.{leaf}" if prefix else leaf
                    if tensor is None or not _is_dtensor(tensor) or (wanted is not None and key not in wanted):
                        continue
                    full = tensor.full_tensor().detach()  # type: ignore[attr-defined]
                    swapped.append((sub, leaf, is_param, tensor))
                    store[leaf] = nn.Parameter(full, requires_grad=tensor.requires_grad) if is_param else full
        yield module
    finally:
        for sub, leaf, is_param, tensor in reversed(swapped):
            (sub._parameters if is_param else sub._buffers)[leaf] = tensor


__all__ = ["check_not_sharded", "gathered", "is_sharded"]
