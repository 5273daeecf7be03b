"""The README's sections on the default recipe: one LoRA setting against full fine-tuning on four tasks (the
seed-0 search with its grid edges and cut-off runs, the final runs, LoRA − full fine-tuning with TOST per task at
the task's level — 0.025 where a task was looked at twice — with the bootstrap over seeds and test examples beside
Welch), the pre-registered split rotation of the Rotten Tomatoes comparison, and the probes of the LoRA default.
Built from ``records``, ``recover`` (the runs a search log shows cut off), ``stats``, ``power``, ``claims``,
``tables`` and ``plots``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.claims import EQUIVALENT, RecipeCheck, equivalent_label, harmonic_n, outcome_of, recipe_check
from experiments.plots import plot_curves
from experiments.power import power_equivalence
from experiments.records import (
    LAST_TEST_METRIC,
    METRIC,
    METRIC_NAMES,
    RECIPE,
    RECIPE_PROBE,
    ROTATION,
    ROTATION_SEEDS,
    ROTATION_SPLITS,
    TASKS,
    TEST_METRIC,
    config_value,
    data_seed,
    has_metric,
    is_search,
    of_experiment,
    read_config,
    with_curves,
)
from experiments.recover import overrides_dict, unfinished_blocks
from experiments.stats import (
    ALPHA,
    MARGIN,
    convergence_check,
    example_bootstrap,
    hierarchical_bootstrap,
    paired_mde,
    paired_t,
    stat_of,
    variance_components,
    welch,
)
from experiments.tables import (
    METHOD_LABELS,
    STD_NOTE,
    ci_text,
    describe,
    lr_text,
    mde_text,
    p_text,
    pct,
    seeds_text,
    targets_text,
)

LOOKS = {"trec": 2, "convention_speeches": 2}  # tasks whose LoRA-vs-full result was looked at before seeds were added
EXTRA_SEEDS = {"trec": (4, 5, 6), "convention_speeches": (4, 5, 6)}  # the second look's seeds (PREREGISTRATION.md §3)
RECIPE_ORDER = ("rotten_tomatoes", "trec", "convention_speeches", "newsgroups")  # recipe.sh's order of full-FT lrs


# --------------------------------------------------------------------------- the default recipe
def recipe_tasks(rows: list[dict]) -> list[str]:
    found = {r.get("data") for r in of_experiment(rows, RECIPE)}
    return [t for t in TASKS if t in found] + sorted(t for t in found - set(TASKS) if t)


def best_by_val(rows: list[dict]) -> dict | None:
    """The run with the highest validation accuracy (ties: the smaller lr)."""
    ok = [r for r in rows if has_metric(r, METRIC)]
    return min(ok, key=lambda r: (-r[METRIC], r.get("lr") or 0.0)) if ok else None


def search_grid_notes(search: list[dict]) -> dict[int, list[str]]:
    """Per search run (by ``id``): 'best val of <method>' and, for the chosen lr of each method (and LoRA targets),
    whether it sits on an edge of the searched grid or was the only lr tried."""
    notes: dict[int, list[str]] = {}
    groups: dict[tuple, list[dict]] = {}
    varied = lora_settings_vary(search)
    for r in search:
        groups.setdefault(
            (
                r.get("method"),
                r["targets_key"] if r.get("method") == "lora" else "",
                lora_key(r)[2:] if varied and r.get("method") == "lora" else (),
            ),
            [],
        ).append(r)
    for (method, _, setting), runs in groups.items():
        best = best_by_val(runs)
        if best is None:
            continue
        lrs = sorted({float(r["lr"]) for r in runs if r.get("lr") is not None})
        where = []
        if len(lrs) == 1:
            where.append("the only lr tried: not searched")
        elif float(best["lr"]) == lrs[0]:
            where.append(f"on the lower edge of the {len(lrs)} lrs searched")
        elif float(best["lr"]) == lrs[-1]:
            where.append(f"on the upper edge of the {len(lrs)} lrs searched")
        if method == "lora":
            where.insert(
                0, f"best of LoRA W{{{best['targets_key']}}}" + (f", {setting_text(setting)}" if setting else "")
            )
        notes.setdefault(id(best), []).extend(where)
    return notes


def lora_settings_vary(search: list[dict]) -> bool:
    """Whether the LoRA search runs differ in alpha or dropout (the pre-registered Rotten Tomatoes search does)."""
    return len({lora_key(r)[2:] for r in search if r.get("method") == "lora"}) > 1


def setting_text(setting: tuple) -> str:
    alpha, dropout = setting
    return f"alpha {'?' if alpha is None else f'{alpha:g}'}, dropout {'?' if dropout is None else f'{dropout:g}'}"


def recipe_search_table(
    search: list[dict], default: tuple[str, float] | None, cut_off: Sequence[str] = ()
) -> list[str]:
    """Seed-0 search of one task: one row per (method, targets, lr) with val and test accuracy, the choices, where
    each method's best lr sits in its grid, and the runs its log shows cut off (``cut_off``: rows already written)."""
    if not search:
        return ["No search runs (seed 0) for this task."] + ([""] + list(cut_off) if cut_off else [])
    best_full = best_by_val([r for r in search if r.get("method") == "full"])
    best_lora = best_by_val([r for r in search if r.get("method") == "lora"])
    grid = search_grid_notes(search)
    varied = lora_settings_vary(search)
    lines = ["| method | targets | lr | val acc | test acc | note |", "|---|---|---|---|---|---|"]
    order = {"lora": 0, "full": 1, "head_only": 2}
    for r in sorted(search, key=lambda r: (order.get(r.get("method"), 9), r["targets_key"], r.get("lr") or 0)):
        notes = []
        if r is best_full:
            notes.append("best val of full FT")
        if r is best_lora:
            notes.append("best val of LoRA")
        if is_default(r, default):
            notes.append("the LoRA default")
        notes += grid.get(id(r), [])
        targets = targets_text(r["targets_key"]) + (
            f" ({setting_text(lora_key(r)[2:])})" if varied and r.get("method") == "lora" else ""
        )
        lines.append(
            f"| {METHOD_LABELS.get(r.get('method'), r.get('method'))} | {targets} | {r.get('lr', 0):g} "
            f"| {pct(r.get(METRIC))} | {pct(r.get(TEST_METRIC))} | {', '.join(notes)} |"
        )
    return lines + list(cut_off)


