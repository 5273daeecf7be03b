"""Issue 37 item 6: the OLoRA and LoftQ initialisations, each checked against its formula and against PEFT 0.21's
implementation on the same weights.

PEFT's ``loftq_init`` needs bitsandbytes and runs on ``"cuda"`` (or ``"xpu"``) only; here it is run on the CPU from
PEFT's own source with that one line changed (bitsandbytes' 4-bit functions run on the CPU), against our LoftQ with
a quantizer doing what PEFT's does (``Params4bit``: NF4 in blocks of 64, absmax not double-quantized).
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import warnings

import pytest
import torch
from torch import nn

from conftest import tiny_batch, tiny_model
from lora_lightning import (
    AdapterMismatchError,
    LoftQLinear,
    LoRAConfig,
    LoRAConfigError,
    OLoRALinear,
    export_peft_adapter,
    inject_lora,
    load_adapter,
    loftq_init,
    lora_layers,
    merge_and_unload,
    merge_lora,
    merged_state_dict,
    olora_to_lora,
    registry,
    remove_lora,
    save_adapter,
    unmerge_lora,
)
from lora_lightning.quantization import Bnb4bit, bitsandbytes_functional, dequantize, quantize, register_quantizer


class Two(nn.Module):
    """Two Linear layers, one wider than tall and one taller than wide, reading the same input."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(64, 32)
        self.v = nn.Linear(64, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.v(x)], -1)


def two(seed: int = 0, dtype: torch.dtype = torch.float32) -> Two:
    torch.manual_seed(seed)
    return Two().to(dtype)


def x_batch(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(6, 64, generator=torch.Generator().manual_seed(1)).to(dtype)


def peft_model(model: nn.Module, targets: tuple[str, ...] = ("q", "v"), **options):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(target_modules=list(targets), **options))


def peft_layer(model, name: str):
    return model.base_model.model.get_submodule(name)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def by_hand(model: nn.Module) -> nn.Module:
    """A plain tiny model whose adapted weights are ``W_base + s·B·A`` from each layer's tensors (float64 sums)."""
    plain = tiny_model()
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
            w = layer.base_weight().detach().double() + layer.scaling * B @ A
            plain.get_submodule(name).weight.copy_(w)
    return plain


def perturb_same(ours: nn.Module, theirs, seed: int = 3) -> None:
    """The same random A and B in both models (as after the same training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("q", "v"):
            mine, other = ours.get_submodule(name), peft_layer(theirs, name)
            for leaf in ("lora_A", "lora_B"):
                p = getattr(mine, leaf)
                value = torch.randn(p.shape, generator=g) * 0.2
                p.copy_(value)
                getattr(other, leaf)["default"].weight.copy_(value)


# ==================================================================================================== OLoRA
@pytest.mark.parametrize("r,alpha", [(4, 8), (3, 3), (5, 2.5)])
def test_olora_equals_peft_olora_init_bit_for_bit(r, alpha):
    """fp32: A = R[:r], B = Q[:, :r] and the residual base are PEFT's bit for bit, at every scaling."""
    theirs = peft_model(two(), r=r, lora_alpha=alpha, init_lora_weights="olora")
    ours = two()
    inject_lora(ours, LoRAConfig(variant="olora", r=r, alpha=alpha, targets=["q", "v"]))
    for name in ("q", "v"):
        mine, other = ours.get_submodule(name), peft_layer(theirs, name)
        assert isinstance(mine, OLoRALinear) and mine.scaling == other.scaling["default"]
        assert torch.equal(mine.lora_A, other.lora_A["default"].weight), name
        assert torch.equal(mine.lora_B, other.lora_B["default"].weight), name
        assert torch.equal(mine.weight, other.base_layer.weight), name
    x = x_batch()
    with torch.no_grad():
        assert maxdiff(ours(x), theirs(x)) <= 1e-6
        perturb_same(ours, theirs)
        assert maxdiff(ours(x), theirs(x)) <= 1e-6


def test_olora_formula_and_unchanged_output_at_init():
    """Independently of PEFT: B has orthonormal columns, A = Bᵀ·W0 (so B·A projects W0 onto span(B)), A is upper
    triangular and B·A reproduces W0's first r columns (QR's defining properties); W_res = W0 - s·B·A."""
    base = two()
    x = x_batch()
    with torch.no_grad():
        y0 = base(x)
    model = copy.deepcopy(base)
    r, s = 4, 8 / 4
    inject_lora(model, LoRAConfig(variant="olora", r=r, alpha=8, targets=["q", "v"]))
    for name in ("q", "v"):
        layer, W0 = model.get_submodule(name), base.get_submodule(name).weight.detach().double()
        A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        torch.testing.assert_close(B.T @ B, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-5)
        torch.testing.assert_close(A, B.T @ W0, rtol=0, atol=1e-5)
        assert torch.equal(A[:, :r].tril(-1), torch.zeros(r, r, dtype=torch.float64))
        torch.testing.assert_close(B @ A[:, :r], W0[:, :r], rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.weight.detach().double(), W0 - s * B @ A, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-5)


