"""The README's sections on the default recipe: one LoRA setting against full fine-tuning on four tasks (the
seed-0 search, the final runs, LoRA − full fine-tuning with TOST per task) and the probes of the LoRA default.
Built from ``records``, ``stats``, ``claims``, ``tables`` and ``plots``.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from experiments.claims import RecipeCheck, equivalent_label, recipe_check
from experiments.plots import plot_curves
from experiments.records import (
    LAST_TEST_METRIC,
    METRIC,
    METRIC_NAMES,
    RECIPE,
    RECIPE_PROBE,
    TASKS,
    TEST_METRIC,
    config_value,
    has_metric,
    is_search,
    of_experiment,
    read_config,
    with_curves,
)
from experiments.stats import convergence_check, example_bootstrap, stat_of, welch
from experiments.tables import METHOD_LABELS, STD_NOTE, ci_text, describe, lr_text, p_text, pct, seeds_text, targets_text

RECIPE_ORDER = ("rotten_tomatoes", "trec", "convention_speeches", "newsgroups")  # recipe.sh's order of full-FT lrs


# --------------------------------------------------------------------------- the default recipe
def recipe_tasks(rows: list[dict]) -> list[str]:
    found = {r.get("data") for r in of_experiment(rows, RECIPE)}
    return [t for t in TASKS if t in found] + sorted(t for t in found - set(TASKS) if t)


def best_by_val(rows: list[dict]) -> dict | None:
    """The run with the highest validation accuracy (ties: the smaller lr)."""
    ok = [r for r in rows if has_metric(r, METRIC)]
    return min(ok, key=lambda r: (-r[METRIC], r.get("lr") or 0.0)) if ok else None


def recipe_search_table(search: list[dict], default: tuple[str, float] | None) -> list[str]:
    """Seed-0 search of one task: one row per (method, targets, lr) with val and test accuracy and the choices."""
    if not search:
        return ["No search runs (seed 0) for this task."]
    best_full = best_by_val([r for r in search if r.get("method") == "full"])
    best_lora = best_by_val([r for r in search if r.get("method") == "lora"])
    lines = ["| method | targets | lr | val acc | test acc | note |", "|---|---|---|---|---|---|"]
    order = {"lora": 0, "full": 1, "head_only": 2}
    for r in sorted(search, key=lambda r: (order.get(r.get("method"), 9), r["targets_key"], r.get("lr") or 0)):
        notes = []
        if r is best_full:
            notes.append("best val of full FT")
        if r is best_lora:
            notes.append("best val of LoRA")
        if default and r.get("method") == "lora" and (r["targets_key"], float(r["lr"])) == default:
            notes.append("the LoRA default")
        lines.append(f"| {METHOD_LABELS.get(r.get('method'), r.get('method'))} | {targets_text(r['targets_key'])} | {r.get('lr', 0):g} "
                     f"| {pct(r.get(METRIC))} | {pct(r.get(TEST_METRIC))} | {', '.join(notes)} |")
    return lines


def recipe_default(final: list[dict]) -> tuple[str, float] | None:
    """The LoRA default: the (targets, lr) of the final LoRA runs (the most common one if they differ)."""
    keys = [(r["targets_key"], float(r["lr"])) for r in final if r.get("method") == "lora" and r.get("lr") is not None]
    return max(set(keys), key=keys.count) if keys else None


def recipe_final_table(final: list[dict], search: list[dict]) -> list[str]:
    """Seeds ≥ 1 of one task: full FT, the LoRA default, head only — mean ± std of val and test accuracy."""
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
            note = "the lr with the best val acc in the search" if lrs == {float(best_full["lr"])} else f"search chose {best_full['lr']:g} on val"
        if method == "lora":
            note = "the LoRA default"
        lines.append(f"| {METHOD_LABELS[method] if method != 'lora' else 'LoRA default'} | {targets_text(mine[0]['targets_key']) if method == 'lora' else ''} "
                     f"| {lr_text(lrs)} | {seeds_text(mine)} | {stat_of(mine, METRIC)} | {stat_of(mine, TEST_METRIC)} | {note} |")
    ns = sorted({stat_of([r for r in final if r.get("method") == m], METRIC).n for m in ("full", "lora", "head_only")} - {0})
    lines += ["", f"Mean ± std over seeds (n = {', '.join(map(str, ns)) or '-'} per row); {STD_NOTE}."]
    return lines


def recipe_check_rows(checks: Sequence[RecipeCheck], margin: float) -> list[str]:
    lines = [f"| LoRA default − full FT | difference (pp) [95% CI] | Welch t (df) | p | TOST p (±{margin:g}) | outcome |", "|---|---|---|---|---|---|"]
    for c in checks:
        tdf = "-" if math.isnan(c.welch.t) else f"{c.welch.t:+.2f} ({c.welch.df:.1f})"
        lines.append(f"| {METRIC_NAMES[c.metric]} | {ci_text(c.welch)} | {tdf} | {p_text(c.welch.p)} | {p_text(c.p_tost)} | **{c.outcome}** |")
    return lines


def lora_configs_table(search: list[dict], tasks: list[str]) -> list[str]:
    """Each searched LoRA config across tasks (seed 0): val / test per task and the mean val acc over tasks."""
    lora = [r for r in search if r.get("method") == "lora"]
    configs = sorted({(r["targets_key"], float(r["lr"])) for r in lora})
    if not configs:
        return []
    lines = ["| LoRA targets | lr | " + " | ".join(f"{t}: val / test" for t in tasks) + " | mean val over the tasks searched |",
             "|---|---|" + "---|" * len(tasks) + "---|"]
    for key, lr in configs:
        cells, vals = [], []
        for t in tasks:
            run = next((r for r in lora if r.get("data") == t and (r["targets_key"], float(r["lr"])) == (key, lr)), None)
            cells.append(f"{pct(run.get(METRIC))} / {pct(run.get(TEST_METRIC))}" if run else "-")
            if run and has_metric(run, METRIC):
                vals.append(100 * run[METRIC])
        mean = f"{statistics.fmean(vals):.1f} ({len(vals)} of {len(tasks)})" if vals else "-"
        lines.append(f"| {targets_text(key)} | {lr:g} | " + " | ".join(cells) + f" | {mean} |")
    return lines


def final_command(search: list[dict], tasks_needed: Sequence[str] = RECIPE_ORDER) -> str | None:
    """The `recipe.sh final` call the search suggests: the LoRA config with the best mean val acc over tasks
    (searched on all of them); the script picks each task's best full-FT lr itself (shown in a comment);
    ``None`` while a task's search is missing."""
    lora = [r for r in search if r.get("method") == "lora" and has_metric(r, METRIC)]
    full_lr = {}
    for t in tasks_needed:
        best = best_by_val([r for r in search if r.get("method") == "full" and r.get("data") == t])
        if best is None:
            return None
        full_lr[t] = best["lr"]
    means = {}
    for key in {(r["targets_key"], float(r["lr"])) for r in lora}:
        vals = [r[METRIC] for r in lora if (r["targets_key"], float(r["lr"])) == key]
        if {r.get("data") for r in lora if (r["targets_key"], float(r["lr"])) == key} >= set(tasks_needed):
            means[key] = statistics.fmean(vals)
    if not means:
        return None
    targets, lr = min(means, key=lambda k: (-means[k], k[1]))
    full_text = ", ".join(f"{t} {full_lr[t]!r}" for t in tasks_needed)
    return (f"RUNS=experiments/runs bash experiments/recipe.sh final {lr!r} '[{targets}]' {' '.join(tasks_needed)}"
            f"   # full FT at each task's best search lr: {full_text}")


