"""Markdown: numbers in words, the claim tables, the Method paragraph of the statistical tests, the Table 5 /
Table 6 / variants tables and the per-run CSV files. Imports ``records``, ``stats`` and ``claims``.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from experiments.claims import (
    GREATER,
    TABLE5_ORDER,
    TABLE5_PAPER,
    TABLE6_PAPER,
    TABLE6_RANKS,
    TABLE6_TARGETS,
    ClaimCheck,
    equivalent_label,
    table5_stats,
    table6_stats,
)
from experiments.records import METRIC, METRIC_NAMES, TEST_METRIC, has_metric, metrics_present
from experiments.stats import ALPHA, MARGIN, Stat, Welch, group, pooled_std, welch

# --------------------------------------------------------------------------- numbers and runs in words
STD_NOTE = "± = sample standard deviation over seeds (n−1), not the standard error"
PAPER_SPREAD = "Paper rows: (±0.5) / (±0.1) is the fluctuation the paper states for WikiSQL / MultiNLI."
METHOD_LABELS = {"full": "full fine-tuning", "head_only": "head only", "lora": "LoRA"}


def pct(x: float | None) -> str:
    """An accuracy in [0, 1] as a percentage with one decimal ('-' when absent)."""
    return "-" if x is None else f"{100 * x:.1f}"


def lr_text(lrs: Iterable[Any]) -> str:
    return ", ".join(f"{x:g}" for x in sorted({float(v) for v in lrs if v is not None})) or "-"


def targets_text(key: str) -> str:
    return f"W{{{key}}}" if key else "-"


def seeds_text(rows: Iterable[dict]) -> str:
    seeds = sorted({r.get("seed") for r in rows if r.get("seed") is not None})
    return ", ".join(map(str, seeds)) or "-"


def describe(row: dict) -> str:
    """A run's method in words: 'LoRA W{q,v}, r=4', 'full fine-tuning', 'head only'."""
    if row.get("method") == "lora":
        return f"LoRA {targets_text(row['targets_key'])}, r={row.get('r')}"
    return METHOD_LABELS.get(row.get("method"), str(row.get("method")))


def stat_cell(rows: list[dict], metric: str) -> str:
    """One run: its accuracy; several: mean ± std."""
    values = [r[metric] for r in rows if has_metric(r, metric)]
    if not values:
        return "-"
    return pct(values[0]) if len(values) == 1 else str(Stat.of(values))


def p_text(p: float, alpha: float = ALPHA) -> str:
    """A p-value with 3 decimals ('<0.001' below), more where 3 would print the level ``alpha`` itself or put it on the
    other side of ``alpha`` than the unrounded value the verdict reads (0.0495 is printed 0.0495, not 0.050)."""
    if math.isnan(p):
        return "-"
    if p < 0.001:
        return "<0.001"
    digits = 3
    while (
        digits < 8
        and p != alpha
        and (float(f"{p:.{digits}f}") == alpha or (float(f"{p:.{digits}f}") < alpha) != (p < alpha))
    ):
        digits += 1
    return f"{p:.{digits}f}"


def mde_text(value: float) -> str:
    return "-" if math.isnan(value) else "∞" if math.isinf(value) else f"{value:.2f}"


def ci_text(w: Welch) -> str:
    """'+0.91 [+0.37, +1.46]': the difference and its confidence interval (the interval left out when undefined)."""
    return f"{w.diff:+.2f}" + ("" if math.isnan(w.ci[0]) else f" [{w.ci[0]:+.2f}, {w.ci[1]:+.2f}]")


