"""The LoRA layer math against independent computations (paper §4.1)."""

import math

import pytest
import torch
from torch import nn

from lora_lightning import LoRAConfig, LoRALinear, MergeStateError, RankTooLargeError, inject_lora


def make(d_in=12, d_out=10, r=4, alpha=8.0, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).to(dtype)
    return base, LoRALinear(base, r=r, alpha=alpha, **kw)


def test_initial_output_equals_base_exactly():
    base, layer = make()
    w0 = base.weight.detach().clone()
    x = torch.randn(5, 3, 12)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w0, base.bias))
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0


def test_forward_matches_formula():
    base, layer = make(r=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 12, dtype=torch.float64)
    W, b, A, B = (t.detach().double() for t in (base.weight, base.bias, layer.lora_A, layer.lora_B))
    expected = x @ W.T + b + (6.0 / 3) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


def test_keeps_base_parameters_without_copy():
    base, layer = make()
    assert layer.weight is base.weight and layer.bias is base.bias
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "lora_A", "lora_B"}


def test_merge_equals_adapted_and_unmerge_restores():
    base, layer = make(r=4, alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_()
    w0 = base.weight.detach().clone()
    x = torch.randn(9, 12)
    adapted = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), adapted, atol=1e-5, rtol=0)
    delta = (layer.lora_B @ layer.lora_A).detach() * 4.0
    torch.testing.assert_close(layer.weight.detach(), w0 + delta, atol=1e-6, rtol=0)
    layer.unmerge()
    assert (layer.weight.detach() - w0).abs().max() < 1e-6
    torch.testing.assert_close(layer(x), adapted, atol=1e-5, rtol=0)


def test_merge_twice_and_unmerge_unmerged_raise():
    _, layer = make()
    with pytest.raises(MergeStateError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(MergeStateError, match="already merged"):
        layer.merge()


@pytest.mark.parametrize(
    "spelling", [{}, {"use_rslora": True}, {"variant": "rslora"}], ids=["alpha/r", "use_rslora", "variant=rslora"]
)
def test_scaling_follows_the_config_into_the_forward(spelling):
    """The config decides the scale (alpha/r, or alpha/sqrt(r) for rsLoRA); the output is checked against
    the formula written out here, with the scale computed here."""
    torch.manual_seed(0)
    model = nn.Module()
    model.q_proj = nn.Linear(12, 10)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets=["q"], **spelling))
    layer = model.q_proj
    with torch.no_grad():
        layer.lora_B.normal_()
    expected_scale = 8 / math.sqrt(4) if spelling else 8 / 4
    x = torch.randn(3, 12)
    manual = x @ layer.weight.T + layer.bias + expected_scale * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), manual, atol=1e-5, rtol=0)
    assert layer.scaling == expected_scale


def test_gaussian_init_std():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(4096, 64), r=8, alpha=8, init="gaussian")
    assert abs(layer.lora_A.std().item() - 1 / 8) < 0.005
    torch.manual_seed(0)
    kaiming = LoRALinear(nn.Linear(4096, 64), r=8, alpha=8)
    bound = 1 / math.sqrt(4096)  # kaiming_uniform(a=sqrt(5)) == nn.Linear's default bound
    assert kaiming.lora_A.abs().max() <= bound and kaiming.lora_A.abs().max() > 0.9 * bound


@pytest.mark.parametrize("r", [1, 8, 64])
def test_gaussian_fan_in_init_has_kaimings_std_whatever_the_rank(r):
    layer = LoRALinear(
        nn.Linear(1024, 64), r=r, alpha=16, init="gaussian_fan_in", generator=torch.Generator().manual_seed(r)
    )
    A = layer.lora_A.detach()
    target = 1 / math.sqrt(3 * 1024)  # the std of U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert abs(A.std().item() - target) < 0.05 * target
    assert A.abs().max() > 1 / math.sqrt(1024)  # a Gaussian's tails pass the uniform bound (1024·r draws)
    assert torch.count_nonzero(layer.lora_B) == 0