def test_olora_bf16_base_dtype_handling_against_peft():
    """A bf16 base: the QR runs in float32 in both. PEFT ends with A, B rounded to bf16 (moved to the base's dtype)
    and stored in float32, but its residual subtracts the unrounded factors; here A, B are the same bf16 values and
    the residual subtracts them as stored, so W_res + s·B·A is closer to W0. With adapter_dtype='float32' the
    factors stay unrounded and the base is PEFT's bit for bit."""
    r, alpha, s = 8, 16, 2.0
    base = two(dtype=torch.bfloat16)
    theirs = peft_model(copy.deepcopy(base), r=r, lora_alpha=alpha, init_lora_weights="olora")
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRAConfig(variant="olora", r=r, alpha=alpha, targets=["q", "v"]))
    wide = copy.deepcopy(base)
    inject_lora(wide, LoRAConfig(variant="olora", r=r, alpha=alpha, targets=["q", "v"], adapter_dtype="float32"))
    for name in ("q", "v"):
        mine, other, w32 = ours.get_submodule(name), peft_layer(theirs, name), wide.get_submodule(name)
        W0 = base.get_submodule(name).weight.detach().float()
        A_p, B_p = other.lora_A["default"].weight, other.lora_B["default"].weight
        assert mine.lora_A.dtype == torch.bfloat16 and A_p.dtype == torch.float32
        assert torch.equal(mine.lora_A.float(), A_p) and torch.equal(mine.lora_B.float(), B_p)
        assert torch.equal(w32.weight, other.base_layer.weight)  # same float32 residual, cast to bf16
        assert torch.equal(w32.lora_A.bfloat16().float(), A_p) and torch.equal(w32.lora_B.bfloat16().float(), B_p)

        ours_err = maxdiff(mine.weight.float() + s * mine.lora_B.float() @ mine.lora_A.float(), W0)
        peft_err = maxdiff(other.base_layer.weight.float() + s * B_p.float() @ A_p.float(), W0)
        assert ours_err < peft_err


def test_olora_adapter_files_merge_remove_and_conversion(tmp_path):
    """Saving keeps A, B only; loading onto the original base redoes the QR (the residual is rebuilt). Merge and
    unmerge are exact to round-off, remove_lora of the unmerged model gives W0 back, and olora_to_lora states the
    update as a rank-2r LoRA on the original base that PEFT runs to the same outputs."""
    ids, _ = tiny_batch()
    ref = tiny_model()(ids)
    cfg = LoRAConfig(variant="olora", r=3, alpha=6, targets=["q", "v"])
    model = tiny_model()
    inject_lora(model, cfg)
    torch.testing.assert_close(model(ids), ref, rtol=0, atol=1e-5)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=g) * 0.05)
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    y = model(ids)
    path = save_adapter(model, tmp_path / "olora.safetensors")
    fresh = tiny_model()
    load_adapter(fresh, path)
    assert torch.equal(fresh(ids), y)
    plain = tiny_model()
    plain.load_state_dict(merged_state_dict(model))
    torch.testing.assert_close(plain(ids), y, rtol=0, atol=1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    torch.testing.assert_close(model(ids), y, rtol=0, atol=1e-5)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)
    # the conversion, checked by hand and in PEFT (rank 2r on the unmodified base, the same scaling)
    converted = olora_to_lora(model)
    layer = model.layers[1].self_attn.v_proj
    A2, B2, s2 = converted["layers.1.self_attn.v_proj"]
    W0 = tiny_model().layers[1].self_attn.v_proj.weight.detach()
    torch.testing.assert_close(W0 + s2 * B2 @ A2, layer.merged_weight(), rtol=0, atol=1e-5)
    theirs = peft_model(tiny_model(), ("q_proj", "v_proj"), r=6, lora_alpha=s2 * 6)
    with torch.no_grad():
        for name, (A, B, _) in converted.items():
            target = theirs.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(A)
            target.lora_B["default"].weight.copy_(B)
        torch.testing.assert_close(theirs(ids), y, rtol=0, atol=1e-5)
    with pytest.raises(LoRAConfigError, match=r"only plain LoRA adapters have an exact PEFT LoRA equivalent"):
        export_peft_adapter(model, tmp_path / "peft")
    remove_lora(model)
    torch.testing.assert_close(model(ids), ref, rtol=0, atol=1e-5)
    with pytest.raises(LoRAConfigError, match="olora_to_lora needs a model injected with"):
        olora_to_lora(tiny_model())


