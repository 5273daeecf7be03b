"""Statistics of the run records: group means, Welch's t-test, TOST equivalence, Holm–Bonferroni, a paired
t-test, an example-level bootstrap (one split, and hierarchical over splits), variance components over splits and
seeds, and the convergence of validation curves.

The Student t distribution, Welch's and the paired t-test come from ``scipy.stats`` (``t.sf``, ``t.cdf``,
``t.ppf``, ``ttest_ind_from_stats``, ``ttest_1samp``); this module only states which quantities the reports use:
accuracies in percentage points, mean ± sample standard deviation (n−1) per group, the Welch–Satterthwaite degrees
of freedom, two-sided p-values, t-quantile confidence intervals, and TOST as two one-sided Welch t-tests.
Imports ``experiments.records`` only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats

from experiments.records import METRIC, has_metric

ALPHA = 0.05  # family-wise error rate of the claim checks
MARGIN = 1.0  # equivalence margin, accuracy points (pp): the pre-registered ±1 point (experiments/PREREGISTRATION.md)


# --------------------------------------------------------------------------- groups of runs
@dataclass(frozen=True)
class Stat:
    """Mean, sample std (n-1; NaN for n=1) and count of a group of runs (accuracy in %)."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        v = [100.0 * x for x in values]
        if not v:
            return cls(math.nan, math.nan, 0)
        return cls(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else math.nan, len(v))

    @property
    def sem(self) -> float:
        return self.std / math.sqrt(self.n) if self.n > 1 else math.nan

    def __str__(self) -> str:
        if self.n == 0:
            return "-"
        if self.n == 1:
            return f"{self.mean:.1f} (n=1)"
        return f"{self.mean:.1f} ± {self.std:.1f}"


def stat_of(rows: Iterable[dict], metric: str) -> Stat:
    """Mean ± std (in %) of ``metric`` over the runs that recorded it."""
    return Stat.of(r[metric] for r in rows if has_metric(r, metric))


def group(rows: list[dict], *keys: str, metric: str = METRIC) -> dict[tuple, Stat]:
    """``Stat`` of ``metric`` per value of ``keys`` (runs without the metric are left out)."""
    out: dict[tuple, list[float]] = {}
    for row in rows:
        if has_metric(row, metric):
            out.setdefault(tuple(row[k] for k in keys), []).append(row[metric])
    return {k: Stat.of(v) for k, v in out.items()}


def pooled_sd_of(stats: Iterable[Stat]) -> tuple[float, int]:
    """The pooled standard deviation (points) of groups given as ``Stat`` (each counted once: equal ones are the same
    group) and its degrees of freedom, sum(n−1); NaN when no group has two values."""
    groups = {s for s in stats if s.n > 1 and not math.isnan(s.std)}
    dof = sum(s.n - 1 for s in groups)
    return (math.sqrt(sum((s.n - 1) * s.std**2 for s in groups) / dof) if dof else math.nan), dof


def pooled_std(rows: list[dict], *keys: str, metric: str = METRIC) -> tuple[float, int]:
    """Seed noise: the pooled within-group standard deviation (in %) and its degrees of freedom."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        if has_metric(row, metric):
            groups.setdefault(tuple(row[k] for k in keys), []).append(100.0 * row[metric])
    ss = sum(sum((x - statistics.fmean(v)) ** 2 for x in v) for v in groups.values() if len(v) > 1)
    dof = sum(len(v) - 1 for v in groups.values() if len(v) > 1)
    return (math.sqrt(ss / dof) if dof else math.nan), dof


# --------------------------------------------------------------------------- t distribution and tests
def t_sf(t: float, df: float) -> float:
    """Upper tail P(T > t) of Student's t with ``df`` > 0 degrees of freedom (real, not only integer; ``inf``: the
    standard normal): ``scipy.stats.t.sf``. NaN when ``t`` or ``df`` is NaN or ``df`` <= 0."""
    if math.isnan(t) or math.isnan(df) or df <= 0:
        return math.nan
    return float(scipy_stats.t.sf(t, df))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t): ``scipy.stats.t.cdf`` (NaN as ``t_sf``)."""
    if math.isnan(t) or math.isnan(df) or df <= 0:
        return math.nan
    return float(scipy_stats.t.cdf(t, df))


def t_ppf(q: float, df: float) -> float:
    """Quantile t_{q, df}, the t with P(T <= t) = q: ``scipy.stats.t.ppf``. NaN unless 0 < q < 1 and df > 0."""
    if math.isnan(q) or math.isnan(df) or df <= 0 or not 0.0 < q < 1.0:
        return math.nan
    return float(scipy_stats.t.ppf(q, df))


