"""The paper's claims, stated on our groups of runs, and their verdicts.

Each claim of Hu et al. (2021) that the ablations can test (Table 5, Table 6, "LoRA matches full fine-tuning")
becomes a ``Claim`` on two of our groups (``Stat``); ``check_claims`` tests a family of them as
experiments/PREREGISTRATION.md fixes it: Welch's t-test with Holm–Bonferroni over the family's difference p-values,
and TOST at ``margin`` accuracy points for the no-difference ("equivalent") claims only, Holm over their TOST
p-values; each check gets an outcome ("equivalent within ±m", "different", "inconclusive"), a verdict vs the paper
("agrees", "disagrees", "inconclusive") and its power: n per arm and the minimum detectable effect (MDE) at its
per-check level (``power.mde_unequal``, with the seed sd pooled over the family's groups). The families are built
here too: ``ablation_checks`` (the same 10 Table 5 / Table 6 claims at every schedule, one family per schedule and
metric), ``primary_checks`` (LoRA vs full fine-tuning, the pre-registered primary family: k = 2, one check per
schedule), ``pilot_primary_checks`` (the same comparison on the pilot runs, exploratory) and ``recipe_check`` (the
default recipe against full fine-tuning, per task). Imports ``records``, ``stats`` and ``power`` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from experiments.power import mde_unequal, power_equivalence
from experiments.records import (
    METRIC,
    PILOT_SCHEDULES,
    PRIMARY,
    PRIMARY_SEEDS,
    TEST_METRIC,
    has_metric,
    of_experiment,
)
from experiments.stats import (
    ALPHA,
    MARGIN,
    Stat,
    Welch,
    example_bootstrap,
    group,
    holm,
    pooled_sd_of,
    stat_of,
    tost,
    welch,
)

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
    """A claim, its Welch test and TOST p-value, both Holm-corrected over their families (the difference family:
    every check; the TOST family: the EQUIVALENT claims only, NaN for a GREATER claim), the test's outcome
    (``equivalent within ±m`` / ``different`` / ``inconclusive``, or ``n/a`` below two seeds), the verdict vs the
    paper (``agrees`` / ``disagrees`` / ``inconclusive``) and its power: the seed sd pooled over the family's groups,
    the MDE of the difference test at the per-check level alpha / family, and (EQUIVALENT) TOST's power at a true
    difference of 0 at alpha / tost_family."""

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
    tost_family: int = 0
    sd: float = math.nan
    mde: float = math.nan
    tost_power: float = math.nan

    @property
    def level(self) -> float:
        """The per-check level of the difference test (Holm's first step)."""
        return self.alpha / self.family if self.family else math.nan

    @property
    def n_text(self) -> str:
        return f"{self.claim.a.n} / {self.claim.b.n}"


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


def harmonic_n(a: int, b: int) -> int:
    """The per-arm n with the standard error of arms of ``a`` and ``b`` runs, rounded down (``power.mde_unequal``)."""
    return 0 if min(a, b) < 1 else math.floor(2.0 / (1.0 / a + 1.0 / b))


def check_claims(
    claims: Sequence[Claim], margin: float = MARGIN, alpha: float = ALPHA, sd: float | None = None
) -> list[ClaimCheck]:
    """Test every claim and correct over the family: the two-sided Welch p-values of all testable checks form one
    Holm family (size m); the TOST p-values of the EQUIVALENT claims form a second one (the GREATER claims are not
    in it: their outcome is a difference or nothing). ``sd``: the seed sd of the MDEs; default, pooled over the
    claims' groups."""
    tests = [welch(c.a, c.b) for c in claims]
    p_tost = [tost(w, margin) if c.kind == EQUIVALENT else math.nan for c, w in zip(claims, tests, strict=True)]
    p_holm = holm([w.p for w in tests])
    p_tost_holm = holm(p_tost)
    family = sum(not math.isnan(w.p) for w in tests)
    tost_family = sum(not math.isnan(p) for p in p_tost)
    if sd is None:
        sd = pooled_sd_of([s for c in claims for s in (c.a, c.b)])[0]
    out = []
    for c, w, pt, ph, pth in zip(claims, tests, p_tost, p_holm, p_tost_holm, strict=True):
        if math.isnan(ph):
            outcome, verdict = "n/a (fewer than 2 seeds)", INCONCLUSIVE
        else:
            outcome = outcome_of(c.kind, ph < alpha, pth < alpha, margin)
            verdict = verdict_of(c.kind, outcome, w.diff)
        testable = family and sd > 0 and min(c.a.n, c.b.n) >= 2
        mde = mde_unequal(c.a.n, c.b.n, sd, alpha / family) if testable else math.nan
        tost_power = (
            power_equivalence(harmonic_n(c.a.n, c.b.n), margin, sd, alpha / tost_family)
            if testable and c.kind == EQUIVALENT and tost_family
            else math.nan
        )
        out.append(
            ClaimCheck(c, w, pt, ph, pth, family, margin, alpha, outcome, verdict, tost_family, sd, mde, tost_power)
        )
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
            claims.append(
                Claim(
                    f"W{{{multi}}} beats the best single type (W{{{best_single}}})",
                    GREATER,
                    f"W{{{multi}}}",
                    stats[multi],
                    f"W{{{best_single}}}",
                    stats[best_single],
                )
            )
    for weak in ("q", "k"):
        others = [t for t in ("v", "o") if t in stats]
        if weak in stats and others:
            ref = min(others, key=lambda t: stats[t].mean)
            claims.append(
                Claim(
                    f"W{{{weak}}} alone is worse than W{{{ref}}} (the weaker of Wv, Wo)",
                    GREATER,
                    f"W{{{ref}}}",
                    stats[ref],
                    f"W{{{weak}}}",
                    stats[weak],
                )
            )
    return claims


def table6_stats(rows: list[dict], metric: str = METRIC) -> dict[tuple[str, int], Stat]:
    """Table 6 cells: one ``Stat`` per (weight-type set, r)."""
    return {(k[0], k[1]): s for k, s in group(rows, "targets_key", "r", metric=metric).items()}


def table6_claims(stats: dict[tuple[str, int], Stat]) -> list[Claim]:
    """The paper's Table 6 claims on our groups: r=1 competitive for W{q,v}, W{q} gains from r,
    little gain past r=8 (each set), W{q,v} beats W{q} at r=8."""
    claims: list[Claim] = []
    if ("q,v", 1) in stats and ("q,v", 64) in stats:
        claims.append(
            Claim(
                "r=1 is already competitive for W{q,v} (paper, r=1 minus r=64: -0.1 / -0.1)",
                EQUIVALENT,
                "r=1",
                stats[("q,v", 1)],
                "r=64",
                stats[("q,v", 64)],
            )
        )
    if ("q", 1) in stats and ("q", 8) in stats:
        claims.append(
            Claim(
                "W{q} alone gains from a larger r (paper, r=8 minus r=1: +1.6 / 0.0)",
                GREATER,
                "r=8",
                stats[("q", 8)],
                "r=1",
                stats[("q", 1)],
            )
        )
    for t in TABLE6_TARGETS:
        if (t, 8) in stats and (t, 64) in stats:
            claims.append(
                Claim(f"little gain past r=8 for W{{{t}}}", EQUIVALENT, "r=64", stats[(t, 64)], "r=8", stats[(t, 8)])
            )
    if ("q,v", 8) in stats and ("q", 8) in stats:
        claims.append(
            Claim("W{q,v} beats W{q} at the same r=8", GREATER, "W{q,v}", stats[("q,v", 8)], "W{q}", stats[("q", 8)])
        )
    return claims


SCHEDULES = tuple(PILOT_SCHEDULES)  # (150, 300): optimizer steps of the two schedules
TABLE_LABELS = {"table5": "Table 5", "table6": "Table 6"}


def ablation_checks(
    rows: list[dict], margin: float = MARGIN, alpha: float = ALPHA, schedule: int = 150
) -> dict[str, list[tuple[str, ClaimCheck]]]:
    """The ablation family at one schedule (``records.PILOT_SCHEDULES``: 150 steps, table5 + table6; 300 steps,
    convergence_table5 + convergence), by metric: ``checks[metric]`` is a list of ``(table, check)`` ("table5"
    claims first), the same 10 claims at every schedule, one Holm family per metric (validation, then test
    accuracy); a metric no claim can be stated on is left out. "LoRA matches full fine-tuning" is not in it (see
    ``primary_checks``)."""
    t5_exp, t6_exp, _ = PILOT_SCHEDULES[schedule]
    t5 = of_experiment(rows, t5_exp, ["lora"])
    t6 = of_experiment(rows, t6_exp, ["lora"])
    checks: dict[str, list[tuple[str, ClaimCheck]]] = {}
    for metric in (METRIC, TEST_METRIC):
        flat: list[tuple[str, Claim]] = []
        if t5:
            flat += [("table5", c) for c in table5_claims(table5_stats(t5, metric))]
        if t6:
            flat += [("table6", c) for c in table6_claims(table6_stats(t6, metric))]
        if flat:
            checks[metric] = list(
                zip([t for t, _ in flat], check_claims([c for _, c in flat], margin, alpha), strict=True)
            )
    return checks


# --------------------------------------------------------------------------- LoRA vs full fine-tuning (primary family)
LORA_ARM = ("lora", "q,v", 8)  # method, targets, r of the primary comparison's LoRA arm


@dataclass(frozen=True)
class PrimaryCheck:
    """One check of the LoRA-vs-full family: its schedule and metric, the claim check (Holm within the family of
    the two schedules), the seeds of each arm and the bootstrap over seeds and test examples
    (``(difference, low, high, number of test examples)``; None where the runs did not record ``test_correct`` or
    for validation accuracy, which has no per-example record)."""

    schedule: int
    metric: str
    check: ClaimCheck
    seeds_lora: tuple[int, ...]
    seeds_full: tuple[int, ...]
    bootstrap: tuple[float, float, float, int] | None = None


def arms(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """The LoRA W{q,v} r=8 runs and the full fine-tuning runs among ``runs``."""
    lora = [r for r in runs if (r.get("method"), r.get("targets_key"), r.get("r")) == LORA_ARM]
    return lora, [r for r in runs if r.get("method") == "full"]


def example_bootstrap_of(
    a: list[dict], b: list[dict], key: str = "test_correct"
) -> tuple[float, float, float, int] | None:
    """``stats.example_bootstrap`` on the per-example records ``key`` of two groups of runs: (d, low, high, n
    examples), or None unless every run of both groups recorded one, all of one length (one test split)."""
    if not a or not b or not all(r.get(key) for r in a + b) or len({len(r[key]) for r in a + b}) != 1:
        return None
    d, lo, hi = example_bootstrap([r[key] for r in a], [r[key] for r in b])
    return d, lo, hi, len(a[0][key])


def seeds_of(runs: list[dict]) -> tuple[int, ...]:
    return tuple(sorted({r["seed"] for r in runs if isinstance(r.get("seed"), int)}))


def one_per_seed(runs: list[dict]) -> list[dict]:
    """The first run of each seed (a re-launched seed counts once)."""
    seen: dict[int, dict] = {}
    for r in runs:
        seen.setdefault(r.get("seed"), r)
    return list(seen.values())


def matches_claim(schedule: int, lora: Stat, full: Stat) -> Claim:
    return Claim(
        f"LoRA matches full fine-tuning at {schedule} steps (W{{q,v}}, r=8; paper, RoBERTa-base GLUE: LoRA 87.2 vs "
        "full FT 86.4 on average)",
        EQUIVALENT,
        "LoRA",
        lora,
        "full FT",
        full,
    )


def lora_vs_full_family(
    pairs: Sequence[tuple[int, list[dict], list[dict]]],
    margin: float = MARGIN,
    alpha: float = ALPHA,
    metrics: Sequence[str] = (TEST_METRIC, METRIC),
) -> dict[str, list[PrimaryCheck]]:
    """LoRA vs full fine-tuning at each schedule of ``pairs`` ((schedule, LoRA runs, full runs)), one family per
    metric (Holm over its schedules), the bootstrap over seeds and test examples beside each test-accuracy check."""
    out: dict[str, list[PrimaryCheck]] = {}
    for metric in metrics:
        mine = [
            (s, [r for r in a if has_metric(r, metric)], [r for r in b if has_metric(r, metric)]) for s, a, b in pairs
        ]
        mine = [(s, a, b) for s, a, b in mine if a or b]
        if not mine:
            continue
        checks = check_claims(
            [matches_claim(s, stat_of(a, metric), stat_of(b, metric)) for s, a, b in mine], margin, alpha
        )
        out[metric] = [
            PrimaryCheck(
                s, metric, c, seeds_of(a), seeds_of(b), example_bootstrap_of(a, b) if metric == TEST_METRIC else None
            )
            for (s, a, b), c in zip(mine, checks, strict=True)
        ]
    return out


def primary_cells(rows: list[dict]) -> dict[tuple[int, str], tuple[int, ...]]:
    """The seeds present in each cell of the primary study: (schedule, "lora" | "full") -> seeds."""
    out = {}
    for schedule, experiment in PRIMARY.items():
        lora, full = arms(of_experiment(rows, experiment))
        out[(schedule, "lora")], out[(schedule, "full")] = seeds_of(lora), seeds_of(full)
    return out


def primary_seeds(rows: list[dict], seeds: Sequence[int] = PRIMARY_SEEDS) -> tuple[int, ...]:
    """The pre-registered seeds present in all four cells (both arms at both schedules): the analysed seeds (a
    cut-off run leaves the arms balanced)."""
    cells = primary_cells(rows)
    return tuple(s for s in seeds if all(s in have for have in cells.values()))


def primary_checks(
    rows: list[dict], margin: float = MARGIN, alpha: float = ALPHA, seeds: Sequence[int] = PRIMARY_SEEDS
) -> dict[str, list[PrimaryCheck]]:
    """The pre-registered primary family on the ``lora_vs_full`` / ``lora_vs_full_300`` runs: per metric (test
    accuracy primary, validation accuracy secondary), LoRA W{q,v} r=8 vs full fine-tuning at 150 and 300 steps,
    Holm within the two schedules, on the seeds of ``primary_seeds``. Empty when no run of the study exists."""
    if not any(of_experiment(rows, e) for e in PRIMARY.values()):
        return {}
    keep = set(primary_seeds(rows, seeds))
    pairs = []
    for schedule, experiment in PRIMARY.items():
        lora, full = arms([r for r in of_experiment(rows, experiment) if r.get("seed") in keep])
        pairs.append((schedule, one_per_seed(lora), one_per_seed(full)))
    if not keep:  # nothing analysable yet: the checks of empty arms (n/a)
        return {
            m: [
                PrimaryCheck(s, m, c, (), ())
                for s, c in zip(
                    PRIMARY,
                    check_claims([matches_claim(s, Stat.of([]), Stat.of([])) for s in PRIMARY], margin, alpha),
                    strict=True,
                )
            ]
            for m in (TEST_METRIC, METRIC)
        }
    return lora_vs_full_family(pairs, margin, alpha)


def pilot_primary_checks(
    rows: list[dict], margin: float = MARGIN, alpha: float = ALPHA
) -> dict[str, list[PrimaryCheck]]:
    """The same comparison on the pilot runs, every seed they have (exploratory: the data were seen before the
    analysis was fixed): 150 steps, Table 6's LoRA W{q,v} r=8 vs its full fine-tuning reference rows; 300 steps,
    the convergence runs of both."""
    pairs = []
    for schedule, (_, t6_exp, ref_exp) in PILOT_SCHEDULES.items():
        lora, _ = arms(of_experiment(rows, t6_exp))
        _, full = arms(of_experiment(rows, ref_exp))
        if lora and full:
            pairs.append((schedule, lora, full))
    return lora_vs_full_family(pairs, margin, alpha)


# --------------------------------------------------------------------------- the default recipe
@dataclass(frozen=True)
class RecipeCheck:
    """LoRA default minus full fine-tuning on one task and metric: Welch test, TOST p, outcome at ±margin and at the
    task's level ``alpha`` (0.025 where the task was looked at twice), n per arm and the MDE at that level."""

    task: str
    metric: str
    welch: Welch
    p_tost: float
    outcome: str
    alpha: float = ALPHA
    n: tuple[int, int] = (0, 0)
    sd: float = math.nan
    mde: float = math.nan


def recipe_check(
    task: str, metric: str, lora: list[dict], full: list[dict], margin: float, alpha: float
) -> RecipeCheck:
    """Welch's test of LoRA − full (pp) and TOST at ±margin at level ``alpha``, uncorrected across tasks
    (intersection–union); the MDE with the two arms' pooled sd."""
    a, b = stat_of(lora, metric), stat_of(full, metric)
    w = welch(a, b)
    p_tost = tost(w, margin)
    sd = pooled_sd_of([a, b])[0]
    mde = mde_unequal(a.n, b.n, sd, alpha) if min(a.n, b.n) >= 2 and sd > 0 else math.nan
    if math.isnan(w.p):
        return RecipeCheck(task, metric, w, p_tost, "n/a (fewer than 2 seeds)", alpha, (a.n, b.n), sd, mde)
    return RecipeCheck(
        task, metric, w, p_tost, outcome_of(EQUIVALENT, w.p < alpha, p_tost < alpha, margin), alpha, (a.n, b.n), sd, mde
    )