def test_olora_with_a_quantized_base_quantizes_the_residual():
    model, base = tiny_model(), tiny_model()
    inject_lora(model, LoRAConfig(variant="olora", r=2, alpha=4, targets=["v"], quantize_base="int8"))
    layer = model.layers[0].self_attn.v_proj
    W0 = base.layers[0].self_attn.v_proj.weight.detach()
    residual = W0 - 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    assert layer.quantize_base == "int8"
    assert torch.equal(layer.base_weight(), dequantize(*quantize(residual, "int8"), "int8"))
    merge_and_unload(model)


# ==================================================================================================== LoftQ
class PEFTNF4(Bnb4bit):
    """bitsandbytes NF4 as PEFT's ``loftq_init`` quantizes (``Params4bit(compress_statistics=False)``, blocks of 64):
    the registered ``bnb-nf4`` double-quantizes the absmax as PEFT's QLoRA loading does."""

    def __init__(self) -> None:
        super().__init__("nf4")
        self.name = "bnb-nf4-peft-loftq"

    def quantize(self, w: torch.Tensor):
        return bitsandbytes_functional().quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)


@pytest.fixture(scope="module")
def peft_loftq_cpu():
    """PEFT's ``loftq_init`` from its own source, with ``compute_device`` set to the CPU (PEFT picks cuda or xpu)."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    import peft.utils.loftq_utils as loftq_utils

    source = inspect.getsource(loftq_utils.loftq_init)
    # PEFT <= 0.21: `compute_device = "xpu" if is_xpu_available() else "cuda"`; 0.22: `compute_device = infer_device()`
    source, n = re.subn(r"(?m)^(\s*)compute_device = .+$", r'\1compute_device = "cpu"', source)
    assert n == 1, "PEFT's loftq_init no longer sets compute_device in one line: update this test"
    namespace = dict(vars(loftq_utils))
    exec(compile(source, loftq_utils.__file__, "exec"), namespace)
    return namespace["loftq_init"]


@pytest.fixture
def peft_nf4():
    """The PEFT-like NF4 format registered while a test runs."""
    fmt = register_quantizer(PEFTNF4())
    try:
        yield fmt.name
    finally:
        del registry.QUANTIZERS[fmt.name]
        registry.notify()


def pretrained_like(d_out: int = 128, d_in: int = 256, seed: int = 0) -> torch.Tensor:
    """A weight with a decaying spectrum (a few strong directions over noise), as pretrained weights have."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d_out, d_out, generator=g))[0]
    V = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))[0]
    k = min(d_out, d_in)
    S = 0.05 + 2.0 * torch.exp(-torch.arange(k, dtype=torch.float32) / 6)
    return (U[:, :k] * S) @ V[:, :k].T


@pytest.mark.parametrize("iters", [1, 2, 5])
def test_loftq_init_equals_peft_loftq_init(peft_loftq_cpu, iters):
    """The same quantization gives PEFT's Q, A = R and B = L bit for bit (s = 1)."""
    W = pretrained_like()
    Q, A, B = peft_loftq_cpu(W, num_bits=4, reduced_rank=8, num_iter=iters)
    ours = loftq_init(W, PEFTNF4(), 8, iters)
    assert torch.equal(ours.base, Q) and torch.equal(ours.A, A) and torch.equal(ours.B, B)
    assert ours.errors[-1] == float(torch.linalg.norm(W - Q - B @ A))