def first_steps_effect(init: str, r: int) -> float:
    """||ΔW·x|| / ||x|| after 3 Adam steps (lr 1e-3, alpha 16) on a fixed regression problem."""
    gen = torch.Generator().manual_seed(0)
    x, target = torch.randn(256, 384, generator=gen), torch.randn(256, 384, generator=gen)
    base = nn.Linear(384, 384)
    with torch.no_grad():
        base.weight.copy_(torch.randn(384, 384, generator=gen) / 20)
        base.bias.zero_()
    layer = LoRALinear(base, r=r, alpha=16, init=init, generator=torch.Generator().manual_seed(r))
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        opt.step()
    with torch.no_grad():
        return ((x @ layer.delta_weight().T).norm() / x.norm()).item()


def test_gaussian_fan_in_makes_the_step_depend_on_the_rank_much_less_than_pefts_gaussian():
    # with alpha/r scaling: std 1/r -> the effect falls about as 1/r (64x over r = 1..64); a rank-independent
    # std (kaiming, gaussian_fan_in) -> about as 1/sqrt(r) (8x)
    spread = {
        init: first_steps_effect(init, 1) / first_steps_effect(init, 64)
        for init in ("gaussian", "gaussian_fan_in", "kaiming")
    }
    assert 25 < spread["gaussian"] < 150, spread
    assert 3 < spread["gaussian_fan_in"] < 15 and 3 < spread["kaiming"] < 15, spread


def test_rank_larger_than_matrix_raises():
    with pytest.raises(RankTooLargeError, match=r"r=11 .* min\(d_in, d_out\)=10"):
        make(r=11)


def test_low_precision_base_with_fp32_adapters():
    base, layer = make(dtype=torch.bfloat16, adapter_dtype=torch.float32)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.normal_()
    out = layer(x)
    assert out.dtype == torch.bfloat16
    ref = (x.float() @ base.weight.float().T + base.bias.float()) + layer.scaling * (
        x.float() @ layer.lora_A.T @ layer.lora_B.T
    ).detach()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.02)
    w0 = base.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    # bf16 round-off: one ulp-ish of |W| + |ΔW| at most
    tol = 2**-7 * (w0.float().abs() + layer.delta_weight().abs()).max()
    assert (layer.weight.float() - w0.float()).abs().max() <= tol


def test_dropout_only_on_adapter_path():
    base, layer = make(dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(64, 12)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(2)
    y2 = layer(x)
    assert not torch.allclose(y1, y2)
    # base path is untouched: the difference lies entirely in the column space of B
    diff = (y1 - y2).detach()
    proj = diff @ torch.linalg.pinv(layer.lora_B.detach()).T @ layer.lora_B.detach().T
    torch.testing.assert_close(proj, diff, atol=1e-4, rtol=1e-4)


def test_to_base_returns_plain_linear_of_same_class():
    mha_out = nn.modules.linear.NonDynamicallyQuantizableLinear(6, 6)
    layer = LoRALinear(mha_out, r=2, alpha=2)
    plain = layer.to_base()
    assert type(plain) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert plain.weight is mha_out.weight


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("train_bias,train_weight", [(False, False), (True, False), (True, True)])
def test_one_node_autograd_matches_the_composed_formula(dropout, train_bias, train_weight):
    """LoRALinear's single autograd node (LoRALinearFunction) against the same formula built from
    separate differentiable ops: outputs and every gradient, with and without adapter dropout."""
    torch.manual_seed(3)
    base = nn.Linear(12, 10).double()
    layer = LoRALinear(base, r=4, alpha=8.0, dropout=dropout).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.weight.requires_grad_(train_weight)
    layer.bias.requires_grad_(train_bias)
    params = [p for p in (layer.weight, layer.bias, layer.lora_A, layer.lora_B) if p.requires_grad]
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(9)
    y = layer(x)
    assert y.grad_fn is not None and "LoRALinearFunction" in type(y.grad_fn).__name__
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *params], g)

    torch.manual_seed(9)
    x_d = torch.nn.functional.dropout(x, dropout, True) if dropout > 0 else x
    ref_y = x @ layer.weight.T + layer.bias + (x_d @ layer.lora_A.T) @ layer.lora_B.T * (8.0 / 4)
    ref = torch.autograd.grad(ref_y, [x, *params], g)
    assert torch.allclose(y, ref_y, atol=1e-12)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_one_node_autograd_gradcheck_and_double_backward():
    from lora_lightning.layers import LoRALinearFunction

    torch.manual_seed(4)
    w, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    A = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    x_d = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    same = lambda x, A, B: LoRALinearFunction.apply(x, None, w, b, A, B, 1.7)  # noqa: E731
    apart = lambda x, x_d, A, B: LoRALinearFunction.apply(x, x_d, w, None, A, B, 0.3)  # noqa: E731
    assert torch.autograd.gradcheck(same, (x, A, B))
    assert torch.autograd.gradgradcheck(same, (x, A, B))
    assert torch.autograd.gradcheck(apart, (x, x_d, A, B))
    assert torch.autograd.gradgradcheck(apart, (x, x_d, A, B))


