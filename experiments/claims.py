"""The paper's claims, stated on our groups of runs, and their verdicts.

Each claim of Hu et al. (2021) that the ablations can test (Table 5, Table 6, "LoRA matches full fine-tuning")
becomes a ``Claim`` on two of our groups (``Stat``); ``check_claims`` tests a family of them (Welch's t-test,
Holm–Bonferroni over the family, TOST at ``margin`` accuracy points for the no-difference claims) and gives each an
outcome ("equivalent within ±m", "different", "inconclusive") and a verdict vs the paper ("agrees", "disagrees",
"inconclusive"). The families the README reports are built here too: ``ablation_checks`` (Tables 5 and 6, one
Holm family per metric), ``schedule_checks`` (the same claims on the 300-step runs) and ``recipe_check`` (the
default recipe against full fine-tuning, per task). Imports ``records`` and ``stats`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal, Sequence

from experiments.records import LONG, LONG_TABLE5, METRIC, TEST_METRIC, by_cell, of_experiment
from experiments.stats import ALPHA, MARGIN, Stat, Welch, group, holm, stat_of, tost, welch


# --------------------------------------------------------------------------- the paper's figures
TABLE5_ORDER = ["q", "k", "v", "o", "q,k", "q,v", "q,k,v,o"]
TABLE5_PAPER = {  # weights -> (r, WikiSQL, MultiNLI), GPT-3 175B, 18M-parameter budget
    "q": (8, 70.4, 91.0),
    "k": (8, 70.0, 90.8),
    "v": (8, 73.0, 91.0),
    "o": (8, 73.2, 91.3),
    "q,k": (4, 71.4, 91.3),
    "q,v": (4, 73.7, 91.3),
    "q,k,v,o": (2, 73.7, 91.7),
}
TABLE6_RANKS = [1, 2, 4, 8, 64]
TABLE6_TARGETS = ["q", "q,v", "q,k,v,o"]
TABLE6_PAPER = {  # weights -> {r: (WikiSQL, MultiNLI)}
    "q": {1: (68.8, 90.7), 2: (69.6, 90.9), 4: (70.5, 91.1), 8: (70.4, 90.7), 64: (70.0, 90.7)},
    "q,v": {1: (73.4, 91.3), 2: (73.3, 91.4), 4: (73.7, 91.3), 8: (73.8, 91.6), 64: (73.5, 91.4)},
    "q,k,v,o": {1: (74.1, 91.2), 2: (73.7, 91.7), 4: (74.0, 91.7), 8: (74.0, 91.5), 64: (73.9, 91.4)},
}


# --------------------------------------------------------------------------- claims, outcomes, verdicts
ClaimKind = Literal["greater", "equivalent"]
GREATER: Final = "greater"  # the paper says mean(a) > mean(b)
EQUIVALENT: Final = "equivalent"  # the paper says a and b do not differ (competitive, little gain, matches)
DIFFERENT = "different"
INCONCLUSIVE = "inconclusive"
AGREES = "agrees"
DISAGREES = "disagrees"


@dataclass(frozen=True)
class Claim:
    """One claim of the paper, stated on two groups of ours: ``kind`` is GREATER (mean_a > mean_b)
    or EQUIVALENT (no difference beyond the margin)."""

    text: str
    kind: ClaimKind
    a_label: str
    a: Stat
    b_label: str
    b: Stat


@dataclass(frozen=True)
class ClaimCheck:
    """A claim, its Welch test, TOST p-value, both Holm-corrected over the report's family, the
    test's outcome (``equivalent within ±m`` / ``different`` / ``inconclusive``, or ``n/a`` below two
    seeds) and the verdict vs the paper (``agrees`` / ``disagrees`` / ``inconclusive``)."""

    claim: Claim
    welch: Welch
    p_tost: float
    p_holm: float
    p_tost_holm: float
    family: int
    margin: float
    alpha: float
    outcome: str
    verdict: str


def equivalent_label(margin: float) -> str:
    return f"equivalent within ±{margin:g}"


def outcome_of(kind: ClaimKind, significant: bool, equivalent: bool, margin: float) -> str:
    """Three outcomes: ``different`` (difference significant after correction), ``equivalent within ±m``
    (TOST significant after correction) or ``inconclusive`` (neither). When both hold (a real
    difference smaller than m), the one the claim is about is reported: equivalence for an
    EQUIVALENT claim, the difference for a GREATER claim."""
    if kind == EQUIVALENT and equivalent:
        return equivalent_label(margin)
    if significant:
        return DIFFERENT
    if equivalent:
        return equivalent_label(margin)
    return INCONCLUSIVE


def verdict_of(kind: ClaimKind, outcome: str, diff: float) -> str:
    """``agrees`` only when the test supports the paper (a significant difference in its direction for
    GREATER, equivalence for EQUIVALENT), ``disagrees`` when it supports the opposite (a significant
    difference the other way, or any significant difference for EQUIVALENT), else ``inconclusive``."""
    if kind == GREATER:
        if outcome == DIFFERENT:
            return AGREES if diff > 0 else DISAGREES
        return INCONCLUSIVE
    if kind == EQUIVALENT:
        if outcome.startswith(EQUIVALENT):
            return AGREES
        return DISAGREES if outcome == DIFFERENT else INCONCLUSIVE
    raise ValueError(f"unknown claim kind {kind!r}")


def check_claims(claims: Sequence[Claim], margin: float = MARGIN, alpha: float = ALPHA) -> list[ClaimCheck]:
    """Test every claim and correct over the family: the two-sided Welch p-values of all testable
    checks form one Holm family (size m), their TOST p-values a second one of the same checks."""
    tests = [welch(c.a, c.b) for c in claims]
    p_tost = [tost(w, margin) for w in tests]
    p_holm = holm([w.p for w in tests])
    p_tost_holm = holm(p_tost)
    family = sum(not math.isnan(w.p) for w in tests)
    out = []
    for c, w, pt, ph, pth in zip(claims, tests, p_tost, p_holm, p_tost_holm):
        if math.isnan(ph):
            outcome, verdict = "n/a (fewer than 2 seeds)", INCONCLUSIVE
        else:
            outcome = outcome_of(c.kind, ph < alpha, pth < alpha, margin)
            verdict = verdict_of(c.kind, outcome, w.diff)
        out.append(ClaimCheck(c, w, pt, ph, pth, family, margin, alpha, outcome, verdict))
    return out


# --------------------------------------------------------------------------- Table 5 and Table 6
def table5_stats(rows: list[dict], metric: str = METRIC) -> dict[str, Stat]:
    """Table 5 cells: one ``Stat`` per weight-type set."""
    return {k[0]: s for k, s in group(rows, "targets_key", metric=metric).items()}


def table5_claims(stats: dict[str, Stat]) -> list[Claim]:
    """The paper's Table 5 claims on our groups: several weight types beat the best single type (by
    mean, ours), and Wq or Wk alone is worse than the weaker of Wv, Wo."""
    singles = [t for t in ("q", "k", "v", "o") if t in stats]
    claims: list[Claim] = []
    if not singles:
        return claims
    best_single = max(singles, key=lambda t: stats[t].mean)
    for multi in ("q,v", "q,k,v,o"):
        if multi in stats:
            claims.append(Claim(f"W{{{multi}}} beats the best single type (W{{{best_single}}})", GREATER, f"W{{{multi}}}", stats[multi], f"W{{{best_single}}}", stats[best_single]))
    for weak in ("q", "k"):
        others = [t for t in ("v", "o") if t in stats]
        if weak in stats and others:
            ref = min(others, key=lambda t: stats[t].mean)
            claims.append(Claim(f"W{{{weak}}} alone is worse than W{{{ref}}} (the weaker of Wv, Wo)", GREATER, f"W{{{ref}}}", stats[ref], f"W{{{weak}}}", stats[weak]))
    return claims


def table6_stats(rows: list[dict], metric: str = METRIC) -> dict[tuple[str, int], Stat]:
    """Table 6 cells: one ``Stat`` per (weight-type set, r)."""
    return {(k[0], k[1]): s for k, s in group(rows, "targets_key", "r", metric=metric).items()}


def table6_claims(stats: dict[tuple[str, int], Stat]) -> list[Claim]:
    """The paper's Table 6 claims on our groups: r=1 competitive for W{q,v}, W{q} gains from r,
    little gain past r=8 (each set), W{q,v} beats W{q} at r=8."""
    claims: list[Claim] = []
    if ("q,v", 1) in stats and ("q,v", 64) in stats:
        claims.append(Claim("r=1 is already competitive for W{q,v} (paper, r=1 minus r=64: -0.1 / -0.1)", EQUIVALENT, "r=1", stats[("q,v", 1)], "r=64", stats[("q,v", 64)]))
    if ("q", 1) in stats and ("q", 8) in stats:
        claims.append(Claim("W{q} alone gains from a larger r (paper, r=8 minus r=1: +1.6 / 0.0)", GREATER, "r=8", stats[("q", 8)], "r=1", stats[("q", 1)]))
    for t in TABLE6_TARGETS:
        if (t, 8) in stats and (t, 64) in stats:
            claims.append(Claim(f"little gain past r=8 for W{{{t}}}", EQUIVALENT, "r=64", stats[(t, 64)], "r=8", stats[(t, 8)]))
    if ("q,v", 8) in stats and ("q", 8) in stats:
        claims.append(Claim("W{q,v} beats W{q} at the same r=8", GREATER, "W{q,v}", stats[("q,v", 8)], "W{q}", stats[("q", 8)]))
    return claims


def ablation_checks(rows: list[dict], margin: float = MARGIN, alpha: float = ALPHA) -> dict[str, list[tuple[str, ClaimCheck]]]:
    """Every Table 5 and Table 6 claim checked on the ablation runs, by metric: ``checks[metric]`` is a list of
    ``(table, check)`` ("table5" claims first), one Holm family per metric (validation, then test accuracy);
    a metric no claim can be stated on is left out."""
    t5 = of_experiment(rows, "table5", ["lora"])
    t6 = of_experiment(rows, "table6", ["lora"])
    ref = of_experiment(rows, "table6_reference", ["full", "head_only"])
    checks: dict[str, list[tuple[str, ClaimCheck]]] = {}
    for metric in (METRIC, TEST_METRIC):
        flat: list[tuple[str, Claim]] = []
        if t5:
            flat += [("table5", c) for c in table5_claims(table5_stats(t5, metric))]
        if t6 or ref:
            flat += [("table6", c) for c in table6_claims(table6_stats(t6, metric))]
        if flat:
            checks[metric] = list(zip([t for t, _ in flat], check_claims([c for _, c in flat], margin, alpha)))
    return checks


# --------------------------------------------------------------------------- the longer schedule
def schedule_claims(cells: dict[tuple, list[dict]], metric: str) -> list[Claim]:
    """Table 6's claims on these cells (those whose groups exist), then LoRA W{q,v} r=8 vs full fine-tuning."""
    lora = {(k[1], k[2]): stat_of(v, metric) for k, v in cells.items() if k[0] == "lora"}
    claims = table6_claims(lora)
    full = cells.get(("full", "", None))
    if full and ("q,v", 8) in lora:
        claims.append(Claim("LoRA matches full fine-tuning (W{q,v}, r=8; paper, RoBERTa-base GLUE: LoRA 87.2 vs full FT 86.4 on average)",
                            EQUIVALENT, "LoRA", lora[("q,v", 8)], "full FT", stat_of(full, metric)))
    return claims


