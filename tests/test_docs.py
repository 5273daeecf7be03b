"""The guides under docs/ (the documentation site's pages): their Python examples run as written, with a tiny
LightningModule and data module standing in for the user's ``MyLightningModule``, ``MyNetwork`` and ``dm``, and
do what the text says, each result checked against an independent computation.

A block fenced exactly as ```python is run by a test below; a block that cannot run here (it needs GPUs,
several processes, your own model) is fenced ```python title="not run: <why>" and is shown, not run. Every
other Python fence fails ``test_every_python_block_is_run_or_marked_not_run``, so a new example cannot go
untested by accident. The API reference pages must cover ``lora_lightning.__all__``, and the site must build
with ``mkdocs build --strict`` (skipped where the ``docs`` extra is not installed)."""

import copy
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import LitTiny, tiny_batch, tiny_loader, tiny_model
from lora_lightning import LoRALinear, lora_layers, read_adapter
from test_readme import TinyData, fenced_blocks, outputs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# the pages with examples that run, and how many each has (in order of appearance)
RUN = {
    "getting-started.md": 1,
    "callback.md": 1,
    "lifecycle.md": 1,
    "many-adapters.md": 3,
    "fabric.md": 1,
    "monitor.md": 1,
    "variants.md": 1,
}


def python_blocks(page: str) -> list[str]:
    blocks = fenced_blocks((DOCS / page).read_text(encoding="utf-8"), "python")
    assert len(blocks) == RUN[page], f"docs/{page} has {len(blocks)} runnable examples, tests expect {RUN[page]}"
    return blocks


def test_every_python_block_is_run_or_marked_not_run():
    for path in sorted(DOCS.rglob("*.md")):
        page = path.relative_to(DOCS).as_posix()
        fences = re.findall(r"^[ \t]*```(?:python|py)\b(.*)$", path.read_text(encoding="utf-8"), re.M)
        run = [f for f in fences if not f.strip()]
        shown = [f for f in fences if f.strip()]
        assert len(run) == RUN.get(page, 0), (
            f"docs/{page}: {len(run)} ```python blocks; tests/test_docs.py runs {RUN.get(page, 0)}"
        )
        bad = [f for f in shown if not re.fullmatch(r' title="not run: [^"]+"', f)]
        assert not bad, f'docs/{page}: fence a block that is not run as ```python title="not run: <why>" ({bad})'


def test_callback_and_load_for_inference_examples(tmp_path, monkeypatch):
    """docs/callback.md (attach the callback, fit) then docs/lifecycle.md (load for inference, three ways)."""
    monkeypatch.chdir(tmp_path)
    ns = {"MyLightningModule": LitTiny, "MyNetwork": tiny_model, "dm": TinyData()}
    exec(python_blocks("callback.md")[0], ns)  # noqa: S102 - the guide's own example: attach the callback, fit
    trained, trainer = ns["model"], ns["trainer"]
    assert trainer.current_epoch == 3
    layers = lora_layers(trained)
    assert layers and all(isinstance(m, LoRALinear) for m in layers.values())
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"q_proj", "v_proj"}
    ckpts = list(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpts[0], map_location="cpu", weights_only=True)["state_dict"]
    assert state and all("lora_" in k or ".classifier." in k for k in state), sorted(state)[:5]
    ids = tiny_batch()[0]
    expected = outputs(trained, ids)
    assert not torch.allclose(expected, outputs(LitTiny(), ids), atol=1e-3)  # training changed the model

    exec(python_blocks("lifecycle.md")[0], ns)  # noqa: S102 - load for inference, three ways
    ckpt_model = LitTiny.load_from_checkpoint(ns["ckpt_path"])  # what the first line of the block does
    torch.testing.assert_close(outputs(ckpt_model, ids), expected, atol=0, rtol=0)
    merged = ns["model"]  # load_adapter + merge_and_unload: the plain base architecture
    assert not lora_layers(merged) and not any(".lora_" in k for k in merged.state_dict())
    torch.testing.assert_close(outputs(merged, ids), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs(ns["net"], ids), expected, atol=1e-5, rtol=0)  # the merged export


def adamw_steps(m, ids, y, steps: int = 5) -> None:
    """A user's training loop: a few AdamW steps on whatever requires grad."""
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(m(ids), y).backward()
        opt.step()