@dataclass(frozen=True)
class Welch:
    """Welch's unequal-variance t-test of the difference of two group means (``welch``)."""

    diff: float  # d = mean_a - mean_b
    se: float  # sqrt(s_a²/n_a + s_b²/n_b)
    df: float  # Welch–Satterthwaite degrees of freedom
    t: float  # d / se
    p: float  # two-sided p-value, 2 P(T_df > |t|)
    ci: tuple[float, float]  # d ± t_{(1+level)/2, df} · se
    level: float = 0.95


def welch(a: Stat, b: Stat, level: float = 0.95) -> Welch:
    """Welch's t-test of mean_a - mean_b from the groups' mean, sample std (n-1) and n
    (``scipy.stats.ttest_ind_from_stats(..., equal_var=False)``): d = m_a - m_b, v_i = s_i²/n_i,
    se = sqrt(v_a + v_b), t = d/se, df = (v_a + v_b)² / (v_a²/(n_a-1) + v_b²/(n_b-1)), p = 2 P(T_df > |t|),
    CI = d ± t_{(1+level)/2, df} · se. NaN (except d) when a group has fewer than two values;
    if both groups have zero spread, df = n_a + n_b - 2 and p = 0 (d != 0) or 1 (d = 0)."""
    d = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        return Welch(d, math.nan, math.nan, math.nan, math.nan, (math.nan, math.nan), level)
    va, vb = a.std**2 / a.n, b.std**2 / b.n
    se = math.sqrt(va + vb)
    if se == 0.0:
        t = 0.0 if d == 0 else math.copysign(math.inf, d)
        return Welch(d, 0.0, float(a.n + b.n - 2), t, 1.0 if d == 0 else 0.0, (d, d), level)
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    test = scipy_stats.ttest_ind_from_stats(a.mean, a.std, a.n, b.mean, b.std, b.n, equal_var=False)
    half = t_ppf(0.5 + level / 2.0, df) * se
    return Welch(d, se, df, float(test.statistic), min(1.0, float(test.pvalue)), (d - half, d + half), level)


def tost(w: Welch, margin: float) -> float:
    """p-value of TOST (two one-sided Welch t-tests) for equivalence within ±margin:
    H0: |d| >= margin vs H1: |d| < margin, p = max(P(T > (d + margin)/se), P(T < (d - margin)/se)),
    T ~ t with Welch's df. p < alpha exactly when the (1 - 2·alpha) CI of d lies inside (-margin, margin)."""
    if math.isnan(w.se) or math.isnan(w.df):
        return math.nan
    if w.se == 0.0:
        return 0.0 if abs(w.diff) < margin else 1.0
    return max(t_sf((w.diff + margin) / w.se, w.df), t_cdf((w.diff - margin) / w.se, w.df))


@dataclass(frozen=True)
class Paired:
    """The paired t-test of per-pair differences (``paired_t``), with its TOST p-value."""

    n: int
    mean: float  # mean difference
    sd: float  # sample std of the differences (n-1)
    t: float
    p: float  # two-sided p-value, 2 P(T_{n-1} > |t|)
    ci: tuple[float, float]  # mean ± t_{(1+level)/2, n-1} · sd / sqrt(n)
    p_tost: float  # equivalence within ±margin: max of the two one-sided p-values
    level: float = 0.95