def method_of(overrides: dict[str, str]) -> str:
    return {"full": "full", "head_only": "head_only"}.get(overrides.get("lora", ""), "lora")


def cut_off_rows(logs: Path | None, task: str, rows: list[dict], experiment: str = RECIPE, seed: int = 0) -> list[str]:
    """Table rows for the runs of ``task``'s search that a log under ``logs`` (``recipe_search*.log``) shows started
    and never finished, and that no record replaced."""
    if logs is None or not logs.is_dir():
        return []
    out = []
    for block in unfinished_blocks(sorted(logs.glob("recipe_search*.log"))):
        o = overrides_dict(block.overrides)
        if (
            o.get("data") != task
            or o.get("experiment") != "recipe"
            or int(o.get("seed", seed)) != seed
            or "experiment_name" in o
        ):
            continue
        method, lr = method_of(o), float(o.get("lora.lr", "nan"))
        targets = o.get("lora.targets", "").strip("[]") if method == "lora" else ""
        done = [
            r
            for r in of_experiment(rows, experiment)
            if r.get("data") == task
            and r.get("seed") == seed
            and r.get("method") == method
            and r.get("lr") is not None
            and math.isclose(float(r["lr"]), lr)
            and (method != "lora" or r["targets_key"] == targets)
        ]
        if not done:
            out.append(
                f"| {METHOD_LABELS.get(method, method)} | {targets_text(targets)} | {lr:g} | - | - | cut off: "
                f"started, never finished (no summary in `{Path(block.log).name}`, job #{block.job}) |"
            )
    return out


def recipe_default(final: list[dict]) -> tuple[str, float] | None:
    """The LoRA default: the (targets, lr) of the final LoRA runs (the most common one if they differ)."""
    keys = [(r["targets_key"], float(r["lr"])) for r in final if r.get("method") == "lora" and r.get("lr") is not None]
    return max(set(keys), key=keys.count) if keys else None


def recipe_final_table(final: list[dict], search: list[dict]) -> list[str]:
    """Seeds ≥ 1 of one task: full FT, the LoRA default, head only — mean ± std of val and test accuracy; a row
    whose lr this task's search did not choose among several says so."""
    best_full = best_by_val([r for r in search if r.get("method") == "full"])
    lines = ["| method | targets | lr | seeds | val acc | test acc | note |", "|---|---|---|---|---|---|---|"]
    for method in ("full", "lora", "head_only"):
        mine = [r for r in final if r.get("method") == method]
        if not mine:
            lines.append(f"| {METHOD_LABELS[method]} | | | 0 | - | - | no final runs yet |")
            continue
        lrs = {float(r["lr"]) for r in mine if r.get("lr") is not None}
        note = ""
        if method == "full" and best_full is not None:
            note = (
                "the lr with the best val acc in the search"
                if lrs == {float(best_full["lr"])}
                else f"search chose {best_full['lr']:g} on val"
            )
        if method == "lora":
            note = "the LoRA default"
        if method == "head_only":
            tried = sorted(
                {float(r["lr"]) for r in search if r.get("method") == "head_only" and r.get("lr") is not None}
            )
            if len(tried) < 2:
                note = (
                    "lr not searched on this task"
                    + (f" (one search run, at {lr_text(tried)})" if tried else "")
                    + ": a baseline at an unsearched lr, a lower bound for head-only training"
                )
        lines.append(
            f"| {METHOD_LABELS[method] if method != 'lora' else 'LoRA default'} | "
            f"{targets_text(mine[0]['targets_key']) if method == 'lora' else ''} | {lr_text(lrs)} | "
            f"{seeds_text(mine)} | {stat_of(mine, METRIC)} | {stat_of(mine, TEST_METRIC)} | {note} |"
        )
    ns = sorted(
        {stat_of([r for r in final if r.get("method") == m], METRIC).n for m in ("full", "lora", "head_only")} - {0}
    )
    lines += ["", f"Mean ± std over seeds (n = {', '.join(map(str, ns)) or '-'} per row); {STD_NOTE}."]
    return lines


def task_alpha(task: str, alpha: float) -> float:
    """The level of a task's final LoRA-vs-full test: alpha, split over the looks the task had (Bonferroni)."""
    return alpha / LOOKS.get(task, 1)


