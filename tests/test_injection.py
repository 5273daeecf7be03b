"""Target resolution, freezing and parameter counts."""

import pytest
import torch
from torch import nn

from conftest import N_LAYERS, tiny_batch, tiny_model
from lora_lightning import (
    AlreadyInjectedError,
    LoRAConfig,
    LoRAConfigError,
    LoRALinear,
    RankTooLargeError,
    TargetNotFoundError,
    count_parameters,
    inject_lora,
    lora_layers,
    lora_parameter_count,
    plan_injection,
)
from lora_lightning.plan import block_index, compile_pattern, summarize_names


def names_for(model, **kw):
    return [s.name for s in plan_injection(model, LoRAConfig(**kw))]


def bert_like(n_layers=2, d=8):
    """A module tree with BERT's names (attention.output.dense vs output.dense)."""

    def layer():
        m = nn.Module()
        m.attention = nn.Module()
        m.attention.self = nn.Module()
        for n in ("query", "key", "value"):
            setattr(m.attention.self, n, nn.Linear(d, d))
        m.attention.output = nn.Module()
        m.attention.output.dense = nn.Linear(d, d)
        m.intermediate = nn.Module()
        m.intermediate.dense = nn.Linear(d, 4 * d)
        m.output = nn.Module()
        m.output.dense = nn.Linear(4 * d, d)
        return m

    root = nn.Module()
    root.encoder = nn.Module()
    root.encoder.layer = nn.ModuleList(layer() for _ in range(n_layers))
    root.pooler = nn.Module()
    root.pooler.dense = nn.Linear(d, d)
    root.classifier = nn.Linear(d, 2)
    return root


def test_aliases_on_bert_names_distinguish_attention_output_from_ffn_output():
    m = bert_like()
    assert names_for(m, targets=["o"]) == [f"encoder.layer.{i}.attention.output.dense" for i in range(2)]
    assert names_for(m, targets=["mlp"]) == [
        n for i in range(2) for n in (f"encoder.layer.{i}.intermediate.dense", f"encoder.layer.{i}.output.dense")
    ]
    assert names_for(m, targets=["q", "v"]) == [
        f"encoder.layer.{i}.attention.self.{p}" for p in ("query", "value") for i in range(2)
    ]
    # all-linear skips heads (pooler, classifier)
    assert len(names_for(m, targets=["all-linear"])) == 2 * 6


def test_aliases_on_llama_and_t5_style_names():
    m = tiny_model()
    assert names_for(m, targets=["q", "k", "v", "o"]) == [
        f"layers.{i}.self_attn.{p}_proj" for p in "qkvo" for i in range(N_LAYERS)
    ]
    assert names_for(m, targets=["mlp"]) == [
        f"layers.{i}.mlp.{p}" for i in range(N_LAYERS) for p in ("up_proj", "down_proj")
    ]
    t5 = nn.Module()
    t5.block = nn.ModuleList([nn.Module()])
    t5.block[0].SelfAttention = nn.Module()
    for p in "qkvo":
        setattr(t5.block[0].SelfAttention, p, nn.Linear(8, 8, bias=False))
    t5.block[0].DenseReluDense = nn.Module()
    t5.block[0].DenseReluDense.wi = nn.Linear(8, 16)
    t5.block[0].DenseReluDense.wo = nn.Linear(16, 8)
    assert names_for(t5, targets=["o"]) == ["block.0.SelfAttention.o"]
    assert names_for(t5, targets=["mlp"]) == ["block.0.DenseReluDense.wi", "block.0.DenseReluDense.wo"]


def test_suffix_glob_and_regex_targets():
    m = tiny_model()
    assert names_for(m, targets=["self_attn.q_proj"]) == [f"layers.{i}.self_attn.q_proj" for i in range(N_LAYERS)]
    assert names_for(m, targets=["layers.1.*_proj"]) == [f"layers.1.self_attn.{p}_proj" for p in "qkvo"] + [
        "layers.1.mlp.up_proj",
        "layers.1.mlp.down_proj",
    ]
    assert names_for(m, targets=[r"re:layers\.[02]\.self_attn\.v_proj"]) == [
        "layers.0.self_attn.v_proj",
        "layers.2.self_attn.v_proj",
    ]
    assert compile_pattern("query")("a.query") and not compile_pattern("query")("a.subquery")


def test_layers_selection_including_negative_indices():
    m = tiny_model()
    assert names_for(m, targets=["q"], layers=[0, -1]) == ["layers.0.self_attn.q_proj", "layers.2.self_attn.q_proj"]
    with pytest.raises(LoRAConfigError, match=r"block\(s\) \[7\] do not exist.*available blocks: \[0, 1, 2\]"):
        names_for(m, targets=["q"], layers=[7])
    assert block_index("model.layers.12.q") == 12 and block_index("classifier") is None


def test_rank_and_alpha_patterns():
    m = tiny_model()
    specs = plan_injection(
        m, LoRAConfig(r=2, alpha=4, targets=["q", "v"], rank_pattern={"v": 8, "layers.0.*": 1}, alpha_pattern={"v": 16})
    )
    by_name = {s.name: (s.r, s.alpha) for s in specs}
    assert by_name["layers.0.self_attn.q_proj"] == (1, 4)
    assert by_name["layers.1.self_attn.q_proj"] == (2, 4)
    assert by_name["layers.1.self_attn.v_proj"] == (8, 16)
    assert by_name["layers.0.self_attn.v_proj"] == (8, 16)  # first matching pattern wins
    with pytest.raises(TargetNotFoundError, match="pattern 'mlp' matches none of the adapted modules"):
        plan_injection(m, LoRAConfig(targets=["q"], rank_pattern={"mlp": 4}))