def recipe_overview(tasks: list[str], summary_rows: list[tuple[str, RecipeCheck | None]], margin: float) -> list[str]:
    """Across tasks: LoRA − full on test accuracy, the outcome, and whether the goal holds on every task."""
    if not summary_rows:
        return []
    lines = ["### Across tasks", "", f"| task | LoRA default − full FT, test acc (pp) [95% CI] | outcome (±{margin:g}) |", "|---|---|---|"]
    met = 0
    for task, c in summary_rows:
        if c is None:
            lines.append(f"| {task} | - | no test accuracy |")
            continue
        met += c.outcome == equivalent_label(margin)
        lines.append(f"| {task} | {ci_text(c.welch)} | {c.outcome} |")
    missing = [t for t in tasks if t not in {t for t, _ in summary_rows}]
    verdict = (f"shown on every task ({met} of {len(tasks)})" if met == len(tasks) and not missing
               else f"shown on {met} of {len(tasks)} tasks" + (f"; not yet testable on {', '.join(missing)}" if missing else ""))
    return lines + ["", f"Goal (LoRA default within ±{margin:g} point of full fine-tuning on test accuracy, every task): equivalence {verdict}.", ""]


def recipe_section(rows: list[dict], out: Path, link: str, margin: float, alpha: float) -> tuple[list[str], list[RecipeCheck]]:
    """The default recipe: per task, full FT vs the LoRA default vs head only (seeds ≥ 1), LoRA − full with TOST; the search."""
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
        "fine-tuning on every task. Full fine-tuning runs at its own best lr per task (chosen on validation accuracy in "
        "the seed-0 search); the LoRA default is one lr and one set of targets for all tasks; head only trains the "
        "classification head on a frozen encoder. The decision is on test accuracy (of the checkpoint chosen on "
        "validation); validation accuracy is shown beside it.",
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
        lines += [f"### {task}", ""]
        lora = [r for r in t_final if r.get("method") == "lora"]
        full = [r for r in t_final if r.get("method") == "full"]
        if t_final:
            lines += recipe_final_table(t_final, t_search) + [""]
        else:
            lines += ["No final runs (seeds 1-3) for this task yet; the seed-0 search below is all there is.", ""]
        if lora and full:
            task_checks = [recipe_check(task, m, lora, full, margin, alpha) for m in (TEST_METRIC, METRIC)
                           if any(has_metric(r, m) for r in lora) and any(has_metric(r, m) for r in full)]
            checks += [c for c in task_checks if c.metric == TEST_METRIC]
            lines += recipe_check_rows(task_checks, margin) + [""]
            summary_rows.append((task, next((c for c in task_checks if c.metric == TEST_METRIC), None)))
        elif t_final:
            lines += ["LoRA − full fine-tuning cannot be tested yet: one of the two has no final runs.", ""]
        task_curves = {METHOD_LABELS.get(m, m) if m != "lora" else "LoRA default": [r for r in t_final if r.get("method") == m] for m in ("full", "lora", "head_only")}
        task_curves = with_curves(task_curves)
        if task_curves:
            curves[task] = task_curves
            lines += [c.line() for label, runs in task_curves.items() if (c := convergence_check(label, runs))] + [""]
        lines += [f"Search (seed 0), {task}:", "", *recipe_search_table(t_search, default), ""]
    lines = head + recipe_overview(tasks, summary_rows, margin) + lines
    if curves:
        plot_curves(curves, out / "recipe_convergence.png")
        lines += [f"![recipe validation curves]({link}/recipe_convergence.png)", ""]
    configs = lora_configs_table(search, tasks)
    if configs:
        lines += ["LoRA configurations of the search across tasks (seed 0, accuracy in %):", "", *configs, ""]
    command = final_command(search)
    if command:
        lines += ["What the search suggests for the final runs (best mean val acc over tasks for LoRA, best val acc per task for full FT):",
                  "", "```bash", command, "```", ""]
    return lines, checks