# --------------------------------------------------------------------------- claim checks and the Method paragraph
def claims_markdown(checks: Sequence[ClaimCheck]) -> str:
    """One row per claim: the difference with its 95% CI (no ± in this table), n per arm, Welch t and df, raw and
    Holm-corrected p, Holm-corrected TOST p (equivalence claims only) with TOST's power, the MDE, outcome and
    verdict; above it, the family's sizes, levels and seed sd."""
    if not checks:
        return ""
    c0 = checks[0]
    tost = (
        f"equivalence claims by TOST at ±{c0.margin:g} pp, Holm over the {c0.tost_family} equivalence claims (the "
        '"beats" claims are not in that family)'
        if c0.tost_family
        else "no equivalence claim in this family"
    )
    lines = [
        f"Claim checks: Welch t-test; p Holm-corrected over the {c0.family} checks of its family; {tost}; alpha "
        f"{c0.alpha:g}. Brackets are 95% confidence intervals of the difference. MDE: the true difference the "
        f"difference test detects with 80% power at its per-check level alpha/{c0.family} = {c0.level:.4f} (Holm's "
        f"first step), at its n per arm, with the seed sd pooled over this family's groups ({c0.sd:.2f} pp); TOST "
        "power: the chance to show equivalence when the true difference is 0, at its per-check level (see Method).",
        "",
        f"| paper's claim | test | ours: difference a − b (pp) [95% CI] | n (a / b) | Welch t (df) | p | p, Holm | "
        f"TOST p, Holm (±{c0.margin:g}) [power] | MDE (pp) | outcome | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        w = c.welch
        test = "difference" if c.claim.kind == GREATER else f"equivalence ±{c.margin:g}"
        tdf = "-" if math.isnan(w.t) else f"{w.t:+.2f} ({w.df:.1f})"
        tost_cell = (
            "-"
            if c.claim.kind == GREATER
            else p_text(c.p_tost_holm, c.alpha) + ("" if math.isnan(c.tost_power) else f" [{c.tost_power:.2f}]")
        )
        lines.append(
            f"| {c.claim.text} | {test} | {c.claim.a_label} − {c.claim.b_label}: {ci_text(w)} | {c.n_text} | {tdf} | "
            f"{p_text(w.p, c.level)} | {p_text(c.p_holm, c.alpha)} | {tost_cell} | {mde_text(c.mde)} | {c.outcome} | "
            f"**{c.verdict}** |"
        )
    return "\n".join(lines)


def method_markdown(margin: float = MARGIN, alpha: float = ALPHA, *, heading: bool = True) -> str:
    """The report's Method paragraph for the claim checks: the test, the families and their corrections as
    experiments/PREREGISTRATION.md fixes them, the equivalence margin, the power printed with every check, the
    three outcomes and the verdicts."""
    return (
        ("## Method\n\n" if heading else "")
        + "Tables: every accuracy cell is mean ± std over n seeds (± is the sample standard deviation, n−1 "
        "denominator, not the standard error; n is printed with each table). "
        "Claim checks compare two of our configurations a and b with Welch's two-sample t-test (unequal "
        "variances): difference d = mean_a − mean_b, standard error SE = sqrt(s_a²/n_a + s_b²/n_b), t = d/SE, "
        "Welch–Satterthwaite degrees of freedom df = SE⁴ / ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1)), "
        "two-sided p-value and 95% confidence interval d ± t(0.975, df)·SE. "
        "Families, as `experiments/PREREGISTRATION.md` fixes them: at each schedule (150 and 300 steps) and for each "
        "metric (validation and test accuracy), the ablation family holds the same 10 claims (Table 5: W{q,v} and "
        "W{q,k,v,o} beat the best single type, W{q} and W{k} alone are worse than the weaker of W{v}, W{o}; Table 6: "
        "r=1 competitive for W{q,v}, W{q} gains from r, little gain past r=8 for each of three sets, W{q,v} beats "
        "W{q} at r=8). Their 10 difference p-values are Holm–Bonferroni corrected together at alpha = "
        f"{alpha:g}; the "
        'TOST p-values of the 4 equivalence claims form a second Holm family (the "beats" claims are not in it). '
        '"LoRA matches full fine-tuning" is not an ablation claim: it is the primary family (its own section). '
        f"Equivalence margin ±{margin:g} point: TOST, two one-sided Welch t-tests of H0: |d| ≥ {margin:g} against "
        f"|d| < {margin:g} accuracy points (uncorrected, this is the 90% confidence interval lying inside "
        f"±{margin:g}). "
        f'Every check has one of three outcomes: "{equivalent_label(margin)}" (TOST significant after '
        'correction), "different" (difference significant after correction) or "inconclusive" (neither: the data '
        "cannot tell, and the check's CI says by how much). Where both tests are significant (a real difference inside "
        "the margin), the outcome the claim is about is shown. Power: every check prints n per arm and its minimum "
        "detectable effect (MDE), the true difference its difference test detects with 80% power at its per-check "
        "level alpha/k (Holm's first step, k the family's size; `experiments/power.py`), with the seed sd pooled over "
        "the family's groups; an equivalence claim also prints TOST's power when the true difference is 0. "
        'Verdict vs the paper: "agrees" only when the test supports the paper\'s claim (a significant '
        'difference in the paper\'s direction, or equivalence for a no-difference claim), "disagrees" when it '
        "supports the opposite (a significant difference in the other direction, or a significant difference "
        'where the paper claims none), "inconclusive" otherwise. A difference that merely stays under a '
        "threshold is never scored as agreement. p-values print with 3 decimals (more where 3 would round across "
        "the level), and the verdicts use the unrounded values. The ablation runs are the pilot of the pre-registered "
        "study: their data were seen before this analysis was fixed, so their verdicts are exploratory."
    )


def spread_caption(stats: Iterable[Stat]) -> str:
    """The line under a table that says what its ± is, with the seed counts of its cells."""
    ns = sorted({s.n for s in stats if s.n > 0})
    n = "-" if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}, per cell"
    return (
        f"Cells: mean ± std over n seeds (n = {n}); ± is the sample standard deviation over seeds, not the standard "
        "error."
    )