def recipe_check_rows(checks: Sequence[RecipeCheck], margin: float) -> list[str]:
    lines = [
        "| LoRA default − full FT | n (LoRA / full) | difference (pp) [95% CI] | Welch t (df) | p | TOST p "
        f"(±{margin:g}) | level | MDE (pp) | outcome |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        tdf = "-" if math.isnan(c.welch.t) else f"{c.welch.t:+.2f} ({c.welch.df:.1f})"
        lines.append(
            f"| {METRIC_NAMES[c.metric]} | {c.n[0]} / {c.n[1]} | {ci_text(c.welch)} | {tdf} | "
            f"{p_text(c.welch.p, c.alpha)} | {p_text(c.p_tost, c.alpha)} | {c.alpha:g} | {mde_text(c.mde)} | "
            f"**{c.outcome}** |"
        )
    return lines


def tost_power_of(c: RecipeCheck, margin: float) -> float:
    """TOST's power at a true difference of 0, at the check's n, level and pooled seed sd."""
    if math.isnan(c.sd) or min(c.n) < 2:
        return math.nan
    return power_equivalence(harmonic_n(*c.n), margin, c.sd, c.alpha)


def lora_configs_table(search: list[dict], tasks: list[str]) -> list[str]:
    """Each searched LoRA config across tasks (seed 0): val / test per task, and the mean val acc over the tasks on
    which every config of the table was searched (so each row's mean is over the same tasks)."""
    lora = [r for r in search if r.get("method") == "lora"]
    configs = sorted({(r["targets_key"], float(r["lr"])) for r in lora})
    if not configs:
        return []

    def run_of(t: str, key: tuple[str, float]) -> dict | None:
        return next(
            (
                r
                for r in lora
                if r.get("data") == t and (r["targets_key"], float(r["lr"])) == key and has_metric(r, METRIC)
            ),
            None,
        )

    common = [t for t in tasks if all(run_of(t, k) for k in configs)]
    mean_head = (
        f"mean val over {', '.join(common)} (the tasks every row was searched on)"
        if common
        else "mean val (no task has every row)"
    )
    lines = [
        "| LoRA targets | lr | " + " | ".join(f"{t}: val / test" for t in tasks) + f" | {mean_head} |",
        "|---|---|" + "---|" * len(tasks) + "---|",
    ]
    for key in configs:
        cells = []
        for t in tasks:
            run = run_of(t, key)
            cells.append(f"{pct(run.get(METRIC))} / {pct(run.get(TEST_METRIC))}" if run else "-")
        mean = f"{statistics.fmean(100 * run_of(t, key)[METRIC] for t in common):.1f}" if common else "-"
        lines.append(f"| {targets_text(key[0])} | {key[1]:g} | " + " | ".join(cells) + f" | {mean} |")
    return lines


def final_command(search: list[dict], tasks_needed: Sequence[str] = RECIPE_ORDER) -> str | None:
    """The `recipe.sh final` call the search suggests: the LoRA config with the best mean val acc over the tasks
    ``tasks_needed`` (every candidate searched on all of them, and averaged over exactly those); the script picks
    each task's best full-FT lr itself (shown in a comment); ``None`` while a task's search is missing."""
    lora = [r for r in search if r.get("method") == "lora" and has_metric(r, METRIC)]
    full_lr = {}
    for t in tasks_needed:
        best = best_by_val([r for r in search if r.get("method") == "full" and r.get("data") == t])
        if best is None:
            return None
        full_lr[t] = best["lr"]
    means = {}
    for key in {(r["targets_key"], float(r["lr"])) for r in lora}:
        mine = [r for r in lora if (r["targets_key"], float(r["lr"])) == key and r.get("data") in tasks_needed]
        if {r.get("data") for r in mine} >= set(tasks_needed):
            means[key] = statistics.fmean(
                statistics.fmean(r[METRIC] for r in mine if r.get("data") == t) for t in tasks_needed
            )
    if not means:
        return None
    targets, lr = min(means, key=lambda k: (-means[k], k[1]))
    full_text = ", ".join(f"{t} {full_lr[t]!r}" for t in tasks_needed)
    return (
        f"RUNS=experiments/runs bash experiments/recipe.sh final {lr!r} '[{targets}]' {' '.join(tasks_needed)}"
        f"   # full FT at each task's best search lr: {full_text}"
    )


def recipe_overview(
    tasks: list[str], summary_rows: list[tuple[str, RecipeCheck | None, list[dict], list[dict]]], margin: float
) -> list[str]:
    """Across tasks: LoRA − full on test accuracy with its seeds, level, MDE and the bootstrap over seeds and test
    examples, the outcome, and whether the goal holds on every task."""
    if not summary_rows:
        return []
    lines = [
        "### Across tasks",
        "",
        "| task | seeds (LoRA / full) | LoRA default − full FT, test acc (pp) [95% CI] | level | MDE (pp) | bootstrap "
        f"over seeds and test examples [95% CI] | outcome (±{margin:g}) |",
        "|---|---|---|---|---|---|---|",
    ]
    met = 0
    for task, c, lora, full in summary_rows:
        if c is None:
            lines.append(f"| {task} | {seeds_text(lora)} / {seeds_text(full)} | - | - | - | - | no test accuracy |")
            continue
        met += c.outcome == equivalent_label(margin)
        boot = bootstrap_text(lora, full, cell=True)
        lines.append(
            f"| {task} | {seeds_text(lora)} / {seeds_text(full)} | {ci_text(c.welch)} | {c.alpha:g} | "
            f"{mde_text(c.mde)} | {boot} | {c.outcome} |"
        )
    missing = [t for t in tasks if t not in {s[0] for s in summary_rows}]
    verdict = (
        f"shown on every task ({met} of {len(tasks)})"
        if met == len(tasks) and not missing
        else f"shown on {met} of {len(tasks)} tasks"
        + (f"; not yet testable on {', '.join(missing)}" if missing else "")
    )
    return lines + [
        "",
        f"Goal (LoRA default within ±{margin:g} point of full fine-tuning on test accuracy, every task): equivalence "
        f"{verdict}. Level: 0.05, split over the looks a task had (TREC and the convention speeches were extended "
        "after an inconclusive first look: 0.025 each, Bonferroni). The bootstrap uses the runs that recorded which "
        "test examples they got right (their seeds in brackets).",
        "",
    ]


def task_notes(task: str, check: RecipeCheck | None, lora: list[dict], full: list[dict], margin: float) -> list[str]:
    """The looks a task had, the seeds its second look still lacks, and whether equivalence is within reach at its n."""
    lines = []
    if task in LOOKS:
        lacking = [
            s
            for s in EXTRA_SEEDS.get(task, ())
            if s not in {r.get("seed") for r in lora} or s not in {r.get("seed") for r in full}
        ]
        lines.append(
            f"- Looked at twice (at 3 seeds, then with seeds {', '.join(map(str, EXTRA_SEEDS.get(task, ())))} added): "
            f"the final test is at {task_alpha(task, ALPHA):g} (Bonferroni over the two looks)"
            + (
                f"; the pre-registered second look is not run yet (seeds {', '.join(map(str, lacking))} missing in "
                "at least one arm), so the result above is the first look's, at the final level."
                if lacking
                else "."
            )
        )
    if check is not None and not check.outcome.startswith("n/a"):
        power = tost_power_of(check, margin)
        if not math.isnan(power) and power < 0.05:
            lines.append(
                f"- At n {check.n[0]} / {check.n[1]} and a seed sd of {check.sd:.2f} points, TOST's power to show "
                f"equivalence within ±{margin:g} (true difference 0) is {power:.2f}: equivalence is out of reach here, "
                'so this task\'s outcome can only be "different" or "inconclusive".'
            )
    return lines + ([""] if lines else [])


def recipe_section(
    rows: list[dict], out: Path, link: str, margin: float, alpha: float, logs: Path | None = None
) -> tuple[list[str], list[RecipeCheck]]:
    """The default recipe: per task, full FT vs the LoRA default vs head only (seeds ≥ 1), LoRA − full with TOST at
    the task's level and the bootstrap beside it; the search (its grid edges, and the runs ``logs`` show cut off);
    the split rotation of Rotten Tomatoes."""
    recipe = of_experiment(rows, RECIPE)
    tasks = recipe_tasks(rows)
    if not recipe:
        return [], []
    search = [r for r in recipe if is_search(r)]
    final = [r for r in recipe if not is_search(r)]
    default = recipe_default(final)
    lines = [
        "## The default recipe",
        "",
        f"The goal: one LoRA setting (targets, r, alpha, lr) that is within ±{margin:g} accuracy point of full "
        "fine-tuning on every task. Full fine-tuning runs at its own best lr per task (chosen on validation accuracy "
        "in the seed-0 search); the LoRA default is one lr and one set of targets for all tasks; head only trains the "
        "classification head on a frozen encoder. The decision is on test accuracy (of the checkpoint chosen on "
        "validation); validation accuracy is shown beside it. Every task's runs share one train/validation/test split "
        "(`data.seed=0`).",
        "",
    ]
    if default:
        lines += [f"LoRA default of the final runs: targets {targets_text(default[0])}, lr {default[1]:g}.", ""]
    head, lines = lines, []
    checks: list[RecipeCheck] = []
    summary_rows = []
    curves: dict[str, dict[str, list[dict]]] = {}
    for task in tasks:
        t_search = [r for r in search if r.get("data") == task]
        t_final = [r for r in final if r.get("data") == task]
        level = task_alpha(task, alpha)
        lines += [f"### {task}", ""]
        lora = [r for r in t_final if r.get("method") == "lora"]
        full = [r for r in t_final if r.get("method") == "full"]
        if t_final:
            lines += recipe_final_table(t_final, t_search) + [""]
        else:
            lines += ["No final runs (seeds 1-3) for this task yet; the seed-0 search below is all there is.", ""]
        test_check = None
        if lora and full:
            task_checks = [
                recipe_check(task, m, lora, full, margin, level)
                for m in (TEST_METRIC, METRIC)
                if any(has_metric(r, m) for r in lora) and any(has_metric(r, m) for r in full)
            ]
            checks += [c for c in task_checks if c.metric == TEST_METRIC]
            lines += recipe_check_rows(task_checks, margin) + [""]
            boot = bootstrap_text(lora, full)
            if boot:
                lines += [f"Test accuracy, beside Welch: {boot[2].upper()}{boot[3:]}.", ""]
            test_check = next((c for c in task_checks if c.metric == TEST_METRIC), None)
            summary_rows.append((task, test_check, lora, full))
        elif t_final:
            lines += ["LoRA − full fine-tuning cannot be tested yet: one of the two has no final runs.", ""]
        lines += task_notes(task, test_check, lora, full, margin)
        task_curves = {
            METHOD_LABELS.get(m, m) if m != "lora" else "LoRA default": [r for r in t_final if r.get("method") == m]
            for m in ("full", "lora", "head_only")
        }
        task_curves = with_curves(task_curves)
        if task_curves:
            curves[task] = task_curves
            lines += [c.line() for label, runs in task_curves.items() if (c := convergence_check(label, runs))] + [""]
        lines += [
            f"Search (seed 0), {task}:",
            "",
            *recipe_search_table(t_search, default, cut_off_rows(logs, task, rows)),
            "",
        ]
        if task == "rotten_tomatoes":
            lines += rotation_section(rows, margin, alpha, default, test_check)[0]
    lines = head + recipe_overview(tasks, summary_rows, margin) + lines
    if curves:
        plot_curves(curves, out / "recipe_convergence.png")
        lines += [f"![recipe validation curves]({link}/recipe_convergence.png)", ""]
    configs = lora_configs_table(search, tasks)
    if configs:
        lines += ["LoRA configurations of the search across tasks (seed 0, accuracy in %):", "", *configs, ""]
    command = final_command(search)
    if command:
        lines += [
            "What the search suggests for the final runs (best mean val acc over tasks for LoRA, best val acc per "
            "task for full FT):",
            "",
            "```bash",
            command,
            "```",
            "",
        ]
    return lines, checks


# --------------------------------------------------------------------------- the split rotation (Rotten Tomatoes)
def lora_key(row: dict) -> tuple:
    """(targets, lr, alpha, dropout) of a LoRA run (dropout from its resolved config; None when not kept)."""
    cfg = read_config(row) or {}
    return (
        row["targets_key"],
        float(row.get("lr") or 0.0),
        row.get("alpha"),
        config_value(cfg, "lora.dropout") if cfg else None,
    )


def is_default(row: dict, default: tuple[str, float] | None) -> bool:
    """A LoRA run with the recipe default's targets and lr, alpha 16 and dropout 0.1 (or not recorded)."""
    if row.get("method") != "lora" or default is None:
        return False
    targets, lr, alpha, dropout = lora_key(row)
    return (targets, lr) == default and alpha in (16, 16.0, None) and dropout in (0.1, None)


def by_split(runs: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in runs:
        if (s := data_seed(r)) is not None and has_metric(r, TEST_METRIC):
            out.setdefault(s, []).append(r)
    return dict(sorted(out.items()))


def rotation_reading(test, outcome: str, margin: float) -> str:
    """The rotation's sentence, no stronger than its interval."""
    ci = f"{test.mean:+.2f} [{test.ci[0]:+.2f}, {test.ci[1]:+.2f}]"
    if outcome.startswith("equivalent"):
        return (
            f"the LoRA default is within ±{margin:g} point of full fine-tuning across splits: {ci} pp (TOST p "
            f"{p_text(test.p_tost)})"
        )
    if outcome == "different":
        return (
            f"the LoRA default is {'below' if test.mean < 0 else 'above'} full fine-tuning across splits: {ci} pp (p "
            f"{p_text(test.p)})"
        )
    if test.ci[0] > 0 or test.ci[1] < 0:
        return f"the data cannot tell: the 95% CI {ci} pp excludes 0 but the test is not significant"
    return f"the data cannot tell: the 95% CI {ci} pp includes 0" + (
        f" and reaches beyond ±{margin:g}" if test.ci[0] <= -margin or test.ci[1] >= margin else ""
    )


def rotation_section(
    rows: list[dict],
    margin: float = MARGIN,
    alpha: float = ALPHA,
    default: tuple[str, float] | None = None,
    split0: RecipeCheck | None = None,
) -> tuple[list[str], str | None]:
    """The pre-registered split rotation (experiment ``recipe_rotation``: data.seed 1-5 x seeds 1, 2, the LoRA
    default and full fine-tuning): per split the mean of each arm over its seeds, the paired t-test and TOST (±margin,
    alpha, a family of one) over the per-split differences, the variance components, the hierarchical bootstrap
    over splits, seeds and test examples; LoRA settings other than the default are shown as exploratory arms. Returns
    the lines and the sentence the README's recipe statements use (None while no rotation run exists)."""
    rot = of_experiment(rows, ROTATION)
    lines = ["#### The Rotten Tomatoes gap across splits (pre-registered split rotation)", ""]
    split0_text = (
        f"On the one split every recipe run shares (`data.seed=0`), the LoRA default − full fine-tuning is "
        f"{ci_text(split0.welch)} pp on test accuracy (n {split0.n[0]} / {split0.n[1]}, MDE {mde_text(split0.mde)} pp)"
        if split0 is not None
        else ""
    )
    if not rot:
        lines += [
            "Not run yet: the rotation (`experiment_name=recipe_rotation`, `data.seed` 1-5 x seeds 1, 2, the LoRA "
            "default and full fine-tuning at its searched lr; `experiments/PREREGISTRATION.md`, Runs §2) has no "
            "collected run. "
            + (
                split0_text + "; one split cannot tell a gap of LoRA from the split (which examples landed in train, "
                "validation and test) or from the settings searched on it, so no sentence here attributes the gap to "
                "LoRA until the rotation has run."
                if split0_text
                else ""
            ),
            "",
        ]
        return lines, None
    lora_all = [r for r in rot if r.get("method") == "lora"]
    lora = by_split([r for r in lora_all if is_default(r, default)])
    full = by_split([r for r in rot if r.get("method") == "full"])
    splits = [s for s in lora if s in full]
    expected = len(ROTATION_SPLITS) * len(ROTATION_SEEDS)
    n_lora, n_full = sum(len(v) for v in lora.values()), sum(len(v) for v in full.values())
    full_lr = lr_text(r.get("lr") for v in full.values() for r in v)
    lines += [
        f"Runs (`experiment_name={ROTATION}`): LoRA default {n_lora} of {expected}, full fine-tuning (lr {full_lr}) "
        f"{n_full} of {expected} (splits {', '.join(map(str, ROTATION_SPLITS))} x seeds "
        f"{', '.join(map(str, ROTATION_SEEDS))})"
        + ("; in progress, so the result below is provisional." if min(n_lora, n_full) < expected else "."),
        "",
        "| split (data.seed) | LoRA default: seeds | test acc | full FT: seeds | test acc | LoRA − full (pp) |",
        "|---|---|---|---|---|---|",
    ]
    diffs = []
    for s in sorted(set(lora) | set(full)):
        a, b = stat_of(lora.get(s, []), TEST_METRIC), stat_of(full.get(s, []), TEST_METRIC)
        d = a.mean - b.mean if s in splits else math.nan
        if s in splits:
            diffs.append(d)
        lines.append(
            f"| {s} | {seeds_text(lora.get(s, []))} | {a} | {seeds_text(full.get(s, []))} | {b} | "
            f"{'-' if math.isnan(d) else f'{d:+.2f}'} |"
        )
    lines += ["", f"Cells: mean ± std over the split's seeds; {STD_NOTE}.", ""]
    if len(diffs) < 2:
        lines += ["Fewer than two splits have both arms: nothing to test yet.", ""]
        return lines, None
    test = paired_t(diffs, margin)
    outcome = outcome_of(EQUIVALENT, test.p < alpha, test.p_tost < alpha, margin)
    mde = paired_mde(test.n, test.sd, alpha)
    comp_l = variance_components([[100 * r[TEST_METRIC] for r in lora[s]] for s in splits])
    comp_f = variance_components([[100 * r[TEST_METRIC] for r in full[s]] for s in splits])
    seed_part = comp_l.within / comp_l.per_group + comp_f.within / comp_f.per_group
    gap_between = max(0.0, test.sd**2 - seed_part) if not math.isnan(seed_part) else math.nan
    lines += [
        f"Paired over the {test.n} splits (each split's mean over its seeds, LoRA − full): {test.mean:+.2f} "
        f"[{test.ci[0]:+.2f}, {test.ci[1]:+.2f}] pp, t = {test.t:+.2f} (df {test.n - 1}), p {p_text(test.p)}; TOST at "
        f"±{margin:g}: p {p_text(test.p_tost)}; alpha {alpha:g} (a family of one); MDE {mde_text(mde)} pp (sd of the "
        f"per-split differences {test.sd:.2f}); outcome **{outcome}**.",
        "",
        "Variance components of test accuracy (method of moments): LoRA default between splits sd "
        f"{comp_l.between_sd:.2f}, between seeds within a split sd {comp_l.within_sd:.2f} ({comp_l.within_df} df); "
        f"full fine-tuning between splits sd {comp_f.between_sd:.2f}, within sd {comp_f.within_sd:.2f} "
        f"({comp_f.within_df} df); the gap itself varies between splits with sd "
        f"{math.sqrt(gap_between) if not math.isnan(gap_between) else math.nan:.2f} beyond what its seeds explain.",
        "",
    ]
    per_split = [([r["test_correct"] for r in lora[s]], [r["test_correct"] for r in full[s]]) for s in splits]
    if all(all(per_split_item) for pair in per_split for per_split_item in pair) and all(
        len({len(x) for x in a + b}) == 1 for a, b in per_split
    ):
        d, lo, hi = hierarchical_bootstrap(per_split)
        lines += [
            f"Hierarchical bootstrap (splits, then seeds and test examples within a split; 4,000 draws, seed 0): "
            f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}] pp.",
            "",
        ]
    else:
        lines += ["Hierarchical bootstrap: not computed (a run did not record its per-example test results).", ""]
    tuned: dict[tuple, list[dict]] = {}
    for r in lora_all:
        if not is_default(r, default):
            tuned.setdefault(lora_key(r), []).append(r)
    for key, runs in sorted(tuned.items(), key=lambda kv: str(kv[0])):
        mine = by_split(runs)
        common = [s for s in mine if s in full]
        extra = [
            statistics.fmean(100 * r[TEST_METRIC] for r in mine[s])
            - statistics.fmean(100 * r[TEST_METRIC] for r in full[s])
            for s in common
        ]
        t2 = paired_t(extra, margin) if len(extra) >= 2 else None
        lines.append(
            f"- Exploratory arm, LoRA tuned on Rotten Tomatoes (W{{{key[0]}}}, lr {key[1]:g}, alpha {key[2]}, dropout "
            f"{key[3]}): "
            + (
                f"− full FT over {t2.n} splits {t2.mean:+.2f} [{t2.ci[0]:+.2f}, {t2.ci[1]:+.2f}] pp (paired t p "
                f"{p_text(t2.p)}, TOST p {p_text(t2.p_tost)})."
                if t2
                else f"{len(runs)} runs, fewer than two splits shared with full fine-tuning."
            )
        )
    if tuned:
        lines.append("")
    sentence = rotation_reading(test, outcome, margin)
    lines += [f"The recipe's Rotten Tomatoes gap, from this test alone: {sentence}.", ""]
    return lines, sentence