# --------------------------------------------------------------------------- recipe probes
def probe_label(row: dict) -> str:
    """'LoRA W{q,k,v,o}, r=8, lr 0.002, 6 epochs' (the epochs from the run's resolved config)."""
    cfg = read_config(row) or {}
    epochs = config_value(cfg, "trainer.max_epochs") if cfg else None
    return f"{describe(row)}, lr {row.get('lr', 0):g}, {epochs if epochs is not None else '?'} epochs"


def probe_epochs(row: dict) -> Any:
    cfg = read_config(row) or {}
    return config_value(cfg, "trainer.max_epochs") if cfg else None


def bootstrap_text(a: list[dict], b: list[dict]) -> str:
    """'; bootstrap over seeds and the n test examples: d [lo, hi]' for the best-validation checkpoints (and the last
    ones), on the runs of each group that recorded which test examples they got right (runs since 2026-12-06);
    '' when a group has none."""
    out, n = [], 0
    for key, what in (("test_correct", "best-validation checkpoints"), ("last_test_correct", "last checkpoints")):
        ra, rb = [r for r in a if r.get(key)], [r for r in b if r.get(key)]
        if ra and rb and len({len(r[key]) for r in ra + rb}) == 1:
            n = len(ra[0][key])
            d, lo, hi = example_bootstrap([r[key] for r in ra], [r[key] for r in rb])
            out.append(f"{what} {d:+.2f} [{lo:+.2f}, {hi:+.2f}] (seeds {seeds_text(ra)} − {seeds_text(rb)})")
    if not out:
        return ""
    return f"; bootstrap over seeds and the {n} test examples (95% percentile CI): " + ", ".join(out)


