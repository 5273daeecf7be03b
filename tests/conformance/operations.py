"""The battery's operations: each one is checked on every case against an independent reference, or must be
refused by the library in one line (a :class:`~lora_lightning.LoRAError`) before anything changes.

Which cells are refused is derived from what the registries declare (a kind's ``quantizable``, ``tieable``,
``routable``; a variant's ``linear_only``, ``supports_ties``; PEFT's layouts), so a refusal the library
makes where it should not, or a silent result where it should refuse, fails the battery.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora_lightning import (
    LoRAError,
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    disable_adapter,
    export_peft_adapter,
    import_peft_adapter,
    inject_lora,
    list_adapters,
    load_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    merged_state_dict,
    mixed_batch,
    registry,
    save_adapter,
    set_adapter,
    set_shared_input_fusion,
    unmerge_lora,
    use_adapter,
)
from lora_lightning.layers import is_lora_module
from lora_lightning.loraplus import SOURCE_KEY, apply_loraplus
from lora_lightning.state import lora_handle

from .cases import Case, Net, inputs, randomize
from .references import reference_model, rewrites_base

TOL = dict(rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- expected refusals
def inject_refusal(case: Case) -> str | None:
    """The one-line error injection must raise for ``case`` (a regex), or ``None`` if it must succeed."""
    kind, variant = case.kind, registry.variant(case.variant)
    if variant.needs_quantized_base and case.quantizer is None:  # the config refuses, before any planning
        return r"needs one: set quantize_base"
    tied = case.topology in ("shared", "tied-head")
    if tied and case.example.fused:  # found while planning, before the variant looks at the plan
        return r"hold one weight .* adapters would add two updates"
    if variant.linear_only and (case.example.kind != "linear" or case.example.fused):
        return r"adapts whole nn\.Linear layers only"
    if case.quantizer is not None and not kind.quantizable:
        return r"stores nn\.Linear weights only"
    if tied and (not variant.supports_ties or case.quantizer is not None or not kind.tieable):
        return r"hold one tied weight and would share one adapter"
    return None


def _plain_lora(case: Case) -> bool:
    return registry.variant(case.variant).name == "lora"


def peft_refusal(case: Case) -> str | None:
    if not registry.variant(case.variant).peft_lora or case.quantizer is not None:
        return r"only plain LoRA adapters have an exact PEFT LoRA equivalent"
    if case.topology in ("shared", "tied-head"):
        return r"shares the adapter of its tied weight"
    if not case.example.peft:
        return r"(no|has no exact) PEFT"
    return None


def named_refusal(case: Case) -> str | None:
    return None if _plain_lora(case) else r"named adapters are plain LoRA"


def routing_refusal(case: Case) -> str | None:
    if not _plain_lora(case):
        return r"named adapters are plain LoRA"
    kinds = {case.example.kind} | ({"linear"} if case.topology == "tied-head" else set())
    if not all(registry.layer_kind(k).routable for k in kinds) or case.topology == "tied-head":
        return r"mixed_batch routes Linear and GPT-2 Conv1D LoRA layers"
    return None


def loraplus_refusal(case: Case) -> str | None:
    return r"holds no lora_B" if case.variant == "vera" else None


def multi_fit_refusal(case: Case) -> str | None:
    return None if _plain_lora(case) else r"several adapters in one fit are plain LoRA"


# --------------------------------------------------------------------------- helpers
def snapshot(model: nn.Module) -> tuple[dict[str, Tensor], list[tuple[str, type]]]:
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)],
    )


def assert_unchanged(model: nn.Module, before: tuple[dict[str, Tensor], list[tuple[str, type]]]) -> None:
    tensors, modules = before
    now = model.state_dict()
    assert now.keys() == tensors.keys(), "the refusal changed the model's keys"
    for k, v in tensors.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), f"the refusal changed {k}"
    assert [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)] == modules, (
        "the refusal changed modules"
    )


class Refused(Exception):
    """A cell the library refused as expected: carries the one-line error."""


def refused_as_expected(model: nn.Module, call: Callable[[], Any], pattern: str | None) -> Any:
    """Run ``call``; if ``pattern`` is given it must raise a one-line LoRAError matching it, with ``model``
    unchanged (raises :class:`Refused`); otherwise it must succeed (returns its result)."""
    before = snapshot(model)
    try:
        result = call()
    except LoRAError as exc:
        message = str(exc)
        if pattern is None:
            raise AssertionError(f"refused where it must work: {type(exc).__name__}: {message}") from exc
        assert "\n" not in message, f"the refusal is not one line: {message!r}"
        assert re.search(pattern, message), f"refused with {message!r}, expected /{pattern}/"
        assert_unchanged(model, before)
        raise Refused(f"{type(exc).__name__}: {message}") from None
    if pattern is not None:
        raise AssertionError(f"expected a refusal /{pattern}/, but it ran")
    return result


def adapted(case: Case, seed: int = 0) -> tuple[nn.Module, Tensor]:
    """The case's model with its adapters injected and given random values, and an input batch."""
    model = Net(case, seed).eval()
    refused_as_expected(model, lambda: inject_lora(model, case.config()), inject_refusal(case))
    randomize(model)
    return model, inputs(case)