TABLE6_LABEL, TABLE5_LABEL = "Table 6 cells at 300 steps", "Table 5 at 300 steps"


def schedule_checks(rows: list[dict], margin: float = MARGIN, alpha: float = ALPHA) -> list[tuple[str, str, ClaimCheck]]:
    """(label, metric, check) of every claim re-checked on the longer runs: the Table 6 cells' claims with "LoRA
    matches full fine-tuning" (one Holm family per metric), then Table 5's (another family per metric)."""
    out: list[tuple[str, str, ClaimCheck]] = []
    long = by_cell(of_experiment(rows, LONG))
    t5 = of_experiment(rows, LONG_TABLE5, ["lora"])
    for metric in (METRIC, TEST_METRIC):
        if long:
            out += [(TABLE6_LABEL, metric, c) for c in check_claims(schedule_claims(long, metric), margin, alpha)]
        if t5:
            out += [(TABLE5_LABEL, metric, c) for c in check_claims(table5_claims(table5_stats(t5, metric)), margin, alpha)]
    return out


def of_label(checks: Sequence[tuple[str, str, ClaimCheck]], label: str, metric: str) -> list[ClaimCheck]:
    return [c for lab, m, c in checks if lab == label and m == metric]


# --------------------------------------------------------------------------- the default recipe
@dataclass(frozen=True)
class RecipeCheck:
    """LoRA default minus full fine-tuning on one task and metric: Welch test, TOST p, outcome at ±margin."""

    task: str
    metric: str
    welch: Welch
    p_tost: float
    outcome: str


def recipe_check(task: str, metric: str, lora: list[dict], full: list[dict], margin: float, alpha: float) -> RecipeCheck:
    """Welch's test of LoRA − full (pp) and TOST at ±margin, uncorrected (intersection–union over tasks)."""
    w = welch(stat_of(lora, metric), stat_of(full, metric))
    p_tost = tost(w, margin)
    if math.isnan(w.p):
        return RecipeCheck(task, metric, w, p_tost, "n/a (fewer than 2 seeds)")
    return RecipeCheck(task, metric, w, p_tost, outcome_of(EQUIVALENT, w.p < alpha, p_tost < alpha, margin))
