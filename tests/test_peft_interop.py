"""Export to / import from Hugging Face PEFT LoRA adapters, checked against PEFT itself."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import randomize_adapters
from lora_lightning import (
    AdapterFileError,
    LoRAConfig,
    LoRAConfigError,
    export_peft_adapter,
    import_peft_adapter,
    inject_lora,
    lora_layers,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 64


def bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


IDS = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


def test_export_bert_loads_in_peft_with_same_logits(tmp_path):
    m = bert()
    inject_lora(
        m,
        LoRAConfig(r=2, alpha=6, targets=["q", "v", "mlp"], rank_pattern={"value": 3}, modules_to_save=["classifier"]),
    )
    randomize_adapters(m)
    with torch.no_grad():
        m.classifier.weight.add_(0.5)
    ours = logits(m)
    assert (ours - logits(bert())).abs().max() > 1e-3
    export_peft_adapter(m, tmp_path / "a", base_model_name_or_path="tiny-bert")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (
        cfg["peft_type"] == "LORA"
        and cfg["r"] == 2
        and cfg["lora_alpha"] == 6
        and cfg["base_model_name_or_path"] == "tiny-bert"
    )
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert keys["base_model.model.bert.encoder.layer.0.attention.self.value.lora_B.weight"].shape == (16, 3)
    loaded = peft.PeftModel.from_pretrained(bert(), str(tmp_path / "a")).eval()
    torch.testing.assert_close(logits(loaded), ours, atol=1e-5, rtol=0)


def test_import_bert_adapter_made_by_peft(tmp_path):
    pm = peft.get_peft_model(
        bert(),
        peft.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            rank_pattern={"value": 3},
            alpha_pattern={"query": 8},
            use_rslora=True,
        ),
    )
    for name, p in pm.named_parameters():  # PEFT initialises B = 0: make the adapter non-trivial
        if "lora_B" in name or "modules_to_save" in name:
            torch.nn.init.normal_(p, std=0.3)
    pm.eval()
    expected = logits(pm)
    pm.save_pretrained(str(tmp_path / "p"))
    m = bert()
    assert (logits(m) - expected).abs().max() > 1e-3
    cfg = import_peft_adapter(m, tmp_path / "p")
    assert cfg.use_rslora and cfg.modules_to_save == ["classifier"]
    assert len(lora_layers(m)) == 4
    torch.testing.assert_close(logits(m), expected, atol=1e-5, rtol=0)


def test_gpt2_round_trips_both_ways_including_fused_q_v(tmp_path):
    # PEFT -> ours: PEFT adapts the whole Conv1D c_attn (fan_in_fan_out)
    pm = peft.get_peft_model(
        gpt2(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    )
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    pm.eval()
    expected = logits(pm)
    pm.save_pretrained(str(tmp_path / "p"))
    m = gpt2()
    import_peft_adapter(m, tmp_path / "p")
    torch.testing.assert_close(logits(m), expected, atol=1e-5, rtol=0)
    # ours (q and v blocks of c_attn only) -> PEFT: exact as a rank-2r c_attn adapter with zero k rows
    m = gpt2()
    inject_lora(m, LoRAConfig(r=2, alpha=4, targets=["q", "v"]))
    randomize_adapters(m)
    ours = logits(m)
    export_peft_adapter(m, tmp_path / "o")
    keys = load_file(tmp_path / "o" / "adapter_model.safetensors")
    b = keys["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert b.shape == (48, 4) and torch.count_nonzero(b[16:32]) == 0  # k rows are zero
    loaded = peft.PeftModel.from_pretrained(gpt2(), str(tmp_path / "o")).eval()
    torch.testing.assert_close(logits(loaded), ours, atol=1e-5, rtol=0)


def test_unsupported_peft_features_and_bad_directories_are_clear_errors(tmp_path):
    pm = peft.get_peft_model(bert(), peft.LoraConfig(r=2, target_modules=["query"], use_dora=True))
    pm.save_pretrained(str(tmp_path / "dora"))
    m = bert()
    with pytest.raises(LoRAConfigError, match="use_dora=True"):
        import_peft_adapter(m, tmp_path / "dora")
    assert not lora_layers(m)
    with pytest.raises(AdapterFileError, match="not a PEFT adapter directory"):
        import_peft_adapter(m, tmp_path)
    enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1)
    inject_lora(enc, LoRAConfig(r=2, targets=["q"]))
    with pytest.raises(LoRAConfigError, match="nn.MultiheadAttention"):
        export_peft_adapter(enc, tmp_path / "mha")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_adapter_trained_on_a_rewritten_base_is_refused_and_its_converted_form_imports(tmp_path, init):
    """PEFT's PiSSA/OLoRA adapters are trained against W0 − s·B0·A0, not W0: imported onto the original base they
    would give another model, so they are refused in one line naming PEFT's conversion; the converted adapter
    (plain LoRA of rank 2r for the original base) imports and gives PEFT's outputs."""
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=init)
    pm = peft.get_peft_model(bert(), cfg)
    pm.save_pretrained(str(tmp_path / "initial"))  # the adapter as initialised, for PEFT's conversion
    for name, p in pm.named_parameters():  # "train" it
        if "lora_" in name:
            p.data.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    pm.eval()
    expected = logits(pm)
    pm.save_pretrained(str(tmp_path / "raw"))
    m = bert()
    with pytest.raises(LoRAConfigError, match=rf"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion"):
        import_peft_adapter(m, tmp_path / "raw")
    assert not lora_layers(m)  # refused before anything changed
    pm.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    import_peft_adapter(m, tmp_path / "converted")
    torch.testing.assert_close(logits(m), expected, atol=1e-5, rtol=0)
