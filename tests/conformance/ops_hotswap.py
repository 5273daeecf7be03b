"""The battery's operation for issue 37, item 5: hot-swapping adapters of other ranks and alphas into a
``torch.compile``'d model (``prepare_for_hotswap`` + ``hotswap_adapter``).

Each case's rank-2 adapter is padded to rank 3 (outputs within 1e-6), the model is compiled with a backend that
counts compilations, and adapters of rank 3 (alpha 5) and rank 1 (alpha 2) made on a fresh copy of the case are
swapped in: no compilation after the first, outputs equal to the eager fresh copy holding that adapter. A rank-4
adapter is refused in one line naming ``prepare_for_hotswap(model, target_rank=4)``, with the model unchanged.
Saving after a swap writes the adapter at its own rank (bit-equal to the file swapped in), merging after a swap
gives the same outputs. Plain LoRA cases also swap into an inactive named adapter.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from lora_lightning import (
    add_adapter,
    hotswap_adapter,
    inject_lora,
    merge_lora,
    prepare_for_hotswap,
    read_adapter,
    registry,
    save_adapter,
    unmerge_lora,
    use_adapter,
)

from .cases import Case, Net, randomize
from .operations import Refused, adapted, close, named_refusal, operation, out, refused_as_expected

TARGET_RANK = 3
# the adapter tensors zero-padding keeps meaningful: A and B (rank rows / columns) and DoRA's d_out magnitude
PADDABLE = {"lora_A", "lora_B", "lora_magnitude"}


def hotswap_refusal(case: Case) -> str | None:
    """Variants whose initialisation rewrote the frozen base, or whose adapter holds other rank-sized tensors."""
    variant = registry.variant(case.variant)
    if variant.rewrites_base:
        return r"rewrote the frozen base from the adapter"
    if set(variant.layer_class.adapter_names) - PADDABLE:
        return r"cannot be padded to another rank"
    return None


def _counting_compile(model: nn.Module) -> tuple[nn.Module, list[int]]:
    compiles: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]):  # noqa: ARG001 - the backend protocol
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(model, backend=backend), compiles


def _made(case: Case, tmp: Path, name: str, r: int, alpha: float, seed: int, x: Tensor) -> tuple[Path, Tensor]:
    """An adapter of rank ``r`` made on a fresh copy of the case's model, saved; its eager outputs."""
    fresh = Net(case).eval()
    inject_lora(fresh, case.config(r=r, alpha=alpha))
    randomize(fresh, seed=seed)
    return save_adapter(fresh, tmp / f"{name}.safetensors"), out(fresh, x)


@operation(
    "hotswap",
    "prepare_for_hotswap(target_rank=3) pads the rank-2 adapter (outputs within 1e-6); under torch.compile (counting "
    "backend) hotswap_adapter of rank-3 (alpha 5) and rank-1 (alpha 2) adapters recompiles nothing and gives the "
    "eager outputs of a fresh model holding each; rank 4 refused naming target_rank=4, model unchanged; "
    "save_adapter after a swap writes the swapped-in tensors bit-equal (true rank), merge_lora keeps the outputs; "
    "plain LoRA also swaps into an inactive named adapter",
    hotswap_refusal,
)
def op_hotswap(case: Case) -> None:
    model, x = adapted(case)
    y = out(model, x)
    refused_as_expected(model, lambda: prepare_for_hotswap(model, TARGET_RANK), hotswap_refusal(case))
    close(out(model, x), y, "padded to rank 3", rtol=0, atol=1e-6)
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "b": _made(case, Path(tmp), "b", 3, 5.0, 21, x),
            "c": _made(case, Path(tmp), "c", 1, 2.0, 22, x),
            "big": _made(case, Path(tmp), "big", 4, 4.0, 23, x),
        }
        compiled, compiles = _counting_compile(model)
        close(out(compiled, x), y, "compiled, before any swap", rtol=0, atol=1e-6)
        first = len(compiles)
        for name in ("b", "c", "b"):
            path, expected = files[name]
            hotswap_adapter(compiled, path)
            close(out(compiled, x), expected, f"compiled after swapping in {name}", rtol=0, atol=1e-6)
        assert len(compiles) == first, f"recompiled after a swap ({first} -> {len(compiles)} compilations)"
        with contextlib.suppress(Refused):
            refused_as_expected(
                model,
                lambda: hotswap_adapter(compiled, files["big"][0]),
                r"above the padded rank 3; call prepare_for_hotswap\(model, target_rank=4\)",
            )
        saved = save_adapter(model, Path(tmp) / "again.safetensors")
        tensors, original = read_adapter(saved)[0], read_adapter(files["b"][0])[0]
        assert tensors.keys() == original.keys(), "saved keys differ from the swapped-in file's"
        for k, v in tensors.items():
            assert v.shape == original[k].shape and torch.equal(v, original[k]), f"saved {k} is not the file's"
        merge_lora(model)
        close(out(model, x), files["b"][1], "merged after a swap", rtol=1e-5, atol=1e-5)
        unmerge_lora(model)
        if named_refusal(case) is None:
            _named(case, x, files)


def _named(case: Case, x: Tensor, files: dict[str, tuple[Path, Tensor]]) -> None:
    """A second named adapter, prepared with the first; a swap into it leaves the active one's outputs alone."""
    model, x = adapted(case)
    add_adapter(model, "other", {"r": 1})
    prepare_for_hotswap(model, TARGET_RANK)
    y = out(model, x)
    hotswap_adapter(model, files["c"][0], adapter_name="other")
    close(out(model, x), y, "the active adapter after a swap into another", rtol=0, atol=0)
    with use_adapter(model, "other"):
        close(out(model, x), files["c"][1], "the named adapter swapped into", rtol=0, atol=1e-6)
