"""The README's section on a longer schedule: do the ablations' differences and verdicts hold when the schedule is
twice as long?

The ``convergence`` experiment (``conf/experiment/convergence.yaml``, ``experiments/convergence.sh``) trains the
cells the verdicts compare for 300 steps instead of 150, each at the lr its family's 150-step search chose. This
module sets those runs beside the 150-step runs of the same cells and seeds (``table6``, ``table6_reference``):
per cell the change in accuracy; per comparison the difference at both schedules; and the 300-step ablation family
(``claims.ablation_checks(..., schedule=300)``): the same 10 Table 5 / Table 6 claims as at 150 steps, one Holm family
per metric, Table 5's claims read on ``convergence_table5`` and Table 6's on ``convergence``. LoRA vs full
fine-tuning is not in it (the primary family, ``primary.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from experiments.claims import TABLE5_ORDER, ClaimCheck, ablation_checks, table5_stats, table6_claims
from experiments.plots import plot_curves
from experiments.records import (
    LONG,
    LONG_TABLE5,
    METRIC,
    METRIC_NAMES,
    TEST_METRIC,
    by_cell,
    fresh_subspace_text,
    of_experiment,
    with_curves,
)
from experiments.stats import ALPHA, MARGIN, convergence_check, stat_of, welch
from experiments.tables import STD_NOTE, ci_text, claims_markdown, describe, lr_text, seeds_text, targets_text

SHORT = ("table6", "table6_reference")
CELL_ORDER = {"full": 0, "head_only": 1, "lora": 2}
TARGET_ORDER = {"q,v": 0, "q": 1, "q,k,v,o": 2}


def cell_sort(key: tuple[str, str, int | None]) -> tuple:
    return (CELL_ORDER.get(key[0], 9), TARGET_ORDER.get(key[1], 9), key[2] or 0)


def steps_text(rows: Sequence[dict]) -> str:
    return "/".join(str(s) for s in sorted({r.get("steps") for r in rows if r.get("steps")})) or "?"


def cell_claims(cells: dict[tuple, list[dict]], metric: str) -> list:
    """Table 6's claims on these cells (those whose groups exist)."""
    return table6_claims({(k[1], k[2]): stat_of(v, metric) for k, v in cells.items() if k[0] == "lora"})


def comparison_rows(short: dict[tuple, list[dict]], long: dict[tuple, list[dict]], metric: str) -> list[str]:
    """Each Table 6 claim's difference at 150 and at 300 steps (same seeds), side by side."""
    a, b = cell_claims(short, metric), cell_claims(long, metric)
    s_by_text = {c.text: c for c in a}
    seeds = seeds_text([r for v in long.values() for r in v])
    lines = [
        f"| comparison ({METRIC_NAMES[metric]}) | 150 steps, seeds {seeds}: a − b (pp) [95% CI] | 300 steps, seeds "
        f"{seeds}: a − b (pp) [95% CI] |",
        "|---|---|---|",
    ]
    for c in b:
        s = s_by_text.get(c.text)
        w_long = welch(c.a, c.b)
        w_short = welch(s.a, s.b) if s else None
        lines.append(
            f"| {c.text}: {c.a_label} − {c.b_label} | {ci_text(w_short) if w_short else '-'} | {ci_text(w_long)} |"
        )
    return lines


