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
METRIC = "best_val_acc"
PAPER_SPREAD = "Paper rows: (±0.5) / (±0.1) is the fluctuation the paper states for WikiSQL / MultiNLI."


# --------------------------------------------------------------------------- loading
def load_runs(root: Path) -> list[dict]:
    """Every ``summary.json`` below ``root`` (one per finished run), with ``dir`` added."""
    rows = []
    for path in sorted(root.rglob("summary.json")):
        row = json.loads(path.read_text())
        row["dir"] = str(path.parent)
        row["targets_key"] = ",".join(row.get("targets") or [])
        rows.append(row)
    return rows


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


def group(rows: list[dict], *keys: str) -> dict[tuple, Stat]:
    out: dict[tuple, list[float]] = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in keys), []).append(row[METRIC])
    return {k: Stat.of(v) for k, v in out.items()}


def pooled_std(rows: list[dict], *keys: str) -> tuple[float, int]:
    """Seed noise: the pooled within-group standard deviation (in %) and its degrees of freedom."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(100.0 * row[METRIC])
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
        ci = "" if math.isnan(w.ci[0]) else f" [{w.ci[0]:+.2f}, {w.ci[1]:+.2f}]"
        tdf = "-" if math.isnan(w.t) else f"{w.t:+.2f} ({w.df:.1f})"
        lines.append(
            f"| {c.claim.text} | {test} | {c.claim.a_label} − {c.claim.b_label}: {w.diff:+.2f}{ci} | {tdf} "
            f"| {_p(w.p)} | {_p(c.p_holm)} | {_p(c.p_tost_holm)} | {c.outcome} | **{c.verdict}** |"
        )
    return "\n".join(lines)


def method_markdown(family: int, margin: float = MARGIN, alpha: float = ALPHA) -> str:
    """The report's Method paragraph: the test, the correction, the equivalence margin, the three outcomes."""
    return (
        "## Method\n\n"
        "Tables: every accuracy cell is mean ± std over n seeds (± is the sample standard deviation, n−1 "
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
    )


def spread_caption(stats: Iterable[Stat]) -> str:
    """The line under a table that says what its ± is, with the seed counts of its cells."""
    ns = sorted({s.n for s in stats if s.n > 0})
    n = "-" if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}, per cell"
    return f"Cells: mean ± std over n seeds (n = {n}); ± is the sample standard deviation over seeds, not the standard error."