def test_autocast_and_mixed_dtypes_take_the_composed_path():
    base, layer = make()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and "LoRALinearFunction" not in type(y.grad_fn).__name__
    ref = x @ layer.weight.T + layer.bias + (x @ layer.lora_A.T) @ layer.lora_B.T * layer.scaling
    assert torch.allclose(y.float(), ref, atol=5e-2, rtol=2e-2)
    half_base, half = make(dtype=torch.bfloat16, adapter_dtype=torch.float32)  # bf16 base, fp32 adapters
    out = half(torch.randn(4, 12, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and "LoRALinearFunction" not in type(out.grad_fn).__name__


def test_torch_compile_fullgraph_matches_eager():
    """The adapted layer traces with dynamo in one graph (no break at the autograd Function) and
    gives the eager outputs and gradients; training mode with adapter dropout compiles too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    model[0] = LoRALinear(model[0], r=4, alpha=8.0, dropout=0.1)
    model[2] = LoRALinear(model[2], r=4, alpha=8.0)
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.lora_B)
        layer.weight.requires_grad_(False)
    x = torch.randn(5, 16)
    model.eval()
    ref = model(x)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)
    for p, g in zip([p for p in model.parameters() if p.requires_grad], ref_grads, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)
    model.train()
    torch.compile(model, backend="aot_eager", fullgraph=True)(x).sum().backward()
    assert model[0].lora_A.grad is not None


def test_init_seed_gives_each_adapter_its_own_stream():
    """§7.2 compares A matrices of runs with r=8 and r=64: drawn from the global RNG in the same state, the
    first rows of a higher-rank A are the lower-rank A itself; with init_seed each (seed, module, rank) has
    its own stream, independent of whatever used the global RNG before."""
    from conftest import tiny_model

    def first_A(r, **kw):
        model = tiny_model(0)  # tiny_model re-seeds the global RNG: both draws start from the same state
        inject_lora(model, LoRAConfig(r=r, targets=["q"], **kw))
        return model.layers[0].self_attn.q_proj.lora_A.detach().clone()

    assert torch.equal(first_A(16)[:4], first_A(4))  # the artefact, without init_seed
    a4, a16 = first_A(4, init_seed=1), first_A(16, init_seed=1)
    assert not torch.allclose(a16[:4], a4, atol=1e-3)
    assert torch.equal(first_A(4, init_seed=1), a4)  # reproducible
    torch.manual_seed(123)
    _ = torch.rand(1000)  # consumption of the global RNG does not matter
    assert torch.equal(first_A(4, init_seed=1), a4)
    assert not torch.allclose(first_A(4, init_seed=2), a4, atol=1e-3)
    g = first_A(16, init_seed=3, init="gaussian")
    assert abs(g.std().item() - 1 / 16) < 0.15 / 16  # N(0, 1/r): 256 draws