# --------------------------------------------------------------------------- recipe probes
def probe_label(row: dict) -> str:
    """'LoRA W{q,k,v,o}, r=8, lr 0.002, 6 epochs' (the epochs from the run's resolved config)."""
    cfg = read_config(row) or {}
    epochs = config_value(cfg, "trainer.max_epochs") if cfg else None
    return f"{describe(row)}, lr {row.get('lr', 0):g}, {epochs if epochs is not None else '?'} epochs"


def probe_epochs(row: dict) -> Any:
    cfg = read_config(row) or {}
    return config_value(cfg, "trainer.max_epochs") if cfg else None


def bootstrap_text(a: list[dict], b: list[dict], cell: bool = False) -> str:
    """'; bootstrap over seeds and the n test examples: d [lo, hi]' for the best-validation checkpoints (and the last
    ones), on the runs of each group that recorded which test examples they got right (runs since 2026-12-06; their
    seeds listed); '' when a group has none. ``cell``: the best-validation figure alone, for a table cell ('-')."""
    out, n = [], 0
    for key, what in (("test_correct", "best-validation checkpoints"), ("last_test_correct", "last checkpoints")):
        ra, rb = [r for r in a if r.get(key)], [r for r in b if r.get(key)]
        if ra and rb and len({len(r[key]) for r in ra + rb}) == 1:
            n = len(ra[0][key])
            d, lo, hi = example_bootstrap([r[key] for r in ra], [r[key] for r in rb])
            if cell:
                return f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}] (seeds {seeds_text(ra)} / {seeds_text(rb)})"
            out.append(f"{what} {d:+.2f} [{lo:+.2f}, {hi:+.2f}] (seeds {seeds_text(ra)} − {seeds_text(rb)})")
    if cell:
        return "-"
    if not out:
        return ""
    return f"; bootstrap over seeds and the {n} test examples (95% percentile CI): " + ", ".join(out)


