"""LoRACallback built by LightningCLI from YAML (class_path/init_args), as in examples/lightning_cli."""

import importlib.util
from pathlib import Path

import pytest
import torch

from lora_lightning import LoRACallback, LoRAConfig, lora_layers

pytest.importorskip("jsonargparse")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_cli"
_spec = importlib.util.spec_from_file_location("lightning_cli_example", EXAMPLE / "train.py")
_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_example)
main = _example.main


def test_example_yaml_builds_the_callback_and_fit_injects(tmp_path):
    cli = main(
        args=[
            "--config",
            str(EXAMPLE / "config.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
        ],
        run=False,
    )
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, LoRACallback)]
    assert len(callbacks) == 1
    assert callbacks[0].config == LoRAConfig(r=4, alpha=8, targets=["q", "v"], modules_to_save=["classifier"])
    model = cli.model
    embed_before = model.embed.weight.detach().clone()
    q_before = model.q_proj.weight.detach().clone()
    cli.trainer.fit(model, datamodule=cli.datamodule)
    assert sorted(lora_layers(model)) == ["q_proj", "v_proj"]
    assert model.q_proj.lora_A.shape == (4, 16)
    assert torch.equal(model.embed.weight, embed_before) and torch.equal(model.q_proj.weight, q_before)  # frozen
    assert model.q_proj.lora_B.abs().sum() > 0  # the adapter trained


def test_cli_override_and_bad_value_errors(tmp_path):
    cli = main(
        args=[
            "--config",
            str(EXAMPLE / "config.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.callbacks.init_args.r",
            "2",
        ],
        run=False,
    )
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, LoRACallback)]
    assert cb.config.r == 2
    with pytest.raises(SystemExit):  # jsonargparse reports the type error and exits
        main(args=["--config", str(EXAMPLE / "config.yaml"), "--trainer.callbacks.init_args.r", "four"], run=False)
