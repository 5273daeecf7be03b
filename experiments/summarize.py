"""Summarise the Table 5 / Table 6 sweeps into markdown tables, CSV files and PNG plots.

    python -m experiments.summarize                       # reads multirun/{table5,table6,table6_reference}
    python -m experiments.summarize --runs multirun --out experiments/results

Every number comes from the ``summary.json`` each ``lora-train`` run writes (metric: best
validation accuracy over the run, as the paper reports validation accuracy). Groups are averaged
over seeds: mean ± sample standard deviation (n-1), n = number of seeds found. The paper's
figures (GPT-3 175B, ../shared/PAPER.md) are printed beside ours for the shape comparison.

Claim checks (``check_claims``): Welch's t-test per comparison (difference, 95% CI, two-sided p),
Holm–Bonferroni over all checks of the report, TOST equivalence at ``--margin`` accuracy points
(default 0.5) for the paper's no-difference claims; each check is "equivalent within ±m",
"different" or "inconclusive", and each verdict "agrees", "disagrees" or "inconclusive".
The Student t distribution is computed here (regularized incomplete beta), without scipy.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Iterable, Literal, Sequence

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
METRIC = "best_val_acc"  # the paper's metric
TEST_METRIC = "test_acc"  # accuracy on the test split of the checkpoint with the best validation accuracy
METRIC_NAMES = {METRIC: "validation accuracy", TEST_METRIC: "test accuracy"}
PAPER_SPREAD = "Paper rows: (±0.5) / (±0.1) is the fluctuation the paper states for WikiSQL / MultiNLI."


# --------------------------------------------------------------------------- loading
def load_runs(root: Path) -> list[dict]:
    """Every ``summary.json`` below ``root`` (one per finished run), with ``dir`` and ``targets_key`` added."""
    rows = []
    for path in sorted(root.rglob("summary.json")) if root.is_dir() else []:
        row = json.loads(path.read_text())
        row["dir"] = str(path.parent)
        row["targets_key"] = ",".join(row.get("targets") or [])
        rows.append(row)
    return rows


def of_experiment(rows: list[dict], experiment: str, methods: Sequence[str] | None = None) -> list[dict]:
    """The runs of one ``experiment`` (the summary's field, whatever folder they sit in), optionally of some methods."""
    return [r for r in rows if r.get("experiment") == experiment and (methods is None or r.get("method") in methods)]


def has_metric(row: dict, metric: str) -> bool:
    """Whether a run recorded ``metric`` (``test_acc`` is absent when the run had no test split)."""
    return isinstance(row.get(metric), (int, float))


@dataclass(frozen=True)
class Stat:
    """Mean, sample std (n-1; NaN for n=1) and count of a group of runs (accuracy in %)."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> "Stat":
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


def group(rows: list[dict], *keys: str, metric: str = METRIC) -> dict[tuple, Stat]:
    """``Stat`` of ``metric`` per value of ``keys`` (runs without the metric are left out)."""
    out: dict[tuple, list[float]] = {}
    for row in rows:
        if has_metric(row, metric):
            out.setdefault(tuple(row[k] for k in keys), []).append(row[metric])
    return {k: Stat.of(v) for k, v in out.items()}


def pooled_std(rows: list[dict], *keys: str, metric: str = METRIC) -> tuple[float, int]:
    """Seed noise: the pooled within-group standard deviation (in %) and its degrees of freedom."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        if has_metric(row, metric):
            groups.setdefault(tuple(row[k] for k in keys), []).append(100.0 * row[metric])
    ss = sum(sum((x - statistics.fmean(v)) ** 2 for x in v) for v in groups.values() if len(v) > 1)
    dof = sum(len(v) - 1 for v in groups.values() if len(v) > 1)
    return (math.sqrt(ss / dof) if dof else math.nan), dof


# --------------------------------------------------------------------------- statistics
ALPHA = 0.05  # family-wise error rate of the claim checks
MARGIN = 0.5  # equivalence margin, accuracy points (pp)


def _betacf(a: float, b: float, x: float, eps: float = 1e-15, max_iter: int = 10_000) -> float:
    """Continued fraction of I_x(a, b) (modified Lentz; Numerical Recipes 6.4, betacf), with terms
    d_{2m+1} = -(a+m)(a+b+m)x / ((a+2m)(a+2m+1)) and d_{2m} = m(b-m)x / ((a+2m-1)(a+2m))."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)), -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0, 0 <= x <= 1:
    x^a (1-x)^b / (a B(a, b)) times a continued fraction, evaluated directly where
    x < (a+1)/(a+b+2) and as 1 - I_{1-x}(b, a) elsewhere (where it converges fast)."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """Upper tail P(T > t) of Student's t with ``df`` > 0 degrees of freedom (real, not only integer):
    P(T > |t|) = I_{df/(df+t²)}(df/2, 1/2) / 2; df = inf gives the standard normal."""
    if math.isnan(t) or math.isnan(df) or df <= 0:
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    if math.isinf(df):
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) = P(T > -t) (the t distribution is symmetric)."""
    return t_sf(-t, df)


def t_ppf(q: float, df: float) -> float:
    """Quantile t_{q, df}: the t with P(T <= t) = q, by bisection on ``t_cdf`` (|error| < 1e-12 · max(1, |t|))."""
    if math.isnan(q) or math.isnan(df) or df <= 0 or not 0.0 < q < 1.0:
        return math.nan
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return 0.5 * (lo + hi)


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
    """Welch's t-test of mean_a - mean_b from the groups' mean, sample std (n-1) and n:
    d = m_a - m_b, v_i = s_i²/n_i, se = sqrt(v_a + v_b), t = d/se,
    df = (v_a + v_b)² / (v_a²/(n_a-1) + v_b²/(n_b-1)), p = 2 P(T_df > |t|),
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
    t = d / se
    half = t_ppf(0.5 + level / 2.0, df) * se
    return Welch(d, se, df, t, min(1.0, 2.0 * t_sf(abs(t), df)), (d - half, d + half), level)


def example_bootstrap(a: Sequence[str], b: Sequence[str], draws: int = 4000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
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


def tost(w: Welch, margin: float) -> float:
    """p-value of TOST (two one-sided Welch t-tests) for equivalence within ±margin:
    H0: |d| >= margin vs H1: |d| < margin, p = max(P(T > (d + margin)/se), P(T < (d - margin)/se)),
    T ~ t with Welch's df. p < alpha exactly when the (1 - 2·alpha) CI of d lies inside (-margin, margin)."""
    if math.isnan(w.se) or math.isnan(w.df):
        return math.nan
    if w.se == 0.0:
        return 0.0 if abs(w.diff) < margin else 1.0
    return max(t_sf((w.diff + margin) / w.se, w.df), t_cdf((w.diff - margin) / w.se, w.df))


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


# --------------------------------------------------------------------------- claim checks
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


def _p(p: float) -> str:
    return "-" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def ci_text(w: Welch) -> str:
    """'+0.91 [+0.37, +1.46]': the difference and its confidence interval (the interval left out when undefined)."""
    return f"{w.diff:+.2f}" + ("" if math.isnan(w.ci[0]) else f" [{w.ci[0]:+.2f}, {w.ci[1]:+.2f}]")


def claims_markdown(checks: Sequence[ClaimCheck]) -> str:
    """One row per claim: the difference with its 95% CI (no ± in this table), Welch t and df, raw and
    Holm-corrected p, Holm-corrected TOST p, outcome and verdict."""
    if not checks:
        return ""
    c0 = checks[0]
    lines = [
        f"Claim checks: Welch t-test; p corrected by Holm over the {c0.family} checks of this report; "
        f"equivalence by TOST at ±{c0.margin:g} pp; alpha {c0.alpha:g}. Brackets are 95% confidence intervals of the difference (see Method).",
        "",
        f"| paper's claim | test | ours: difference a − b (pp) [95% CI] | Welch t (df) | p | p, Holm | TOST p, Holm (±{c0.margin:g}) | outcome | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        w = c.welch
        test = "difference" if c.claim.kind == GREATER else f"equivalence ±{c.margin:g}"
        tdf = "-" if math.isnan(w.t) else f"{w.t:+.2f} ({w.df:.1f})"
        lines.append(
            f"| {c.claim.text} | {test} | {c.claim.a_label} − {c.claim.b_label}: {ci_text(w)} | {tdf} "
            f"| {_p(w.p)} | {_p(c.p_holm)} | {_p(c.p_tost_holm)} | {c.outcome} | **{c.verdict}** |"
        )
    return "\n".join(lines)


def method_markdown(family: int, margin: float = MARGIN, alpha: float = ALPHA, *, test_family: int = 0, heading: bool = True) -> str:
    """The report's Method paragraph: the test, the correction, the equivalence margin, the three outcomes.
    ``test_family``: the number of checks repeated on test accuracy (a second Holm family), 0 if none."""
    test = (
        f" The same claims are also checked on test accuracy (the checkpoint with the best validation accuracy, "
        f"evaluated once on the test split): those {test_family} checks form a second family, Holm-corrected on their own."
        if test_family
        else ""
    )
    return (
        ("## Method\n\n" if heading else "")
        + "Tables: every accuracy cell is mean ± std over n seeds (± is the sample standard deviation, n−1 "
        "denominator, not the standard error; n is printed with each table). "
        "Claim checks compare two of our configurations a and b with Welch's two-sample t-test (unequal "
        "variances): difference d = mean_a − mean_b, standard error SE = sqrt(s_a²/n_a + s_b²/n_b), t = d/SE, "
        "Welch–Satterthwaite degrees of freedom df = SE⁴ / ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1)), "
        "two-sided p-value and 95% confidence interval d ± t(0.975, df)·SE. "
        f"Correction: the p-values are Holm–Bonferroni corrected over the family of all {family} checks in "
        f"this report (the equivalence p-values likewise, over the same {family} checks), at alpha = {alpha:g}. "
        f"Equivalence margin: claims of no difference (competitive, little gain past r=8, matches) are tested "
        f"with TOST, two one-sided Welch t-tests of H0: |d| ≥ {margin:g} against |d| < {margin:g} accuracy "
        f"points (uncorrected, this is the 90% confidence interval lying inside ±{margin:g}). "
        f"Every check has one of three outcomes: \"{equivalent_label(margin)}\" (TOST significant after "
        "correction), \"different\" (difference significant after correction) or \"inconclusive\" (neither: "
        "these seeds have no power to tell; a verdict that hinges on it needs more seeds, ≥ 5). Where both "
        "tests are significant (a real difference inside the margin), the outcome the claim is about is shown. "
        "Verdict vs the paper: \"agrees\" only when the test supports the paper's claim (a significant "
        "difference in the paper's direction, or equivalence for a no-difference claim), \"disagrees\" when it "
        "supports the opposite (a significant difference in the other direction, or a significant difference "
        "where the paper claims none), \"inconclusive\" otherwise. A difference that merely stays under a "
        "threshold is never scored as agreement."
        + test
    )


def spread_caption(stats: Iterable[Stat]) -> str:
    """The line under a table that says what its ± is, with the seed counts of its cells."""
    ns = sorted({s.n for s in stats if s.n > 0})
    n = "-" if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}, per cell"
    return f"Cells: mean ± std over n seeds (n = {n}); ± is the sample standard deviation over seeds, not the standard error."


# --------------------------------------------------------------------------- tables
CSV_COLUMNS = [
    "experiment", "method", "variant", "lr", "targets_key", "r", "alpha", "init", "init_seed", "seed",
    "best_val_acc", "test_acc", "params_lora", "params_trainable", "fit_seconds", "steps", "adapter_bytes",
]


def write_csv(rows: list[dict], path: Path) -> None:
    """One line per run (the columns of ``CSV_COLUMNS``; empty where a run did not record one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for row in sorted(rows, key=lambda r: (r.get("method", ""), r["targets_key"], r.get("r") or 0, r.get("seed", 0))):
            w.writerow(["" if row.get(c) is None else row.get(c) for c in CSV_COLUMNS])


def _bold(stat: Stat | None) -> str:
    return f"**{stat}**" if stat is not None else "-"


def table5_stats(rows: list[dict], metric: str = METRIC) -> dict[str, Stat]:
    """Table 5 cells: one ``Stat`` per weight-type set."""
    return {k[0]: s for k, s in group(rows, "targets_key", metric=metric).items()}


def table5_markdown(rows: list[dict]) -> tuple[str, dict[str, Stat]]:
    """Table 5, ours (validation and, where recorded, test accuracy) beside the paper's; returns the val cells too."""
    stats, test = table5_stats(rows), table5_stats(rows, TEST_METRIC)
    ranks = {row["targets_key"]: row["r"] for row in rows}
    params = {row["targets_key"]: row["params_lora"] for row in rows}
    head = "| weights | " + " | ".join(f"W{{{t}}}" for t in TABLE5_ORDER) + " |"
    lines = [head, "|---" * (len(TABLE5_ORDER) + 1) + "|"]
    lines.append("| r (ours) | " + " | ".join(str(ranks.get(t, "-")) for t in TABLE5_ORDER) + " |")
    lines.append("| LoRA params (ours) | " + " | ".join(f"{params[t]:,}" if t in params else "-" for t in TABLE5_ORDER) + " |")
    lines.append("| **val acc, MiniLM / Rotten Tomatoes (ours, mean ± std)** | " + " | ".join(_bold(stats.get(t)) for t in TABLE5_ORDER) + " |")
    if test:
        lines.append("| test acc, same runs (ours, mean ± std) | " + " | ".join(str(test[t]) if t in test else "-" for t in TABLE5_ORDER) + " |")
    lines.append("| seeds (ours) | " + " | ".join(str(stats[t].n) if t in stats else "0" for t in TABLE5_ORDER) + " |")
    lines.append("| r (paper) | " + " | ".join(str(TABLE5_PAPER[t][0]) for t in TABLE5_ORDER) + " |")
    lines.append("| WikiSQL (paper, ±0.5) | " + " | ".join(f"{TABLE5_PAPER[t][1]}" for t in TABLE5_ORDER) + " |")
    lines.append("| MultiNLI (paper, ±0.1) | " + " | ".join(f"{TABLE5_PAPER[t][2]}" for t in TABLE5_ORDER) + " |")
    lines += ["", spread_caption([*stats.values(), *test.values()]) + " " + PAPER_SPREAD]
    return "\n".join(lines), stats


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


def table5_findings(stats: dict[str, Stat], margin: float = MARGIN, alpha: float = ALPHA) -> str:
    """Table 5's claim checks alone (Holm family = these checks); ``summarize`` corrects over the whole report."""
    return claims_markdown(check_claims(table5_claims(stats), margin, alpha))


def table6_stats(rows: list[dict], metric: str = METRIC) -> dict[tuple[str, int], Stat]:
    """Table 6 cells: one ``Stat`` per (weight-type set, r)."""
    return {(k[0], k[1]): s for k, s in group(rows, "targets_key", "r", metric=metric).items()}


REFERENCE_LABELS = {"full": "full fine-tuning", "head_only": "head only (frozen encoder)"}


def reference_markdown(ref_rows: list[dict]) -> tuple[list[str], list[Stat]]:
    """Table 6's reference rows (full fine-tuning, head only): val and test accuracy, trainable parameters."""
    val = {k[0]: s for k, s in group(ref_rows, "method").items()}
    test = {k[0]: s for k, s in group(ref_rows, "method", metric=TEST_METRIC).items()}
    params = {row["method"]: row.get("params_trainable") for row in ref_rows}
    lines = ["| reference (ours) | val acc (mean ± std) | test acc (mean ± std) | lr | trainable params |", "|---|---|---|---|---|"]
    for m, label in REFERENCE_LABELS.items():
        if m in val:
            lrs = sorted({row.get("lr") for row in ref_rows if row["method"] == m and row.get("lr") is not None})
            p = f"{params[m]:,}" if params.get(m) else "-"
            lines.append(f"| {label} | {val[m]} | {test.get(m, '-')} | {', '.join(f'{x:g}' for x in lrs) or '-'} | {p} |")
    return lines, [*val.values(), *test.values()]


def table6_markdown(rows: list[dict], ref_rows: list[dict]) -> tuple[str, dict[tuple[str, int], Stat]]:
    """Table 6, ours (val and test rows) beside the paper's, and the reference rows; returns the val cells too."""
    stats, test = table6_stats(rows), table6_stats(rows, TEST_METRIC)
    lines = ["| weights | " + " | ".join(f"r={r}" for r in TABLE6_RANKS) + " | source |", "|---" * (len(TABLE6_RANKS) + 2) + "|"]
    for t in TABLE6_TARGETS:
        lines.append(f"| **W{{{t}}}** | " + " | ".join(_bold(stats.get((t, r))) for r in TABLE6_RANKS) + " | ours, val acc (mean ± std) |")
        if test:
            lines.append("| | " + " | ".join(str(test[(t, r)]) if (t, r) in test else "-" for r in TABLE6_RANKS) + " | ours, test acc (mean ± std) |")
        lines.append("| | " + " | ".join(f"{TABLE6_PAPER[t][r][0]}" for r in TABLE6_RANKS) + " | paper, WikiSQL (±0.5) |")
        lines.append("| | " + " | ".join(f"{TABLE6_PAPER[t][r][1]}" for r in TABLE6_RANKS) + " | paper, MultiNLI (±0.1) |")
    ref_stats: list[Stat] = []
    if ref_rows:
        ref_lines, ref_stats = reference_markdown(ref_rows)
        lines += ["", *ref_lines]
    lines += ["", spread_caption([*stats.values(), *test.values(), *ref_stats]) + " " + PAPER_SPREAD]
    return "\n".join(lines), stats


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


def rank_profile_markdown(rows: list[dict]) -> str:
    """Every Table 6 row's r=1 and r=8 against its r=64, ours (val and test, Welch 95% CI, raw p) beside the
    paper's difference: a description of each row's shape, deliberately outside the claim checks' Holm family."""
    by_metric = {m: table6_stats(rows, m) for m in _metrics_present(rows)}
    lines = ["| weights | comparison | paper (WikiSQL / MultiNLI) | "
             + " | ".join(f"ours, {METRIC_NAMES[m]}: diff [95% CI], raw p" for m in by_metric) + " |",
             "|---|---|---|" + "---|" * len(by_metric)]
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
                cells.append(f"{ci_text(w)}, p {_p(w.p)} (n {a.n} / {b.n})")
            lines.append(f"| W{{{key}}} | r={small} − r=64 | {paper[small][0] - paper[64][0]:+.1f} / {paper[small][1] - paper[64][1]:+.1f} | "
                         + " | ".join(cells) + " |")
    return "\n".join([
        "Rank profile of every row: r=1 and r=8 against r=64, ours beside the paper's difference (a description, not "
        "a claim check: raw p-values, outside the Holm family of the checks above):",
        "",
        *lines,
    ])


def table6_findings(stats: dict[tuple[str, int], Stat], margin: float = MARGIN, alpha: float = ALPHA) -> str:
    """Table 6's claim checks alone (Holm family = these checks); ``summarize`` corrects over the whole report."""
    return claims_markdown(check_claims(table6_claims(stats), margin, alpha))


# --------------------------------------------------------------------------- plots
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


def _metrics_present(rows: list[dict]) -> list[str]:
    """``[METRIC]``, plus ``TEST_METRIC`` when some run recorded it."""
    return [METRIC] + ([TEST_METRIC] if any(has_metric(r, TEST_METRIC) for r in rows) else [])


def plot_table5(rows: list[dict], stats: dict[str, Stat], path: Path) -> Path:
    """Bars (mean ± std over seeds) and one dot per seed, per weight-type set; val and test side by side."""
    metrics = _metrics_present(rows)
    fig = _figure(7.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    present = [t for t in TABLE5_ORDER if t in stats]
    width = 0.8 / len(metrics)
    for m_i, (metric, colour, dots) in enumerate(zip(metrics, ("#8fb3d9", "#e3b778"), ("#1f3b5c", "#7a4f0f"))):
        cells = table5_stats(rows, metric)
        xs = [i + (m_i - (len(metrics) - 1) / 2) * width for i in range(len(present))]
        ax.bar(xs, [cells[t].mean if t in cells else math.nan for t in present], width,
               yerr=[0 if t not in cells or math.isnan(cells[t].std) else cells[t].std for t in present],
               color=colour, capsize=3, label=f"{METRIC_NAMES[metric]}, mean ± std over seeds")
        for x, t in zip(xs, present):
            seeds = [100 * r[metric] for r in rows if r["targets_key"] == t and has_metric(r, metric)]
            ax.scatter([x] * len(seeds), seeds, color=dots, s=10, zorder=3)
    ranks = {row["targets_key"]: row["r"] for row in rows}
    ax.set_xticks(list(range(len(present))), [f"W{{{t}}}\nr={ranks[t]}" for t in present])
    values = [100 * r[m] for r in rows for m in metrics if has_metric(r, m)]
    ax.set_ylim(min(values) - 1.5, max(values) + 1.0)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Table 5 at CPU scale: one LoRA parameter budget, different weight types (dots: seeds)", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def plot_table6(stats: dict[tuple[str, int], Stat], ref_rows: list[dict], path: Path, rows: list[dict] | None = None) -> Path:
    """Accuracy vs r per weight-type set (mean ± std over seeds), reference rows as lines; one panel per metric."""
    metrics = _metrics_present((rows or []) + ref_rows)
    fig = _figure(6.5 * len(metrics), 4.0)
    for m_i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), m_i + 1)
        cells = stats if metric == METRIC or rows is None else table6_stats(rows, metric)
        for t, colour in zip(TABLE6_TARGETS, ("#d1495b", "#00798c", "#edae49")):
            rs = [r for r in TABLE6_RANKS if (t, r) in cells]
            if rs:
                errs = [0 if math.isnan(cells[(t, r)].std) else cells[(t, r)].std for r in rs]
                ax.errorbar(rs, [cells[(t, r)].mean for r in rs], yerr=errs, marker="o", capsize=3, color=colour, label=f"W{{{t}}}")
        ref = {k[0]: s for k, s in group(ref_rows, "method", metric=metric).items()} if ref_rows else {}
        for m, style, label in (("full", "--", "full fine-tuning"), ("head_only", ":", "head only")):
            if m in ref:
                ax.axhline(ref[m].mean, color="grey", linestyle=style, label=f"{label} ({ref[m]})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(TABLE6_RANKS, [str(r) for r in TABLE6_RANKS])
        ax.set_xlabel("rank r")
        ax.set_ylabel(f"{METRIC_NAMES[metric]} (%)")
        ax.set_title(f"Table 6 at CPU scale: {METRIC_NAMES[metric]} vs rank (mean ± std over seeds)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


# --------------------------------------------------------------------------- variants (issue 8)
VARIANT_ORDER = ["lora", "rslora", "dora", "pissa", "vera", "adalora", "qlora"]


def variants_markdown(rows: list[dict]) -> str:
    """One row per (variant, lr): val acc, adapter parameters, step time, adapter bytes, base bytes."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row.get("variant") or "lora", row.get("lr") or math.nan), []).append(row)
    order = sorted(groups, key=lambda k: (VARIANT_ORDER.index(k[0]) if k[0] in VARIANT_ORDER else 99, k[1]))
    lines = [
        "| variant | lr | val acc (mean ± std) | seeds | adapter params | trainable (incl. head) | s / step (median) | adapter file | adapted base weights |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in order:
        g = groups[key]
        stat = Stat.of(r[METRIC] for r in g)
        step = statistics.median(r["fit_seconds"] / r["steps"] for r in g if r.get("steps"))
        base = g[0].get("base_bytes_after")
        before = g[0].get("base_bytes_before")
        base_txt = f"{base / 1e6:.2f} MB (from {before / 1e6:.2f} MB)" if base and before and base != before else "unchanged" if base else "not recorded"
        lines.append(
            f"| {key[0]} | {key[1]:g} | **{stat}** | {stat.n} | {g[0]['params_lora']:,} | {g[0]['params_trainable']:,} "
            f"| {step:.2f} | {g[0].get('adapter_bytes', 0) / 1e6:.2f} MB | {base_txt} |"
        )
    lines += ["", spread_caption(Stat.of(r[METRIC] for r in g) for g in groups.values())]
    return "\n".join(lines)


def plot_adalora_ranks(rows: list[dict], path: Path) -> Path | None:
    """Final AdaLoRA rank per adapted matrix (one bar group per seed)."""
    runs = [r for r in rows if r.get("adalora_ranks")]
    if not runs:
        return None
    fig = _figure(8.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    names = sorted(runs[0]["adalora_ranks"])
    width = 0.8 / len(runs)
    for i, run in enumerate(sorted(runs, key=lambda r: r.get("seed", 0))):
        ax.bar([j + i * width for j in range(len(names))], [run["adalora_ranks"].get(n, 0) for n in names], width, label=f"seed {run.get('seed')}")
    short = [n.replace("model.bert.encoder.layer.", "L").replace(".attention.self.", ".") for n in names]
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], short, rotation=60, fontsize=7)
    ax.set_ylabel("final rank")
    ax.set_title("AdaLoRA: rank per matrix after budget pruning (start r=8)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path




def read_variants_csv(path: Path) -> list[dict]:
    """The rows of a ``variants_runs.csv`` written by ``write_csv`` (numbers parsed; empty cells dropped)."""
    def value(text: str):
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return text

    with path.open() as fh:
        return [{k: value(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


# --------------------------------------------------------------------------- the ablation report
def noise_line(rows: list[dict], *keys: str, metric: str = METRIC) -> str:
    """Run count, seed noise (pooled within-configuration std of ``metric``) and median fit time."""
    sd, dof = pooled_std(rows, *keys, metric=metric)
    times = [row["fit_seconds"] for row in rows if row.get("fit_seconds")]
    t = f"; fit time per run median {statistics.median(times):.0f} s" if times else ""
    return f"{len(rows)} runs; seed noise of {METRIC_NAMES[metric]} (pooled within-config std) {sd:.2f} pp with {dof} degrees of freedom{t}."


@dataclass
class AblationReport:
    """The Table 5 / Table 6 / variants sections (markdown blocks) and every claim check, by metric:
    ``checks[metric]`` is a list of ``(table, check)``, one Holm family per metric."""

    parts: list[str]
    checks: dict[str, list[tuple[str, ClaimCheck]]]
    variants: list[str]

    def family(self, metric: str) -> int:
        checks = self.checks.get(metric, [])
        return checks[0][1].family if checks else 0


def _claims_block(checks: dict[str, list[tuple[str, ClaimCheck]]], table: str) -> str:
    """The claim tables of one table of the paper, one per metric."""
    blocks = []
    for metric, pairs in checks.items():
        mine = [c for t, c in pairs if t == table]
        if mine:
            note = "the paper's metric" if metric == METRIC else "the checkpoint chosen on validation, evaluated once"
            blocks += [f"On {METRIC_NAMES[metric]} ({note}):", "", claims_markdown(mine), ""]
    return "\n".join(blocks).strip() or "(no claim of the paper can be checked on these runs)"


def ablation_report(rows: list[dict], out: Path, link: str = "results", margin: float = MARGIN, alpha: float = ALPHA,
                    variants_csv: Path | None = None) -> AblationReport:
    """Tables 5 and 6 (+ reference rows, + variants) from the runs' summaries: CSVs and PNGs into ``out``
    (linked as ``link/<name>.png``), claims checked on validation and on test accuracy."""
    parts: list[str] = []
    claims: dict[str, dict[str, list[Claim]]] = {METRIC: {}, TEST_METRIC: {}}
    t5 = of_experiment(rows, "table5", ["lora"])
    if t5:
        write_csv(t5, out / "table5_runs.csv")
        md, stats = table5_markdown(t5)
        plot_table5(t5, stats, out / "table5.png")
        claims[METRIC]["table5"] = table5_claims(stats)
        claims[TEST_METRIC]["table5"] = table5_claims(table5_stats(t5, TEST_METRIC))
        noise = [noise_line(t5, "targets_key", metric=m) for m in _metrics_present(t5)]
        parts += ["## Table 5 (ours)", "", md, "", *noise, "", "{table5}", "", f"![table 5]({link}/table5.png)", ""]
    t6 = of_experiment(rows, "table6", ["lora"])
    ref = of_experiment(rows, "table6_reference", ["full", "head_only"])
    if t6 or ref:
        write_csv(t6 + ref, out / "table6_runs.csv")
        md, stats6 = table6_markdown(t6, ref)
        plot_table6(stats6, ref, out / "table6.png", t6)
        claims[METRIC]["table6"] = table6_claims(stats6)
        claims[TEST_METRIC]["table6"] = table6_claims(table6_stats(t6, TEST_METRIC))
        noise = [noise_line(t6, "targets_key", "r", metric=m) for m in _metrics_present(t6)] if t6 else []
        profile = [rank_profile_markdown(t6), ""] if t6 else []
        parts += ["## Table 6 (ours)", "", md, "", *noise, "", "{table6}", "", *profile, f"![table 6]({link}/table6.png)", ""]
    variants = variants_section(of_experiment(rows, "variants", ["lora"]), out, link, variants_csv)
    checks: dict[str, list[tuple[str, ClaimCheck]]] = {}
    for metric, by_table in claims.items():
        flat = [(t, c) for t, cs in by_table.items() for c in cs]
        if flat:
            checks[metric] = list(zip([t for t, _ in flat], check_claims([c for _, c in flat], margin, alpha)))
    parts = [_claims_block(checks, part[1:-1]) if part in ("{table5}", "{table6}") else part for part in parts]
    return AblationReport(parts, checks, variants)


def variants_section(var: list[dict], out: Path, link: str, variants_csv: Path | None) -> list[str]:
    """The variants sweep (issue 8): from its runs, or else from a saved ``variants_runs.csv`` (earlier scale)."""
    if var:
        write_csv(var, out / "variants_runs.csv")
        lines = ["## Variants (ours, issue 8)", "", variants_markdown(var), "", noise_line(var, "variant", "lr"), ""]
        if plot_adalora_ranks(var, out / "adalora_ranks.png"):
            lines += [f"![AdaLoRA ranks]({link}/adalora_ranks.png)", ""]
        return lines
    if variants_csv is None or not variants_csv.is_file():
        return []
    rows = read_variants_csv(variants_csv)
    steps = sorted({r["steps"] for r in rows if r.get("steps")})
    lrs = [r["lr"] for r in rows if r.get("lr")]
    base_lr = max(set(lrs), key=lrs.count) if lrs else math.nan
    others = sorted({(r.get("variant"), r["lr"]) for r in rows if r.get("lr") and r["lr"] != base_lr})
    other_txt = "".join(f"; {v} also at lr {lr:g}" for v, lr in others)
    return [
        "## Variants (earlier scale, not re-run)",
        "",
        f"Read from `{variants_csv.name}` (the run folders are gone). These runs used the first ablation scale "
        f"(`conf/experiment/ablation_scale_75steps.yaml`: {', '.join(map(str, steps))} optimizer steps, one epoch, "
        "Kaiming-uniform A, no per-adapter init stream, seeds that did not vary the batch order), "
        f"lr {base_lr:g} for every variant{other_txt}, r=8 on {{Wq,Wv}}; the size of the QLoRA base was not saved in the CSV. "
        "These runs are not comparable with the tables above and were not repeated at the current scale.",
        "",
        variants_markdown(rows),
        "",
        noise_line(rows, "variant", "lr"),
        "",
    ]


def summarize(runs: Path, out: Path, margin: float = MARGIN, alpha: float = ALPHA, variants_csv: Path | None = None,
              link: str = "results") -> str:
    """Write the tables, CSVs and plots for whatever ablation sweeps exist under ``runs`` (found by the
    summaries' ``experiment`` field) and ``out/tables.md``; return its markdown. The claim checks of
    Table 5 and Table 6 form one Holm family per metric (see ``method_markdown``)."""
    report = ablation_report(load_runs(runs), out, link, margin, alpha, variants_csv)
    if not report.parts and not report.variants:
        raise SystemExit(f"no table5, table6, table6_reference or variants summary.json under {runs}; run the sweeps first")
    return write_tables(report, out, margin, alpha)


def write_tables(report: AblationReport, out: Path, margin: float = MARGIN, alpha: float = ALPHA) -> str:
    """``out/tables.md``: the Method paragraph, then the ablation tables and the variants; returns its text."""
    method = method_markdown(report.family(METRIC), margin, alpha, test_family=report.family(TEST_METRIC))
    text = "\n".join([method, "", *report.parts, *report.variants])
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("experiments/runs"),
                   help="the collected runs (default %(default)s); with --collect, where they are copied to")
    p.add_argument("--out", type=Path, default=Path("experiments/results"), help="where tables.md, CSVs and PNGs go")
    p.add_argument("--readme", type=Path, default=None, help="the generated report (default: README.md beside --out)")
    p.add_argument("--variants-csv", type=Path, default=Path("experiments/results/variants_runs.csv"),
                   help="the earlier variants sweep, shown when --runs holds no variants runs")
    p.add_argument("--margin", type=float, default=MARGIN, help="equivalence margin in accuracy points for the TOST checks (default %(default)s)")
    p.add_argument("--recipe-margin", type=float, default=1.0, help="equivalence margin of LoRA vs full fine-tuning in the recipe (default %(default)s)")
    p.add_argument("--alpha", type=float, default=ALPHA, help="family-wise error rate of the claim checks (default %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--ablation-lrs", action="store_true", help="print '<family> <lr>' per family, chosen on the search runs under --runs")
    mode.add_argument("--ablation-extensions", action="store_true",
                      help="print '<family> <lr>' for each family whose chosen lr sits on an edge of its search grid: the next lr past it")
    mode.add_argument("--collect", action="store_true", help="copy the finished runs under --source to --runs (summaries, configs, the §7.2/§7.3 adapters)")
    mode.add_argument("--recover-logs", type=Path, nargs="+", metavar="LOG",
                      help="rebuild the records of runs whose folders are gone from their console logs into --runs (experiments/recover.py)")
    p.add_argument("--source", type=Path, default=Path("multirun"), help="with --collect: the Hydra output folder (default %(default)s)")
    args = p.parse_args(argv)
    if not args.margin > 0 or not args.recipe_margin > 0 or not 0 < args.alpha < 1:
        p.error("--margin and --recipe-margin must be > 0 and --alpha in (0, 1)")
    from experiments import collect, report  # noqa: PLC0415 (they import this module)

    if args.ablation_lrs:
        print(collect.format_lrs(collect.ablation_lrs(load_runs(args.runs))), end="")
        return
    if args.ablation_extensions:
        print(collect.format_lrs(collect.edge_extensions(load_runs(args.runs))), end="")
        return
    if args.collect:
        copied = collect.collect(args.source, args.runs)
        print(f"copied {len(copied)} files ({sum(p.stat().st_size for p in copied) / 1e6:.1f} MB) from {args.source} to {args.runs}")
        return
    if args.recover_logs:
        from experiments import recover  # noqa: PLC0415

        rejected: list[str] = []
        written, twins = recover.recover(args.recover_logs, args.runs, load_runs(args.runs), rejected)
        record = recover.write_record(args.runs, args.recover_logs, twins, rejected)
        print(f"recovered {len(written) // 2} runs from {len(args.recover_logs)} logs into {args.runs}; {record}:")
        print("\n".join(recover.twin_checks(twins) + rejected))
        return
    readme = args.readme or args.out.parent / "README.md"
    text = report.write_readme(args.runs, args.out, readme, args.margin, args.alpha, args.recipe_margin, args.variants_csv)
    print(text)


if __name__ == "__main__":
    main()