def paired_t(diffs: Sequence[float], margin: float = MARGIN, level: float = 0.95) -> Paired:
    """Paired t-test of the differences against 0 (``scipy.stats.ttest_1samp``), the t-quantile confidence
    interval of their mean and TOST for |mean| < margin (two one-sided t-tests, n-1 degrees of freedom).
    NaN below two differences; with zero spread p = 0 (mean != 0) or 1 and TOST p = 0 (|mean| < margin) or 1."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else math.nan
    if n < 2:
        return Paired(n, mean, math.nan, math.nan, math.nan, (math.nan, math.nan), math.nan, level)
    sd = statistics.stdev(diffs)
    se = sd / math.sqrt(n)
    if se == 0.0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
        return Paired(
            n, mean, sd, t, 1.0 if mean == 0 else 0.0, (mean, mean), 0.0 if abs(mean) < margin else 1.0, level
        )
    test = scipy_stats.ttest_1samp(list(diffs), 0.0)
    half = t_ppf(0.5 + level / 2.0, n - 1) * se
    p_tost = max(t_sf((mean + margin) / se, n - 1), t_cdf((mean - margin) / se, n - 1))
    return Paired(n, mean, sd, float(test.statistic), float(test.pvalue), (mean - half, mean + half), p_tost, level)


def paired_mde(n: int, sd: float, alpha: float = ALPHA, power: float = 0.8) -> float:
    """Minimum detectable effect of the two-sided paired t-test (one-sample t on ``n`` differences of standard
    deviation ``sd``) at level ``alpha`` with ``power``: noncentral t with n−1 degrees of freedom, bisection; inf
    below two differences or without a finite sd."""
    if n < 2 or math.isnan(sd) or sd <= 0:
        return math.inf if n < 2 else math.nan
    df, se = n - 1, sd / math.sqrt(n)
    tc = float(scipy_stats.t.ppf(1.0 - alpha / 2.0, df))

    def pw(delta: float) -> float:
        nc = delta / se
        return float(scipy_stats.nct.sf(tc, df, nc) + scipy_stats.nct.cdf(-tc, df, nc))

    lo, hi = 0.0, sd
    while pw(hi) < power:
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if pw(mid) < power else (lo, mid)
    return hi


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order: with the m non-NaN p-values sorted
    p_(1) <= ... <= p_(m), p~_(i) = min(1, max_{j<=i} (m - j + 1) p_(j)). Rejecting where
    p~ < alpha controls the family-wise error rate at alpha. NaN p-values stay NaN, outside the family."""
    order = sorted((i for i, p in enumerate(pvalues) if not math.isnan(p)), key=lambda i: pvalues[i])
    m = len(order)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def example_bootstrap(
    a: Sequence[str], b: Sequence[str], draws: int = 4000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Difference of mean accuracy (pp) of two groups of runs scored on one test split, and a percentile
    bootstrap CI that resamples both sources of noise: the test examples (one multinomial draw of the n
    examples per replicate, shared by both groups: the comparison is paired on examples) and the seeds
    (each group's runs drawn with replacement). ``a``/``b``: per run, its ``test_correct`` string ("1" =
    right, "0" = wrong, one character per example in data-loader order). Welch over seeds alone treats
    the test split as fixed; this interval also covers which n examples the split happened to hold."""
    import numpy as np  # noqa: PLC0415 (only this function needs it)

    ma = np.array([[c == "1" for c in run] for run in a], dtype=float)
    mb = np.array([[c == "1" for c in run] for run in b], dtype=float)
    if ma.ndim != 2 or mb.ndim != 2 or ma.shape[1] != mb.shape[1] or ma.shape[1] == 0:
        raise ValueError("example_bootstrap: every run needs a test_correct string of one length (one test split)")
    n = ma.shape[1]
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=draws).T  # n x draws: how often each example is drawn
    acc_a, acc_b = ma @ weights / n, mb @ weights / n  # runs x draws
    cols = np.arange(draws)
    ia = rng.integers(0, len(ma), size=(len(ma), draws))
    ib = rng.integers(0, len(mb), size=(len(mb), draws))
    diffs = 100.0 * (acc_a[ia, cols].mean(axis=0) - acc_b[ib, cols].mean(axis=0))
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return 100.0 * float(ma.mean() - mb.mean()), float(lo), float(hi)


def hierarchical_bootstrap(
    splits: Sequence[tuple[Sequence[str], Sequence[str]]], draws: int = 4000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean over splits of the per-split difference of mean accuracy (pp) of two groups of runs, and a percentile
    bootstrap CI over the three levels of noise: the splits (drawn with replacement), then within each drawn split
    the test examples (one multinomial draw shared by both groups, as in :func:`example_bootstrap`) and each group's
    runs (seeds, with replacement). ``splits``: per split, the ``test_correct`` strings of group a and of group b
    (one length within a split; splits may differ)."""
    import numpy as np  # noqa: PLC0415

    mats = []
    for a, b in splits:
        ma = np.array([[c == "1" for c in run] for run in a], dtype=float)
        mb = np.array([[c == "1" for c in run] for run in b], dtype=float)
        if ma.ndim != 2 or mb.ndim != 2 or ma.shape[1] != mb.shape[1] or ma.shape[1] == 0:
            raise ValueError(
                "hierarchical_bootstrap: within a split every run needs a test_correct string of one length"
            )
        mats.append((ma, mb))
    k = len(mats)
    if k == 0:
        raise ValueError("hierarchical_bootstrap: no split")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, k, size=(k, draws))  # the splits of each replicate, one per position
    total = np.zeros(draws)
    cols = np.arange(draws)
    for pos in range(k):  # each position of a replicate draws its examples and runs afresh
        per_split = np.zeros((k, draws))
        for s, (ma, mb) in enumerate(mats):
            n = ma.shape[1]
            weights = rng.multinomial(n, np.full(n, 1.0 / n), size=draws).T
            acc_a, acc_b = ma @ weights / n, mb @ weights / n
            ia = rng.integers(0, len(ma), size=(len(ma), draws))
            ib = rng.integers(0, len(mb), size=(len(mb), draws))
            per_split[s] = acc_a[ia, cols].mean(axis=0) - acc_b[ib, cols].mean(axis=0)
        total += per_split[picks[pos], cols]
    diffs = 100.0 * total / k
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    point = statistics.fmean(100.0 * (ma.mean() - mb.mean()) for ma, mb in mats)
    return point, float(lo), float(hi)


