"""Every way a Lightning user loads, resumes, re-fits, spawns and serves an adapter (docs/lifecycle.md):
each gives the trained model, or fails with one line before anything is lost.

The numbered sections follow issue #13's list; each test failed on the code before it was fixed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as activation_checkpoint
from torch import nn

from conftest import (
    N_LAYERS,
    PACKAGE,
    LitTiny,
    LitTinyLate,
    LoRACallback,
    ModelCheckpoint,
    TinyTransformer,
    adapted,
    assert_unchanged,
    lora_tensors,
    randomize_adapters,
    snapshot,
    tiny_batch,
    tiny_bert_classifier,
    tiny_loader,
    tiny_model,
    trainer,
)
from lora_lightning import (
    AdapterFileError,
    AdapterMismatchError,
    BaseModelMismatchError,
    LoRAConfig,
    NoAdapterGradientError,
    get_lora_state,
    has_lora,
    inject_lora,
    is_merged,
    load_adapter,
    load_lora_checkpoint,
    lora_layers,
    make_inputs_require_grad,
    merge_lora,
    save_adapter,
    switch_adapter,
)
from lora_lightning.config import all_option_defaults

LORA = dict(r=4, targets=["q", "v"])
IDS = tiny_batch()[0]


def outputs(module) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(IDS)


def fitted(tmp_path, steps: int = 4, seed: int = 0, **cb_kw) -> tuple[LitTiny, Path]:
    """A LitTiny fitted with LoRA (``steps`` AdamW steps); returns it and its adapter-only last.ckpt."""
    model = LitTiny(seed=seed)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [LoRACallback(**(LORA | cb_kw)), ckpt], max_steps=steps, enable_checkpointing=True).fit(
        model, tiny_loader()
    )
    return model, tmp_path / "ckpt" / "last.ckpt"


def weights_only_checkpoint(tmp_path, trained: LitTiny) -> Path:
    """``trainer.save_checkpoint(path, weights_only=True)`` of a fitted model (no optimizer, no callbacks)."""
    run = trainer(tmp_path, [LoRACallback(**LORA)], max_steps=1, limit_train_batches=0)
    run.fit(trained, tiny_loader())  # attaches the model to a trainer (reuses its adapters, trains nothing)
    run.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    saved = torch.load(tmp_path / "weights.ckpt", weights_only=True)
    assert "optimizer_states" not in saved and set(saved["state_dict"]) == set(lora_tensors(trained))
    return tmp_path / "weights.ckpt"


# ============================================================ 1. load_from_checkpoint / eval with ckpt_path
@pytest.mark.parametrize("kind", ["adapter-only", "weights-only"])
@pytest.mark.parametrize("kw", [{}, {"strict": False}], ids=["strict", "strict=False"])
def test_load_from_checkpoint_returns_the_trained_model(tmp_path, kw, kind):
    trained, ckpt = fitted(tmp_path)
    assert set(torch.load(ckpt, weights_only=True)["state_dict"]) == set(lora_tensors(trained))  # adapter-only
    if kind == "weights-only":
        ckpt = weights_only_checkpoint(tmp_path, trained)
    loaded = LitTiny.load_from_checkpoint(ckpt, **kw)
    assert has_lora(loaded)
    torch.testing.assert_close(outputs(loaded), outputs(trained), atol=0, rtol=0)
    assert not torch.allclose(outputs(loaded), outputs(LitTiny()))  # the untrained base differs


def test_load_from_checkpoint_with_strict_loading_false_and_configure_model(tmp_path):
    class Lenient(LitTinyLate):
        strict_loading = False

    model = Lenient()
    trainer(
        tmp_path,
        [LoRACallback(**LORA), ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)],
        max_steps=3,
        enable_checkpointing=True,
    ).fit(model, tiny_loader())
    loaded = Lenient.load_from_checkpoint(tmp_path / "c" / "last.ckpt")
    torch.testing.assert_close(outputs(loaded), outputs(model), atol=0, rtol=0)


def test_load_from_checkpoint_checks_the_base_and_its_advice_works(tmp_path):
    trained, ckpt = fitted(tmp_path)
    with pytest.raises(
        BaseModelMismatchError, match=r"load_lora_checkpoint\(MyModule, path, on_base_mismatch='warn'\)"
    ):
        LitTiny.load_from_checkpoint(ckpt, seed=1)  # the same class built on other base weights
    with pytest.warns(UserWarning, match="different base weights"):
        other = load_lora_checkpoint(LitTiny, ckpt, on_base_mismatch="warn", seed=1)
    assert has_lora(other)
    for k, v in lora_tensors(trained).items():
        assert torch.equal(lora_tensors(other)[k], v)


@pytest.mark.parametrize("kind", ["adapter-only", "weights-only"])
@pytest.mark.parametrize("entry", ["validate", "test", "predict"])
def test_eval_with_ckpt_path_and_no_callback_gives_the_trained_model(tmp_path, entry, kind):
    trained, ckpt = fitted(tmp_path)
    if kind == "weights-only":
        ckpt = weights_only_checkpoint(tmp_path, trained)
    fresh = LitTiny()
    run = trainer(tmp_path, [], max_steps=1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(IDS, torch.zeros(len(IDS), dtype=torch.long)), batch_size=len(IDS)
    )
    result = getattr(run, entry)(fresh, loader, ckpt_path=str(ckpt))
    assert has_lora(fresh)
    torch.testing.assert_close(outputs(fresh), outputs(trained), atol=0, rtol=0)
    if entry == "predict":
        torch.testing.assert_close(result[0], outputs(trained), atol=0, rtol=0)


def test_eval_without_callback_on_other_base_names_the_setting_that_works(tmp_path):
    _, ckpt = fitted(tmp_path)
    with pytest.raises(BaseModelMismatchError, match=r"attach LoRACallback\(on_base_mismatch='warn'\)"):
        trainer(tmp_path, [], max_steps=1).test(LitTiny(seed=1), tiny_loader(), ckpt_path=str(ckpt))
    other = LitTiny(seed=1)
    with pytest.warns(UserWarning, match="different base weights"):
        trainer(tmp_path, [LoRACallback(**LORA, on_base_mismatch="warn")], max_steps=1).test(
            other, tiny_loader(), ckpt_path=str(ckpt)
        )
    assert has_lora(other)


@pytest.mark.parametrize("order", ["lora_lightning first", "lightning first"])
def test_load_from_checkpoint_in_a_fresh_process(tmp_path, order):
    """The inference script imports lora_lightning (in either order with Lightning) and nothing else of ours."""
    trained, ckpt = fitted(tmp_path)
    torch.save(outputs(trained), tmp_path / "expected.pt")
    imports = ["import lora_lightning", f"import {PACKAGE}"]
    if order == "lightning first":
        imports.reverse()
    script = "\n".join(
        [
            "import sys, torch",
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})",
            *imports,
            "from conftest import LitTiny, tiny_batch",
            f"m = LitTiny.load_from_checkpoint({str(ckpt)!r}, strict=False).eval()",
            "with torch.no_grad(): out = m(tiny_batch()[0])",
            f"assert torch.equal(out, torch.load({str(tmp_path / 'expected.pt')!r})), 'untrained model'",
            "print('ok')",
        ]
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_eval_with_ckpt_path_and_a_callback_gives_the_trained_model(tmp_path):
    trained, ckpt = fitted(tmp_path)
    for path in (ckpt, weights_only_checkpoint(tmp_path, trained)):
        fresh = LitTiny()
        trainer(tmp_path, [LoRACallback(**LORA)], max_steps=1).test(fresh, tiny_loader(), ckpt_path=str(path))
        torch.testing.assert_close(outputs(fresh), outputs(trained), atol=0, rtol=0)


def test_resuming_a_weights_only_checkpoint_is_refused_by_lightning_before_training(tmp_path):
    trained, _ = fitted(tmp_path)
    path = weights_only_checkpoint(tmp_path, trained)
    run = trainer(tmp_path, [LoRACallback(**LORA)], max_steps=8)
    with pytest.raises(KeyError, match="contains only the model"):
        run.fit(LitTiny(), tiny_loader(), ckpt_path=str(path))
    assert run.global_step == 0


def test_a_full_checkpoint_evaluates_as_it_is_without_the_callback(tmp_path):
    model = LitTiny()
    full = ModelCheckpoint(dirpath=tmp_path / "full", save_last=True)
    trainer(tmp_path, [full], max_steps=2, enable_checkpointing=True).fit(model, tiny_loader())
    fresh = LitTiny()
    trainer(tmp_path, [], max_steps=1).test(fresh, tiny_loader(), ckpt_path=str(tmp_path / "full" / "last.ckpt"))
    assert not has_lora(fresh)
    torch.testing.assert_close(outputs(fresh), outputs(model), atol=0, rtol=0)
    with pytest.raises(AdapterFileError, match="holds no LoRA adapters"):  # into a model with adapters: one line
        trainer(tmp_path, [LoRACallback(**LORA)], max_steps=1).test(
            LitTiny(), tiny_loader(), ckpt_path=str(tmp_path / "full" / "last.ckpt")
        )


# ============================================================ 2. a second LoRACallback on the same module
def test_second_callback_with_the_same_config_continues_the_adapters(tmp_path, caplog):
    model, _ = fitted(tmp_path)
    layers_before, after_first = lora_layers(model), lora_tensors(model)
    run = trainer(tmp_path, [LoRACallback(**LORA)], max_steps=2)
    run.fit(model, tiny_loader())
    assert {n: id(m) for n, m in lora_layers(model).items()} == {n: id(m) for n, m in layers_before.items()}
    assert any(not torch.equal(v, after_first[k]) for k, v in lora_tensors(model).items())  # trained on


def test_second_callback_with_another_config_fails_before_training(tmp_path):
    """bad input: a second `LoRACallback(r=8, targets=[q,k,v,o])` on a module a first fit gave r=4 q,v adapters"""
    model, _ = fitted(tmp_path)
    before = snapshot(model)
    run = trainer(tmp_path, [LoRACallback(r=8, targets=["q", "k", "v", "o"])], max_steps=2)
    with pytest.raises(
        AdapterMismatchError, match=r"already holds LoRA adapters .*r=4.*asks for other ones .*replace_existing=True"
    ):
        run.fit(model, tiny_loader())
    assert run.global_step == 0
    assert_unchanged(model, before)


def test_replace_existing_trains_new_adapters_and_the_checkpoint_resumes(tmp_path, caplog):
    model, _ = fitted(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "new", save_last=True)
    cb = LoRACallback(r=8, targets=["q", "k", "v", "o"], replace_existing=True)
    with caplog.at_level("INFO"):
        trainer(tmp_path, [cb, ckpt], max_steps=2, enable_checkpointing=True).fit(model, tiny_loader())
    assert {m.r for m in lora_layers(model).values()} == {8} and len(lora_layers(model)) == 4 * N_LAYERS
    assert "12 matrices, r=8" in caplog.text  # the log line describes what is in the model
    sd = torch.load(tmp_path / "new" / "last.ckpt", weights_only=True)["state_dict"]
    assert {tuple(v.shape) for k, v in sd.items() if k.endswith("lora_A")} == {(8, 16)}
    resumed = LitTiny()
    trainer(tmp_path, [LoRACallback(r=8, targets=["q", "k", "v", "o"])], max_steps=3).fit(
        resumed, tiny_loader(), ckpt_path=str(tmp_path / "new" / "last.ckpt")
    )
    assert {m.r for m in lora_layers(resumed).values()} == {8}


def test_a_corrected_init_adapter_after_a_failed_fit_is_applied(tmp_path):
    source = adapted(seed=0)  # r=4 on q, v with random B
    path = save_adapter(source, tmp_path / "a.safetensors")
    model = LitTiny()
    with pytest.raises(AdapterFileError, match="does not exist"):
        trainer(tmp_path, [LoRACallback(**LORA, init_adapter=str(tmp_path / "typo.safetensors"))], max_steps=1).fit(
            model, tiny_loader()
        )
    assert not has_lora(model)  # nothing was injected
    wrong = save_adapter(adapted(seed=0, r=2), tmp_path / "r2.safetensors")
    with pytest.raises(AdapterMismatchError, match="r: 2 in adapter r2.safetensors vs 4 in model"):
        trainer(tmp_path, [LoRACallback(**LORA, init_adapter=str(wrong))], max_steps=1).fit(model, tiny_loader())
    assert not has_lora(model)
    cb = LoRACallback(**LORA, init_adapter=str(path))
    trainer(tmp_path, [cb], max_steps=1, limit_train_batches=0).fit(model, tiny_loader())  # setup only
    for k, v in lora_tensors(source).items():
        assert torch.equal(lora_tensors(model)[f"net.{k}"], v)


def test_the_base_mismatch_advice_for_resume_works(tmp_path):
    _, ckpt = fitted(tmp_path)
    with pytest.raises(BaseModelMismatchError, match=r"pass LoRACallback\(on_base_mismatch='warn'\)"):
        trainer(tmp_path, [LoRACallback(**LORA)], max_steps=5).fit(LitTiny(seed=1), tiny_loader(), ckpt_path=str(ckpt))
    with pytest.warns(UserWarning, match="different base weights"):
        trainer(tmp_path, [LoRACallback(**LORA, on_base_mismatch="warn")], max_steps=5).fit(
            LitTiny(seed=1), tiny_loader(), ckpt_path=str(ckpt)
        )


# ============================================================ 3. two processes: DDP and ddp_spawn
@pytest.fixture(scope="module", params=["ddp", "ddp_spawn"])
def two_process_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    res = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "lifecycle_2proc.py"), str(out), request.param],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return request.param, out, json.loads((out / "results.json").read_text())


def test_two_processes_fit_test_validate_refit_and_resume(two_process_run):
    strategy, out, results = two_process_run
    last = LitTiny.load_from_checkpoint(out / "ckpt" / "last.ckpt")  # one-process load of the 2-process checkpoint
    # after fit the (main) process holds the trained adapters, merged as asked: ddp_spawn included
    assert results["fit"]["has_lora"] and results["fit"]["merged"]
    torch.testing.assert_close(torch.load(out / "fit.pt"), outputs(last), atol=1e-6, rtol=0)
    # test with a new callback / validate with none: rank 0's loss over its shard (DistributedSampler:
    # every other sample), computed here on one process from the checkpoint
    single = LitTiny.load_from_checkpoint(out / "ckpt" / "last.ckpt").eval()
    ids, y = tiny_batch(32, seed=2)
    with torch.no_grad():
        losses = [F.cross_entropy(single(ids[i : i + 16 : 2]), y[i : i + 16 : 2]) for i in (0, 16)]
    assert results["test_with_callback"]["loss"] == pytest.approx(float(torch.stack(losses).mean()), abs=1e-5)
    # the tested model's base went through merge (fit end) and unmerge (before loading): W0 up to fp32 round-off
    assert results["validate_without_callback"]["loss"] == pytest.approx(
        results["test_with_callback"]["loss"], abs=1e-6
    )
    if strategy == "ddp":  # in the main process of ddp_spawn, evaluation leaves the module as it was
        assert results["validate_without_callback"]["has_lora"]
        torch.testing.assert_close(torch.load(out / "validate_without_callback.pt"), outputs(single), atol=0, rtol=0)
    # the second fit trains the same adapters further and exports them (same callback); the resumed fit runs
    exported = LitTiny()
    load_adapter(exported, out / "adapter.safetensors")
    assert results["second_fit"]["has_lora"]
    torch.testing.assert_close(torch.load(out / "second_fit.pt"), outputs(exported), atol=1e-6, rtol=0)
    assert not torch.allclose(torch.load(out / "second_fit.pt"), torch.load(out / "fit.pt"))
    assert results["resume"]["has_lora"]
    weights = torch.load(out / "weights.ckpt", weights_only=True)
    assert set(weights["state_dict"]) == set(lora_tensors(exported)) and "optimizer_states" not in weights


# ============================================================ 4. after merge_on_fit_end
def test_fit_again_after_merge_on_fit_end_trains_the_adapters(tmp_path):
    model, _ = fitted(tmp_path, merge_on_fit_end=True)
    assert is_merged(model)
    after_first = lora_tensors(model)
    cb = LoRACallback(**LORA, merge_on_fit_end=True)
    run = trainer(tmp_path, [cb], max_steps=3)
    run.fit(model, tiny_loader())  # no trainable head: crashed before (no grad), or trained nothing
    assert run.global_step == 3 and is_merged(model)
    assert all(not torch.equal(v, after_first[k]) for k, v in lora_tensors(model).items() if k.endswith("lora_A"))


def test_test_without_ckpt_path_after_a_merged_fit_keeps_the_merged_weights(tmp_path):
    model, _ = fitted(tmp_path, merge_on_fit_end=True)
    before = outputs(model)
    trainer(tmp_path, [LoRACallback(**LORA)], max_steps=1).test(model, tiny_loader(), verbose=False)
    assert is_merged(model)  # evaluation keeps the zero-latency merged weights
    assert torch.equal(outputs(model), before)


def test_test_with_best_checkpoint_after_a_merged_fit(tmp_path):
    model = LitTiny()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "c", monitor="val_loss", save_top_k=1)
    run = trainer(
        tmp_path,
        [LoRACallback(**LORA, merge_on_fit_end=True), ckpt],
        max_steps=8,
        val_check_interval=4,
        enable_checkpointing=True,
    )
    run.fit(model, tiny_loader(), tiny_loader(seed=2))
    best = LitTiny.load_from_checkpoint(ckpt.best_model_path)
    metrics = run.test(model, tiny_loader(seed=2), ckpt_path="best", verbose=False)
    torch.testing.assert_close(outputs(model), outputs(best), atol=1e-6, rtol=0)
    assert metrics[0]["test_loss"] == pytest.approx(float(ckpt.best_model_score), abs=1e-6)


# ============================================================ 5. activation checkpointing
class CheckpointedTiny(TinyTransformer):
    """The tiny transformer with each block under torch.utils.checkpoint."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.layers:
            x = activation_checkpoint.checkpoint(block, x, use_reentrant=self.reentrant)
        return self.classifier(x.mean(1))