def stat_with_seeds(runs: list[dict], metric: str) -> str:
    """Mean ± std of ``metric``, with the seeds it averages named when they are not all the runs' seeds."""
    have = [r for r in runs if has_metric(r, metric)]
    text = str(stat_of(runs, metric))
    return text if not have or len(have) == len(runs) else f"{text} (seeds {seeds_text(have)})"


def same_schedule_lines(groups: dict[str, list[dict]], margin: float, alpha: float, task: str) -> list[str]:
    """LoRA probes against full fine-tuning probes trained for the same number of epochs: test accuracy of the
    best-validation checkpoint (Welch, TOST at ±margin), and of the last checkpoint where both recorded it."""
    lines = []
    for l_label, l_runs in sorted(groups.items()):
        for f_label, f_runs in sorted(groups.items()):
            if (
                l_runs[0].get("method") != "lora"
                or f_runs[0].get("method") != "full"
                or probe_epochs(l_runs[0]) != probe_epochs(f_runs[0])
            ):
                continue
            best = recipe_check(task, TEST_METRIC, l_runs, f_runs, margin, alpha)
            val = welch(stat_of(l_runs, METRIC), stat_of(f_runs, METRIC))
            last = ""
            if stat_of(l_runs, LAST_TEST_METRIC).n > 1 and stat_of(f_runs, LAST_TEST_METRIC).n > 1:
                la, lb = ([r for r in x if has_metric(r, LAST_TEST_METRIC)] for x in (l_runs, f_runs))
                last = (
                    "; last checkpoints on test "
                    f"{ci_text(welch(stat_of(la, LAST_TEST_METRIC), stat_of(lb, LAST_TEST_METRIC)))} (seeds "
                    f"{seeds_text(la)} − {seeds_text(lb)})"
                )
            lines.append(
                f"- Same schedule: {l_label} − {f_label}: test {ci_text(best.welch)} (n {best.n[0]} / {best.n[1]}, "
                f"MDE {mde_text(best.mde)}; **{best.outcome}**, TOST p {p_text(best.p_tost)}); validation "
                f"{ci_text(val)}{last}{bootstrap_text(l_runs, f_runs)}."
            )
    return lines + [""] if lines else []