def test_loftq_model_equals_peft_loftq_model(peft_loftq_cpu, peft_nf4, monkeypatch):
    """Through inject_lora and PEFT's get_peft_model(init_lora_weights='loftq'): at s = 1 the bases, A, B and
    outputs are PEFT's; at s = 2 ours are PEFT's divided by sqrt(s) (PEFT ignores the scaling: issue
    huggingface/peft#1982), so Q + s·B·A approximates W0 where PEFT's Q + s·L·R is no closer than Q alone."""
    import peft
    import peft.tuners.lora.layer as peft_layers

    monkeypatch.setattr(peft_layers, "loftq_init", peft_loftq_cpu)
    x = x_batch()
    for alpha, iters in ((4, 2), (8, 3)):
        s = alpha / 4
        loftq = peft.LoftQConfig(loftq_bits=4, loftq_iter=iters)
        theirs = peft_model(two(), r=4, lora_alpha=alpha, init_lora_weights="loftq", loftq_config=loftq)
        ours = two()
        inject_lora(
            ours,
            LoRAConfig(variant="loftq", r=4, alpha=alpha, targets=["q", "v"], quantize_base=peft_nf4, loftq_iter=iters),
        )
        for name in ("q", "v"):
            mine, other = ours.get_submodule(name), peft_layer(theirs, name)
            A_p, B_p = other.lora_A["default"].weight, other.lora_B["default"].weight
            assert isinstance(mine, LoftQLinear) and len(mine.loftq_errors) == iters
            assert torch.equal(mine.base_weight(), other.base_layer.weight)
            if s == 1:
                assert torch.equal(mine.lora_A, A_p) and torch.equal(mine.lora_B, B_p)
            else:
                torch.testing.assert_close(mine.lora_A * math.sqrt(s), A_p, rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(mine.lora_B * math.sqrt(s), B_p, rtol=1e-6, atol=1e-7)
                W0 = two().get_submodule(name).weight.detach()
                Q = mine.base_weight().detach()
                ours_err = torch.linalg.norm(W0 - Q - s * mine.lora_B.detach() @ mine.lora_A.detach())
                peft_err = torch.linalg.norm(W0 - Q - s * B_p.detach() @ A_p.detach())
                # PEFT's s·L·R overshoots by as much as L·R corrects: its error is Q's alone, ||W0 - Q||
                assert math.isclose(peft_err, torch.linalg.norm(W0 - Q), rel_tol=1e-4)
                assert ours_err < 0.95 * peft_err
        with torch.no_grad():
            if s == 1:
                assert maxdiff(ours(x), theirs(x)) <= 1e-6
                perturb_same(ours, theirs)
                assert maxdiff(ours(x), theirs(x)) <= 1e-6


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_loftq_formula_and_errors_by_iteration(fmt):
    """By hand: each step quantizes W0 - s·B·A of the step before (W0 first), s·B·A is the best rank-r
    approximation of W0 - Q (its error is the norm of the discarded singular values), the error of Q + s·B·A is
    below plain quantization's from the first step, and five steps end below one."""
    if fmt == "nf4":
        pytest.importorskip("torchao")
    W, r, s = pretrained_like(), 8, 2.0
    runs = [loftq_init(W, fmt, r, n, s) for n in range(1, 6)]
    errors = runs[-1].errors
    assert [run.errors for run in runs] == [errors[:n] for n in range(1, 6)]  # each run continues the last
    assert errors[0] < runs[-1].quantization_error == float(torch.linalg.norm(W - dequantize(*quantize(W, fmt), fmt)))
    assert errors[-1] < errors[0]
    assert torch.equal(runs[0].quantized_from, W)
    for before, run in zip(runs[:-1], runs[1:], strict=True):
        torch.testing.assert_close(run.quantized_from, W - s * before.B @ before.A, rtol=0, atol=1e-6)
    for run in runs:
        assert torch.equal(run.base, dequantize(*quantize(run.quantized_from, fmt), fmt))
        residual = (W - run.base).double()
        S = torch.linalg.svdvals(residual)
        torch.testing.assert_close(
            torch.linalg.norm(residual - s * run.B.double() @ run.A.double()), S[r:].norm(), rtol=1e-5, atol=0
        )
        assert math.isclose(run.errors[-1], float(S[r:].norm()), rel_tol=1e-5)
    print(
        f"LoftQ {fmt} r={r} on a {tuple(W.shape)} weight: plain quantization {runs[-1].quantization_error:.4f}, "
        f"by step {[round(e, 4) for e in errors]}"
    )


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_loftq_through_inject_lora_files_merge_and_remove(tmp_path, fmt):
    """The layer's base is Q (stored quantized), A, B are loftq_init's; Q + s·B·A is closer to W0 than the plain
    quantized base (weights: outputs of the tiny transformer need not be), outputs at init are Q + s·B·A by hand;
    the adapter file rebuilds Q, A0, B0 from W0; merge and unmerge are exact to round-off; remove_lora of the
    unmerged model gives Q + s·B0·A0."""
    if fmt == "nf4":
        pytest.importorskip("torchao")
    ids, _ = tiny_batch()
    cfg = LoRAConfig(variant="loftq", r=2, alpha=4, targets=["q", "v", "mlp"], quantize_base=fmt, loftq_iter=3)
    model = tiny_model()
    inject_lora(model, cfg)
    plain = tiny_model()
    inject_lora(plain, LoRAConfig(r=2, alpha=4, targets=["q", "v", "mlp"], quantize_base=fmt))  # QLoRA at B = 0
    base = tiny_model()
    for name, layer in lora_layers(model).items():
        assert isinstance(layer, LoftQLinear) and layer.quantize_base == fmt
        W0 = base.get_submodule(name).weight.detach()
        init = loftq_init(W0, fmt, 2, 3, 2.0)
        assert torch.equal(layer.base_weight(), init.base)
        assert torch.equal(layer.lora_A, init.A) and torch.equal(layer.lora_B, init.B)
        assert layer.loftq_errors == init.errors
        effective = layer.base_weight() + 2.0 * layer.lora_B @ layer.lora_A
        assert torch.linalg.norm(W0 - effective) < torch.linalg.norm(W0 - plain.get_submodule(name).base_weight())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), by_hand(model)(ids), rtol=0, atol=1e-5)
        for layer in lora_layers(model).values():
            layer.lora_B.add_(0.05)
        y = model(ids)
    path = save_adapter(model, tmp_path / "loftq.safetensors")
    fresh = tiny_model()
    load_adapter(fresh, path)
    assert torch.equal(fresh(ids), y)
    other = tiny_model()
    inject_lora(other, LoRAConfig(**(cfg.to_dict() | {"loftq_iter": 1})))
    with pytest.raises(AdapterMismatchError, match="loftq_iter"):
        load_adapter(other, path)
    flat = tiny_model()
    flat.load_state_dict(merged_state_dict(model))
    torch.testing.assert_close(flat(ids), y, rtol=0, atol=1e-5)
    merge_lora(model)
    torch.testing.assert_close(model(ids), y, rtol=0, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(ids), y, rtol=0, atol=1e-5)
    initial = tiny_model()
    inject_lora(initial, cfg)
    expected = {
        name: layer.base_weight().detach() + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
        for name, layer in lora_layers(initial).items()
    }
    remove_lora(initial)
    for name, w in expected.items():
        torch.testing.assert_close(initial.get_submodule(name).weight, w, rtol=0, atol=1e-6)


