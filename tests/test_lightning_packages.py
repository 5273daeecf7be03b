"""The Lightning layer for both packages Lightning ships as (``lightning.pytorch`` and ``pytorch_lightning``), the
version range of its one seam to Lightning's private API, and loading with a bare ``import lora_lightning``.

(The lifecycle, callback, checkpoint and distributed tests run on either package with
``LORA_LIGHTNING_TEST_PACKAGE=pytorch_lightning``, and on the oldest supported Lightning through
``scripts/lightning_matrix.sh``: .ci/run does both.)
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lora_lightning
from lora_lightning.lightning import compat

pytorch_lightning = pytest.importorskip("pytorch_lightning")


def test_each_package_gets_its_own_callback_class_on_its_own_base():
    import lightning.pytorch as lp

    from lora_lightning.lightning import LoRACallback as ForLightning
    from lora_lightning.pytorch_lightning import LoRACallback as ForPytorchLightning

    assert issubclass(ForLightning, lp.Callback) and not issubclass(ForLightning, pytorch_lightning.Callback)
    assert issubclass(ForPytorchLightning, pytorch_lightning.Callback) and not issubclass(
        ForPytorchLightning, lp.Callback
    )
    assert lora_lightning.LoRACallback is ForLightning
    for cls in (ForLightning, ForPytorchLightning):
        cb = cls(r=2, targets=["q"])
        assert type(pickle.loads(pickle.dumps(cb))) is cls  # ddp_spawn pickles it: importable by its module path
        assert "vera_seed" in str(__import__("inspect").signature(cls.__init__))  # LightningCLI sees every option


def test_both_packages_are_wrapped_in_one_process():
    import lightning.pytorch.core.saving as a
    import pytorch_lightning.core.saving as b

    for saving in (a, b):
        assert getattr(saving._load_state, "_lora_lightning_original", None) is not None


def _fit_and_reload_script(package: str, tmp: Path, order: str) -> str:
    imports = ["import lora_lightning", f"import {package} as pl"]
    if order == "lightning first":
        imports.reverse()
    return "\n".join(
        [
            "import sys, torch",
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})",
            *imports,
            "from torch.utils.data import DataLoader, TensorDataset",
            "class Lit(pl.LightningModule):",
            "    def __init__(self):",
            "        super().__init__(); torch.manual_seed(0)",
            "        self.q_proj = torch.nn.Linear(8, 8); self.out = torch.nn.Linear(8, 2)",
            "    def forward(self, x): return self.out(torch.tanh(self.q_proj(x)))",
            "    def training_step(self, batch, i): return self(batch[0]).pow(2).mean()",
            "    def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=0.5)",
            "from lora_lightning"
            + (".pytorch_lightning" if package == "pytorch_lightning" else "")
            + " import LoRACallback",
            "m = Lit()",
            "t = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, "
            f"default_root_dir={str(tmp)!r}, callbacks=[LoRACallback(r=2, targets=['q_proj'])])",
            "x = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))",
            "t.fit(m, DataLoader(TensorDataset(x), batch_size=4))",
            f"t.save_checkpoint({str(tmp / 'x.ckpt')!r})",
            "sd = torch.load(" + repr(str(tmp / "x.ckpt")) + ", weights_only=False)['state_dict']",
            "assert set(sd) == {'q_proj.lora_A', 'q_proj.lora_B'}, sorted(sd)  # adapter-only",
            "loaded = Lit.load_from_checkpoint(" + repr(str(tmp / "x.ckpt")) + ").eval(); m.eval()",
            "with torch.no_grad(): assert torch.equal(loaded(x), m(x)) and not torch.equal(Lit()(x), m(x))",
            "print('ok')",
        ]
    )


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
@pytest.mark.parametrize("order", ["lora_lightning first", "lightning first"])
def test_fit_save_and_load_from_checkpoint_with_either_package(tmp_path, package, order):
    res = subprocess.run(
        [sys.executable, "-c", _fit_and_reload_script(package, tmp_path, order)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_a_lightning_outside_the_tested_range_gets_one_warning():
    ns = compat.namespace("lightning.pytorch")
    compat._WARNED.discard("lightning.pytorch-test")
    old = replace(ns, name="lightning.pytorch-test", version="2.3.3")
    with pytest.warns(
        UserWarning, match=r"written and tested for lightning.pytorch-test 2.4 to <2.7, and 2.3.3 is installed"
    ):
        compat.check_version(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_version(old)  # once
        compat.check_version(replace(ns, name="x", version="2.6.6"))  # in range: silent
    assert (compat.Version("2.4"), compat.Version("2.7")) == compat.SUPPORTED


def test_the_installed_lightning_is_in_the_supported_range():
    for package in compat.PACKAGES:
        version = compat.Version(compat.namespace(package).version)
        assert compat.SUPPORTED[0] <= compat.Version(version.base_version) < compat.SUPPORTED[1], (package, version)


def test_the_lightning_layer_leaves_no_attribute_on_the_module_but_its_handle(tmp_path):
    from conftest import LitTiny, LoRACallback, tiny_loader, trainer

    model = LitTiny()
    before = set(vars(model))
    trainer(tmp_path, [LoRACallback(r=2, targets=["q", "v"])], max_steps=2).fit(model, tiny_loader())
    added = set(vars(model)) - before
    assert added <= {"_lora"}, added  # (Lightning's own attributes are set in __init__ already)
    assert torch.equal(model.net.layers[0].self_attn.q_proj.lora_A, model.net.layers[0].self_attn.q_proj.lora_A)