def unsearched_lines(task: str, rows: list[dict], logs: Path | None) -> list[str]:
    """What the task's searches left open: LoRA settings never varied (alpha, dropout) and full fine-tuning's grid
    (how many lrs finished, which were cut off, whether the chosen one is on an edge)."""
    mine = [r for r in rows if r.get("data") == task and r.get("experiment") in (RECIPE, RECIPE_PROBE, ROTATION)]
    lora = [r for r in mine if r.get("method") == "lora"]
    alphas = {r.get("alpha") for r in lora if r.get("alpha") is not None}
    dropouts = {config_value(c, "lora.dropout") for r in lora if (c := read_config(r))} - {None}
    open_ = [name for name, seen in (("alpha", alphas), ("dropout", dropouts)) if len(seen) < 2]
    full = [
        r for r in of_experiment(rows, RECIPE) if r.get("data") == task and is_search(r) and r.get("method") == "full"
    ]
    lrs = sorted({float(r["lr"]) for r in full if r.get("lr") is not None})
    cut = [
        row.split("|")[3].strip()
        for row in cut_off_rows(logs, task, rows)
        if row.startswith(f"| {METHOD_LABELS['full']} |")
    ]
    best = best_by_val(full)
    text = []
    if open_:
        fixed = ", ".join(
            f"{n} {sorted(s)[0]:g}" for n, s in (("alpha", alphas), ("dropout", dropouts)) if n in open_ and s
        )
        text.append(
            f"LoRA's {' and '.join(open_)} {'was' if len(open_) == 1 else 'were'} never varied on this task ({fixed})"
        )
    if best is not None:
        edge = (
            (
                "on the lower edge of its grid"
                if float(best["lr"]) == lrs[0]
                else "on the upper edge of its grid"
                if float(best["lr"]) == lrs[-1]
                else "inside its grid"
            )
            if len(lrs) > 1
            else "the only lr tried"
        )
        text.append(
            f"full fine-tuning's lr search finished {len(lrs)} lr{'s' if len(lrs) != 1 else ''} ({lr_text(lrs)})"
            + (f", its {', '.join(cut)} run{'s were' if len(cut) > 1 else ' was'} cut off" if cut else "")
            + f", and the chosen {best['lr']:g} is {edge}"
        )
    return text