def test_unmatched_target_lists_candidates():
    with pytest.raises(TargetNotFoundError) as err:
        inject_lora(tiny_model(), LoRAConfig(targets=["query"]))
    msg = str(err.value)
    assert "'query' matched no Linear module" in msg
    assert "layers.{i}.self_attn.q_proj" in msg and "classifier" in msg
    with pytest.raises(
        TargetNotFoundError, match="which are not layers LoRA adapts.*target the adaptable layers inside them"
    ):
        inject_lora(tiny_model(), LoRAConfig(targets=["self_attn"]))


def test_bad_config_values_raise_with_fix():
    for kwargs, pattern in [
        (dict(r=0), "r=0 is not a positive integer"),
        (dict(r=-3), "r=-3"),
        (dict(r=2.5), "r=2.5"),
        (dict(alpha=0), "alpha=0 must be a positive number"),
        (dict(dropout=1.0), r"dropout=1.0 is outside \[0, 1\)"),
        (dict(dropout=-0.1), "dropout=-0.1"),
        (dict(bias="some"), "bias='some' is not one of"),
        (dict(targets=[]), "non-empty list"),
        (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\]=0"),
    ]:
        with pytest.raises(LoRAConfigError, match=pattern):
            LoRAConfig(**kwargs)
    with pytest.raises(LoRAConfigError, match="unknown LoRA option.*'rank'"):
        LoRAConfig.from_dict({"rank": 4})


def test_rank_too_large_leaves_model_untouched():
    m = tiny_model()
    with pytest.raises(RankTooLargeError, match=r"r=17 is larger than min\(d_in, d_out\)=16"):
        inject_lora(m, LoRAConfig(r=17, targets=["q"]))
    assert not lora_layers(m)
    assert all(p.requires_grad for p in m.parameters())


def test_double_injection_raises():
    m = tiny_model()
    inject_lora(m, LoRAConfig(targets=["q"]))
    with pytest.raises(AlreadyInjectedError, match="already has LoRA adapters on 3 module"):
        inject_lora(m, LoRAConfig(targets=["v"]))
    assert len(lora_layers(m)) == 3


def test_multihead_attention_out_proj_is_adapted_not_silently_ignored():
    # MHA's forward reads out_proj.weight directly: the MHA is wrapped so ΔW_o is used (see test_fused.py)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
    inject_lora(enc, LoRAConfig(r=2, targets=["o"]))
    assert sorted(lora_layers(enc)) == [f"layers.{i}.self_attn.out_proj" for i in range(2)]
    assert all(type(layer.self_attn).__name__ == "LoRAMultiheadAttention" for layer in enc.layers)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
    inject_lora(enc, LoRAConfig(r=2, targets=["mlp"]))  # linear1/linear2 are real Linear calls
    assert sorted(lora_layers(enc)) == [f"layers.{i}.linear{j}" for i in range(2) for j in (1, 2)]


def test_parameter_counts_match_closed_form():
    m = tiny_model()
    total_before = sum(p.numel() for p in m.parameters())
    specs = inject_lora(m, LoRAConfig(r=4, targets=["q", "v", "mlp"]))
    d = 16
    expected = N_LAYERS * (2 * 4 * (d + d) + 4 * (d + 4 * d) + 4 * (4 * d + d))
    counts = count_parameters(m)
    assert lora_parameter_count(specs) == expected
    assert counts.lora == expected == counts.trainable
    assert counts.total == total_before + expected


def test_only_adapters_get_gradients():
    m = tiny_model()
    inject_lora(m, LoRAConfig(r=2, targets=["q", "v"]))
    for layer in lora_layers(m).values():  # make B non-zero so A gets a gradient too
        torch.nn.init.normal_(layer.lora_B)
    ids, y = tiny_batch()
    torch.nn.functional.cross_entropy(m(ids), y).backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == {
        f"layers.{i}.self_attn.{p}_proj.lora_{ab}" for i in range(N_LAYERS) for p in "qv" for ab in "AB"
    }
    assert all(m.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)


@pytest.mark.parametrize(
    "bias, expected_bias",
    [("none", set()), ("lora_only", {f"layers.{i}.self_attn.q_proj.bias" for i in range(N_LAYERS)}), ("all", "ALL")],
)
def test_bias_options_and_modules_to_save(bias, expected_bias):
    m = tiny_model()
    inject_lora(m, LoRAConfig(r=2, targets=["q"], bias=bias, modules_to_save=["classifier"]))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_" in n}
    head = {"classifier.weight", "classifier.bias"}
    all_bias = {n for n, _ in m.named_parameters() if n.endswith(".bias")}
    want_bias = all_bias if expected_bias == "ALL" else expected_bias
    assert trainable == lora | head | want_bias
    assert len(lora) == 2 * N_LAYERS


def test_modules_to_save_is_not_also_adapted():
    m = tiny_model()
    names = names_for(m, targets=["all-linear"], modules_to_save=["layers.0"])
    assert not any(n.startswith("layers.0.") for n in names)
    with pytest.raises(TargetNotFoundError, match="modules_to_save entry 'head'.*Top-level modules"):
        names_for(m, targets=["q"], modules_to_save=["head"])


def test_summarize_names_folds_indices():
    assert summarize_names(["a.0.q", "a.1.q", "a.10.k"]) == "a.{i}.q, a.{i}.k"


def test_injection_into_hf_bert_if_available():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 64, (2, 5))
    before = model(input_ids=ids).logits
    inject_lora(model, LoRAConfig(r=2, targets=["q", "k", "v", "o"], modules_to_save=["classifier"]))
    assert len(lora_layers(model)) == 4 * 2
    assert all(isinstance(m, LoRALinear) for m in lora_layers(model).values())
    assert torch.equal(model(input_ids=ids).logits, before)