def out(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


def close(a: Tensor, b: Tensor, what: str, **tol: float) -> None:
    torch.testing.assert_close(a.double(), b.double(), **(TOL | tol), msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- the operations
@dataclass(frozen=True)
class Operation:
    name: str
    checks: str  # what is compared with what (the matrix's legend)
    run: Callable[[Case], None]
    refusal: Callable[[Case], str | None] = lambda case: None


OPERATIONS: list[Operation] = []


def operation(name: str, checks: str, refusal: Callable[[Case], str | None] = lambda case: None) -> Callable:
    def register(fn: Callable[[Case], None]) -> Callable[[Case], None]:
        OPERATIONS.append(Operation(name, checks, fn, refusal))
        return fn

    return register


@operation(
    "inject",
    "outputs right after injection bit-equal to the frozen base's (nn.MultiheadAttention: to its own slow "
    "path, the function its inference fast path computes in another order); a quantized base: to the base with its "
    "dequantized weights; a variant whose initialisation rewrites the base (PiSSA, OLoRA, LoftQ): W_base + s·B·A "
    "by hand, and the base itself to 1e-5 where it is not quantized; a refusal leaves the model bit-equal",
)
def op_inject(case: Case) -> None:
    model = Net(case).eval()
    x = inputs(case)
    grads = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():  # frozen, as LoRA leaves it (F.multi_head_attention_forward's kernels depend on it)
        p.requires_grad_(False)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the base's slow path (its training-mode function)
    try:
        base = out(model, x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    for p, g in grads.items():
        p.requires_grad_(g)
    refused_as_expected(model, lambda: inject_lora(model, case.config()), inject_refusal(case))
    after = out(model, x)
    if rewrites_base(case):
        what = f"{case.variant} at init"
        close(after, out(reference_model(case, model), _x64(x)), f"{what} vs W_base + s·B·A", rtol=1e-5, atol=1e-5)
        if case.quantizer is None:
            close(after, base, f"{what} vs the base", rtol=1e-5, atol=1e-5)
    elif case.quantizer is not None:
        plain = Net(case).eval()  # the base with each adapted weight replaced by its dequantized values
        with torch.no_grad():
            for name, layer in lora_layers(model).items():
                plain.get_submodule(name).weight.copy_(layer.base_weight())
        assert torch.equal(after, out(plain, x)), "quantized base at B=0 differs from its dequantized weights"
    else:
        assert torch.equal(after, base), f"outputs changed by {(after - base).abs().max():.3g} right after injection"


@operation(
    "forward",
    "fp32 forward vs W0 + ΔW by each variant's hand formula in float64 in a plain copy of the model; "
    "gradients reach the trainable tensors only; in-place ops on the output train",
)
def op_forward(case: Case) -> None:
    model, x = adapted(case)
    close(out(model, x), out(reference_model(case, model), _x64(x)), "forward")
    model.train()
    y = model(x)
    y.relu_()  # an in-place op on an adapted layer's output
    y.float().pow(2).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        assert p.grad is None, f"frozen {name} got a gradient"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(model.get_parameter(n).grad is not None for n in trainable if ".lora_bank." not in n)


@operation(
    "half_cast",
    "adapter_dtype='float32', then model.to(torch.bfloat16) (Lightning's bf16-true): every adapter tensor stays "
    "fp32, outputs equal the fp32 model's to bf16 round-off, and a backward reaches the trainable tensors",
)
def op_half_cast(case: Case) -> None:
    model = Net(case).eval()
    refused_as_expected(model, lambda: inject_lora(model, case.config(adapter_dtype="float32")), inject_refusal(case))
    randomize(model)
    x = inputs(case)
    expected = out(model, x)
    model.to(torch.bfloat16)
    for name, layer in lora_layers(model).items():
        for leaf in dict.fromkeys(layer.trainable_names + layer.adapter_names):
            t = getattr(layer, leaf)
            assert not t.is_floating_point() or t.dtype == torch.float32, f"{name}.{leaf} is {t.dtype} after the cast"
    xb = x.to(torch.bfloat16) if x.is_floating_point() else x
    close(out(model, xb).float(), expected, "bf16 model vs fp32", rtol=0.05, atol=0.05)
    model.train()
    model(xb).float().pow(2).sum().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(model.get_parameter(n).grad is not None for n in trainable if ".lora_bank." not in n)


@operation(
    "merge",
    "merge_lora: outputs equal the unmerged ones; unmerge_lora: the base weights back; merge_and_unload: "
    "the base architecture (no LoRA module left) with the same outputs",
)
def op_merge(case: Case) -> None:
    model, x = adapted(case)
    y = out(model, x)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    close(out(model, x), y, "merged")
    unmerge_lora(model)
    close(out(model, x), y, "unmerged")
    if case.quantizer is None:
        for k, v in model.state_dict().items():
            close(v, weights[k], f"{k} after merge+unmerge", rtol=1e-5, atol=1e-5)
    merge_and_unload(model)
    assert not any(is_lora_module(m) for m in model.modules()), "merge_and_unload left LoRA modules"
    close(out(model, x), y, "merge_and_unload")


@operation("merged_state_dict", "merged_state_dict loaded (strict) into a fresh plain model gives the adapted outputs")
def op_merged_state_dict(case: Case) -> None:
    model, x = adapted(case)
    y = out(model, x)
    plain = Net(case, seed=7).eval()
    plain.load_state_dict(merged_state_dict(model))
    close(out(plain, x), y, "merged_state_dict")


@operation("save_load", "save_adapter, then load_adapter onto a fresh base: bit-equal outputs")
def op_save_load(case: Case) -> None:
    model, x = adapted(case)
    y = out(model, x)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_adapter(model, Path(tmp) / "a.safetensors")
        fresh = Net(case).eval()
        load_adapter(fresh, path)
    assert torch.equal(out(fresh, x), y), "reloaded adapter gives other outputs"


@operation(
    "peft",
    "export_peft_adapter loaded by peft.PeftModel gives our outputs; import_peft_adapter of it too",
    peft_refusal,
)
def op_peft(case: Case) -> None:
    import peft

    model, x = adapted(case)
    y = out(model, x)
    with tempfile.TemporaryDirectory() as tmp:
        refused_as_expected(model, lambda: export_peft_adapter(model, tmp), peft_refusal(case))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(Net(case).eval(), tmp).eval()
        close(out(theirs, x), y, "in PEFT", rtol=1e-5, atol=1e-5)
        ours = Net(case).eval()
        import_peft_adapter(ours, tmp)
        close(out(ours, x), y, "imported back", rtol=1e-6, atol=1e-6)


@operation(
    "named",
    "add_adapter/set_adapter/use_adapter give each adapter's hand-formula outputs; add_weighted_adapter "
    "(cat) gives W0 + Σ w_i·ΔW_i; bad calls (NaN weight, svd_rank too large) change nothing; delete_adapter",
    named_refusal,
)
def op_named(case: Case) -> None:
    model, x = adapted(case)
    y = out(model, x)
    refused_as_expected(model, lambda: add_adapter(model, "b", {"r": 1}), named_refusal(case))
    with use_adapter(model, "b"):
        randomize(model, seed=11)
        y_b = out(model, x)
        close(y_b, out(reference_model(case, model), _x64(x)), "adapter b")
    assert torch.equal(out(model, x), y), "use_adapter did not give the previous adapter back"
    for bad in (
        lambda: add_weighted_adapter(model, ["default", "b"], [1.0, float("nan")], "w"),
        lambda: add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "w", "svd", svd_rank=10_000),
    ):
        with contextlib.suppress(Refused):
            refused_as_expected(model, bad, r"not a finite number|does not fit")
    add_weighted_adapter(model, ["default", "b"], [0.7, -0.4], "w", combination_type="cat")
    expected = out(reference_model(case, model, {"default": 0.7, "b": -0.4}), _x64(x))
    set_adapter(model, "w")
    close(out(model, x), expected, "weighted (cat)")
    delete_adapter(model, "b")
    assert list_adapters(model) == ["default", "w"]
    set_adapter(model, "default")
    assert torch.equal(out(model, x), y)


def _x64(x: Tensor) -> Tensor:
    return x.double() if x.is_floating_point() else x


@operation(
    "mixed_batch",
    "each sample's output row equals that sample through its own adapter (or the base for None)",
    routing_refusal,
)
def op_mixed_batch(case: Case) -> None:
    model, x = adapted(case)
    if not _plain_lora(case):
        refused_as_expected(model, lambda: add_adapter(model, "b"), routing_refusal(case))
    add_adapter(model, "b", {"r": 1})
    with use_adapter(model, "b"):
        randomize(model, seed=13)
        y_b = out(model, x)
    with disable_adapter(model):
        y_base = out(model, x)

    def routed() -> Tensor:
        with mixed_batch(model, ["b", None]):
            return out(model, x)

    mixed = refused_as_expected(model, routed, routing_refusal(case))
    close(mixed[0], y_b[0], "row routed to b")
    close(mixed[1], y_base[1], "row routed to the base")


@operation(
    "fusion",
    "shared-input fusion on vs off: outputs bit-equal, gradients equal (None where unfused gives None, "
    "also for a member whose output is unused), one AdamW step with weight decay equal",
)
def op_fusion(case: Case) -> None:
    model, x = adapted(case)
    model.train()
    runs = []
    for fuse in (True, False):
        m = copy.deepcopy(model)
        set_shared_input_fusion(m, fuse)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        outs = []
        for _ in range(2):  # the first forward learns the groups, the second runs them fused
            opt.zero_grad(set_to_none=True)
            y = m(x)
            y.float().pow(2).sum().backward()
            outs.append(y.detach())
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        groupable = (
            case.topology == "siblings"
            and case.example.kind == "linear"
            and not case.example.fused
            and _plain_lora(case)
            and case.quantizer is None
        )
        if fuse and groupable:  # q/k/v-like siblings of plain LoRA Linear layers: the fused node really ran
            assert lora_handle(m).tracker.fused_calls > 0, "the siblings were not fused"
        opt.step()
        runs.append((outs, grads, {n: p.detach().clone() for n, p in m.named_parameters()}))
    if case.topology in (
        "siblings",
        "shared",
    ):  # both read x, only the first output is used: no gradient for the second
        for fuse in (True, False):
            m = copy.deepcopy(model)
            set_shared_input_fusion(m, fuse)
            grads = []
            for _ in range(2):
                m.zero_grad(set_to_none=True)
                y1 = m.run(m.first.get_submodule(m.attr), x)
                m.run(m.second.get_submodule(m.attr), x)  # called, unused
                y1.float().pow(2).sum().backward()
                grads.append({n: p.grad is None for n, p in m.named_parameters() if p.requires_grad})
            runs.append((None, grads[-1], None))
    (o1, g1, p1), (o2, g2, p2) = runs[:2]
    for a, b in zip(o1, o2, strict=True):
        assert torch.equal(a, b), "fused outputs differ from unfused ones"
    for n in g1:
        assert (g1[n] is None) == (g2[n] is None), (
            f"{n}: gradient None with fusion {g1[n] is None}, without {g2[n] is None}"
        )
        if g1[n] is not None:
            close(g1[n], g2[n], f"gradient of {n}", rtol=1e-5, atol=1e-6)
    for n in p1:
        close(p1[n], p2[n], f"{n} after a step", rtol=1e-5, atol=1e-6)
    if len(runs) == 4:
        assert runs[2][1] == runs[3][1], (
            f"an unused member's gradients differ with fusion on/off: {runs[2][1]} vs {runs[3][1]}"
        )


def _schedulers(opt: torch.optim.Optimizer) -> dict[str, Any]:
    S = torch.optim.lr_scheduler
    return {
        "LambdaLR": lambda: S.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
        "MultiplicativeLR": lambda: S.MultiplicativeLR(opt, lambda step: 0.9),
        "StepLR": lambda: S.StepLR(opt, step_size=2, gamma=0.5),
        "MultiStepLR": lambda: S.MultiStepLR(opt, milestones=[1, 3], gamma=0.5),
        "ConstantLR": lambda: S.ConstantLR(opt, factor=0.5, total_iters=2),
        "LinearLR": lambda: S.LinearLR(opt, start_factor=0.3, total_iters=3),
        "ExponentialLR": lambda: S.ExponentialLR(opt, gamma=0.8),
        "SequentialLR": lambda: S.SequentialLR(
            opt,
            [S.ConstantLR(opt, factor=0.5, total_iters=2), S.CosineAnnealingLR(opt, T_max=4, eta_min=1e-3)],
            milestones=[2],
        ),
        "PolynomialLR": lambda: S.PolynomialLR(opt, total_iters=5, power=2.0),
        "CosineAnnealingLR": lambda: S.CosineAnnealingLR(opt, T_max=4, eta_min=1e-3),
        "ChainedScheduler": lambda: S.ChainedScheduler(
            [S.ConstantLR(opt, factor=0.5, total_iters=2), S.ExponentialLR(opt, gamma=0.9)]
        ),
        "ReduceLROnPlateau": lambda: S.ReduceLROnPlateau(opt, patience=0, factor=0.5, min_lr=1e-3),
        "CyclicLR": lambda: S.CyclicLR(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=2),
        "CosineAnnealingWarmRestarts": lambda: S.CosineAnnealingWarmRestarts(opt, T_0=2, eta_min=1e-3),
        "OneCycleLR": lambda: S.OneCycleLR(opt, max_lr=1e-2, total_steps=10),
    }


SCHEDULERS = tuple(_schedulers(None))  # type: ignore[arg-type]


@operation(
    "loraplus",
    "LoRA+ (ratio 16) under each of torch.optim.lr_scheduler's " + str(len(SCHEDULERS)) + " schedulers: "
    "lr_B = 16·lr_A in every B group before every optimizer step and after every scheduler step",
    loraplus_refusal,
)
def op_loraplus(case: Case) -> None:
    model, x = adapted(case)
    model.train()
    for name in SCHEDULERS:
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        sched = _schedulers(opt)[name]()
        if loraplus_refusal(case):
            refused_as_expected(
                m,
                lambda m=m, opt=opt, sched=sched: apply_loraplus(opt, m, 16, [sched], strict=True),
                loraplus_refusal(case),
            )
        apply_loraplus(opt, m, 16, [sched], strict=True)
        seen: list[float] = []

        def check(when: str, opt=opt, name=name, seen=seen) -> None:
            groups = opt.param_groups
            b_groups = [g for g in groups if g.get(SOURCE_KEY) is not None]
            assert b_groups, "no LoRA+ group"
            for g in b_groups:
                lr_a, lr_b = float(groups[g[SOURCE_KEY]]["lr"]), float(g["lr"])
                assert lr_b == 16 * lr_a, f"{name} {when}: lr_B/lr_A = {lr_b / lr_a if lr_a else float('inf')}"
                seen.append(lr_a)

        for _ in range(5):
            opt.zero_grad()
            loss = m(x).float().pow(2).mean()
            loss.backward()
            opt.step()  # the pre-step hook set the ratio just before this step
            check("at the step")
            sched.step(loss.item()) if name == "ReduceLROnPlateau" else sched.step()
            check("after the scheduler step")


@operation("deepcopy", "copy.deepcopy and pickle round trip: same outputs, and the copy's adapter is its own")
def op_deepcopy(case: Case) -> None:
    model, x = adapted(case)
    y = out(model, x)
    clone = copy.deepcopy(model)
    assert torch.equal(out(clone, x), y), "deepcopy changed the outputs"
    loaded = pickle.loads(pickle.dumps(model))
    assert torch.equal(out(loaded, x), y), "pickle round trip changed the outputs"
    randomize(clone, seed=21)
    assert torch.equal(out(model, x), y), "changing the copy's adapter changed the original"


# --------------------------------------------------------------------------- Lightning
def _lit(case: Case) -> Any:
    import lightning.pytorch as pl

    class LitNet(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net(case)

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return self.net(batch[0]).float().pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)

    return LitNet


def _loader(case: Case, seed: int) -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    xs = torch.cat([inputs(case, seed + i) for i in range(4)])
    return DataLoader(TensorDataset(xs), batch_size=2, shuffle=False)


def _trainer(tmp: str, callbacks: list[Any], **kw: Any) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        default_root_dir=tmp,
        callbacks=callbacks,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        **kw,
    )


@operation(
    "lightning",
    "fit 2 steps with LoRACallback, save a checkpoint (adapter-only), LitNet.load_from_checkpoint: bit-equal outputs",
)
def op_lightning(case: Case) -> None:
    import logging

    from lora_lightning import LoRACallback

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    adapted(case)  # a case injection refuses is refused here too (the callback would raise the same in setup)
    LitNet = _lit(case)
    model = LitNet()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = _trainer(tmp, [LoRACallback(case.config(), verbose=False)])
        t.fit(model, _loader(case, 3))
        x = inputs(case)
        y = out(model.eval(), x)
        t.save_checkpoint(Path(tmp) / "x.ckpt")
        loaded = LitNet.load_from_checkpoint(Path(tmp) / "x.ckpt").eval()
    assert torch.equal(out(loaded, x), y), "load_from_checkpoint gave other outputs"


@operation(
    "multi_fit",
    "LoRACallback(adapters=['a', 'b']) with gradient accumulation (2), clipping by norm and LoRA+ (16): "
    "each adapter equals the same adapter trained alone on its own batches",
    multi_fit_refusal,
)
def op_multi_fit(case: Case) -> None:
    from lora_lightning import LoRACallback

    adapted(case)
    LitNet = _lit(case)
    pattern = multi_fit_refusal(case)
    if pattern:
        refused_as_expected(
            nn.Linear(1, 1), lambda: LoRACallback(case.config(), adapters=["a", "b"], verbose=False), pattern
        )
    settings = dict(accumulate_grad_batches=2, gradient_clip_val=0.02)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = LitNet()
        cfg = case.config(init_seed=5)
        t = _trainer(tmp, [LoRACallback(cfg, adapters=["a", "b"], loraplus_lr_ratio=16, verbose=False)], **settings)
        t.fit(both, {"a": _loader(case, 3), "b": _loader(case, 30)})
        trained = {}
        for name, seed in (("a", 3), ("b", 30)):
            alone = LitNet()
            add_adapter(alone, name, cfg)  # the same initial adapter (init_seed, name-independent streams)
            t = _trainer(tmp, [LoRACallback(cfg, loraplus_lr_ratio=16, verbose=False)], **settings)
            t.fit(alone, _loader(case, seed))
            trained[name] = {k: v for k, v in alone.state_dict().items() if ".lora_" in k}
        for name in ("a", "b"):
            with use_adapter(both, name):
                mine = {k: v for k, v in both.state_dict().items() if ".lora_" in k and ".lora_bank." not in k}
            for k, v in trained[name].items():
                close(mine[k], v, f"adapter {name} {k} vs trained alone", rtol=1e-5, atol=1e-6)


# The operations of later features live one module each beside this one (``ops_<feature>.py``): each registers its
# operations with ``@operation`` when imported here, after the operations above, in file-name order.
for _path in sorted(Path(__file__).parent.glob("ops_*.py")):
    importlib.import_module(f"{__package__}.{_path.stem}")


__all__ = ["OPERATIONS", "Operation", "Refused", "adapted", "inject_refusal", "operation", "out", "close"]