def test_plain_pytorch_example_trains_saves_and_merges_exactly(tmp_path, monkeypatch):
    """docs/getting-started.md, "Without Lightning"."""
    monkeypatch.chdir(tmp_path)
    model = tiny_model()
    ids, y = tiny_batch()

    def train(m):  # the user's loop
        adamw_steps(m, ids, y)

    exec(python_blocks("getting-started.md")[0], {"model": model, "train": train})  # noqa: S102
    tensors, _ = read_adapter(tmp_path / "task_a.safetensors")
    layers = lora_layers(model)
    assert len(layers) == 2 * len(model.layers) and all(m.merged for m in layers.values())
    # independent check of the merge: the base weights plus (alpha/r)·B·A from the saved file
    reference = tiny_model()
    with torch.no_grad():
        for name in layers:
            B, A = tensors[f"{name}.lora_B"], tensors[f"{name}.lora_A"]
            assert B.abs().sum() > 0  # trained
            reference.get_submodule(name).weight.add_((16 / 4) * B @ A)  # LoRAConfig's default alpha=16, r=4
    torch.testing.assert_close(outputs(model, ids), outputs(reference, ids), atol=1e-5, rtol=0)


def test_many_adapters_example(tmp_path, monkeypatch):
    """docs/many-adapters.md, "Named adapters on one base"."""
    monkeypatch.chdir(tmp_path)
    model = tiny_model()
    ids, y = tiny_batch()
    steps = {}

    def train(m):  # a few AdamW steps on what requires grad; records which tensors moved
        before = {k: v.detach().clone() for k, v in m.state_dict().items()}
        adamw_steps(m, ids, y)
        steps[len(steps)] = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}

    x = ids[:4]  # a batch of four, one adapter name per sample
    ns = {"model": model, "train": train, "x": x}
    exec(python_blocks("many-adapters.md")[0], ns)  # noqa: S102 - the "Many adapters" example
    # the second fit moved task_b's tensors only: never the frozen base, never default's (in the bank)
    assert steps[1] and not any(".lora_bank.default." in k for k in steps[1])
    assert all("lora_" in k or "classifier" in k for k in steps[1]), sorted(steps[1])[:5]
    from lora_lightning import list_adapters, merge_lora, set_adapter

    assert list_adapters(model) == ["default", "task_b"]
    base = tiny_model()  # the untouched base: same seed, no adapters
    torch.testing.assert_close(ns["y_base"], outputs(base, x), atol=1e-6, rtol=0)
    per_adapter = {}
    for name in ("default", "task_b"):
        m = copy.deepcopy(model)
        set_adapter(m, name)
        merge_lora(m)
        per_adapter[name] = outputs(m, x)
    torch.testing.assert_close(ns["y_default"], per_adapter["default"], atol=1e-5, rtol=0)
    assert not torch.allclose(per_adapter["default"], per_adapter["task_b"], atol=1e-3)
    for i, name in enumerate(["default", "task_b", None, "task_b"]):
        ref = outputs(base, x)[i] if name is None else per_adapter[name][i]
        torch.testing.assert_close(ns["y_mixed"][i], ref, atol=1e-5, rtol=0)


def test_hotswap_example(tmp_path, monkeypatch):
    """docs/many-adapters.md, "Hot-swapping adapters of other ranks under torch.compile": one compilation (counted
    with a backend of our own), each output the eager model's with that adapter, the last file at its true rank."""
    monkeypatch.chdir(tmp_path)
    from lora_lightning import LoRAConfig, inject_lora, save_adapter

    x = tiny_batch(4)[0]
    expected = {}
    for name, r, alpha, rs in (("r4", 4, 8, False), ("r16", 16, 5, False), ("r2", 2, 3, True)):
        m = tiny_model()
        inject_lora(m, LoRAConfig(r=r, alpha=alpha, use_rslora=rs, targets=["q", "v", "embed"]))
        for layer in lora_layers(m).values():
            torch.nn.init.normal_(layer.lora_B, std=0.5)
        save_adapter(m, f"{name}.safetensors")
        expected[name] = outputs(m, x)
    compiles, real_compile = [], torch.compile

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    def compile_counting(model):
        return real_compile(model, backend=backend)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", compile_counting)
    ns = {"model": tiny_model().eval(), "x": x}
    with torch.no_grad():
        exec(python_blocks("many-adapters.md")[2], ns)  # noqa: S102
    assert len(compiles) == 1, f"{len(compiles)} compilations"
    for name, y in (("r4", "y4"), ("r16", "y16"), ("r2", "y2")):
        torch.testing.assert_close(ns[y], expected[name], atol=1e-6, rtol=0)
    saved, original = read_adapter(tmp_path / "again.safetensors")[0], read_adapter(tmp_path / "r2.safetensors")[0]
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)


