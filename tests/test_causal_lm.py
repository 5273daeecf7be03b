"""The causal-LM job's parts: generation data (split by input, answer-only labels, length buckets), a
tiny random Llama (GQA) trained with LoRA through the callback, generation from the merged model equal
to the unmerged one, the merged Hugging Face folder and the PEFT export equal on logits; and the real
SmolLM2 job at smoke scale through the Hydra app."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lora_lightning import (
    LoRACallback,
    export_peft_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from lora_lightning.app.generation_data import (
    BucketBatchSampler,
    CausalCollator,
    GenerationDataModule,
    e2e_path,
    read_groups,
    split_groups,
)
from lora_lightning.errors import DataError

SAMPLE = Path(__file__).resolve().parent / "data" / "e2e_sample.jsonl"
# lora-train arguments of the causal-LM job at smoke size: the E2E sample, 3 / 1 / 2 examples, 2 steps
SMOKE_JOB = [
    "model=smollm2",
    "data=e2e_nlg",
    f"data.source={SAMPLE}",
    "data.train_size=3",
    "data.val_size=1",
    "data.test_size=2",
    "data.batch_size=4",
    "+trainer.max_steps=2",
]


def test_groups_keep_every_reference_and_split_by_input(tmp_path):
    groups = read_groups(SAMPLE)
    records = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    assert len(groups) == len({r["input"] for r in records}) == 12
    assert sum(len(g.references) for g in groups) == len({(r["input"], r["target"]) for r in records})
    parts = split_groups(groups, 0.25, 0.25, seed=0)
    inputs = {k: {g.input for g in v} for k, v in parts.items()}
    assert [len(parts[k]) for k in ("train", "val", "test")] == [6, 3, 3]
    assert not (inputs["train"] & inputs["test"]) and not (inputs["train"] & inputs["val"])
    assert parts == split_groups(groups, 0.25, 0.25, seed=0) and parts != split_groups(groups, 0.25, 0.25, seed=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no input field"}\n')
    with pytest.raises(DataError, match="record 0 has no 'input' and 'target' fields"):
        read_groups(bad)


def test_installed_e2e_data_gives_the_split_the_job_reported():
    """data.source=e2e_nlg reads GEM's E2E NLG from the installed bigbench package (`bash scripts/install.sh
    decoder`): 213 inputs; with the job's split (seed 0, 10% / 20%) 149 / 21 / 43 inputs and 684 training pairs, the
    same first test inputs as the reported runs, and its first 38 examples are the test sample's."""
    pytest.importorskip("bigbench", reason="the E2E NLG data: bash scripts/install.sh decoder")
    path = e2e_path()
    sample = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    assert json.loads(path.read_text())["examples"][:38] == sample
    groups = read_groups(path)
    assert len(groups) == 213
    parts = split_groups(groups, 0.1, 0.2, seed=0)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [149, 21, 43]
    assert sum(len(g.references) for g in parts["train"]) == 684
    assert [g.input for g in parts["test"][:2]] == [
        "name: Green Man, eatType: pub, customer rating: 3 out of 5, near: All Bar One",
        "name: Cocum, eatType: coffee shop, near: The Rice Boat",
    ]


def test_gzipped_jsonl_source(tmp_path):
    zipped = tmp_path / "mine.jsonl.gz"
    zipped.write_bytes(gzip.compress(SAMPLE.read_bytes()))
    assert read_groups(zipped) == read_groups(SAMPLE)
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(SAMPLE.read_bytes())  # not gzip
    with pytest.raises(DataError, match="cannot read it as gzipped UTF-8 text"):
        read_groups(broken)


def test_collator_labels_only_the_answer():
    batch = CausalCollator(pad_token_id=0)([([5, 6, 7, 8, 9], 3), ([5, 6, 7], 2)])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, -100, 7, -100, -100]]


def test_bucket_sampler_covers_every_index_once_with_less_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (400,), generator=g).tolist()
    sampler = BucketBatchSampler(lengths, batch_size=8, seed=3, bucket=10)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(400)) and len(batches) == len(sampler) == 50

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    plain = [list(range(k, k + 8)) for k in range(0, 400, 8)]  # unsorted batches of the same data
    assert padding(batches) < 0.25 * padding(plain)
    sampler.set_epoch(1)
    assert list(sampler) != batches  # a new order each epoch


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir():
    pytest.importorskip("gguf")
    from lora_lightning.app.causal_lm import smollm2_folder

    try:
        return smollm2_folder()
    except Exception as e:  # the wheel is part of the test install; say what is missing
        pytest.skip(f"SmolLM2 not available: {e}")


def tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg)


def test_tiny_llama_trains_with_lora_and_generates_the_same_merged(tmp_path, smollm2_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    from lora_lightning.app.causal_lm import CausalLMModule, answer_loss, generate

    dm = GenerationDataModule(
        source=str(SAMPLE),
        tokenizer=str(smollm2_tokenizer_dir),
        batch_size=4,
        eval_batch_size=4,
        val_fraction=0.25,
        test_fraction=0.25,
    )
    tok = dm.tokenizer
    module = CausalLMModule(tiny_llama(len(tok)), lr=5e-3)
    cb = LoRACallback(r=4, alpha=8, targets=["q", "k", "v", "o"], dropout=0.0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[cb],
    )
    trainer.fit(module, datamodule=dm)
    layers = lora_layers(module)
    assert len(layers) == 8 and layers["model.model.layers.0.self_attn.k_proj"].lora_B.shape == (
        8,
        4,
    )  # GQA: 2 kv heads x 4
    assert all(layer.lora_B.abs().sum() > 0 for layer in layers.values())
    # the loss is the answer tokens' mean cross-entropy, computed independently here
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    with torch.no_grad():
        logits = module(batch["input_ids"], batch["attention_mask"])
        lp = torch.log_softmax(logits[:, :-1], -1)
        tgt, keep = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
        want = -(lp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * keep).sum() / keep.sum()
        assert torch.allclose(answer_loss(logits, batch["labels"]), want, atol=1e-5)
    prompts, _ = dm.prompts("test")
    unmerged = generate(module.model, tok, prompts, max_new_tokens=8)
    with torch.no_grad():
        before = module(batch["input_ids"], batch["attention_mask"])
    merge_lora(module)
    assert generate(module.model, tok, prompts, max_new_tokens=8) == unmerged
    with torch.no_grad():
        torch.testing.assert_close(module(batch["input_ids"], batch["attention_mask"]), before, atol=1e-4, rtol=1e-4)
    unmerge_lora(module)
    # PEFT export: PEFT's model on a fresh base gives our logits (and not the base's)
    from peft import PeftModel

    export_peft_adapter(module, tmp_path / "peft", submodule="model")
    fresh = tiny_llama(len(tok))
    with torch.no_grad():
        base_logits = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        peft_logits = (
            PeftModel.from_pretrained(fresh, str(tmp_path / "peft"))
            .eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            .logits
        )
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(peft_logits[mask], before[mask], atol=1e-5, rtol=1e-5)
    assert (base_logits[mask] - before[mask]).abs().max() > 1e-3
    # the merged model as a plain HF folder: transformers loads it and generates the same text
    plain = merge_and_unload(module).model
    plain.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    assert generate(reloaded, tok, prompts, max_new_tokens=8) == unmerged


def test_causal_lm_job_smoke(tmp_path, smollm2_tokenizer_dir):
    """lora-train model=smollm2 at smoke scale: a few steps on a handful of E2E examples, generation from
    the merged model scored, PEFT export checked by the job itself, merged HF folder written."""
    from test_app import cli

    res = cli([*SMOKE_JOB, "generation.max_new_tokens=8", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "causal_lm" and summary["steps"] == 2 and summary["test_inputs"] == 2
    assert 0 <= summary["test_bleu"] <= 1 and 0 <= summary["zero_shot_rougeL"] <= 1
    assert summary["peft_max_abs_logit_diff"] < 1e-4
    preds = json.loads((tmp_path / "run" / "test_predictions.json").read_text())
    assert len(preds) == 2 and all(p["references"] for p in preds)
    assert (tmp_path / "run" / "merged_hf" / "config.json").is_file() and summary[
        "merged_hf_generates_the_same"
    ] is True
    assert (tmp_path / "run" / "peft_adapter" / "adapter_config.json").is_file()


def test_decoder_experiment_smoke(tmp_path, smollm2_tokenizer_dir):
    """lora-train experiment=decoder scale=smoke on the E2E sample, cut to a few examples and steps: composes, trains,
    generates, exports; its console has none of torchao's / bitsandbytes' import-time lines (the job imports peft,
    which imports both)."""
    from test_app import QUIET_START_TEXTS, cli

    res = cli(
        [
            "experiment=decoder",
            "scale=smoke",
            f"data.source={SAMPLE}",
            "data.train_size=2",
            "data.val_size=1",
            "data.test_size=2",
            "data.batch_size=4",
            "+trainer.max_steps=2",
            "generation.max_new_tokens=8",
            f"hydra.run.dir={tmp_path}/run",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["experiment"], summary["task"]) == ("decoder", "causal_lm")
    assert summary["steps"] == 2 and summary["test_inputs"] == 2 and summary["peft_max_abs_logit_diff"] < 1e-4
    preds = json.loads((tmp_path / "run" / "test_predictions.json").read_text())
    assert len(preds) == 2 and all(p["references"] for p in preds)
    console = res.stdout + res.stderr
    assert not [t for t in QUIET_START_TEXTS if t in console], console[-3000:]


def test_e2e_without_bigbench_names_both_fixes(monkeypatch):
    """data=e2e_nlg where bigbench is not installed (the package index may not serve 1.0.0): one line naming the
    install command and the data.source alternative."""
    import importlib.util

    from lora_lightning.app import generation_data

    real = importlib.util.find_spec
    monkeypatch.setattr(
        generation_data.importlib.util, "find_spec", lambda name, *a: None if name == "bigbench" else real(name, *a)
    )
    with pytest.raises(DataError) as e:
        e2e_path()
    text = str(e.value)
    assert "\n" not in text and "pip install --no-deps bigbench==1.0.0" in text and "data.source" in text