def same_schedule_lines(groups: dict[str, list[dict]], margin: float, alpha: float, task: str) -> list[str]:
    """LoRA probes against full fine-tuning probes trained for the same number of epochs: test accuracy of the
    best-validation checkpoint (Welch, TOST at ±margin), and of the last checkpoint where both recorded it."""
    lines = []
    for l_label, l_runs in sorted(groups.items()):
        for f_label, f_runs in sorted(groups.items()):
            if l_runs[0].get("method") != "lora" or f_runs[0].get("method") != "full" or probe_epochs(l_runs[0]) != probe_epochs(f_runs[0]):
                continue
            best = recipe_check(task, TEST_METRIC, l_runs, f_runs, margin, alpha)
            val = welch(stat_of(l_runs, METRIC), stat_of(f_runs, METRIC))
            last = ""
            if stat_of(l_runs, LAST_TEST_METRIC).n > 1 and stat_of(f_runs, LAST_TEST_METRIC).n > 1:
                last = f"; last checkpoints on test {ci_text(welch(stat_of(l_runs, LAST_TEST_METRIC), stat_of(f_runs, LAST_TEST_METRIC)))}"
            lines.append(f"- Same schedule: {l_label} − {f_label}: test {ci_text(best.welch)} (**{best.outcome}**, TOST p "
                         f"{p_text(best.p_tost)}); validation {ci_text(val)}{last}{bootstrap_text(l_runs, f_runs)}.")
    return lines + [""] if lines else []


def recipe_probe_section(rows: list[dict], margin: float, alpha: float) -> list[str]:
    """Variations of the LoRA default (``experiment_name=recipe_probe``) on one task, each against the
    task's full fine-tuning final runs and the LoRA default's final runs (same seeds, same split)."""
    probes = of_experiment(rows, RECIPE_PROBE)
    if not probes:
        return []
    final = [r for r in of_experiment(rows, RECIPE) if not is_search(r)]
    lines = [
        "## Recipe probes",
        "",
        "Why the LoRA default falls short of full fine-tuning where it does: variations of the default (and full "
        "fine-tuning at the longer schedule), run on the task's split like the final runs (seeds in the table), "
        "compared with that task's full fine-tuning final runs (its own lr) "
        f"and with the default itself. Test accuracy decides (Welch 95% CI; TOST at ±{margin:g} against full "
        "fine-tuning, uncorrected like the recipe's per-task checks); validation accuracy beside it. Runs: "
        "`bash experiments/recipe_probe.sh`.",
        "",
    ]
    for task in sorted({r.get("data") for r in probes}, key=lambda t: (TASKS.index(t) if t in TASKS else 99, str(t))):
        full = [r for r in final if r.get("data") == task and r.get("method") == "full"]
        default = [r for r in final if r.get("data") == task and r.get("method") == "lora"]
        groups: dict[str, list[dict]] = {}
        for r in (r for r in probes if r.get("data") == task):
            groups.setdefault(probe_label(r), []).append(r)
        lines += [f"### {task}", "",
                  "| runs | seeds | val acc | test acc | test acc, last checkpoint | − full FT, test (pp) [95% CI] | outcome (±"
                  + f"{margin:g}) | − LoRA default, test (pp) [95% CI] |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, mine in [("full fine-tuning (final runs)", full), ("LoRA default (final runs)", default)] + sorted(groups.items()):
            if not mine:
                continue
            vs_full = recipe_check(task, TEST_METRIC, mine, full, margin, alpha) if full and mine is not full else None
            vs_default = welch(stat_of(mine, TEST_METRIC), stat_of(default, TEST_METRIC)) if default and mine is not default and mine is not full else None
            lines.append(
                f"| {label} | {seeds_text(mine)} | {stat_of(mine, METRIC)} | {stat_of(mine, TEST_METRIC)} | {stat_of(mine, LAST_TEST_METRIC)} "
                f"| {ci_text(vs_full.welch) if vs_full else ''} | {vs_full.outcome if vs_full else ''} | {ci_text(vs_default) if vs_default else ''} |")
        lines += ["", f"Mean ± std over seeds; {STD_NOTE}. Test acc: the checkpoint with the best validation accuracy; last "
                  "checkpoint: the weights after the final step (runs since 2026-12-06, `test_last=true`).", ""]
        lines += same_schedule_lines(groups, margin, alpha, task)
        checks = [c for label, runs in sorted(with_curves(groups).items()) if (c := convergence_check(label, runs))]
        if checks:
            lines += ["Validation curves of the probes (last two points of the mean curve against the seed noise):", "",
                      *(c.line() for c in checks), ""]
    return lines