def test_several_adapters_in_one_fit_example(tmp_path, monkeypatch):
    """docs/many-adapters.md, "Several adapters in one Trainer.fit": both adapters train (each on its own
    loader), logs are per adapter, one exported file per adapter."""
    monkeypatch.chdir(tmp_path)
    from lora_lightning import use_adapter

    class Module(LitTiny):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            ids, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self(ids), y))

    module = Module()
    ns = {
        "module": module,
        "sentiment_train": tiny_loader(seed=1),
        "topic_train": tiny_loader(seed=3),
        "sentiment_val": tiny_loader(seed=2),
        "topic_val": tiny_loader(seed=4),
    }
    exec(python_blocks("many-adapters.md")[1], ns)  # noqa: S102
    assert {"sentiment/val_loss", "topic/val_loss", "sentiment/train_loss", "topic/train_loss"} <= set(ns["metrics"])
    heads = {}
    for name in ("sentiment", "topic"):
        assert read_adapter(tmp_path / "adapters" / f"{name}.safetensors")[1]["adapter_name"] == name
        with use_adapter(module, name):
            heads[name] = module.net.classifier.weight.detach().clone()
    start = LitTiny().net.classifier.weight
    assert not torch.allclose(heads["sentiment"], start) and not torch.allclose(heads["topic"], start)
    assert not torch.allclose(heads["sentiment"], heads["topic"])


