"""GPT-2 Conv1D (fan_in_fan_out), fused [q;k;v] projections and nn.MultiheadAttention."""

import contextlib

import pytest
import torch
from torch import nn
from torch.profiler import profile

from conftest import randomize_adapters
from lora_lightning import (
    LoRAConfig,
    LoRAConfigError,
    RankTooLargeError,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_layers,
    lora_parameter_count,
    merge_and_unload,
    merge_lora,
    merged_state_dict,
    register_fused_layout,
    save_adapter,
    unmerge_lora,
)
from lora_lightning.layers import LoRAConv1D, LoRAMultiheadAttention
from lora_lightning.plan import FUSED_LAYOUTS

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

D, HEADS = 16, 2


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=D, n_head=HEADS, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2Model(cfg).eval()


def ids(n=2, t=5, seed=1):
    return torch.randint(0, 40, (n, t), generator=torch.Generator().manual_seed(seed))


def qkv_of(model, x, layer=0):
    """The fused c_attn output of block ``layer`` for hidden states ``x``, split into q, k, v."""
    return model.h[layer].attn.c_attn(x).split(D, dim=-1)


# --------------------------------------------------------------------------- Conv1D
def test_conv1d_forward_and_merge_match_hand_computation():
    torch.manual_seed(0)
    base = Conv1D(24, 12)  # nf=24 outputs, nx=12 inputs, weight stored 12 x 24
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRAConv1D(base, r=3, alpha=6)
    x = torch.randn(4, 5, 12)
    assert torch.equal(layer(x), base(x))  # B = 0: exactly the base
    torch.nn.init.normal_(layer.lora_B)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    expected = x @ w0 + b0 + 2.0 * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    layer.merge()
    torch.testing.assert_close(layer.weight.detach(), w0 + 2.0 * (B @ A).T, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.weight.detach(), w0, atol=1e-6, rtol=0)
    plain = layer.to_base()
    assert type(plain) is Conv1D and plain.nf == 24 and plain.nx == 12 and plain.weight is layer.weight