def _adapter_grads(net: nn.Module, inputs_require_grad: bool) -> dict[str, torch.Tensor | None]:
    net.load_state_dict(tiny_model(0).state_dict())
    inject_lora(net, LoRAConfig(**LORA))
    randomize_adapters(net)
    if inputs_require_grad:
        make_inputs_require_grad(net)
    ids, y = tiny_batch()
    F.cross_entropy(net(ids), y).backward()
    return {n: p.grad for n, p in net.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_gives_the_adapters_their_gradients(reentrant):
    torch.manual_seed(0)
    reference = _adapter_grads(tiny_model(0), False)
    grads = _adapter_grads(CheckpointedTiny(reentrant), True)
    assert grads.keys() == reference.keys()
    for k, g in grads.items():
        torch.testing.assert_close(g, reference[k], atol=1e-6, rtol=1e-5)


class LitCheckpointed(LitTiny):
    def __init__(self, reentrant: bool = True) -> None:
        super().__init__()
        self.net = CheckpointedTiny(reentrant)
        self.net.load_state_dict(tiny_model(0).state_dict())


def test_reentrant_checkpointing_without_input_grads_stops_at_step_one_naming_the_setting(tmp_path):
    """bad input: reentrant activation checkpointing (`use_reentrant=True`) with a frozen base and a trainable head"""
    model = LitCheckpointed(reentrant=True)
    with pytest.raises(NoAdapterGradientError, match=r"LoRACallback\(inputs_require_grad=True\)"):
        trainer(tmp_path, [LoRACallback(**LORA)], max_steps=2).fit(model, tiny_loader())
    model = LitCheckpointed(reentrant=True)  # with a trainable head the loss has a grad, the adapters none
    with pytest.raises(NoAdapterGradientError, match="no adapter received a gradient"):
        trainer(tmp_path, [LoRACallback(**LORA, modules_to_save=["classifier"])], max_steps=2).fit(model, tiny_loader())


@pytest.mark.parametrize("how", ["inputs_require_grad=True", "auto: a submodule flags gradient_checkpointing"])
def test_reentrant_checkpointing_trains_like_no_checkpointing_through_the_callback(tmp_path, how):
    plain, ckpted = LitTiny(), LitCheckpointed(reentrant=True)
    torch.manual_seed(0)  # the same adapter initialisation for both
    trainer(tmp_path, [LoRACallback(**LORA)], max_steps=3).fit(plain, tiny_loader())
    torch.manual_seed(0)
    if how.startswith("auto"):
        ckpted.net.gradient_checkpointing = True  # what Hugging Face models set; LoRACallback's "auto" reads it
        cb = LoRACallback(**LORA)
    else:
        cb = LoRACallback(**LORA, inputs_require_grad=True)
    trainer(tmp_path, [cb], max_steps=3).fit(ckpted, tiny_loader())
    a, b = lora_tensors(plain), lora_tensors(ckpted)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


def test_hf_gradient_checkpointing_trains_like_no_checkpointing(tmp_path):
    """(transformers >= 5 also hooks the input embeddings itself for models read from input_ids)"""

    class LitBert(LitTiny):
        def __init__(self, checkpointing: bool) -> None:
            super().__init__()
            self.net = tiny_bert_classifier(num_labels=3, vocab_size=50)
            if checkpointing:
                self.net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})

        def forward(self, ids):
            return self.net(input_ids=ids).logits

    results = {}
    for on in (False, True):
        torch.manual_seed(0)
        model = LitBert(on)
        trainer(tmp_path, [LoRACallback(r=2, targets=["q", "v"])], max_steps=2).fit(model, tiny_loader())
        results[on] = lora_tensors(model)
    for k in results[False]:
        torch.testing.assert_close(results[True][k], results[False][k], atol=1e-5, rtol=1e-4)