def task_reading(task: str, rows: list[dict], margin: float, alpha: float, logs: Path | None) -> list[str]:
    """What the intervals of one task where the default fell short support, and what they leave open: the final
    runs on test and on validation, the searches' gaps, and the split rotation's sentence when it exists."""
    final = [r for r in of_experiment(rows, RECIPE) if not is_search(r) and r.get("data") == task]
    lora = [r for r in final if r.get("method") == "lora"]
    full = [r for r in final if r.get("method") == "full"]
    if not lora or not full:
        return []
    level = task_alpha(task, alpha)
    test, val = (recipe_check(task, m, lora, full, margin, level) for m in (TEST_METRIC, METRIC))
    if test.outcome.startswith("equivalent"):
        return []
    default = recipe_default(final)
    _, sentence = rotation_section(rows, margin, alpha, default, test) if task == "rotten_tomatoes" else ([], None)
    lines = [
        f"What the {task} intervals support (one split, `data.seed=0`): on test accuracy the LoRA default − full "
        f"fine-tuning is {ci_text(test.welch)} pp (n {test.n[0]} / {test.n[1]}, MDE {mde_text(test.mde)}; "
        f"{test.outcome}), on validation accuracy {ci_text(val.welch)} pp ({val.outcome}); the same-schedule "
        "comparisons and their bootstrap over seeds and test examples are above."
    ]
    gaps = unsearched_lines(task, rows, logs)
    if gaps:
        lines[0] += " Left open: " + "; ".join(gaps) + "."
    if sentence:
        lines[0] += f" Across splits (the pre-registered rotation, the test that decides): {sentence}."
    elif task == "rotten_tomatoes":
        lines[0] += (
            " These runs do not tell a shortfall of LoRA from this split's test examples or from the settings "
            "searched; the pre-registered split rotation and searches decide (not run yet)."
        )
    else:
        lacking = [
            s
            for s in EXTRA_SEEDS.get(task, ())
            if s not in {r.get("seed") for r in lora} or s not in {r.get("seed") for r in full}
        ]
        lines[0] += (
            " These runs do not tell a shortfall of LoRA from this split's test examples or from the settings searched"
            + (
                f"; the pre-registered seeds {', '.join(map(str, lacking))} of both arms (not run yet) give the final "
                f"test, at {level:g}."
                if lacking
                else "."
            )
        )
    return lines + [""]


