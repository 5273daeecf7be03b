"""Power of the claim checks, before and after the runs: the seeds per arm a check needs, and the smallest
difference a check at a given n can detect (its minimum detectable effect, MDE).

The checks of the reports (``stats``/``claims``) compare two groups of n runs each (seeds): a two-sided Welch
t-test for a difference and TOST (two one-sided t-tests) for equivalence within ±margin, each at the per-check
level ``alpha / k`` — Holm's first step in a family of ``k`` checks, the level a check must meet when it is the
family's smallest p-value; later steps are easier, so the powers here are lower bounds for a family. Planning
assumes the two arms share one seed-to-seed standard deviation ``sd`` (accuracy points); with equal n, Welch's
test is then Student's with 2n − 2 degrees of freedom, whose power is exact through the noncentral t:

- difference of true size ``delta``: ``P(|T| > t_{1−a/2, 2n−2})`` with ``T ~ nct(2n − 2, delta / (sd·sqrt(2/n)))``;
- TOST at ±``margin`` with true difference ``theta``: ``P(−m + t_{1−a}·s·k < d̂ < m − t_{1−a}·s·k)`` with
  ``k = sqrt(2/n)``, ``d̂ ~ N(theta, (sd·k)²)`` and ``s² ~ sd²·χ²_{2n−2}/(2n−2)`` independent of it, integrated
  over ``s`` (``scipy.integrate.quad``).

``planning_sd`` pools the seed-to-seed variance of every pilot cell (same settings, ≥ 2 seeds) and returns its
upper one-sided confidence bound (χ² on the pooled degrees of freedom), so a pilot that happened to be quiet does
not under-size the study. Imports ``records`` only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scipy import integrate
from scipy import stats as scipy_stats

from experiments.records import cell, has_metric


@dataclass(frozen=True)
class PooledSD:
    """Pooled seed-to-seed standard deviation (accuracy points) of ``cells`` pilot cells, its degrees of freedom
    and its upper ``level`` one-sided confidence bound."""

    sd: float
    df: int
    cells: int
    upper: float
    level: float


def pooled_sd(rows: Iterable[dict], metric: str, level: float = 0.8) -> PooledSD:
    """Pool the sample variances (in points², n−1) of every cell of ``rows`` — same experiment (schedule), lr,
    data and ``records.cell`` (method, targets, r) — with at least two runs recording ``metric``; the upper bound
    is ``sd·sqrt(df / χ²_{1−level, df})``."""
    ss, df, cells = 0.0, 0, 0
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("experiment"), r.get("data"), r.get("lr"), cell(r)), []).append(r)
    for runs in groups.values():
        xs = [100.0 * r[metric] for r in runs if has_metric(r, metric)]
        if len(xs) >= 2:
            ss += statistics.variance(xs) * (len(xs) - 1)
            df += len(xs) - 1
            cells += 1
    if df == 0:
        raise ValueError(f"pooled_sd: no cell with two runs recording {metric!r}")
    sd = math.sqrt(ss / df)
    return PooledSD(sd, df, cells, math.sqrt(ss / float(scipy_stats.chi2.ppf(1.0 - level, df))), level)


def power_difference(n: int, delta: float, sd: float, alpha: float) -> float:
    """Power of the two-sided two-sample t-test at level ``alpha`` with ``n`` runs per arm, true difference
    ``delta`` and per-arm standard deviation ``sd`` (noncentral t, 2n − 2 degrees of freedom)."""
    if n < 2:
        return 0.0
    df = 2 * n - 2
    nc = delta / (sd * math.sqrt(2.0 / n))
    tc = float(scipy_stats.t.ppf(1.0 - alpha / 2.0, df))
    return float(scipy_stats.nct.sf(tc, df, nc) + scipy_stats.nct.cdf(-tc, df, nc))


def power_equivalence(n: int, margin: float, sd: float, alpha: float, theta: float = 0.0) -> float:
    """Power of TOST at ±``margin`` (each one-sided test at ``alpha``) with ``n`` runs per arm, true difference
    ``theta`` and per-arm standard deviation ``sd``: exact, by integrating over the estimated standard deviation."""
    if n < 2:
        return 0.0
    df = 2 * n - 2
    k = math.sqrt(2.0 / n)
    tc = float(scipy_stats.t.ppf(1.0 - alpha, df))
    se = sd * k

    def integrand(u: float) -> float:  # u = s / sd; df·u² ~ χ²_df
        half = margin - tc * u * se
        if half <= 0.0:
            return 0.0
        inside = scipy_stats.norm.cdf((half - theta) / se) - scipy_stats.norm.cdf((-half - theta) / se)
        return float(inside * scipy_stats.chi2.pdf(df * u * u, df) * 2.0 * df * u)

    top = margin / (tc * se)  # beyond it the interval is empty
    return float(integrate.quad(integrand, 0.0, top, limit=200)[0])


def seeds_for_difference(delta: float, sd: float, alpha: float, power: float = 0.8, most: int = 500) -> int:
    """Smallest n per arm whose two-sided test detects a true difference ``delta`` with at least ``power``."""
    return next(n for n in range(2, most + 1) if power_difference(n, delta, sd, alpha) >= power)


def seeds_for_equivalence(
    margin: float, sd: float, alpha: float, power: float = 0.8, theta: float = 0.0, most: int = 500
) -> int:
    """Smallest n per arm whose TOST shows equivalence within ±``margin`` with at least ``power`` when the true
    difference is ``theta``."""
    return next(n for n in range(2, most + 1) if power_equivalence(n, margin, sd, alpha, theta) >= power)


def mde(n: int, sd: float, alpha: float, power: float = 0.8) -> float:
    """Minimum detectable effect (points): the true difference the two-sided test at ``alpha`` detects with
    ``power`` at ``n`` runs per arm (bisection on :func:`power_difference`); inf below two runs."""
    if n < 2:
        return math.inf
    lo, hi = 0.0, sd
    while power_difference(n, hi, sd, alpha) < power:
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if power_difference(n, mid, sd, alpha) < power else (lo, mid)
    return hi


def mde_unequal(n_a: int, n_b: int, sd: float, alpha: float, power: float = 0.8) -> float:
    """:func:`mde` for arms of ``n_a`` and ``n_b`` runs: at the harmonic-mean n (the same standard error,
    ``sd·sqrt(1/n_a + 1/n_b)``), rounded down so the figure is not optimistic."""
    if min(n_a, n_b) < 2:
        return math.inf
    return mde(max(2, math.floor(2.0 / (1.0 / n_a + 1.0 / n_b))), sd, alpha, power)


@dataclass(frozen=True)
class Plan:
    """The seeds one pre-registered comparison needs: a family of ``k`` checks at ``alpha``, difference test of
    ``delta`` and TOST at ±``margin`` (true difference 0), both at ``power``, with planning ``sd``."""

    name: str
    sd: float
    alpha: float
    k: int
    delta: float
    margin: float
    power: float

    @property
    def level(self) -> float:
        return self.alpha / self.k

    @property
    def n_difference(self) -> int:
        return seeds_for_difference(self.delta, self.sd, self.level, self.power)

    @property
    def n_equivalence(self) -> int:
        return seeds_for_equivalence(self.margin, self.sd, self.level, self.power)

    @property
    def n(self) -> int:
        return max(self.n_difference, self.n_equivalence)


def power_table(plans: Sequence[Plan], at: Sequence[int]) -> str:
    """Markdown: per plan, the seeds each test needs, and the power and MDE at each n of ``at``."""
    head = (
        "| comparison | planning sd (pp) | family k | per-check level | n for Δ=margin | n for TOST (θ=0) | "
        + " | ".join(f"power Δ / TOST, MDE at n={n}" for n in at)
        + " |"
    )
    lines = [head, "|" + "---|" * (6 + len(at))]
    for p in plans:
        cells = [
            f"{power_difference(n, p.delta, p.sd, p.level):.2f} / {power_equivalence(n, p.margin, p.sd, p.level):.2f}, "
            f"{mde(n, p.sd, p.level, p.power):.2f}"
            for n in at
        ]
        lines.append(
            f"| {p.name} | {p.sd:.2f} | {p.k} | {p.level:.4f} | {p.n_difference} | {p.n_equivalence} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the pre-registered plan
PILOT_EXPERIMENTS = (
    "table5",
    "table6",
    "table6_reference",
    "convergence",
    "convergence_table5",
)  # the ablation task's cells
PRIMARY_MARGIN = 1.0  # accuracy points: equivalence margin and the difference the study is sized to detect
PRIMARY_POWER = 0.8
PRIMARY_K = 2  # one check per schedule (150 and 300 steps) in the primary family


def primary_plan(rows: Sequence[dict], metric: str, alpha: float = 0.05) -> tuple[Plan, PooledSD]:
    """The primary comparison (LoRA {q,v} r=8 vs full fine-tuning on the ablation task, at 150 and 300 steps),
    sized on the pooled seed-to-seed sd of every pilot cell of the ablation task (its upper 80% bound)."""
    pilot = pooled_sd([r for r in rows if r.get("experiment") in PILOT_EXPERIMENTS], metric)
    plan = Plan(
        f"LoRA {{q,v}} r=8 vs full FT, {metric}",
        pilot.upper,
        alpha,
        PRIMARY_K,
        PRIMARY_MARGIN,
        PRIMARY_MARGIN,
        PRIMARY_POWER,
    )
    return plan, pilot


def planning_report(
    rows: Sequence[dict], metrics: Sequence[str], at: Sequence[int] = (3, 5, 10, 18), alpha: float = 0.05
) -> str:
    """The power section of experiments/PREREGISTRATION.md: the pilot, then per metric the seeds the primary
    comparison needs and the power and MDE at a few n (``python -m experiments power`` prints it)."""
    lines, plans = [], []
    for metric in metrics:
        plan, pilot = primary_plan(rows, metric, alpha)
        plans.append(plan)
        lines.append(
            f"- {metric}: pooled seed sd {pilot.sd:.3f} points over {pilot.cells} pilot cells ({pilot.df} degrees of "
            f"freedom); upper {pilot.level:.0%} bound {pilot.upper:.3f} (the planning sd)"
        )
    return "\n".join([*lines, "", power_table(plans, at)])