# ============================================================ 6. fp32 adapters on a half-precision base
@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_fp32_adapters_stay_fp32_under_half_true_precision(tmp_path, precision):
    model = LitTiny()
    run = trainer(
        tmp_path,
        [LoRACallback(**LORA, adapter_dtype="float32"), ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)],
        max_steps=4,
        precision=precision,
        enable_checkpointing=True,
    )
    run.fit(model, tiny_loader())  # 16-true ended in NonFiniteError with fp16 adapters
    layer = next(iter(lora_layers(model).values()))
    assert layer.weight.dtype == {"bf16-true": torch.bfloat16, "16-true": torch.float16}[precision]
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32 and bool(layer.lora_B.abs().sum() > 0)
    saved = torch.load(tmp_path / "c" / "last.ckpt", weights_only=True)["state_dict"]
    assert {v.dtype for v in saved.values()} == {torch.float32}


def test_half_true_precision_without_adapter_dtype_warns_naming_it(tmp_path):
    with pytest.warns(UserWarning, match=r"adapter_dtype='float32'"):
        trainer(tmp_path, [LoRACallback(**LORA)], max_steps=1, precision="bf16-true").fit(LitTiny(), tiny_loader())


def test_module_to_keeps_pinned_adapter_dtype():
    model = tiny_model()
    inject_lora(model, LoRAConfig(**LORA, adapter_dtype="float32"))
    model.to(torch.bfloat16)
    layer = next(iter(lora_layers(model).values()))
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    unpinned = tiny_model()
    inject_lora(unpinned, LoRAConfig(**LORA))
    unpinned.to(torch.bfloat16)  # adapter_dtype=None follows the module
    assert next(iter(lora_layers(unpinned).values())).lora_A.dtype == torch.bfloat16