# --------------------------------------------------------------------------- tables
CSV_COLUMNS = [
    "experiment",
    "method",
    "variant",
    "lr",
    "targets_key",
    "r",
    "alpha",
    "init",
    "init_seed",
    "seed",
    "best_val_acc",
    "test_acc",
    "params_lora",
    "params_trainable",
    "fit_seconds",
    "steps",
    "adapter_bytes",
]


def write_csv(rows: list[dict], path: Path) -> None:
    """One line per run (the columns of ``CSV_COLUMNS``; empty where a run did not record one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for row in sorted(
            rows, key=lambda r: (r.get("method", ""), r["targets_key"], r.get("r") or 0, r.get("seed", 0))
        ):
            w.writerow(["" if row.get(c) is None else row.get(c) for c in CSV_COLUMNS])


def _bold(stat: Stat | None) -> str:
    return f"**{stat}**" if stat is not None else "-"


def table5_markdown(rows: list[dict]) -> tuple[str, dict[str, Stat]]:
    """Table 5, ours (validation and, where recorded, test accuracy) beside the paper's; returns the val cells too."""
    stats, test = table5_stats(rows), table5_stats(rows, TEST_METRIC)
    ranks = {row["targets_key"]: row["r"] for row in rows}
    params = {row["targets_key"]: row["params_lora"] for row in rows}
    head = "| weights | " + " | ".join(f"W{{{t}}}" for t in TABLE5_ORDER) + " |"
    lines = [head, "|---" * (len(TABLE5_ORDER) + 1) + "|"]
    lines.append("| r (ours) | " + " | ".join(str(ranks.get(t, "-")) for t in TABLE5_ORDER) + " |")
    lines.append(
        "| LoRA params (ours) | " + " | ".join(f"{params[t]:,}" if t in params else "-" for t in TABLE5_ORDER) + " |"
    )
    lines.append(
        "| **val acc, MiniLM / Rotten Tomatoes (ours, mean ± std)** | "
        + " | ".join(_bold(stats.get(t)) for t in TABLE5_ORDER)
        + " |"
    )
    if test:
        lines.append(
            "| test acc, same runs (ours, mean ± std) | "
            + " | ".join(str(test[t]) if t in test else "-" for t in TABLE5_ORDER)
            + " |"
        )
    lines.append("| seeds (ours) | " + " | ".join(str(stats[t].n) if t in stats else "0" for t in TABLE5_ORDER) + " |")
    lines.append("| r (paper) | " + " | ".join(str(TABLE5_PAPER[t][0]) for t in TABLE5_ORDER) + " |")
    lines.append("| WikiSQL (paper, ±0.5) | " + " | ".join(f"{TABLE5_PAPER[t][1]}" for t in TABLE5_ORDER) + " |")
    lines.append("| MultiNLI (paper, ±0.1) | " + " | ".join(f"{TABLE5_PAPER[t][2]}" for t in TABLE5_ORDER) + " |")
    lines += ["", spread_caption([*stats.values(), *test.values()]) + " " + PAPER_SPREAD]
    return "\n".join(lines), stats