def test_loftq_refusals_are_one_line_and_change_nothing(tmp_path):
    from conftest import tiny_gpt2

    for bad, pattern in (
        (dict(), r"needs one: set quantize_base to one of \[.*\] \('nf4' is PEFT's loftq_bits=4\)"),
        (dict(quantize_base="int8", loftq_iter=0), r"loftq_iter=0 must be a positive integer"),
        (dict(quantize_base="int8", loftq_iter=True), r"loftq_iter=True must be a positive integer"),
    ):
        with pytest.raises(LoRAConfigError, match=pattern) as info:
            LoRAConfig(variant="loftq", **bad)
        assert "\n" not in str(info.value)
    for model, targets, pattern in (
        (tiny_model(), ["embed"], r"adapts whole nn\.Linear layers only"),
        (tiny_gpt2(), ["c_attn"], r"adapts whole nn\.Linear layers only"),
        (tiny_model(), ["classifier"], r"stores blocks of 64 values; classifier has 48, not a multiple"),
    ):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        fmt = "int8" if "embed" in targets or "c_attn" in targets else "bnb-nf4"
        if fmt == "bnb-nf4":
            pytest.importorskip("bitsandbytes")
        with pytest.raises(LoRAConfigError, match=pattern) as info:
            inject_lora(model, LoRAConfig(variant="loftq", targets=targets, r=2, quantize_base=fmt))
        assert "\n" not in str(info.value)
        assert not lora_layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model = tiny_model()
    inject_lora(model, LoRAConfig(variant="loftq", r=2, targets=["q"], quantize_base="int8"))
    with pytest.raises(LoRAConfigError, match=r"only plain LoRA adapters have an exact PEFT LoRA equivalent"):
        export_peft_adapter(model, tmp_path / "peft")
    with pytest.raises(LoRAConfigError, match="needs a quantized base"):
        LoftQLinear(nn.Linear(4, 4), 1, 1.0)


def test_both_are_options_of_the_callback_and_the_app_schema():
    from lora_lightning import LoRACallback
    from lora_lightning.config import all_option_defaults

    assert all_option_defaults()["loftq_iter"] == 1
    cb = LoRACallback(variant="loftq", quantize_base="int8", loftq_iter=2, verbose=False)
    assert cb.config.loftq_iter == 2 and type(cb.config).__name__ == "LoftQConfig"
    assert LoRACallback(variant="olora", verbose=False).config.variant == "olora"