# ============================================================ 7. nn.TransformerEncoder with padding masks
def _encoder(seed: int = 0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16))


@pytest.mark.parametrize("targets", [["q", "v"], ["mlp"], ["o"], ["q", "k", "v", "o", "mlp"]])
def test_transformer_encoder_outputs_equal_the_base_right_after_injection(targets):
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    base, adapted_enc = _encoder(), _encoder()
    inject_lora(adapted_enc, LoRAConfig(r=2, targets=targets))
    for train in (True, False):
        for mask in (None, pad):
            base.train(train), adapted_enc.train(train)
            with torch.no_grad():
                torch.testing.assert_close(
                    adapted_enc(x, src_key_padding_mask=mask), base(x, src_key_padding_mask=mask), atol=2e-6, rtol=0
                )
    randomize_adapters(adapted_enc)  # trained adapters count in eval too (the layer fast path reads base weights)
    adapted_enc.eval()
    with torch.no_grad():
        unmerged = adapted_enc(x, src_key_padding_mask=pad)
        assert not torch.allclose(unmerged, base(x, src_key_padding_mask=pad), atol=1e-3)
        merge_lora(adapted_enc)
        torch.testing.assert_close(adapted_enc(x, src_key_padding_mask=pad), unmerged, atol=1e-4, rtol=0)