REFERENCE_LABELS = {"full": "full fine-tuning", "head_only": "head only (frozen encoder)"}


def reference_markdown(ref_rows: list[dict]) -> tuple[list[str], list[Stat]]:
    """Table 6's reference rows (full fine-tuning, head only): val and test accuracy, trainable parameters."""
    val = {k[0]: s for k, s in group(ref_rows, "method").items()}
    test = {k[0]: s for k, s in group(ref_rows, "method", metric=TEST_METRIC).items()}
    params = {row["method"]: row.get("params_trainable") for row in ref_rows}
    lines = [
        "| reference (ours) | val acc (mean ± std) | test acc (mean ± std) | lr | trainable params |",
        "|---|---|---|---|---|",
    ]
    for m, label in REFERENCE_LABELS.items():
        if m in val:
            lrs = sorted({row.get("lr") for row in ref_rows if row["method"] == m and row.get("lr") is not None})
            p = f"{params[m]:,}" if params.get(m) else "-"
            lines.append(
                f"| {label} | {val[m]} | {test.get(m, '-')} | {', '.join(f'{x:g}' for x in lrs) or '-'} | {p} |"
            )
    return lines, [*val.values(), *test.values()]


def table6_markdown(rows: list[dict], ref_rows: list[dict]) -> tuple[str, dict[tuple[str, int], Stat]]:
    """Table 6, ours (val and test rows) beside the paper's, and the reference rows; returns the val cells too."""
    stats, test = table6_stats(rows), table6_stats(rows, TEST_METRIC)
    lines = [
        "| weights | " + " | ".join(f"r={r}" for r in TABLE6_RANKS) + " | source |",
        "|---" * (len(TABLE6_RANKS) + 2) + "|",
    ]
    for t in TABLE6_TARGETS:
        lines.append(
            f"| **W{{{t}}}** | "
            + " | ".join(_bold(stats.get((t, r))) for r in TABLE6_RANKS)
            + " | ours, val acc (mean ± std) |"
        )
        if test:
            lines.append(
                "| | "
                + " | ".join(str(test[(t, r)]) if (t, r) in test else "-" for r in TABLE6_RANKS)
                + " | ours, test acc (mean ± std) |"
            )
        lines.append(
            "| | " + " | ".join(f"{TABLE6_PAPER[t][r][0]}" for r in TABLE6_RANKS) + " | paper, WikiSQL (±0.5) |"
        )
        lines.append(
            "| | " + " | ".join(f"{TABLE6_PAPER[t][r][1]}" for r in TABLE6_RANKS) + " | paper, MultiNLI (±0.1) |"
        )
    ref_stats: list[Stat] = []
    if ref_rows:
        ref_lines, ref_stats = reference_markdown(ref_rows)
        lines += ["", *ref_lines]
    lines += ["", spread_caption([*stats.values(), *test.values(), *ref_stats]) + " " + PAPER_SPREAD]
    return "\n".join(lines), stats