def test_conv1d_gradients_match_hand_computation_including_a_trained_base():
    """The one-node autograd path on Conv1D's transposed weight: every gradient against the
    same formula written with separate ops (base weight and bias trained too)."""
    torch.manual_seed(1)
    base = Conv1D(7, 5).double()
    layer = LoRAConv1D(base, r=2, alpha=3).double()
    torch.nn.init.normal_(layer.lora_B)
    params = [layer.weight, layer.bias, layer.lora_A, layer.lora_B]
    for p in params:
        p.requires_grad_(True)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, 7, dtype=torch.float64)
    y = layer(x)
    got = torch.autograd.grad(y, [x, *params], g)
    ref_y = x @ layer.weight + layer.bias + 1.5 * (x @ layer.lora_A.T @ layer.lora_B.T)
    ref = torch.autograd.grad(ref_y, [x, *params], g)
    torch.testing.assert_close(y, ref_y, atol=1e-12, rtol=0)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_gpt2_conv1d_targets_merge_save_load_and_merged_state_dict(tmp_path):
    m = gpt2()
    x = ids()
    base = m(x).last_hidden_state
    inject_lora(m, LoRAConfig(r=2, targets=["o", "mlp"]))
    assert set(lora_layers(m)) == {f"h.{i}.{n}" for i in range(2) for n in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert all(isinstance(layer, LoRAConv1D) for layer in lora_layers(m).values())
    assert torch.equal(m(x).last_hidden_state, base)
    randomize_adapters(m)
    adapted = m(x).last_hidden_state
    assert (adapted - base).abs().max() > 1e-3
    # merged_state_dict folds ΔWᵀ into the stored (d_in x d_out) weight: a plain GPT-2 reproduces the output
    plain = gpt2()
    plain.load_state_dict(merged_state_dict(m))
    torch.testing.assert_close(plain(x).last_hidden_state, adapted, atol=1e-5, rtol=0)
    path = save_adapter(m, tmp_path / "gpt2.safetensors")
    fresh = gpt2()
    load_adapter(fresh, path)
    assert torch.equal(fresh(x).last_hidden_state, adapted)
    merge_and_unload(m)
    assert all(type(m.h[i].mlp.c_fc) is Conv1D for i in range(2))
    torch.testing.assert_close(m(x).last_hidden_state, adapted, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- fused c_attn
def test_gpt2_q_v_adapt_only_their_blocks_of_c_attn():
    m = gpt2()
    h = torch.randn(2, 5, D)
    q0, k0, v0 = (t.detach().clone() for t in qkv_of(m, h))
    w0, b0 = m.h[0].attn.c_attn.weight.detach().clone(), m.h[0].attn.c_attn.bias.detach().clone()
    specs = inject_lora(m, LoRAConfig(r=2, alpha=4, targets=["q", "v"]))
    assert [(s.name, s.parts) for s in specs] == [(f"h.{i}.attn.c_attn", ("q", "v")) for i in range(2)]
    layer = m.h[0].attn.c_attn
    assert layer.lora_A.shape == (2 * 2, D) and layer.lora_B.shape == (2 * D, 2)  # loralib MergedLinear layout
    randomize_adapters(m)
    q, k, v = qkv_of(m, h)
    assert torch.equal(k, k0)  # the un-adapted block is bit-identical to the base
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    for out, base_out, i in ((q, q0, 0), (v, v0, 1)):
        A_i, B_i = A[2 * i : 2 * i + 2], B[D * i : D * (i + 1)]
        torch.testing.assert_close(out, base_out + 2.0 * (h @ A_i.T @ B_i.T), atol=1e-5, rtol=0)
    # merge: stored weight (d_in x 3D) gets [ΔWq; 0; ΔWv]ᵀ
    merge_lora(m)
    dq, dv = 2.0 * (B[:D] @ A[:2]), 2.0 * (B[D:] @ A[2:])
    expected = w0 + torch.cat([dq, torch.zeros(D, D), dv]).T
    torch.testing.assert_close(layer.weight.detach(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat(qkv_of(m, h), -1), torch.cat([q, k, v], -1), atol=1e-5, rtol=0)
    assert torch.equal(layer.bias.detach(), b0)


def test_fused_parameter_count_is_per_block_closed_form():
    m = gpt2()
    total = sum(p.numel() for p in m.parameters())
    r = 2
    specs = inject_lora(m, LoRAConfig(r=r, targets=["q", "v"]))
    expected = 2 * 2 * r * (D + D)  # 2 blocks x (q, v) x r·(d_in + d_out_slice)
    assert lora_parameter_count(specs) == expected == count_parameters(m).lora == count_parameters(m).trainable
    assert count_parameters(m).total == total + expected


def test_whole_c_attn_by_name_and_all_linear_use_one_full_adapter():
    m = gpt2()
    specs = inject_lora(m, LoRAConfig(r=2, targets=["c_attn"]))
    assert all(s.parts == () and s.d_out == 3 * D for s in specs)
    assert m.h[0].attn.c_attn.lora_B.shape == (3 * D, 2) and m.h[0].attn.c_attn.fused is None
    m2 = gpt2()
    names = {s.name: s.parts for s in inject_lora(m2, LoRAConfig(r=2, targets=["all-linear", "q"]))}
    assert names["h.0.attn.c_attn"] == ()  # the whole matrix wins over one of its blocks


def test_nanogpt_style_linear_c_attn_and_registered_layout():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(D, 3 * D)
            self.gqa_qkv = nn.Linear(D, D + 4 + 4)  # 16 q rows, 4 k rows, 4 v rows

    torch.manual_seed(0)
    m = nn.Module()
    m.attn = Attn()
    x = torch.randn(3, D)
    base = m.attn.c_attn(x).detach()
    inject_lora(m, LoRAConfig(r=2, targets=["k"]))
    randomize_adapters(m)
    out = m.attn.c_attn(x)
    assert torch.equal(out[:, :D], base[:, :D]) and torch.equal(out[:, 2 * D :], base[:, 2 * D :])
    assert (out[:, D : 2 * D] - base[:, D : 2 * D]).abs().max() > 1e-3
    with pytest.raises(LoRAConfigError, match="one positive row count per part"):
        register_fused_layout("gqa_qkv", ["q", "k", "v"], [16, 4])
    n_before = len(FUSED_LAYOUTS)
    register_fused_layout("gqa_qkv", ["q", "k", "v"], [16, 4, 4])
    try:
        m2 = nn.Module()
        m2.attn = Attn()
        specs = {s.name: s for s in inject_lora(m2, LoRAConfig(r=2, targets=["v"]))}
        assert specs["attn.gqa_qkv"].d_out == 4 and specs["attn.gqa_qkv"].parts == ("v",)
        with pytest.raises(RankTooLargeError, match="per fused block"):
            m3 = nn.Module()
            m3.attn = Attn()
            inject_lora(m3, LoRAConfig(r=5, targets=["v"]))
    finally:
        del FUSED_LAYOUTS[: len(FUSED_LAYOUTS) - n_before]


def test_fused_size_not_divisible_is_a_clear_error():
    m = nn.Module()
    m.qkv = nn.Linear(8, 10)
    with pytest.raises(LoRAConfigError, match="does not split into 3 equal blocks"):
        inject_lora(m, LoRAConfig(r=1, targets=["q"]))
    assert type(m.qkv) is nn.Linear


# --------------------------------------------------------------------------- nn.MultiheadAttention
@contextlib.contextmanager
def slow_path_no_grad():
    """no_grad without PyTorch's fused MHA kernel, so the base runs the same ops as the LoRA host."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def reference_mha(mha, d_in=None, d_out=None):
    """An independent plain MHA with W_in + ΔW_in and W_o + ΔW_o written into its weights."""
    ref = nn.MultiheadAttention(mha.embed_dim, mha.num_heads, batch_first=mha.batch_first)
    with torch.no_grad():
        ref.in_proj_weight.copy_(mha.in_proj_weight + (d_in if d_in is not None else 0))
        ref.in_proj_bias.copy_(mha.in_proj_bias)
        ref.out_proj.weight.copy_(mha.out_proj.weight + (d_out if d_out is not None else 0))
        ref.out_proj.bias.copy_(mha.out_proj.bias)
    return ref.eval()


@pytest.mark.parametrize("targets", [["q"], ["k"], ["v"], ["o"], ["q", "k", "v", "o"]])
def test_multihead_attention_each_projection_is_adapted(targets):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, HEADS, batch_first=True).eval()
    x = torch.randn(2, 5, D)
    with slow_path_no_grad():
        base = mha(x, x, x)[0]
    root = nn.Module()
    root.attn = mha
    inject_lora(root, LoRAConfig(r=2, alpha=2, targets=targets))
    host = root.attn
    assert isinstance(host, LoRAMultiheadAttention)
    with slow_path_no_grad():
        # ΔW = 0 is materialised into a fresh weight tensor, and CPU matmul kernels round differently
        # for differently aligned buffers: equal up to float32 round-off, not bitwise
        torch.testing.assert_close(host(x, x, x)[0], base, atol=1e-6, rtol=0)
    randomize_adapters(root)
    d_in = torch.zeros(3 * D, D)
    if "lora_A" in host._parameters:
        A, B = host.lora_A.detach(), host.lora_B.detach()
        adapted = [p for p in "qkv" if p in targets]
        for j, p in enumerate(adapted):
            row = "qkv".index(p) * D
            d_in[row : row + D] = B[j * D : (j + 1) * D] @ A[2 * j : 2 * j + 2]
    d_out = None
    if "o" in targets:
        d_out = host.out_proj.lora_B.detach() @ host.out_proj.lora_A.detach()
    expected = reference_mha(host, d_in, d_out)(x, x, x)[0]
    got = host(x, x, x)[0]
    assert (got - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # gradients reach exactly the adapters
    got.sum().backward()
    with_grad = {n for n, p in root.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n for n in with_grad)


def test_transformer_encoder_merge_and_unload_restores_plain_mha_and_fast_path():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, HEADS, 32, batch_first=True, dropout=0.0), 2).eval()
    keys = list(enc.state_dict())
    x = torch.randn(3, 5, D)
    inject_lora(enc, LoRAConfig(r=2, targets=["q", "v", "o", "mlp"]))
    randomize_adapters(enc)
    adapted = enc(x).detach()
    with torch.no_grad(), profile() as prof:  # unmerged: the fused kernel would skip ΔW, so it must not run
        unmerged_nograd = enc(x)
    assert "aten::_transformer_encoder_layer_fwd" not in {e.name for e in prof.events()}
    torch.testing.assert_close(unmerged_nograd, adapted, atol=1e-5, rtol=0)
    merge_and_unload(enc)
    assert type(enc.layers[0].self_attn) is nn.MultiheadAttention and type(enc.layers[0].linear1) is nn.Linear
    assert list(enc.state_dict()) == keys and enc.use_nested_tensor
    with torch.no_grad(), profile() as prof:
        merged = enc(x)
    assert "aten::_transformer_encoder_layer_fwd" in {e.name for e in prof.events()}
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=0)


def test_multihead_attention_merge_unmerge_round_trip_and_padding_mask():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, HEADS, 32, batch_first=True, dropout=0.0), 1).eval()
    w0 = enc.layers[0].self_attn.in_proj_weight.detach().clone()
    x = torch.randn(2, 5, D)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    inject_lora(enc, LoRAConfig(r=2, targets=["k", "o"]))
    randomize_adapters(enc)
    with torch.no_grad():  # padded input would take the nested-tensor path of a plain encoder
        adapted = enc(x, src_key_padding_mask=pad)
        merge_lora(enc)
        torch.testing.assert_close(enc(x, src_key_padding_mask=pad)[0], adapted[0], atol=1e-5, rtol=0)
    unmerge_lora(enc)
    torch.testing.assert_close(enc.layers[0].self_attn.in_proj_weight.detach(), w0, atol=1e-6, rtol=0)


def test_multihead_attention_with_separate_kv_dims():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, HEADS, kdim=8, vdim=8, batch_first=True)
    root = nn.Module()
    root.attn = mha
    with pytest.raises(LoRAConfigError, match="kdim/vdim != embed_dim"):
        inject_lora(root, LoRAConfig(r=2, targets=["q"]))
    assert type(root.attn) is nn.MultiheadAttention
    inject_lora(root, LoRAConfig(r=2, alpha=4, targets=["o"]))  # out_proj still works
    q, kv = torch.randn(2, 3, D), torch.randn(2, 4, 8)
    base = mha(q, kv, kv)[0].detach()
    torch.testing.assert_close(root.attn(q, kv, kv)[0], base, atol=1e-6, rtol=0)
    randomize_adapters(root)
    out_proj = root.attn.out_proj
    # independent reference: a plain MHA with separate q/k/v weights and Wo + (alpha/r)·B·A written out here
    ref = nn.MultiheadAttention(D, HEADS, kdim=8, vdim=8, batch_first=True)
    with torch.no_grad():
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            getattr(ref, name).copy_(getattr(mha, name))
        ref.out_proj.weight.copy_(out_proj.weight + (4 / 2) * out_proj.lora_B @ out_proj.lora_A)  # alpha/r = 4/2
        ref.out_proj.bias.copy_(out_proj.bias)
    expected = ref(q, kv, kv)[0]
    assert (expected - base).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(root.attn(q, kv, kv)[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(merge_and_unload(root).attn(q, kv, kv)[0], expected, atol=1e-5, rtol=0)
