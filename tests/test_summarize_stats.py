"""The statistics behind the experiments' claim checks (experiments/stats.py, experiments/claims.py): the Student t
distribution (wired to ``scipy.stats``), Welch's and the paired t-test, Holm–Bonferroni, TOST equivalence, the three
outcomes and the verdicts vs the paper.

Every number is checked against an independent computation, never against scipy itself: closed forms of the t
distribution (df = 1, 2), printed t-table quantiles, R's ``t.test`` on the ``sleep`` data (Welch and paired),
numerical integration of the t density, a hand-worked Holm example, and synthetic groups whose right answer is
known. So a wrong wiring (sf for cdf, a quantile at the wrong level, a one-sided p) fails here."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from experiments.ablations import summarize
from experiments.claims import (
    AGREES,
    DIFFERENT,
    DISAGREES,
    EQUIVALENT,
    GREATER,
    INCONCLUSIVE,
    Claim,
    check_claims,
    verdict_of,
)
from experiments.stats import Stat, example_bootstrap, holm, paired_t, t_cdf, t_ppf, t_sf, tost, welch
from experiments.tables import claims_markdown, method_markdown


def stat(values: list[float]) -> Stat:
    """A group already in accuracy points (Stat.of would multiply fractions by 100)."""
    return Stat(statistics.fmean(values), statistics.stdev(values), len(values))


def t_pdf(x: np.ndarray, df: float) -> np.ndarray:
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return c * (1 + x * x / df) ** (-(df + 1) / 2)


def sf_by_integration(t: float, df: float, points: int = 200_001) -> float:
    """P(T > t) = 1/2 - ∫_0^t pdf (Simpson's rule): independent of scipy's incomplete beta."""
    x = np.linspace(0.0, abs(t), points)
    y = t_pdf(x, df)
    h = x[1] - x[0]
    area = h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())
    return 0.5 - area if t >= 0 else 0.5 + area


# --------------------------------------------------------------------------- t distribution
@pytest.mark.parametrize("t", [-30.0, -2.0, -0.3, 0.0, 0.7, 4.3, 100.0])
def test_t_cdf_closed_forms_df1_df2(t):
    assert t_cdf(t, 1.0) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)  # Cauchy
    assert t_cdf(t, 2.0) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)


@pytest.mark.parametrize("t, df", [(2.5, 7.3), (0.4, 2.1), (-1.7, 17.776), (3.9, 3.4), (1.2, 250.0)])
def test_t_sf_matches_integrated_density_at_fractional_df(t, df):
    assert t_sf(t, df) == pytest.approx(sf_by_integration(t, df), abs=1e-10)


def test_t_sf_far_tail_keeps_relative_precision():
    # df = 1: P(T > t) = 1/2 - atan(t)/pi = atan(1/t)/pi, accurate for large t
    assert t_sf(1e6, 1.0) == pytest.approx(math.atan(1e-6) / math.pi, rel=1e-10)
    # df = 2: P(T > t) = (1 - t/sqrt(2 + t²)) / 2 = 1 / (sqrt(2 + t²) (sqrt(2 + t²) + t))
    t = 1e4
    assert t_sf(t, 2.0) == pytest.approx(1 / (math.sqrt(2 + t * t) * (math.sqrt(2 + t * t) + t)), rel=1e-10)


@pytest.mark.parametrize("q", [0.6, 0.9, 0.95, 0.975, 0.995, 0.025])
def test_t_ppf_closed_forms(q):
    assert t_ppf(q, 1.0) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-10)
    assert t_ppf(q, 2.0) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)), rel=1e-10)


# a printed table of Student's t (upper-tail quantiles, three decimals), as in any statistics textbook
T_TABLE = {
    0.975: {
        1: 12.706,
        2: 4.303,
        3: 3.182,
        4: 2.776,
        5: 2.571,
        6: 2.447,
        7: 2.365,
        8: 2.306,
        9: 2.262,
        10: 2.228,
        12: 2.179,
        15: 2.131,
        20: 2.086,
        25: 2.060,
        30: 2.042,
        60: 2.000,
        120: 1.980,
        math.inf: 1.960,
    },
    0.95: {1: 6.314, 2: 2.920, 5: 2.015, 10: 1.812, 30: 1.697, math.inf: 1.645},
    0.995: {3: 5.841, 10: 3.169, 30: 2.750},
    0.9: {4: 1.533, 20: 1.325},
}


@pytest.mark.parametrize("q, df, table", [(q, df, v) for q, row in T_TABLE.items() for df, v in row.items()])
def test_t_ppf_matches_printed_t_table(q, df, table):
    assert t_ppf(q, df) == pytest.approx(table, abs=5e-4)
    assert t_ppf(1 - q, df) == pytest.approx(-table, abs=5e-4)  # the lower tail, by symmetry
    assert t_cdf(t_ppf(q, df), df) == pytest.approx(q, abs=1e-12)
    assert t_sf(table, df) == pytest.approx(1 - q, rel=2e-3)  # the table's t leaves 1 - q above it


def test_t_functions_are_undefined_outside_their_domain():
    for value in (
        t_sf(1.0, 0.0),
        t_cdf(1.0, -1.0),
        t_sf(math.nan, 3.0),
        t_ppf(0.0, 5.0),
        t_ppf(1.0, 5.0),
        t_ppf(0.5, math.nan),
    ):
        assert math.isnan(value)
    assert t_ppf(0.5, 7.3) == 0.0 and t_sf(math.inf, 4.0) == 0.0 and t_sf(-math.inf, 4.0) == 1.0


# --------------------------------------------------------------------------- Welch
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_welch_matches_r_t_test_on_sleep_data():
    # R: t.test(extra ~ group, data = sleep) -> Welch Two Sample t-test
    # t = -1.8608, df = 17.776, p-value = 0.07939, 95 percent CI: -3.3654832 0.2054832
    w = welch(stat(SLEEP_1), stat(SLEEP_2))
    assert w.diff == pytest.approx(0.75 - 2.33, abs=1e-12)
    assert w.t == pytest.approx(-1.8608, abs=5e-5)
    assert w.df == pytest.approx(17.776, abs=5e-4)
    assert w.p == pytest.approx(0.07939, abs=5e-6)
    assert w.ci == pytest.approx((-3.3654832, 0.2054832), abs=5e-7)


@pytest.mark.parametrize("seed", range(5))
def test_welch_matches_independent_numpy_computation(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(75, rng.uniform(0.2, 2), int(rng.integers(3, 12)))
    y = rng.normal(75.5, rng.uniform(0.2, 2), int(rng.integers(3, 12)))
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    t = (x.mean() - y.mean()) / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    w = welch(stat(list(x)), stat(list(y)))
    assert w.t == pytest.approx(t, rel=1e-12)
    assert w.df == pytest.approx(df, rel=1e-12)
    assert w.p == pytest.approx(2 * sf_by_integration(abs(t), df), abs=1e-9)
    # the CI's half-width solves P(|T| > h/se) = 0.05
    half = (w.ci[1] - w.ci[0]) / 2
    assert (w.ci[0] + w.ci[1]) / 2 == pytest.approx(x.mean() - y.mean(), abs=1e-12)
    assert 2 * sf_by_integration(half / math.sqrt(vx + vy), df) == pytest.approx(0.05, abs=1e-9)


def test_paired_t_matches_r_paired_t_test_on_sleep_data():
    # R: t.test(extra ~ group, data = sleep, paired = TRUE)  (group 1 minus group 2)
    # t = -4.0621, df = 9, p-value = 0.002833, 95 percent CI: -2.4598858 -0.7001142, mean difference -1.58
    d = paired_t([a - b for a, b in zip(SLEEP_1, SLEEP_2, strict=True)], margin=0.5)
    assert d.n == 10 and d.mean == pytest.approx(-1.58, abs=1e-12)
    assert d.t == pytest.approx(-4.0621, abs=5e-5) and d.p == pytest.approx(0.002833, abs=5e-7)
    assert d.ci == pytest.approx((-2.4598858, -0.7001142), abs=5e-7)
    # TOST at ±0.5: the upper one-sided test, P(T_9 > (d + 0.5)/se) with d + 0.5 = -1.08 < 0, is far from significant
    se = d.sd / math.sqrt(10)
    assert d.p_tost == pytest.approx(sf_by_integration((d.mean + 0.5) / se, 9), abs=1e-9) and d.p_tost > 0.95
    # differences tightly around 0.1: equivalent within ±0.5, not different from 0
    tight = paired_t([0.1, 0.12, 0.08, 0.11, 0.09, 0.1], margin=0.5)
    assert tight.p_tost < 1e-6 and tight.p < 0.001  # a real difference of 0.1 inside the margin
    assert math.isnan(paired_t([0.3]).p)


def test_welch_is_undefined_for_a_single_seed():
    w = welch(Stat(75.0, math.nan, 1), stat([74.0, 75.0, 76.0]))
    assert w.diff == pytest.approx(0.0) and math.isnan(w.p) and math.isnan(w.df)
    (check,) = check_claims([Claim("one seed", GREATER, "a", Stat(75.0, math.nan, 1), "b", stat([74.0, 75.0, 76.0]))])
    assert check.family == 0 and check.verdict == INCONCLUSIVE and check.outcome.startswith("n/a")


# --------------------------------------------------------------------------- Holm
def test_holm_hand_worked_example():
    # sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 = 0.04 -> raised to 0.06 (monotone)
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert [p < 0.05 for p in adjusted] == [True, False, False, True]


def test_holm_caps_at_one_and_leaves_nan_outside_the_family():
    adjusted = holm([0.3, math.nan, 0.6, 0.02])
    # family of 3: 0.02 x3 = 0.06; 0.3 x2 = 0.6; 0.6 x1 = 0.6
    assert (
        adjusted[0] == pytest.approx(0.6) and adjusted[2] == pytest.approx(0.6) and adjusted[3] == pytest.approx(0.06)
    )
    assert math.isnan(adjusted[1])
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def test_check_claims_corrects_over_the_whole_family():
    # one difference at raw p ~ 0.02 is significant alone, not among five checks
    a, b = stat([76.0, 76.8, 77.6, 75.8, 77.0]), stat([75.0, 75.9, 76.3, 74.8, 75.6])
    alone = check_claims([Claim("a beats b", GREATER, "a", a, "b", b)])[0]
    assert 0.01 < alone.welch.p < 0.05
    assert alone.p_holm == pytest.approx(alone.welch.p) and alone.family == 1 and alone.verdict == AGREES
    noise = [
        Claim(f"noise {i}", GREATER, "x", stat([70.0, 72.0, 74.0]), "y", stat([70.5, 72.5, 73.5])) for i in range(4)
    ]
    checks = check_claims([Claim("a beats b", GREATER, "a", a, "b", b), *noise])
    assert all(c.family == 5 for c in checks)
    assert checks[0].p_holm == pytest.approx(min(1.0, 5 * alone.welch.p))
    assert checks[0].outcome == INCONCLUSIVE and checks[0].verdict == INCONCLUSIVE


# --------------------------------------------------------------------------- TOST and the three outcomes
def independent_tost(x: list[float], y: list[float], margin: float) -> float:
    """max of the two one-sided Welch p-values, with numpy moments and integrated tails."""
    vx, vy = np.var(x, ddof=1) / len(x), np.var(y, ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    d = float(np.mean(x) - np.mean(y))
    return max(sf_by_integration((d + margin) / se, df), 1 - sf_by_integration((d - margin) / se, df))


RNG = np.random.default_rng(2021)
SAME_A = list(75.0 + 0.3 * RNG.standard_normal(60))
SAME_B = list(75.0 + 0.3 * RNG.standard_normal(60))
SEPARATED_A = [70.1, 69.8, 70.3, 69.9, 70.0]
SEPARATED_B = [76.2, 75.9, 76.0, 76.3, 75.8]
NOISY_A = [73.0, 75.3, 77.1]  # n = 3, std ~2: no power at a 0.5-point margin
NOISY_B = [72.9, 74.6, 77.0]


def test_tost_equivalent_for_large_identical_mean_groups():
    w = welch(stat(SAME_A), stat(SAME_B))
    p = tost(w, 0.5)
    assert p == pytest.approx(independent_tost(SAME_A, SAME_B, 0.5), abs=1e-9)
    assert p < 1e-6
    # p < 0.05 exactly when the 90% CI lies inside the margin
    lo, hi = welch(stat(SAME_A), stat(SAME_B), level=0.90).ci
    assert -0.5 < lo < hi < 0.5
    (check,) = check_claims([Claim("same", EQUIVALENT, "a", stat(SAME_A), "b", stat(SAME_B))], margin=0.5)
    assert check.outcome == "equivalent within ±0.5" and check.verdict == AGREES
    assert check.p_tost == pytest.approx(p, abs=1e-12) and check.tost_family == 1
    # the default margin is the pre-registered ±1 point (experiments/PREREGISTRATION.md)
    (default,) = check_claims([Claim("same", EQUIVALENT, "a", stat(SAME_A), "b", stat(SAME_B))])
    assert default.margin == 1.0 and default.outcome == "equivalent within ±1" and default.verdict == AGREES
    assert default.p_tost == pytest.approx(independent_tost(SAME_A, SAME_B, 1.0), abs=1e-9)


def test_tost_different_for_separated_groups():
    w = welch(stat(SEPARATED_A), stat(SEPARATED_B))
    assert tost(w, 0.5) == pytest.approx(independent_tost(SEPARATED_A, SEPARATED_B, 0.5), abs=1e-9)
    assert tost(w, 0.5) > 0.99 and w.p < 1e-6
    (check,) = check_claims([Claim("competitive", EQUIVALENT, "a", stat(SEPARATED_A), "b", stat(SEPARATED_B))])
    assert check.outcome == DIFFERENT and check.verdict == DISAGREES


def test_tost_inconclusive_without_power():
    a, b = stat(NOISY_A), stat(NOISY_B)
    w = welch(a, b)
    assert abs(w.diff) < 0.5  # the old rule would have called this agreement
    assert tost(w, 0.5) == pytest.approx(independent_tost(NOISY_A, NOISY_B, 0.5), abs=1e-9)
    assert tost(w, 0.5) > 0.05 and w.p > 0.05
    (check,) = check_claims([Claim("little gain", EQUIVALENT, "a", a, "b", b)])
    assert check.outcome == INCONCLUSIVE and check.verdict == INCONCLUSIVE


def test_margin_is_configurable():
    # the noisy groups become equivalent at a wide enough margin, and the report says which margin
    (wide,) = check_claims([Claim("little gain", EQUIVALENT, "a", stat(NOISY_A), "b", stat(NOISY_B))], margin=20.0)
    assert wide.outcome == "equivalent within ±20" and wide.verdict == AGREES
    assert "±20" in claims_markdown([wide])


# --------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize(
    "a, b, kind, verdict",
    [
        (SEPARATED_B, SEPARATED_A, GREATER, AGREES),  # significant in the paper's direction
        (SEPARATED_A, SEPARATED_B, GREATER, DISAGREES),  # significant the other way
        (NOISY_A, NOISY_B, GREATER, INCONCLUSIVE),  # no power
        (SAME_A, SAME_B, GREATER, INCONCLUSIVE),  # equivalent is not support for "a beats b"
        (SAME_A, SAME_B, EQUIVALENT, AGREES),
        (SEPARATED_A, SEPARATED_B, EQUIVALENT, DISAGREES),
        (NOISY_A, NOISY_B, EQUIVALENT, INCONCLUSIVE),
    ],
)
def test_claim_verdicts(a, b, kind, verdict):
    (check,) = check_claims([Claim("claim", kind, "a", stat(a), "b", stat(b))])
    assert check.verdict == verdict


def test_verdict_rules():
    assert verdict_of(GREATER, DIFFERENT, +1.0) == AGREES
    assert verdict_of(GREATER, DIFFERENT, -1.0) == DISAGREES
    assert verdict_of(GREATER, "equivalent within ±0.5", 0.1) == INCONCLUSIVE
    assert verdict_of(EQUIVALENT, DIFFERENT, +1.0) == DISAGREES
    assert verdict_of(EQUIVALENT, DIFFERENT, -1.0) == DISAGREES
    assert verdict_of(EQUIVALENT, INCONCLUSIVE, 0.0) == INCONCLUSIVE


def test_real_difference_inside_the_margin_counts_as_equivalent():
    # d = 0.2 with a tiny SE: significant difference and equivalence both hold; an equivalence claim agrees
    a = list(75.2 + 0.05 * RNG.standard_normal(40))
    b = list(75.0 + 0.05 * RNG.standard_normal(40))
    (eq,) = check_claims([Claim("c", EQUIVALENT, "a", stat(a), "b", stat(b))])
    (gt,) = check_claims([Claim("c", GREATER, "a", stat(a), "b", stat(b))])
    assert eq.p_holm < 0.05 and eq.p_tost_holm < 0.05
    assert eq.p_tost == pytest.approx(independent_tost(a, b, 1.0), abs=1e-9)  # at the pre-registered ±1 point
    assert (eq.outcome, eq.verdict) == ("equivalent within ±1", AGREES)
    (eq_half,) = check_claims([Claim("c", EQUIVALENT, "a", stat(a), "b", stat(b))], margin=0.5)
    assert (eq_half.outcome, eq_half.verdict) == ("equivalent within ±0.5", AGREES)  # 0.2 is inside ±0.5 too
    assert (gt.outcome, gt.verdict) == (DIFFERENT, AGREES)


# --------------------------------------------------------------------------- the report
def _write_runs(root: Path, experiment: str, groups: dict[tuple[str, int], list[float]]) -> None:
    i = 0
    for (targets, r), accs in groups.items():
        for seed, acc in enumerate(accs, 1):
            d = root / experiment / f"{i}"
            d.mkdir(parents=True)
            row = {
                "experiment": experiment,
                "method": "lora",
                "targets": targets.split(","),
                "r": r,
                "seed": seed,
                "best_val_acc": acc / 100,
                "params_lora": 36_864,
                "params_trainable": 100_000,
                "fit_seconds": 1.0,
                "steps": 1,
            }
            (d / "summary.json").write_text(json.dumps(row))
            i += 1


def test_report_has_method_labels_and_known_verdicts(tmp_path):
    sep = [-0.2, -0.1, 0.0, 0.1, 0.2]
    _write_runs(
        tmp_path / "runs",
        "table5",
        {
            ("q", 8): [70 + e for e in sep],
            ("k", 8): [70.5 + e for e in sep],
            ("v", 8): [76 + e for e in sep],
            ("o", 8): [75 + e for e in sep],
            ("q,v", 4): [80 + e for e in sep],
        },
    )
    _write_runs(
        tmp_path / "runs",
        "table6",
        {
            ("q,v", 1): SAME_A[:30],
            ("q,v", 64): SAME_B[:30],
            ("q", 8): NOISY_A,
            ("q", 64): NOISY_B,
        },
    )
    text = summarize(tmp_path / "runs", tmp_path / "out")
    assert text.startswith("## Method")
    method = text.split("## Table 5")[0]
    for phrase in (
        "Welch",
        "Holm–Bonferroni",
        "the same 10 claims",
        "TOST",
        "Equivalence margin ±1 point",
        "equivalent within ±1",
        '"different"',
        '"inconclusive"',
    ):
        assert phrase in method, phrase
    # one family per metric, Table 5's and Table 6's claims together: of the 10 claims these runs state 5 (Table 5:
    # W{q,v} beats the best single type, W{q} and W{k} worse than W{o}; Table 6: r=1 competitive for W{q,v}, little
    # gain past r=8 for W{q}); their TOST family holds the 2 equivalence claims; each table's caption says so
    caption = (
        "p Holm-corrected over the 5 checks of its family; equivalence claims by TOST at ±1 pp, Holm over the 2 "
        "equivalence claims"
    )
    assert text.count(caption) == 2
    assert text.count("mean ± std over n seeds (n = 5)") == 1  # Table 5
    assert "mean ± std over n seeds (n = 3–30, per cell)" in text  # Table 6
    rows = {
        line.split("|")[1].strip(): line
        for line in text.splitlines()
        if line.startswith("| ") and "**" in line.split("|")[-2]
    }
    assert rows["W{q,v} beats the best single type (W{v})"].endswith("| different | **agrees** |")
    assert rows["W{q} alone is worse than W{o} (the weaker of Wv, Wo)"].endswith("| different | **agrees** |")
    assert rows["W{k} alone is worse than W{o} (the weaker of Wv, Wo)"].endswith("| different | **agrees** |")
    competitive = rows["r=1 is already competitive for W{q,v} (paper, r=1 minus r=64: -0.1 / -0.1)"]
    assert competitive.endswith("| equivalent within ±1 | **agrees** |")
    # the TOST p-values, Holm over the 2 equivalence claims, recomputed: 2·p for the smaller, the larger p as is
    # (Holm keeps it monotone); cells: claim | test | ours | n | t (df) | p | p, Holm | TOST p, Holm [power] | ...
    p_same = independent_tost(SAME_A[:30], SAME_B[:30], 1.0)
    p_noisy = independent_tost(NOISY_B, NOISY_A, 1.0)  # little gain past r=8 for W{q}: r=64 − r=8
    assert 2 * p_same < 0.001 < p_noisy
    assert competitive.split("|")[8].strip().startswith("<0.001 [")
    assert rows["little gain past r=8 for W{q}"].split("|")[8].strip().startswith(f"{p_noisy:.3f} [")
    assert rows["little gain past r=8 for W{q}"].endswith("| inconclusive | **inconclusive** |")
    assert (tmp_path / "out" / "tables.md").read_text() == text
    # the margin is a parameter, and the report prints it
    wide = summarize(tmp_path / "runs", tmp_path / "out2", margin=1.5)
    assert "|d| < 1.5 accuracy points" in wide and "equivalent within ±1.5" in wide


def test_method_paragraph_states_family_margin_and_outcomes():
    text = method_markdown(margin=0.75, alpha=0.01)
    # the families experiments/PREREGISTRATION.md fixes: the same 10 claims at every schedule and metric, Holm over
    # their 10 difference p-values, a second Holm family over the TOST p-values of the 4 equivalence claims only
    assert "the ablation family holds the same 10 claims" in text
    assert "Their 10 difference p-values are Holm–Bonferroni corrected together at alpha = 0.01" in text
    assert 'the TOST p-values of the 4 equivalence claims form a second Holm family (the "beats" claims are not' in text
    assert '"LoRA matches full fine-tuning" is not an ablation claim: it is the primary family' in text
    assert "Equivalence margin ±0.75 point" in text and "|d| < 0.75 accuracy points" in text
    assert '"equivalent within ±0.75"' in text and "±1" not in text
    assert "mean ± std over n seeds" in text and "not the standard error" in text
    assert text.startswith("## Method\n\n") and not method_markdown(heading=False).startswith("## Method")
    assert "Equivalence margin ±1 point" in method_markdown()  # the pre-registered default


def test_example_bootstrap_one_run_each_matches_the_paired_normal_interval():
    rng = np.random.default_rng(7)
    n = 2000
    a = rng.random(n) < 0.80
    b = np.where(rng.random(n) < 0.15, ~a, a)  # disagrees with a on about 15% of the examples
    bits = lambda x: "".join("1" if v else "0" for v in x)  # noqa: E731
    d, lo, hi = example_bootstrap([bits(a)], [bits(b)], draws=4000)
    diff = a.astype(float) - b.astype(float)
    se = 100 * diff.std(ddof=1) / math.sqrt(n)  # paired: the discordant examples carry the whole difference
    assert d == pytest.approx(100 * diff.mean())
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.08)
    assert lo < d < hi


def test_example_bootstrap_resamples_seeds_and_refuses_mixed_splits():
    n = 50
    ones, zeros = "1" * n, "0" * n
    # runs right or wrong on every example: drawing examples changes nothing, only the seed draws count.
    # Group a's mean over 4 resampled runs is Binomial(4, 1/2) / 4, so P(mean = 0) = P(mean = 1) = 1/16 > 2.5%:
    # the 95% interval of a - b (b always 1) runs exactly from -100 to 0 points.
    d, lo, hi = example_bootstrap([ones, ones, zeros, zeros], [ones, ones])
    assert (d, lo, hi) == (-50.0, -100.0, 0.0)
    # identical runs: the seed draws add nothing, the interval is the examples' alone
    rng = np.random.default_rng(5)
    a = "".join("1" if v else "0" for v in rng.random(400) < 0.8)
    b = "".join("1" if v else "0" for v in rng.random(400) < 0.7)
    assert example_bootstrap([a] * 3, [b] * 2) == example_bootstrap([a], [b])
    with pytest.raises(ValueError, match="one length"):
        example_bootstrap([a], [b[:-1]])