def rank_profile_markdown(rows: list[dict]) -> str:
    """Every Table 6 row's r=1 and r=8 against its r=64, ours (val and test, Welch 95% CI, raw p) beside the
    paper's difference: a description of each row's shape, deliberately outside the claim checks' Holm family."""
    by_metric = {m: table6_stats(rows, m) for m in metrics_present(rows)}
    lines = [
        "| weights | comparison | paper (WikiSQL / MultiNLI) | "
        + " | ".join(f"ours, {METRIC_NAMES[m]}: diff [95% CI], raw p" for m in by_metric)
        + " |",
        "|---|---|---|" + "---|" * len(by_metric),
    ]
    for key in TABLE6_TARGETS:
        for small in (1, 8):
            paper = TABLE6_PAPER[key]
            cells = []
            for stats in by_metric.values():
                a, b = stats.get((key, small)), stats.get((key, 64))
                if a is None or b is None or a.n < 2 or b.n < 2:
                    cells.append("-")
                    continue
                w = welch(a, b)
                cells.append(f"{ci_text(w)}, p {p_text(w.p)} (n {a.n} / {b.n})")
            lines.append(
                f"| W{{{key}}} | r={small} − r=64 | {paper[small][0] - paper[64][0]:+.1f} / "
                f"{paper[small][1] - paper[64][1]:+.1f} | " + " | ".join(cells) + " |"
            )
    return "\n".join(
        [
            "Rank profile of every row: r=1 and r=8 against r=64, ours beside the paper's difference (a description, "
            "not a claim check: raw p-values, outside the Holm family of the checks above):",
            "",
            *lines,
        ]
    )


# --------------------------------------------------------------------------- variants
VARIANT_ORDER = ["lora", "rslora", "dora", "pissa", "vera", "adalora", "qlora"]


def variants_markdown(rows: list[dict]) -> str:
    """One row per (variant, lr): val acc, adapter parameters, step time, adapter bytes, base bytes."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row.get("variant") or "lora", row.get("lr") or math.nan), []).append(row)
    order = sorted(groups, key=lambda k: (VARIANT_ORDER.index(k[0]) if k[0] in VARIANT_ORDER else 99, k[1]))
    lines = [
        "| variant | lr | val acc (mean ± std) | seeds | adapter params | trainable (incl. head) | s / step (median) "
        "| adapter file | adapted base weights |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in order:
        g = groups[key]
        stat = Stat.of(r[METRIC] for r in g)
        step = statistics.median(r["fit_seconds"] / r["steps"] for r in g if r.get("steps"))
        base = g[0].get("base_bytes_after")
        before = g[0].get("base_bytes_before")
        base_txt = (
            f"{base / 1e6:.2f} MB (from {before / 1e6:.2f} MB)"
            if base and before and base != before
            else "unchanged"
            if base
            else "not recorded"
        )
        lines.append(
            f"| {key[0]} | {key[1]:g} | **{stat}** | {stat.n} | {g[0]['params_lora']:,} | {g[0]['params_trainable']:,} "
            f"| {step:.2f} | {g[0].get('adapter_bytes', 0) / 1e6:.2f} MB | {base_txt} |"
        )
    lines += ["", spread_caption(Stat.of(r[METRIC] for r in g) for g in groups.values())]
    return "\n".join(lines)


def noise_line(rows: list[dict], *keys: str, metric: str = METRIC) -> str:
    """Run count, seed noise (pooled within-configuration std of ``metric``) and median fit time."""
    sd, dof = pooled_std(rows, *keys, metric=metric)
    times = [row["fit_seconds"] for row in rows if row.get("fit_seconds")]
    t = f"; fit time per run median {statistics.median(times):.0f} s" if times else ""
    return (
        f"{len(rows)} runs; seed noise of {METRIC_NAMES[metric]} (pooled within-config std) {sd:.2f} pp with {dof} "
        f"degrees of freedom{t}."
    )
