"""The q/k/v/o/mlp aliases on tiny randomly initialised Hugging Face models of each common family."""

import pytest
import torch

from conftest import randomize_adapters
from lora_lightning import LoRAConfig, inject_lora, lora_layers, merge_lora, plan_injection

transformers = pytest.importorskip("transformers")

H, HEADS, FF, VOCAB = 16, 2, 32, 64
COMMON = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FF, vocab_size=VOCAB)


def _decoder(cls_name, cfg_name, **extra):
    cfg = getattr(transformers, cfg_name)(**COMMON, num_key_value_heads=HEADS, max_position_embeddings=32, **extra)
    return getattr(transformers, cls_name)(cfg)


# the same module names in the Llama family (Llama, Mistral, Qwen2)
LLAMA_STYLE = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
FAMILIES = {
    "bert": (
        lambda: transformers.BertModel(transformers.BertConfig(**COMMON)),
        "encoder.layer.{i}.",
        {
            "q": "attention.self.query",
            "k": "attention.self.key",
            "v": "attention.self.value",
            "o": "attention.output.dense",
            "mlp": ("intermediate.dense", "output.dense"),
        },
    ),
    "roberta": (
        lambda: transformers.RobertaModel(transformers.RobertaConfig(**COMMON, max_position_embeddings=40)),
        "encoder.layer.{i}.",
        {
            "q": "attention.self.query",
            "k": "attention.self.key",
            "v": "attention.self.value",
            "o": "attention.output.dense",
            "mlp": ("intermediate.dense", "output.dense"),
        },
    ),
    "vit": (
        lambda: transformers.ViTModel(transformers.ViTConfig(**COMMON, image_size=8, patch_size=4, num_channels=3)),
        "layers.{i}.",  # transformers 5 names; 4.x used encoder.layer.{i}.attention.attention.query etc.
        {
            "q": "attention.q_proj",
            "k": "attention.k_proj",
            "v": "attention.v_proj",
            "o": "attention.o_proj",
            "mlp": ("mlp.fc1", "mlp.fc2"),
        },
    ),
    "distilbert": (
        lambda: transformers.DistilBertModel(
            transformers.DistilBertConfig(vocab_size=VOCAB, dim=H, n_layers=2, n_heads=HEADS, hidden_dim=FF)
        ),
        "transformer.layer.{i}.",
        {
            "q": "attention.q_lin",
            "k": "attention.k_lin",
            "v": "attention.v_lin",
            "o": "attention.out_lin",
            "mlp": ("ffn.lin1", "ffn.lin2"),
        },
    ),
    "gpt2": (
        lambda: transformers.GPT2Model(
            transformers.GPT2Config(
                vocab_size=VOCAB, n_embd=H, n_layer=2, n_head=HEADS, n_positions=32, bos_token_id=0, eos_token_id=0
            )
        ),
        "h.{i}.",
        # q, k, v are row blocks of the fused Conv1D c_attn
        {
            "q": "attn.c_attn[q]",
            "k": "attn.c_attn[k]",
            "v": "attn.c_attn[v]",
            "o": "attn.c_proj",
            "mlp": ("mlp.c_fc", "mlp.c_proj"),
        },
    ),
    "llama": (
        lambda: _decoder("LlamaModel", "LlamaConfig"),
        "layers.{i}.",
        LLAMA_STYLE,
    ),
    "mistral": (
        lambda: _decoder("MistralModel", "MistralConfig"),
        "layers.{i}.",
        LLAMA_STYLE,
    ),
    "qwen2": (
        lambda: _decoder("Qwen2Model", "Qwen2Config"),
        "layers.{i}.",
        LLAMA_STYLE,
    ),
    "t5": (
        lambda: transformers.T5EncoderModel(
            transformers.T5Config(vocab_size=VOCAB, d_model=H, d_kv=H // HEADS, d_ff=FF, num_layers=2, num_heads=HEADS)
        ),
        "encoder.block.{i}.",
        {
            "q": "layer.0.SelfAttention.q",
            "k": "layer.0.SelfAttention.k",
            "v": "layer.0.SelfAttention.v",
            "o": "layer.0.SelfAttention.o",
            "mlp": ("layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wo"),
        },
    ),
}


def build(family):
    torch.manual_seed(0)
    return FAMILIES[family][0]().eval()


@torch.no_grad()  # some kernels round differently when weights require grad (injection freezes them)
def run(model, family):
    g = torch.Generator().manual_seed(1)
    if family == "vit":
        return model(pixel_values=torch.randn(2, 3, 8, 8, generator=g)).last_hidden_state
    return model(input_ids=torch.randint(0, VOCAB, (2, 6), generator=g)).last_hidden_state


def resolved(model, alias):
    """``name`` for whole matrices, ``name[part]`` for blocks of a fused one."""
    out = []
    for s in plan_injection(model, LoRAConfig(r=1, targets=[alias])):
        out += [f"{s.name}[{p}]" for p in s.parts] if s.parts else [s.name]
    return sorted(out)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_aliases_resolve_inject_and_merge(family):
    model = build(family)
    _, prefix, table = FAMILIES[family]
    if family == "vit" and any(n == "encoder.layer.0" for n, _ in model.named_modules()):  # transformers 4.x
        prefix, table = FAMILIES["bert"][1:]
        table = table | {k: table[k].replace("attention.self.", "attention.attention.") for k in "qkv"}
    for alias, suffixes in table.items():
        suffixes = (suffixes,) if isinstance(suffixes, str) else suffixes
        expected = sorted(prefix.format(i=i) + s for i in range(2) for s in suffixes)
        assert resolved(model, alias) == expected, alias
    base = run(model, family)
    specs = inject_lora(model, LoRAConfig(r=2, targets=["q", "k", "v", "o", "mlp"]))
    assert len(lora_layers(model)) == len(specs)
    assert torch.equal(run(model, family), base)  # B = 0: exactly the base model
    randomize_adapters(model, std=0.05)
    adapted = run(model, family)
    assert (adapted - base).abs().max() > 1e-3
    merge_lora(model)
    torch.testing.assert_close(run(model, family), adapted, atol=1e-4, rtol=0)