@dataclass(frozen=True)
class Components:
    """Variance components (points²) of a balanced-ish one-way layout: groups (splits) of replicates (seeds)."""

    groups: int
    per_group: float  # mean number of replicates per group
    within: float  # pooled variance of the replicates within a group (seed to seed)
    within_df: int
    between: float  # variance of the true group means (split to split), method of moments, clamped at 0
    group_means_var: float  # the raw variance of the group means

    @property
    def between_sd(self) -> float:
        return math.sqrt(self.between)

    @property
    def within_sd(self) -> float:
        return math.sqrt(self.within)


def variance_components(groups: Sequence[Sequence[float]]) -> Components:
    """Between-group and within-group variance of values grouped by split (``groups``: per split, its seeds'
    values in points): within = pooled sample variance; between = var(group means) − within / (mean group size),
    clamped at 0 (the ANOVA method of moments)."""
    full = [list(g) for g in groups if g]
    means = [statistics.fmean(g) for g in full]
    dof = sum(len(g) - 1 for g in full)
    within = sum(sum((x - statistics.fmean(g)) ** 2 for x in g) for g in full) / dof if dof else math.nan
    size = statistics.fmean(len(g) for g in full) if full else math.nan
    raw = statistics.variance(means) if len(means) > 1 else math.nan
    between = max(0.0, raw - within / size) if not (math.isnan(raw) or math.isnan(within)) else math.nan
    return Components(len(full), size, within, dof, between, raw)


# --------------------------------------------------------------------------- validation curves
@dataclass(frozen=True)
class Convergence:
    """The last two validation points of a mean curve, their change and the seed noise at the last point (pp)."""

    label: str
    n: int
    steps: tuple[int, int]
    prev: float
    last: float
    noise: float

    @property
    def delta(self) -> float:
        return self.last - self.prev

    @property
    def status(self) -> str:
        if math.isnan(self.noise):
            return "seed noise not measurable (one seed)"
        if abs(self.delta) < self.noise:
            return "the change is smaller than the seed noise"
        return (
            "still rising: the change exceeds the seed noise"
            if self.delta > 0
            else "falling: the change exceeds the seed noise"
        )

    def line(self) -> str:
        noise = "n/a" if math.isnan(self.noise) else f"{self.noise:.2f} pp"
        return (
            f"- {self.label}: step {self.steps[0]} → {self.steps[1]}: {self.prev:.1f} → {self.last:.1f} % (Δ "
            f"{self.delta:+.2f} pp); seed noise (std over {self.n} seeds at step {self.steps[1]}) {noise}: "
            f"{self.status}."
        )


def mean_curve(runs: Sequence[dict]) -> list[tuple[int, float, list[float]]]:
    """``(step, mean val acc %, per-seed values %)`` at every step some run validated, in step order."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for step, acc in run.get("val_curve") or []:
            by_step.setdefault(int(step), []).append(100.0 * acc)
    return [(s, statistics.fmean(v), v) for s, v in sorted(by_step.items())]


def convergence_check(label: str, runs: Sequence[dict]) -> Convergence | None:
    """Compare the last two points of the mean validation curve with the seed spread at the last point."""
    curve = mean_curve(runs)
    if len(curve) < 2:
        return None
    (s0, m0, _), (s1, m1, v1) = curve[-2], curve[-1]
    return Convergence(label, len(v1), (s0, s1), m0, m1, statistics.stdev(v1) if len(v1) > 1 else math.nan)