# ============================================================ 8. the same base in another dtype
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_adapter_loads_on_the_same_base_cast_to_half(tmp_path, dtype):
    for seed in range(5):  # several bases: rounding in either cast must never flip the verdict
        trained = adapted(seed=seed)
        path = save_adapter(trained, tmp_path / f"a{seed}.safetensors")
        load_adapter(tiny_model(seed).to(dtype), path)
        with pytest.raises(BaseModelMismatchError):
            load_adapter(tiny_model(seed + 10).to(dtype), path)


# ============================================================ 9. switch_adapter is transactional
def _model_state(model):
    return snapshot(model), {n: id(m) for n, m in model.named_modules()}, is_merged(model)


@pytest.mark.parametrize("merged", [False, True])
def test_switch_adapter_leaves_the_model_exactly_as_before_on_any_error(tmp_path, merged, monkeypatch):
    model = adapted(seed=0)
    if merged:
        merge_lora(model)
    before, before_out = _model_state(model), outputs(model)
    other_base = save_adapter(adapted(seed=1), tmp_path / "other_base.safetensors")
    other_targets_other_base = save_adapter(
        adapted(seed=1, targets=["q", "k", "v", "o"]), tmp_path / "qkvo.safetensors"
    )
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    for path, error in (
        (other_base, BaseModelMismatchError),
        (other_targets_other_base, BaseModelMismatchError),
        (corrupt, AdapterFileError),
    ):
        with pytest.raises(error):
            switch_adapter(model, path)
        assert_unchanged(model, before[0])
        assert _model_state(model)[1:] == before[1:] and torch.equal(outputs(model), before_out)
    # a failure in the middle of a structural switch (after the old layers were removed) is undone too
    import lora_lightning.adapter_io as adapter_io

    good = save_adapter(adapted(seed=0, targets=["q", "k", "v", "o"]), tmp_path / "good.safetensors")

    def broken(*args, **kwargs):
        raise RuntimeError("disk error while copying")

    monkeypatch.setattr(adapter_io, "load_adapter_state", broken)
    with pytest.raises(RuntimeError, match="disk error"):
        switch_adapter(model, good)
    assert_unchanged(model, before[0])
    assert _model_state(model)[1:] == before[1:] and torch.equal(outputs(model), before_out)
    assert get_lora_state(model).config.targets == ["q", "v"]