# --------------------------------------------------------------------------- tables
def write_csv(rows: list[dict], path: Path) -> None:
    cols = ["experiment", "method", "variant", "lr", "targets_key", "r", "alpha", "seed", "best_val_acc", "params_lora", "params_trainable", "fit_seconds", "steps", "adapter_bytes"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for row in sorted(rows, key=lambda r: (r.get("method", ""), r["targets_key"], r.get("r") or 0, r.get("seed", 0))):
            w.writerow([row.get(c, "") for c in cols])


def table5_markdown(rows: list[dict]) -> tuple[str, dict[str, Stat]]:
    stats = {k[0]: s for k, s in group(rows, "targets_key").items()}
    ranks = {row["targets_key"]: row["r"] for row in rows}
    params = {row["targets_key"]: row["params_lora"] for row in rows}
    head = "| weights | " + " | ".join(f"W{{{t}}}" for t in TABLE5_ORDER) + " |"
    lines = [head, "|---" * (len(TABLE5_ORDER) + 1) + "|"]
    lines.append("| r (ours) | " + " | ".join(str(ranks.get(t, "-")) for t in TABLE5_ORDER) + " |")
    lines.append("| LoRA params (ours) | " + " | ".join(f"{params[t]:,}" if t in params else "-" for t in TABLE5_ORDER) + " |")
    lines.append("| **val acc, MiniLM / Rotten Tomatoes (ours, mean ± std)** | " + " | ".join(f"**{stats[t]}**" if t in stats else "-" for t in TABLE5_ORDER) + " |")
    lines.append("| seeds (ours) | " + " | ".join(str(stats[t].n) if t in stats else "0" for t in TABLE5_ORDER) + " |")
    lines.append("| r (paper) | " + " | ".join(str(TABLE5_PAPER[t][0]) for t in TABLE5_ORDER) + " |")
    lines.append("| WikiSQL (paper, ±0.5) | " + " | ".join(f"{TABLE5_PAPER[t][1]}" for t in TABLE5_ORDER) + " |")
    lines.append("| MultiNLI (paper, ±0.1) | " + " | ".join(f"{TABLE5_PAPER[t][2]}" for t in TABLE5_ORDER) + " |")
    lines += ["", spread_caption(stats.values()) + " " + PAPER_SPREAD]
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


def table6_markdown(rows: list[dict], ref_rows: list[dict]) -> tuple[str, dict[tuple[str, int], Stat]]:
    stats = {(k[0], k[1]): s for k, s in group(rows, "targets_key", "r").items()}
    lines = ["| weights | " + " | ".join(f"r={r}" for r in TABLE6_RANKS) + " | source |", "|---" * (len(TABLE6_RANKS) + 2) + "|"]
    for t in TABLE6_TARGETS:
        lines.append(f"| **W{{{t}}}** | " + " | ".join(f"**{stats[(t, r)]}**" if (t, r) in stats else "-" for r in TABLE6_RANKS) + " | ours, val acc (mean ± std) |")
        lines.append(f"| | " + " | ".join(f"{TABLE6_PAPER[t][r][0]}" for r in TABLE6_RANKS) + " | paper, WikiSQL (±0.5) |")
        lines.append(f"| | " + " | ".join(f"{TABLE6_PAPER[t][r][1]}" for r in TABLE6_RANKS) + " | paper, MultiNLI (±0.1) |")
    ref: dict[str, Stat] = {}
    if ref_rows:
        ref = {k[0]: s for k, s in group(ref_rows, "method").items()}
        params = {row["method"]: row["params_trainable"] for row in ref_rows}
        lines.append("")
        lines.append("| reference (ours) | val acc (mean ± std) | trainable params |")
        lines.append("|---|---|---|")
        for m, label in (("full", "full fine-tuning"), ("head_only", "head only (frozen encoder)")):
            if m in ref:
                lines.append(f"| {label} | {ref[m]} | {params[m]:,} |")
    lines += ["", spread_caption([*stats.values(), *ref.values()]) + " " + PAPER_SPREAD]
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


def plot_table5(rows: list[dict], stats: dict[str, Stat], path: Path) -> Path:
    fig = _figure(7.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    present = [t for t in TABLE5_ORDER if t in stats]
    xs = range(len(present))
    ax.bar(xs, [stats[t].mean for t in present], yerr=[0 if math.isnan(stats[t].std) else stats[t].std for t in present], color="#8fb3d9", capsize=4, label="mean ± std over seeds")
    for i, t in enumerate(present):
        seeds = [100 * r[METRIC] for r in rows if r["targets_key"] == t]
        ax.scatter([i] * len(seeds), seeds, color="#1f3b5c", s=12, zorder=3, label="one seed" if i == 0 else None)
    ranks = {row["targets_key"]: row["r"] for row in rows}
    ax.set_xticks(list(xs), [f"W{{{t}}}\nr={ranks[t]}" for t in present])
    lo = min(100 * r[METRIC] for r in rows)
    hi = max(100 * r[METRIC] for r in rows)
    ax.set_ylim(lo - 1.5, hi + 1.0)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Table 5 at CPU scale: one budget (36,864 LoRA params), different weight types")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


def plot_table6(stats: dict[tuple[str, int], Stat], ref_rows: list[dict], path: Path) -> Path:
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for t, colour in zip(TABLE6_TARGETS, ("#d1495b", "#00798c", "#edae49")):
        rs = [r for r in TABLE6_RANKS if (t, r) in stats]
        if not rs:
            continue
        means = [stats[(t, r)].mean for r in rs]
        errs = [0 if math.isnan(stats[(t, r)].std) else stats[(t, r)].std for r in rs]
        ax.errorbar(rs, means, yerr=errs, marker="o", capsize=3, color=colour, label=f"W{{{t}}}")
    ref = {k[0]: s for k, s in group(ref_rows, "method").items()} if ref_rows else {}
    for m, style, label in (("full", "--", "full fine-tuning"), ("head_only", ":", "head only")):
        if m in ref:
            ax.axhline(ref[m].mean, color="grey", linestyle=style, label=f"{label} ({ref[m]})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(TABLE6_RANKS, [str(r) for r in TABLE6_RANKS])
    ax.set_xlabel("rank r")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Table 6 at CPU scale: accuracy vs rank (mean ± std over seeds)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


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
        base_txt = f"{base / 1e6:.2f} MB (from {before / 1e6:.2f} MB)" if base and before and base != before else "unchanged"
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


# --------------------------------------------------------------------------- main
def noise_line(rows: list[dict], *keys: str) -> str:
    sd, dof = pooled_std(rows, *keys)
    times = [row["fit_seconds"] for row in rows if row.get("fit_seconds")]
    t = f"; fit time per run median {statistics.median(times):.0f} s" if times else ""
    return f"{len(rows)} runs; seed noise (pooled within-config std) {sd:.2f} pp with {dof} degrees of freedom{t}."


def summarize(runs: Path, out: Path, margin: float = MARGIN, alpha: float = ALPHA) -> str:
    """Write the tables, CSVs and plots for whatever sweeps exist under ``runs``; return the markdown.
    The claim checks of Table 5 and Table 6 form one Holm family (see ``method_markdown``)."""
    parts: list[str] = []
    claims: dict[str, list[Claim]] = {}
    t5 = [r for r in load_runs(runs / "table5") if r.get("method") == "lora"]
    if t5:
        write_csv(t5, out / "table5_runs.csv")
        md, stats = table5_markdown(t5)
        plot_table5(t5, stats, out / "table5.png")
        claims["table5"] = table5_claims(stats)
        parts += ["## Table 5 (ours)", "", md, "", noise_line(t5, "targets_key"), "", "{table5}", "", "![table 5](results/table5.png)", ""]
    t6 = [r for r in load_runs(runs / "table6") if r.get("method") == "lora"]
    ref = [r for r in load_runs(runs / "table6_reference") if r.get("method") in ("full", "head_only")]
    if t6 or ref:
        write_csv(t6 + ref, out / "table6_runs.csv")
        md, stats6 = table6_markdown(t6, ref)
        plot_table6(stats6, ref, out / "table6.png")
        claims["table6"] = table6_claims(stats6)
        parts += ["## Table 6 (ours)", "", md, "", noise_line(t6, "targets_key", "r") if t6 else "", "", "{table6}", "", "![table 6](results/table6.png)", ""]
    var = [r for r in load_runs(runs / "variants") if r.get("method") == "lora"]
    if var:
        write_csv(var, out / "variants_runs.csv")
        parts += ["## Variants (ours, issue 8)", "", variants_markdown(var), "", noise_line(var, "variant", "lr"), ""]
        if plot_adalora_ranks(var, out / "adalora_ranks.png"):
            parts += ["![AdaLoRA ranks](results/adalora_ranks.png)", ""]
    if not parts:
        raise SystemExit(f"no summary.json under {runs}/table5, {runs}/table6 or {runs}/table6_reference; run the sweeps first")
    # one family over every claim of the report, then each table's rows back in its place
    checks = check_claims([c for cs in claims.values() for c in cs], margin, alpha)
    rendered: dict[str, str] = {}
    i = 0
    for key, cs in claims.items():
        rendered["{" + key + "}"] = claims_markdown(checks[i : i + len(cs)]) or "(no claim of the paper can be checked on these runs)"
        i += len(cs)
    parts = [rendered.get(part, part) for part in parts]
    family = checks[0].family if checks else 0
    text = "\n".join([method_markdown(family, margin, alpha), "", *parts])
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("multirun"), help="folder holding table5/, table6/, table6_reference/")
    p.add_argument("--out", type=Path, default=Path("experiments/results"), help="where tables.md, CSVs and PNGs go")
    p.add_argument("--margin", type=float, default=MARGIN, help="equivalence margin in accuracy points for the TOST checks (default %(default)s)")
    p.add_argument("--alpha", type=float, default=ALPHA, help="family-wise error rate of the claim checks (default %(default)s)")
    args = p.parse_args(argv)
    if not args.margin > 0 or not 0 < args.alpha < 1:
        p.error("--margin must be > 0 and --alpha in (0, 1)")
    print(summarize(args.runs, args.out, args.margin, args.alpha))


if __name__ == "__main__":
    main()
