"""The README is the landing page: its Python example runs as written (with a tiny LightningModule and data
module standing in for the user's ``MyLightningModule`` and ``dm``) and does what its comments say, checked
against an independent computation; its set-up commands are the ones CI runs; its links lead somewhere.
The guides' examples, cut from the README, run in tests/test_docs.py."""

import re
from pathlib import Path

import lightning.pytorch as pl
import torch

from conftest import LitTiny, tiny_batch, tiny_loader
from lora_lightning import LoRALinear, lora_layers

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

SETUP = """\
# 1. install (CPU torch 2.13.0, lightning, hydra, wandb, the embedded model and data) and run the main job
bash scripts/install.sh && .venv/bin/lora-train

# 2. run the tests
bash scripts/install.sh && .venv/bin/python -m pytest -m "not slow" -n 2 --dist loadfile
"""


def fenced_blocks(text: str, language: str) -> list[str]:
    """The bodies of the blocks fenced exactly as ```<language> (a block fenced otherwise is not run)."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def python_blocks() -> list[str]:
    blocks = fenced_blocks(README.read_text(encoding="utf-8"), "python")
    assert len(blocks) == 1, "the README has one example (the ten lines); the others live in docs/ (test_docs.py)"
    return blocks


class TinyData(pl.LightningDataModule):
    def train_dataloader(self):
        return tiny_loader()

    def val_dataloader(self):
        return tiny_loader(seed=2)

    def test_dataloader(self):
        return tiny_loader(seed=2)


def outputs(module, ids):
    module.eval()
    with torch.no_grad():
        return module(ids)


def test_ten_line_example_trains_exports_and_serves_the_trained_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = {"MyLightningModule": LitTiny, "dm": TinyData()}
    block = python_blocks()[0]
    assert len(block.splitlines()) <= 10, "the README promises ten lines"
    exec(block, ns)  # noqa: S102 - the README's own example
    trained, served = ns["model"], ns["served"]
    assert ns["lora"].config.r == 8 and trained.trainer.current_epoch == 3
    layers = lora_layers(trained)
    assert layers and all(isinstance(m, LoRALinear) for m in layers.values())
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"q_proj", "v_proj"}
    # "only A and B train; checkpoints hold them alone"
    assert {n.rsplit(".", 1)[-1] for n, p in trained.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts
    state = torch.load(ckpts[0], map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for k in state), sorted(state)[:5]
    ids = tiny_batch()[0]
    expected = outputs(trained, ids)
    assert not torch.allclose(expected, outputs(LitTiny(), ids), atol=1e-3)  # training changed the model
    # the served model: the base architecture (no LoRA module, no lora_* key) computing the trained function
    assert not lora_layers(served) and not any("lora_" in k for k in served.state_dict())
    assert set(served.state_dict()) == set(LitTiny().state_dict())
    torch.testing.assert_close(outputs(served, ids), expected, atol=1e-5, rtol=0)
    # independent check of the merge: base weight + (alpha/r)·B·A from the exported file
    from lora_lightning import read_adapter

    tensors, _ = read_adapter(tmp_path / "adapter.safetensors")
    base = LitTiny()
    with torch.no_grad():
        for name in layers:
            delta = (16 / 8) * tensors[f"{name}.lora_B"] @ tensors[f"{name}.lora_A"]  # alpha=16, r=8
            torch.testing.assert_close(
                served.get_submodule(name).weight, base.get_submodule(name).weight + delta, atol=1e-6, rtol=0
            )


def test_setup_commands_are_the_ones_ci_runs():
    text = README.read_text(encoding="utf-8")
    assert SETUP in fenced_blocks(text, "bash"), "the two set-up commands changed: keep them exactly as CI runs them"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert SETUP.splitlines()[-1] in ci, ".ci/run must run exactly the README's test command"
    # the guide shows the same block, included from the README between these markers (one copy of the text)
    assert re.search(
        r"<!-- --8<-- \[start:setup\] -->\n```bash\n" + re.escape(SETUP) + r"```\n<!-- --8<-- \[end:setup\] -->", text
    )
    assert '--8<-- "README.md:setup"' in (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")


def test_readme_is_a_landing_page_whose_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [u.split("#", 1)[0] for u in links if not re.match(r"[a-z]+://", u)]
    assert local and all((ROOT / u).exists() for u in local), [u for u in local if not (ROOT / u).exists()]
    for page in (
        "docs/getting-started.md",
        "docs/callback.md",
        "docs/lifecycle.md",
        "docs/many-adapters.md",
        "docs/variants.md",
        "docs/layer-kinds.md",
        "docs/distributed.md",
        "docs/lightning-compat.md",
        "docs/main-job.md",
        "docs/causal-lm.md",
        "docs/laboratory.md",
        "docs/benchmarks.md",
        "docs/licences.md",
        "experiments/README.md",
        "benchmarks/RESULTS.md",
    ):
        assert page in local, f"the README does not link {page}"
    assert "mkdocs build --strict" in text and "mkdocs serve" in text
    assert re.search(r"^## Data and model licences\n", text, re.M)
