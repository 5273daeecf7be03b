"""The README's section on the pre-registered primary family: LoRA W{q,v} r=8 vs full fine-tuning on the ablation
task at 150 and 300 steps (experiments/PREREGISTRATION.md, "Runs", §1), and the same comparison on the pilot runs
as exploratory context.

The confirmatory runs are the ``lora_vs_full`` (150 steps) and ``lora_vs_full_300`` (300 steps) experiments, seeds
101-117 for both arms (``bash experiments/lora_vs_full.sh``, collected into ``experiments/runs/lora_vs_full``). The
analysis reads the seeds present in all four cells (``claims.primary_seeds``); until all 17 are in, or the study is
declared complete (a file ``lora_vs_full/DECLARED_COMPLETE`` below the runs folder, holding the reason), its
verdicts are printed as provisional. Built from ``records``, ``stats``, ``power``, ``claims`` and ``tables``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from experiments.claims import (
    AGREES,
    DIFFERENT,
    EQUIVALENT,
    LORA_ARM,
    ClaimCheck,
    PrimaryCheck,
    arms,
    pilot_primary_checks,
    primary_cells,
    primary_checks,
    primary_seeds,
)
from experiments.records import (
    METRIC,
    METRIC_NAMES,
    PRIMARY,
    PRIMARY_COMPLETE,
    PRIMARY_SEEDS,
    TEST_METRIC,
    of_experiment,
)
from experiments.stats import ALPHA, MARGIN
from experiments.tables import ci_text, mde_text, p_text

LORA_LR, FULL_LR = 0.002, 0.0002  # the pre-registered learning rates of the two arms
STEPS = {150: 150, 300: 300}  # schedule -> optimizer steps a run of it takes


def seed_range(seeds: Sequence[int]) -> str:
    """'101-105, 107' for a sorted list of seeds; '-' for none."""
    if not seeds:
        return "-"
    parts, start, prev = [], seeds[0], seeds[0]
    for s in list(seeds[1:]) + [None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        parts.append(f"{start}-{prev}" if prev > start else str(start))
        if s is not None:
            start = prev = s
    return ", ".join(parts)


def declared_complete(runs: Path | None) -> str | None:
    """The reason the primary study was declared complete (the text of ``<runs>/lora_vs_full/DECLARED_COMPLETE``),
    or None while it is in progress."""
    path = runs / PRIMARY_COMPLETE if runs is not None else None
    if path is None or not path.is_file():
        return None
    return path.read_text().strip() or "declared complete"


def commit_lines(runs: Path | None) -> list[str]:
    """The code the runs trained with: ``<runs>/lora_vs_full/COMMIT`` (written by ``lora_vs_full.sh``, copied by
    ``collect``): the commit, then ``git status --short -- lora_lightning`` (local changes of the training code)."""
    path = runs / "lora_vs_full" / "COMMIT" if runs is not None else None
    if path is None or not path.is_file():
        return []
    return [line for line in path.read_text().splitlines() if line.strip()]


def is_provisional(rows: list[dict], runs: Path | None) -> bool:
    return len(primary_seeds(rows)) < len(PRIMARY_SEEDS) and declared_complete(runs) is None


def status_line(rows: list[dict], runs: Path | None) -> str:
    """How many of the 17 pre-registered seeds are in, per cell and in all four cells."""
    cells = primary_cells(rows)
    done = primary_seeds(rows)
    per_cell = "; ".join(
        f"{s} steps {arm}: {len([x for x in cells[(s, arm)] if x in PRIMARY_SEEDS])}"
        for s in PRIMARY
        for arm in ("lora", "full")
    )
    reason = declared_complete(runs)
    head = (
        f"Declared complete with {len(done)} of {len(PRIMARY_SEEDS)} seeds ({reason})"
        if reason is not None
        else f"Complete: {len(done)} of {len(PRIMARY_SEEDS)} seeds"
        if len(done) == len(PRIMARY_SEEDS)
        else f"In progress: {len(done)} of {len(PRIMARY_SEEDS)} pre-registered seeds are in all four cells"
    )
    return (
        f"{head} (analysed: seeds {seed_range(list(done))}, n = {len(done)} per arm at each schedule); finished runs "
        f"per cell, of the pre-registered seeds: {per_cell}."
    )


def deviations(rows: list[dict], runs: Path | None) -> list[str]:
    """What departs from the pre-registered primary study: runs outside its seeds or settings, records without the
    per-example test results, local changes of the training code, and (once declared complete) fewer than 17 seeds."""
    out = []
    for schedule, experiment in PRIMARY.items():
        mine = of_experiment(rows, experiment)
        extra = sorted({r.get("seed") for r in mine if r.get("seed") not in PRIMARY_SEEDS}, key=str)
        if extra:
            out.append(
                f"primary study, {schedule} steps: runs with seeds outside 101-117 ({', '.join(map(str, extra))}); "
                "not analysed."
            )
        lora, full = arms(mine)
        other = [r for r in mine if r not in lora and r not in full]
        if other:
            out.append(
                f"primary study, {schedule} steps: {len(other)} runs of neither arm (LoRA W{{q,v}} r=8, full "
                "fine-tuning); not analysed."
            )
        wrong_lr = [r for r in lora if r.get("lr") != LORA_LR] + [r for r in full if r.get("lr") != FULL_LR]
        if wrong_lr:
            out.append(
                f"primary study, {schedule} steps: {len(wrong_lr)} runs at another lr than the pre-registered "
                f"{LORA_LR:g} (LoRA) / {FULL_LR:g} (full fine-tuning): seeds "
                f"{', '.join(str(r.get('seed')) for r in wrong_lr)}."
            )
        wrong_steps = [r for r in lora + full if r.get("steps") not in (None, STEPS[schedule])]
        if wrong_steps:
            which = ", ".join(f"seed {r.get('seed')}: {r.get('steps')}" for r in wrong_steps)
            out.append(
                f"primary study, {schedule} steps: {len(wrong_steps)} runs trained another number of steps ({which})."
            )
        no_examples = [r for r in lora + full if not r.get("test_correct")]
        if no_examples:
            out.append(
                f"primary study, {schedule} steps: {len(no_examples)} runs without per-example test results "
                "(`test_correct`), so the bootstrap over test examples leaves their arm out."
            )
    changes = commit_lines(runs)[1:]
    if changes:
        out.append(
            "primary study: trained with local changes of the training code: "
            + "; ".join(f"`{c}`" for c in changes)
            + "."
        )
    reason = declared_complete(runs)
    n = len(primary_seeds(rows))
    if reason is not None and n < len(PRIMARY_SEEDS):
        out.append(
            f"primary study: declared complete with {n} of {len(PRIMARY_SEEDS)} seeds per arm ({reason}); "
            "the checks below report the power of that n (MDE)."
        )
    return out


def reading(check: ClaimCheck, bootstrap: tuple | None = None) -> str:
    """What a LoRA-vs-full check supports, in words no stronger than its interval, with its n and MDE."""
    w, m = check.welch, check.margin
    power = f"n {check.n_text}, MDE {mde_text(check.mde)} pp"
    boot = (
        f"; bootstrap over seeds and test examples {bootstrap[0]:+.2f} [{bootstrap[1]:+.2f}, {bootstrap[2]:+.2f}]"
        if bootstrap
        else ""
    )
    if check.outcome.startswith("n/a"):
        return f"not testable yet (fewer than two seeds per arm; {power})"
    if check.verdict == AGREES:
        return (
            f"LoRA matches full fine-tuning within ±{m:g} point: {ci_text(w)} pp (TOST Holm p "
            f"{p_text(check.p_tost_holm, check.alpha)}; {power}{boot})"
        )
    if check.outcome == DIFFERENT:
        side = "below" if w.diff < 0 else "above"
        return (
            f"LoRA is {side} full fine-tuning: {ci_text(w)} pp (Holm p {p_text(check.p_holm, check.alpha)}; "
            f"{power}{boot})"
        )
    return f"the data cannot tell: {interval_text(check)} ({power}{boot})"


def interval_text(check: ClaimCheck) -> str:
    """Why a check is inconclusive, read off its interval: a CI that excludes 0 is never called too wide to tell."""
    w, m = check.welch, check.margin
    lo, hi = w.ci
    ci = ci_text(w)
    if math.isnan(lo):
        return f"the difference {ci} pp has no interval"
    if lo > 0 or hi < 0:
        return (
            f"the 95% CI {ci} pp excludes 0, but the difference is not significant after Holm's correction "
            f"(Holm p {p_text(check.p_holm, check.alpha)})"
        )
    if check.claim.kind != EQUIVALENT:
        return f"the 95% CI {ci} pp includes 0 (Holm p {p_text(check.p_holm, check.alpha)})"
    if lo > -m and hi < m:
        return (
            f"the 95% CI {ci} pp includes 0 and lies inside ±{m:g}, but equivalence is not significant after "
            f"correction (TOST Holm p {p_text(check.p_tost_holm, check.alpha)})"
        )
    return (
        f"the 95% CI {ci} pp includes 0 and reaches beyond ±{m:g} (Holm p {p_text(check.p_holm, check.alpha)}, "
        f"TOST Holm p {p_text(check.p_tost_holm, check.alpha)})"
    )


def family_table(checks: Sequence[PrimaryCheck]) -> list[str]:
    """One row per schedule: both arms, the difference, its tests (Holm within the family), power and bootstrap."""
    if not checks:
        return []
    c0 = checks[0].check
    lines = [
        f"Family of {c0.family} checks (Holm over its difference p-values, and over its TOST p-values at "
        f"±{c0.margin:g}), alpha {c0.alpha:g}; MDE at the per-check level {c0.level:.4f} with the seed sd pooled over "
        f"the family's arms ({c0.sd:.2f} pp); TOST power at a true difference of 0 in brackets.",
        "",
        "| schedule | LoRA | full FT | seeds (LoRA / full) | n | LoRA − full (pp) [95% CI] | Welch t (df) | p | p, "
        f"Holm | TOST p, Holm (±{c0.margin:g}) [power] | MDE (pp) | bootstrap over seeds and test examples [95% CI] | "
        "outcome | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pc in checks:
        c, w = pc.check, pc.check.welch
        tdf = "-" if math.isnan(w.t) else f"{w.t:+.2f} ({w.df:.1f})"
        tost = p_text(c.p_tost_holm, c.alpha) + ("" if math.isnan(c.tost_power) else f" [{c.tost_power:.2f}]")
        boot = (
            f"{pc.bootstrap[0]:+.2f} [{pc.bootstrap[1]:+.2f}, {pc.bootstrap[2]:+.2f}] ({pc.bootstrap[3]} examples)"
            if pc.bootstrap
            else "-"
        )
        lines.append(
            f"| {pc.schedule} steps | {c.claim.a} | {c.claim.b} | {seed_range(list(pc.seeds_lora))} / "
            f"{seed_range(list(pc.seeds_full))} | {c.n_text} | {ci_text(w)} | {tdf} | {p_text(w.p, c.level)} | "
            f"{p_text(c.p_holm, c.alpha)} | {tost} | {mde_text(c.mde)} | {boot} | {c.outcome} | **{c.verdict}** |"
        )
    return lines


def primary_section(
    rows: list[dict], runs: Path | None = None, margin: float = MARGIN, alpha: float = ALPHA
) -> tuple[list[str], dict[str, list[PrimaryCheck]], dict[str, list[PrimaryCheck]]]:
    """The section, the primary family's checks (by metric) and the pilot's (exploratory), for the report's summary
    lists; empty when neither the study nor the pilot has runs."""
    primary = primary_checks(rows, margin, alpha)
    pilot = pilot_primary_checks(rows, margin, alpha)
    if not primary and not pilot:
        return [], {}, {}
    provisional = is_provisional(rows, runs)
    lines = [
        "## LoRA vs full fine-tuning (the pre-registered primary family)",
        "",
        f"Pre-registered in `experiments/PREREGISTRATION.md` (Runs, §1): LoRA W{{{LORA_ARM[1]}}}, r={LORA_ARM[2]}, "
        f"alpha 16, lr {LORA_LR:g} against full fine-tuning at lr {FULL_LR:g}, on the ablation task at 150 steps "
        f"(`experiment={PRIMARY[150]}`) and at 300 steps (`experiment={PRIMARY[300]}`), seeds 101-117 for both arms "
        "at both schedules (`bash experiments/lora_vs_full.sh`, then `python -m experiments collect`). Test accuracy "
        "is the primary metric and validation accuracy a secondary family of its own, never used to overturn a "
        f"primary verdict. Each family holds one check per schedule (k = 2): Welch's t-test and TOST at ±{margin:g} "
        "point, each Holm-corrected within the family; beside each test-accuracy check, the bootstrap over seeds and "
        "test examples (`stats.example_bootstrap`, 4,000 draws, seed 0). 17 seeds per arm give each check 80% power "
        "to detect a difference of 1 point and to show equivalence within ±1 when the true difference is 0 (the power "
        "analysis of the pre-registration).",
        "",
    ]
    if primary:
        commit = commit_lines(runs)
        lines += [status_line(rows, runs) + (f" Trained at commit `{commit[0][:12]}`." if commit else ""), ""]
        if provisional:
            lines += [
                "**Provisional:** the study is in progress, so the verdicts below are provisional; the pre-registered "
                "verdict is the one read at 17 seeds per arm (or at the n the study is declared complete with).",
                "",
            ]
        testable = any(not pc.check.outcome.startswith("n/a") for checks in primary.values() for pc in checks)
        if not testable:
            lines += ["No check is testable yet: fewer than two of the pre-registered seeds are in all four cells.", ""]
        for metric in (TEST_METRIC, METRIC):
            if metric not in primary or not testable:
                continue
            role = "primary" if metric == TEST_METRIC else "secondary"
            lines += [f"On {METRIC_NAMES[metric]} ({role} family):", "", *family_table(primary[metric]), ""]
            lines += [
                f"- {pc.schedule} steps, {METRIC_NAMES[metric]}: "
                + ("provisional: " if provisional else "")
                + reading(pc.check, pc.bootstrap)
                + "."
                for pc in primary[metric]
            ] + [""]
    else:
        lines += [
            f"Not run yet: no `{PRIMARY[150]}` or `{PRIMARY[300]}` run is collected; the pilot's figures below are "
            "exploratory.",
            "",
        ]
    if pilot:
        lines += [
            "### The pilot (exploratory)",
            "",
            "The same comparison on the pilot runs, every seed they have: at 150 steps Table 6's LoRA W{q,v} r=8 "
            "against its full fine-tuning reference rows, at 300 steps the `convergence` runs of both; the same "
            "family definition (k = 2 per metric). Exploratory: these data were seen before the analysis was fixed, "
            "and they sized the primary study; they do not decide it.",
            "",
        ]
        for metric in (TEST_METRIC, METRIC):
            if metric in pilot:
                lines += [f"On {METRIC_NAMES[metric]}:", "", *family_table(pilot[metric]), ""]
                lines += [
                    f"- pilot, {pc.schedule} steps, {METRIC_NAMES[metric]} (exploratory): "
                    + reading(pc.check, pc.bootstrap)
                    + "."
                    for pc in pilot[metric]
                ] + [""]
    return lines, primary, pilot
