"""LoRA on nn.Embedding and nn.Conv1d/2d/3d: the math against independent computations, merging,
files, PEFT interop and the inputs that are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_lightning import (
    LoRAConfig,
    LoRAConfigError,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from lora_lightning.layers import LoRAConv1d, LoRAConv2d, LoRAConv3d, LoRAEmbedding, is_lora_layer


class Net(nn.Module):
    def __init__(self, conv: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(20, 8, padding_idx=0)
        self.conv = conv if conv is not None else nn.Conv2d(3, 6, 3, padding=1, stride=2)
        self.proj = nn.Linear(8, 4)


def randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.normal_()
            layer.lora_B.normal_()


IDS = torch.tensor([[0, 3, 5, 19], [7, 0, 2, 2]])
IMG = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))


def test_embedding_starts_at_the_base_and_follows_its_formula():
    net = Net()
    base = net.embed_tokens.weight.detach().clone()
    inject_lora(net, LoRAConfig(r=3, alpha=6, targets=["embed"]))
    layer = net.embed_tokens
    assert isinstance(layer, LoRAEmbedding) and layer.lora_A.abs().sum() == 0 and layer.lora_B.abs().sum() > 0
    assert torch.equal(layer(IDS), base[IDS])  # A = 0: the base's lookup exactly
    randomize(net)
    delta = (layer.lora_B @ layer.lora_A).T * (6 / 3)  # num x dim, written out here
    torch.testing.assert_close(layer(IDS), (base + delta)[IDS], atol=1e-6, rtol=0)


def test_embedding_padding_row_gets_no_gradient_and_merges_exactly(tmp_path):
    net = Net()
    inject_lora(net, LoRAConfig(r=3, alpha=6, targets=["embed"]))
    randomize(net)
    net.embed_tokens(IDS).sum().backward()
    grad_A = net.embed_tokens.lora_A.grad
    assert grad_A[:, 0].abs().sum() == 0 and grad_A[:, 3].abs().sum() > 0  # padding_idx=0: no update, as nn.Embedding
    out = net.embed_tokens(IDS).detach()
    path = save_adapter(net, tmp_path / "e.safetensors")
    fresh = Net()
    load_adapter(fresh, path)
    assert torch.equal(fresh.embed_tokens(IDS), out)
    w0 = net.embed_tokens.weight.detach().clone()
    merge_lora(net)
    torch.testing.assert_close(net.embed_tokens(IDS), out, atol=1e-5, rtol=0)
    unmerge_lora(net)
    torch.testing.assert_close(net.embed_tokens.weight.detach(), w0, atol=1e-6, rtol=0)
    plain = merge_and_unload(net)
    assert type(plain.embed_tokens) is nn.Embedding and plain.embed_tokens.padding_idx == 0


@pytest.mark.parametrize(
    "conv, x",
    [
        (nn.Conv1d(3, 6, 5, padding=2, dilation=1), torch.randn(2, 3, 11)),
        (nn.Conv2d(3, 6, 3, padding=1, stride=2), IMG),
        (nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect", dilation=2), IMG),
        (nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1)), torch.randn(1, 2, 3, 6, 6)),
    ],
    ids=["conv1d", "conv2d-stride", "conv2d-reflect-dilation", "conv3d"],
)
def test_conv_formula_merge_and_only_adapters_train(conv, x):
    net = Net(conv)
    w0 = net.conv.weight.detach().clone()
    base_out = net.conv(x).detach()
    inject_lora(net, LoRAConfig(r=2, alpha=4, targets=["conv"]))
    layer = net.conv
    assert isinstance(layer, (LoRAConv1d, LoRAConv2d, LoRAConv3d))
    assert torch.equal(layer(x), base_out)  # B = 0
    assert layer.lora_A.shape == (2, conv.in_channels, *conv.kernel_size) and layer.lora_B.shape[:2] == (
        conv.out_channels,
        2,
    )
    randomize(net)
    # independent: the base convolution with W0 + (alpha/r)·B·A reshaped to the kernel
    delta = (layer.lora_B.reshape(conv.out_channels, 2) @ layer.lora_A.reshape(2, -1)).reshape(w0.shape) * 2.0
    reference = copy.deepcopy(conv)
    with torch.no_grad():
        reference.weight.copy_(w0 + delta)
    expected = reference(x)
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
    layer(x).square().sum().backward()
    assert all(
        (p.grad is not None) == ("lora_" in n)
        for n, p in net.named_parameters()
        if p.requires_grad or p.grad is not None
    )
    assert count_parameters(net).trainable == 2 * (
        conv.in_channels * int(torch.tensor(conv.kernel_size).prod()) + conv.out_channels
    )
    merge_lora(net)
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merge_and_unload(net).conv(x), expected, atol=1e-4, rtol=1e-4)


def test_all_linear_does_not_take_embeddings_or_convolutions():
    net = Net()
    inject_lora(net, LoRAConfig(r=2, targets=["all-linear"]))
    assert set(lora_layers(net)) == {"proj"}


def test_grouped_convolution_is_refused_before_any_change():
    """bad input: `targets=["conv"]` on a grouped `nn.Conv2d(4, 8, 3, groups=2)`"""
    grouped = Net(nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(LoRAConfigError, match=r"conv is a grouped convolution \(groups=2\)"):
        inject_lora(grouped, LoRAConfig(r=2, targets=["conv"]))
    assert type(grouped.conv) is nn.Conv2d


def test_embedding_with_max_norm_is_refused():
    """bad input: `targets=["embed"]` on an `nn.Embedding(..., max_norm=1.0)` (renormalises rows in forward)"""
    net = Net()
    net.embed_tokens = nn.Embedding(20, 8, max_norm=1.0)
    with pytest.raises(LoRAConfigError, match="max_norm=1.0: it renormalises embedding rows"):
        inject_lora(net, LoRAConfig(r=2, targets=["embed"]))
    assert type(net.embed_tokens) is nn.Embedding


def test_embedding_with_padding_idx_keeps_the_padding_vector():
    """bad input: `targets=["embed"]` on an `nn.Embedding(..., padding_idx=0)`: accepted, the padding row is never
    adapted"""
    net = Net()
    inject_lora(net, LoRAConfig(r=2, targets=["embed"]))
    pad = net.embed_tokens.weight[0].detach().clone()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        net.embed_tokens(IDS).square().sum().backward()
        opt.step()
    merge_lora(net)
    assert torch.equal(net.embed_tokens.weight[0], pad) and not torch.equal(
        net.embed_tokens.weight[3], Net().embed_tokens.weight[3]
    )


def test_variant_on_an_embedding_is_refused():
    """bad input: `LoRAConfig(variant="dora", targets=["embed"])`: variants adapt nn.Linear layers only"""
    with pytest.raises(LoRAConfigError, match="adapts whole nn.Linear layers only"):
        inject_lora(Net(), LoRAConfig(variant="dora", r=2, targets=["embed"]))


def test_conv_lora_digits_example_runs():
    pytest.importorskip("sklearn")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "digits", Path(__file__).parent.parent / "examples" / "conv_lora_digits.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    table = example.main(["--quick", "--seeds", "1"])
    rows = [line for line in table.splitlines() if line.startswith("| ") and "method" not in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| LoRA r=4 on conv1-3 + new head",
        "| full fine-tuning",
        "| head only",
    ]
    r = 4  # r·(in·3·3 + out) per convolution, plus the new head
    assert rows[0].split(" | ")[1] == f"{r * (9 * 1 + 16) + r * (9 * 16 + 32) + r * (9 * 32 + 32) + 32 * 5 + 5:,}"


def test_embedding_and_conv_round_trip_through_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from lora_lightning import export_peft_adapter, import_peft_adapter

    class Both(Net):
        def forward(self, ids, img):
            return self.proj(self.embed_tokens(ids)), self.conv(img)

    net, base = Both(), Both()
    inject_lora(net, LoRAConfig(r=2, alpha=4, targets=["embed", "conv", "proj"]))
    randomize(net)
    export_peft_adapter(net, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        for ours, other in zip(net(IDS, IMG), theirs(IDS, IMG), strict=True):
            torch.testing.assert_close(other, ours, atol=1e-5, rtol=0)
    back = copy.deepcopy(base)
    import_peft_adapter(back, tmp_path / "peft")
    with torch.no_grad():
        for ours, other in zip(net(IDS, IMG), back(IDS, IMG), strict=True):
            torch.testing.assert_close(other, ours, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "family, name",
    [
        ("bert", "bert.embeddings.word_embeddings"),
        ("gpt2", "transformer.wte"),
        ("llama", "model.embed_tokens"),
        ("t5", "shared"),
    ],
)
def test_embed_alias_on_hugging_face_families(family, name):
    transformers = pytest.importorskip("transformers")
    cfgs = {
        "bert": lambda: transformers.BertForSequenceClassification(
            transformers.BertConfig(
                vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
            )
        ),
        "gpt2": lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
        ),
        "llama": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=50,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
            )
        ),
        "t5": lambda: transformers.T5ForConditionalGeneration(
            transformers.T5Config(vocab_size=50, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2)
        ),
    }
    torch.manual_seed(0)
    model = cfgs[family]().eval()
    ids = torch.randint(1, 50, (2, 5))
    kw = {"decoder_input_ids": ids} if family == "t5" else {}
    with torch.no_grad():  # (with grad on, the adapter's requires_grad can switch attention kernels: ~1e-7)
        before = model(input_ids=ids, **kw).logits
    inject_lora(model, LoRAConfig(r=2, targets=["embed"]))
    assert list(lora_layers(model)) == [name]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, **kw).logits, before, atol=0, rtol=0)


def test_modules_sharing_one_weight_share_one_adapter_and_merge_once(tmp_path):
    """T5's shared, encoder.embed_tokens and decoder.embed_tokens are three modules holding one weight: they
    get one adapter (owned by the first, read by the others), so merging folds its update into the weight once."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=50, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2)

    def t5() -> nn.Module:
        model = transformers.T5ForConditionalGeneration(cfg).eval()
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie the output head
        return model

    model = t5()
    assert model.encoder.embed_tokens.weight is model.shared.weight and model.encoder.embed_tokens is not model.shared
    ids = torch.randint(1, 50, (2, 5))
    inject_lora(model, LoRAConfig(r=2, targets=["encoder.embed_tokens"]))  # one of the three names
    assert is_lora_layer(model.shared) and list(lora_layers(model)) == ["shared"]
    for follower in (model.encoder.embed_tokens, model.decoder.embed_tokens):
        assert follower is not model.shared and follower.lora_tie == (model.shared, False)
        assert follower.weight is model.shared.weight
    randomize(model)
    with torch.no_grad():
        adapted = model(input_ids=ids, decoder_input_ids=ids).logits
        path = save_adapter(model, tmp_path / "t5.safetensors")
        merge_lora(model)
        torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits, adapted, atol=1e-5, rtol=0)
    plain = merge_and_unload(model)
    assert all(type(m) is nn.Embedding for m in (plain.shared, plain.encoder.embed_tokens, plain.decoder.embed_tokens))
    assert plain.shared.weight is plain.encoder.embed_tokens.weight is plain.decoder.embed_tokens.weight  # still tied
    torch.manual_seed(0)
    fresh = t5()
    load_adapter(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids, decoder_input_ids=ids).logits, adapted, atol=0, rtol=0)


def test_merging_a_weight_tied_to_a_module_the_adapter_does_not_wrap_is_refused():
    """bad input: `merge_lora` of GPT-2 with `targets=["embed"]` (wte's weight is tied to lm_head): refused, unmerged
    it is right"""
    transformers = pytest.importorskip("transformers")
    from lora_lightning import MergeStateError, merged_state_dict

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    )
    inject_lora(model, LoRAConfig(r=2, targets=["embed"]))
    before = model.transformer.wte.weight.detach().clone()
    with pytest.raises(MergeStateError, match=r"transformer.wte is tied to \['lm_head'\]"):
        merge_lora(model)
    with pytest.raises(MergeStateError, match="tied"):
        merged_state_dict(model)
    assert torch.equal(model.transformer.wte.weight, before) and not model.transformer.wte.merged