# ============================================================ 10. targets are compared as adapted modules
@pytest.mark.parametrize("targets", [["v", "q"], ["q_proj", "v_proj"], ["re:.*self_attn\\.(q|v)_proj"]])
def test_resume_with_another_spelling_of_the_same_targets(tmp_path, targets):
    trained, ckpt = fitted(tmp_path)
    resumed = LitTiny()
    trainer(tmp_path, [LoRACallback(r=4, targets=targets)], max_steps=6).fit(
        resumed, tiny_loader(), ckpt_path=str(ckpt)
    )
    assert set(lora_layers(resumed)) == set(lora_layers(trained))
    path = save_adapter(trained, tmp_path / "a.safetensors")
    model = LitTiny()
    inject_lora(model, LoRAConfig(r=4, targets=targets))
    load_adapter(model, path)  # the same for adapter files


def test_rslora_spellings_are_one_config(tmp_path):
    assert LoRAConfig(variant="rslora") == LoRAConfig(use_rslora=True)
    path = save_adapter(adapted(seed=0, variant="rslora"), tmp_path / "a.safetensors")
    model = tiny_model(0)
    inject_lora(model, LoRAConfig(**LORA, use_rslora=True))
    load_adapter(model, path)


# ============================================================ 11. errors that came late or misled
def test_export_path_that_is_a_directory_fails_at_setup(tmp_path):
    """bad input: `LoRACallback(export_adapter=<a directory>)`: fails at setup, not after training"""
    model = LitTiny()
    run = trainer(tmp_path, [LoRACallback(**LORA, export_adapter=str(tmp_path))], max_steps=3)
    with pytest.raises(AdapterFileError, match="is a directory"):
        run.fit(model, tiny_loader())
    assert run.global_step == 0