def cell_table(first: str, cells: Sequence[tuple[str, list[dict], list[dict]]]) -> list[str]:
    """The table of both schedules, one row per (label, 300-step runs, 150-step runs): lr, seeds, val and test
    accuracy at both schedules and the change (Welch 95% CI; '-' below two runs a side); then its caption."""
    lines = [
        f"| {first} | lr | seeds | val acc, 150 steps | val acc, 300 steps | Δ val (pp) [95% CI] | test acc, 150 "
        "steps | test acc, 300 steps | Δ test (pp) [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, long_runs, short_runs in cells:
        values = []
        for metric in (METRIC, TEST_METRIC):
            a, b = stat_of(long_runs, metric), stat_of(short_runs, metric)
            values += [str(b), str(a), ci_text(welch(a, b)) if a.n > 1 and b.n > 1 else "-"]
        lines.append(
            f"| {label} | {lr_text(r.get('lr') for r in long_runs)} | {seeds_text(long_runs)} | "
            + " | ".join(values)
            + " |"
        )
    return lines + ["", f"Mean ± std over seeds; {STD_NOTE}. Δ = 300 steps − 150 steps (Welch 95% CI).", ""]


def curve_lines(groups: dict[str, list[dict]], title: str, path: Path, link: str, alt: str) -> list[str]:
    """The mean validation curves of ``groups`` (label -> runs) plotted to ``path``, its image link, and each curve's
    last step against the seed noise; nothing when no run has a curve."""
    curves = with_curves(groups)
    if not curves:
        return []
    plot_curves({f"{title}: validation accuracy, mean over seeds (band: seed range)": curves}, path)
    return [
        f"![{alt}]({link}/{path.name})",
        "",
        "Last two points of each mean validation curve against the seed noise at the last point:",
        "",
        *(c.line() for label, runs in curves.items() if (c := convergence_check(label, runs))),
        "",
    ]


def weights_key(label: str) -> str:
    """'W{q,v}' -> 'q,v': the Table 5 cell a claim's group label names."""
    return label[2:-1]


def table5_lines(rows: list[dict], checks: dict[str, list[tuple[str, ClaimCheck]]], out: Path, link: str) -> list[str]:
    """Table 5 at 300 steps (experiment ``convergence_table5``) beside the 150-step Table 5 runs of the same seeds:
    each weight-type set, its validation curves (plotted into ``out``), each Table 5 claim's difference at both
    schedules, and the Table 5 claims of the 300-step family (``checks``, from ``ablation_checks(..., 300)``). Empty
    when no such run exists."""
    long_rows = of_experiment(rows, LONG_TABLE5, ["lora"])
    if not long_rows:
        return []
    seeds = {r.get("seed") for r in long_rows}
    short_rows = [r for r in of_experiment(rows, "table5", ["lora"]) if r.get("seed") in seeds]
    sets = []  # (label, 300-step runs, 150-step runs) per weight-type set, in Table 5's order
    for k in TABLE5_ORDER:
        if mine := [r for r in long_rows if r["targets_key"] == k]:
            sets.append(
                (f"{targets_text(k)}, r={mine[0].get('r')}", mine, [r for r in short_rows if r["targets_key"] == k])
            )
    lines = [
        f"### Table 5 at {steps_text(long_rows)} steps",
        "",
        f"The same trainable-parameter budget spent on different weight types, trained for {steps_text(long_rows)} "
        f"steps instead of {steps_text(short_rows) if short_rows else '150'} "
        "(`conf/experiment/convergence_table5.yaml`, `bash experiments/convergence.sh table5`), each family at its "
        f"150-step lr; seeds {seeds_text(long_rows)}, and the 150-step columns use the Table 5 runs of the same seeds.",
        "",
        *cell_table("weights", sets),
        *curve_lines(
            {label: mine for label, mine, _ in sets},
            f"Table 5, {steps_text(long_rows)} steps",
            out / "convergence_table5_300steps.png",
            link,
            "Table 5 at 300 steps",
        ),
    ]
    complete = "Holm over the family's 10 claims"
    for metric in (METRIC, TEST_METRIC):
        s_short = table5_stats(short_rows, metric)
        mine = [c for t, c in checks.get(metric, []) if t == "table5"]
        if not mine:
            continue
        lines += [
            f"| Table 5 claim ({METRIC_NAMES[metric]}, groups as chosen at 300 steps) | 150 steps, seeds "
            f"{seeds_text(long_rows)}: a − b (pp) [95% CI] | 300 steps: a − b (pp) [95% CI] |",
            "|---|---|---|",
        ]
        for c in (check.claim for check in mine):
            a, b = s_short.get(weights_key(c.a_label)), s_short.get(weights_key(c.b_label))
            before = ci_text(welch(a, b)) if a is not None and b is not None and a.n > 1 and b.n > 1 else "-"
            lines.append(f"| {c.text}: {c.a_label} − {c.b_label} | {before} | {ci_text(welch(c.a, c.b))} |")
        lines += [
            "",
            f"Table 5's claims in the {steps_text(long_rows)}-step ablation family, {METRIC_NAMES[metric]} "
            f"(exploratory; {family_scope(checks[metric], complete, 'table6', 'the Table 6 claims above')}):",
            "",
            claims_markdown(mine),
            "",
        ]
    return lines


def family_scope(family: Sequence[tuple[str, ClaimCheck]], complete: str, other: str, where: str) -> str:
    """How a table's claims sit in the ablation family ``family`` (``(table, check)`` pairs): ``complete`` when the
    Holm family holds all 10 claims, else its size as the checks count it (a claim whose cells lack runs is not
    tested), and whether the claims of the ``other`` table (named by ``where``) are in it."""
    n = family[0][1].family if family else 0
    scope = complete if n == 10 else f"Holm over the {n} claims these runs can test"
    return scope + (f", {where} included" if any(t == other for t, _ in family) else "")


def subspace_lines(out: Path, runs: Path | None, link: str = "results") -> list[str]:
    """``out/subspace_convergence.md`` (``python -m experiments subspace --experiment convergence``) when it was
    computed from ``runs`` and its adapters still exist; nothing otherwise."""
    text = fresh_subspace_text(out / f"subspace_{LONG}.md", runs, link) if runs is not None else None
    if text is None:
        return []
    return [
        "§7.2 and §7.3 recomputed on the 300-step adapters (same seeds; compare with the 150-step sections below):",
        "",
        text,
        "",
    ]


def longer_schedule_section(
    rows: list[dict],
    out: Path,
    link: str,
    margin: float = MARGIN,
    alpha: float = ALPHA,
    runs: Path | None = None,
    checks: dict[str, list[tuple[str, ClaimCheck]]] | None = None,
) -> list[str]:
    """The section of experiments/README.md; empty when no ``convergence`` run exists. ``checks``: the 300-step
    ablation family (``ablation_checks(rows, margin, alpha, 300)``) when the caller has it already."""
    long_rows = of_experiment(rows, LONG)
    if not long_rows:
        return []
    if checks is None:
        checks = ablation_checks(rows, margin, alpha, 300)
    long = dict(sorted(by_cell(long_rows).items(), key=lambda kv: cell_sort(kv[0])))
    seeds = {r.get("seed") for r in long_rows}
    short_all = by_cell([r for e in SHORT for r in of_experiment(rows, e)])
    # like for like: the 150-step runs of the same cells and seeds
    short = {k: [r for r in short_all.get(k, []) if r.get("seed") in seeds] for k in long}
    short = {k: v for k, v in short.items() if v}
    lines = [
        "## A longer schedule",
        "",
        f"The cells the verdicts compare, trained for {steps_text(long_rows)} AdamW steps (4 epochs; linear warmup "
        f"and decay over the whole schedule) instead of {steps_text([r for v in short.values() for r in v])}, each at "
        "the lr its family's 150-step search chose (`conf/experiment/convergence.yaml`; `bash "
        "experiments/convergence.sh`, and `... rest` for W{q} at r=1 and 64 and all four at r=64). Seeds "
        f"{seeds_text(long_rows)}; the 150-step columns of the tables below use the same cells and seeds from the "
        "Table 6 runs, so each row compares the two schedules like for like (the 150-step claim checks use every "
        "seed: 5 in the eight Table 6 cells its claims compare).",
        "",
        *cell_table("cell", [(describe(v[0]), v, short.get(k, [])) for k, v in long.items()]),
        *curve_lines(
            {describe(v[0]): v for v in long.values()},
            f"{steps_text(long_rows)} steps",
            out / "convergence_300steps.png",
            link,
            "300-step curves",
        ),
        "What each Table 6 comparison the verdicts read looks like at both schedules (LoRA vs full fine-tuning: see "
        '"LoRA vs full fine-tuning"):',
        "",
    ]
    for metric in (METRIC, TEST_METRIC):
        lines += comparison_rows(short, long, metric) + [""]
    for metric in (METRIC, TEST_METRIC):
        if mine := [c for t, c in checks.get(metric, []) if t == "table6"]:
            scope = family_scope(
                checks[metric], "the same 10 claims as at 150 steps, Holm over all 10", "table5", "Table 5's below"
            )
            lines += [
                f"Table 6's claims in the {steps_text(long_rows)}-step ablation family, {METRIC_NAMES[metric]} "
                f"(exploratory; {scope}):",
                "",
                claims_markdown(mine),
                "",
            ]
    return lines + subspace_lines(out, runs, link) + table5_lines(rows, checks, out, link)