def test_fabric_example_resumes_exactly_and_exports(tmp_path, monkeypatch):
    """docs/fabric.md: inject, set up, train 2 steps, save, resume in a fresh setup, 2 more steps, export, merge;
    checked against 4 uninterrupted AdamW steps in plain PyTorch."""
    monkeypatch.chdir(tmp_path)
    from safetensors.torch import load_file

    from lora_lightning import inject_lora

    ids, y = tiny_batch(n=32, seed=1)
    batches = [(ids[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]) for i in range(4)]
    ns = {"MyNetwork": tiny_model, "batches": batches}
    exec(python_blocks("fabric.md")[0], ns)  # noqa: S102 - the guide's own example
    reference = tiny_model()  # seeds itself: the example's first MyNetwork() and its injected A, drawn alike
    inject_lora(reference, ns["config"])
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-3)
    for batch_ids, labels in batches:
        optimizer.zero_grad()
        F.cross_entropy(reference(batch_ids), labels).backward()
        optimizer.step()
    exported, _ = read_adapter(tmp_path / "adapter.safetensors")
    expected = reference.state_dict()
    assert exported and all(torch.equal(v, expected[k]) for k, v in exported.items())  # resumed == uninterrupted
    assert all(v.abs().sum() > 0 for k, v in exported.items() if k.endswith("lora_B"))  # trained
    ckpt = torch.load(tmp_path / "lora.ckpt", weights_only=True)
    assert set(ckpt) == {"state_dict", "lora_lightning", "optimizer_states", "step"} and ckpt["step"] == 2
    assert set(ckpt["state_dict"]) == set(exported)  # adapter tensors only, no base tensor
    net, test_ids = ns["net"], batches[0][0]
    assert not lora_layers(net) and not any(".lora_" in k for k in net.state_dict())  # merged and unloaded
    merged = tiny_model()
    merged.load_state_dict(load_file(tmp_path / "merged.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(net(test_ids), reference(test_ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(test_ids), reference(test_ids), atol=1e-5, rtol=0)


def test_monitor_example_logs_the_adapters_delta_norms(tmp_path, monkeypatch):
    """docs/monitor.md: the monitor's per-type ‖ΔW‖_F in metrics.csv at its cadence; the last row equals ‖s·B·A‖_F
    summed over the type's matrices, computed here from the trained layers in float64."""
    import csv
    import math

    monkeypatch.chdir(tmp_path)
    ns = {"MyLightningModule": LitTiny, "MyNetwork": tiny_model, "dm": TinyData()}
    exec(python_blocks("monitor.md")[0], ns)  # noqa: S102 - the guide's own example
    metrics = next(tmp_path.glob("logs/lightning_logs/version_*/metrics.csv"))
    rows = list(csv.DictReader(metrics.read_text().splitlines()))
    logged = [(int(r["step"]), float(r["lora/q/delta_norm"])) for r in rows if r.get("lora/q/delta_norm")]
    steps = ns["trainer"].global_step
    assert steps == 4 and sorted({step for step, _ in logged}) == [2, 4]  # every 2 steps (and the validation end)
    layers = {n: m for n, m in lora_layers(ns["trainer"].lightning_module).items() if n.endswith(".q_proj")}
    assert layers, "the example adapts q"
    expected = math.sqrt(
        sum(
            float(torch.linalg.matrix_norm(m.scaling * m.lora_B.double() @ m.lora_A.double())) ** 2
            for m in layers.values()
        )
    )
    assert logged[-1][0] == steps and logged[-1][1] == pytest.approx(expected, rel=1e-5)
    assert logged[0][1] != pytest.approx(expected, rel=1e-3)  # step 2 logged the adapters as they were then


class _Tokenizer:
    """The tokenizer calls of docs/variants.md's example, on a 40-token vocabulary."""

    def __init__(self) -> None:
        self.vocab = {f"t{i}": i for i in range(40)}

    def add_tokens(self, tokens: list[str], special_tokens: bool = False) -> int:
        new = [t for t in tokens if t not in self.vocab]
        self.vocab.update({t: len(self.vocab) + i for i, t in enumerate(new)})
        return len(new)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.vocab[token]

    def __len__(self) -> int:
        return len(self.vocab)


def test_trainable_tokens_example(tmp_path, monkeypatch):
    """docs/variants.md, "Trainable tokens": on a tiny GPT-2 LM, the new token's row is all of the table that trains
    (beside LoRA), the tied lm_head reads it, the file holds that row and its index, the merged model is a plain GPT-2
    with the row in its table."""
    from torch import nn

    from conftest import tiny_gpt2

    monkeypatch.chdir(tmp_path)
    model = tiny_gpt2(lm_head=True)
    ns = {"model": model, "tokenizer": _Tokenizer()}
    exec(python_blocks("variants.md")[0], ns)  # noqa: S102
    assert ns["tool"] == 40
    tensors, _ = read_adapter(tmp_path / "tool.safetensors")
    assert tensors["transformer.wte.token_indices"].tolist() == [40]
    assert tuple(tensors["transformer.wte.token_rows"].shape) == (1, 16)
    assert not any(k.endswith(("wte.weight", "lm_head.weight")) for k in tensors)
    merged = ns["merged"]
    assert type(merged.transformer.wte) is nn.Embedding and merged.transformer.wte.num_embeddings == 41
    assert merged.lm_head.weight is merged.transformer.wte.weight
    assert torch.equal(merged.transformer.wte.weight[40], tensors["transformer.wte.token_rows"][0])


def test_api_reference_covers_the_public_api():
    """Every name of ``lora_lightning.__all__`` has an entry in docs/api/ (``::: <path ending in the name>``, or
    an anchor ``{#lora_lightning.<name>}`` for the classes made per Lightning package)."""
    import lora_lightning

    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((DOCS / "api").glob("*.md")))
    documented = {m.rsplit(".", 1)[-1] for m in re.findall(r"^::: ([\w.]+)", text, re.M)}
    documented |= set(re.findall(r"\{#lora_lightning\.(\w+)\}", text))
    missing = sorted(set(lora_lightning.__all__) - documented)
    assert not missing, f"not in the API reference (docs/api/*.md): {missing}"


def test_site_builds_offline_with_strict(tmp_path):
    """``mkdocs build --strict``: every link, anchor, nav entry, snippet and docstring is in order."""
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (the docs extra: pip install -e '.[docs]')")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert (tmp_path / "site" / "index.html").is_file() and (
        tmp_path / "site" / "api" / "lightning" / "index.html"
    ).is_file()
    assert (tmp_path / "site" / "repo" / "experiments" / "index.html").is_file()  # the generated lab report, linked