def test_adapter_from_another_architecture_with_the_same_shapes_names_the_modules(tmp_path):
    """bad input: `load_adapter` of an adapter from another architecture whose matrices have the same shapes"""

    class Renamed(nn.Module):  # same shapes, other module tree
        def __init__(self) -> None:
            super().__init__()
            self.blocks = tiny_model(0).layers

    source = Renamed()
    inject_lora(source, LoRAConfig(**LORA))
    path = save_adapter(source, tmp_path / "a.safetensors")
    with pytest.raises(
        AdapterMismatchError,
        match=r"adapts modules this model does not have .*only in adapter a.safetensors: \['blocks",
    ):
        load_adapter(tiny_model(0), path)


def test_resuming_a_full_checkpoint_with_the_callback_says_how_to_start_lora_from_it(tmp_path):
    """bad input: `trainer.fit(model, ckpt_path=<a full checkpoint of a run without LoRA>)` with `LoRACallback`"""
    model = LitTiny()
    full = ModelCheckpoint(dirpath=tmp_path / "full", save_last=True)
    trainer(tmp_path, [full], max_steps=2, enable_checkpointing=True).fit(model, tiny_loader())
    run = trainer(tmp_path, [LoRACallback(**LORA)], max_steps=4)
    with pytest.raises(AdapterFileError, match=r"holds no LoRA adapters .*load_from_checkpoint\(path\).*no ckpt_path"):
        run.fit(LitTiny(), tiny_loader(), ckpt_path=str(tmp_path / "full" / "last.ckpt"))
    started = LitTiny.load_from_checkpoint(tmp_path / "full" / "last.ckpt")  # the advice, followed
    trainer(tmp_path, [LoRACallback(**LORA)], max_steps=2).fit(started, tiny_loader())
    assert has_lora(started)


# ============================================================ 12. every option is a callback keyword
def test_every_config_option_is_a_callback_keyword():
    import inspect

    params = inspect.signature(LoRACallback.__init__).parameters
    assert set(all_option_defaults()) <= set(params)  # also the options of variants registered after import
    cb = LoRACallback(variant="adalora", r=6, adalora_target_r=3, adalora_tinit=0.2, quantize_base="int8")
    assert (cb.config.adalora_target_r, cb.config.adalora_tinit, cb.config.quantize_base) == (3, 0.2, "int8")
    assert LoRACallback(variant="vera", vera_seed=7, vera_d_init=0.5).config.vera_seed == 7