def recipe_probe_section(rows: list[dict], margin: float, alpha: float, logs: Path | None = None) -> list[str]:
    """Variations of the LoRA default (``experiment_name=recipe_probe``) on one task, each against the
    task's full fine-tuning final runs and the LoRA default's final runs (same seeds, same split)."""
    probes = of_experiment(rows, RECIPE_PROBE)
    if not probes:
        return []
    final = [r for r in of_experiment(rows, RECIPE) if not is_search(r)]
    lines = [
        "## Recipe probes",
        "",
        "Exploratory: variations of the LoRA default (and full fine-tuning at the longer schedule), run on the task's "
        "split like the final runs (seeds in the table), compared with that task's full fine-tuning final runs (its "
        f"own lr) and with the default itself. Test accuracy decides (Welch 95% CI; TOST at ±{margin:g} against full "
        f"fine-tuning at alpha {alpha:g}, uncorrected: these probes are outside the pre-registered tests); validation "
        "accuracy beside it. Runs: `bash experiments/recipe_probe.sh`.",
        "",
    ]
    for task in sorted({r.get("data") for r in probes}, key=lambda t: (TASKS.index(t) if t in TASKS else 99, str(t))):
        full = [r for r in final if r.get("data") == task and r.get("method") == "full"]
        default = [r for r in final if r.get("data") == task and r.get("method") == "lora"]
        groups: dict[str, list[dict]] = {}
        for r in (r for r in probes if r.get("data") == task):
            groups.setdefault(probe_label(r), []).append(r)
        lines += [
            f"### {task}",
            "",
            "| runs | seeds | val acc | test acc | test acc, last checkpoint | − full FT, test (pp) [95% CI] | n | "
            "MDE (pp) | outcome (±" + f"{margin:g}) | − LoRA default, test (pp) [95% CI] |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, mine in [("full fine-tuning (final runs)", full), ("LoRA default (final runs)", default)] + sorted(
            groups.items()
        ):
            if not mine:
                continue
            vs_full = recipe_check(task, TEST_METRIC, mine, full, margin, alpha) if full and mine is not full else None
            vs_default = (
                welch(stat_of(mine, TEST_METRIC), stat_of(default, TEST_METRIC))
                if default and mine is not default and mine is not full
                else None
            )
            lines.append(
                f"| {label} | {seeds_text(mine)} | {stat_of(mine, METRIC)} | {stat_of(mine, TEST_METRIC)} | "
                f"{stat_with_seeds(mine, LAST_TEST_METRIC)} | {ci_text(vs_full.welch) if vs_full else ''} | "
                f"{f'{vs_full.n[0]} / {vs_full.n[1]}' if vs_full else ''} | "
                f"{mde_text(vs_full.mde) if vs_full else ''} | {vs_full.outcome if vs_full else ''} | "
                f"{ci_text(vs_default) if vs_default else ''} |"
            )
        lines += [
            "",
            f"Mean ± std over seeds; {STD_NOTE}. Test acc: the checkpoint with the best validation accuracy; last "
            "checkpoint: the weights after the final step (runs since 2026-12-06, `test_last=true`; where only some "
            "of a row's runs recorded it, the seeds it averages are named).",
            "",
        ]
        lines += same_schedule_lines(groups, margin, alpha, task)
        lines += task_reading(task, rows, margin, alpha, logs)
        checks = [c for label, runs in sorted(with_curves(groups).items()) if (c := convergence_check(label, runs))]
        if checks:
            lines += [
                "Validation curves of the probes (last two points of the mean curve against the seed noise):",
                "",
                *(c.line() for c in checks),
                "",
            ]
    return lines
