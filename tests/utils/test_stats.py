"""utils/stats.py against direct computations: closed forms and numerical integration of Student's t, brute-force
enumeration of the Wilcoxon signed-rank statistic over every sign pattern, and the published table of its critical
values."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from utils.misc import mean_ci
from utils.stats import (average_ranks, betainc, paired_comparison, paired_t_test, student_t_two_sided_p,
                         wilcoxon_signed_rank)


def simpson(f, lo: float, hi: float, n: int = 20_000) -> float:
    """Composite Simpson's rule with ``n`` (even) intervals: error ~ (hi - lo) h^4 max|f''''| / 180."""
    x = np.linspace(lo, hi, n + 1)
    y = f(x)
    h = (hi - lo) / n
    return float(h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum()))


def t_density(df: float):
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)


# ----------------------------------------------------------------------------------------------- incomplete beta
@pytest.mark.parametrize("a,b,x", [(2.0, 3.0, 0.3), (5.0, 1.5, 0.8), (1.0, 1.0, 0.42), (3.5, 0.5 + 2, 0.05),
                                   (10.0, 10.0, 0.5), (2.5, 4.0, 0.9)])
def test_betainc_equals_the_integral_of_the_beta_density(a, b, x):
    beta = math.exp(math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    direct = simpson(lambda t: t ** (a - 1) * (1 - t) ** (b - 1), 0.0, x) / beta
    assert betainc(a, b, x) == pytest.approx(direct, rel=1e-9, abs=1e-12)
    assert betainc(a, b, x) + betainc(b, a, 1 - x) == pytest.approx(1.0, abs=1e-13)


def test_betainc_closed_forms():
    for x in (0.0, 0.1, 0.5, 0.99, 1.0):
        assert betainc(1.0, 1.0, x) == pytest.approx(x, abs=1e-14)
        assert betainc(3.0, 1.0, x) == pytest.approx(x ** 3, abs=1e-14)     # I_x(a, 1) = x^a
        assert betainc(1.0, 4.0, x) == pytest.approx(1 - (1 - x) ** 4, abs=1e-14)  # I_x(1, b) = 1 - (1-x)^b


# ----------------------------------------------------------------------------------------------- Student's t
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 12.706, 300.0])
def test_t_p_value_closed_forms_for_one_and_two_degrees_of_freedom(t):
    assert student_t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), abs=1e-13)  # Cauchy
    assert student_t_two_sided_p(-t, 2) == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), abs=1e-13)


@pytest.mark.parametrize("t,df", [(1.3, 7), (2.0, 4), (0.7, 29.5), (3.1, 120), (4.2426406871, 4)])
def test_t_p_value_equals_the_integral_of_the_density(t, df):
    direct = 1 - 2 * simpson(t_density(df), 0.0, t)
    assert student_t_two_sided_p(t, df) == pytest.approx(direct, abs=1e-11)


# published two-sided critical values t_{1 - alpha/2, df} (every statistics table: 3 decimals)
TABLE_T = [(1, 0.05, 12.706), (2, 0.05, 4.303), (5, 0.05, 2.571), (10, 0.05, 2.228), (30, 0.05, 2.042),
           (10, 0.01, 3.169), (1, 0.01, 63.657), (20, 0.01, 2.845), (120, 0.05, 1.980)]


@pytest.mark.parametrize("df,alpha,t", TABLE_T)
def test_t_p_value_at_the_tables_critical_values(df, alpha, t):
    # the table rounds t to 0.001: p moves by at most 2 * density(t) * 0.0005 around alpha
    slack = 2 * t_density(df)(t) * 0.0005 + 1e-9
    assert abs(student_t_two_sided_p(t, df) - alpha) <= slack


def test_paired_t_on_hand_computed_vectors():
    # d = 1, 2, 3: mean 2, s = 1, t = 2 / (1 / sqrt 3) = 2 sqrt 3, df 2: p = 1 - t / sqrt(2 + t^2) = 1 - sqrt(12/14)
    r = paired_t_test([1.0, 2.0, 3.0])
    assert r["t"] == pytest.approx(2 * math.sqrt(3)) and r["df"] == 2
    assert r["p"] == pytest.approx(1 - math.sqrt(12 / 14), abs=1e-13)
    # d = 1..5: mean 3, s = sqrt(2.5), t = 3 sqrt(5) / sqrt(2.5) = 3 sqrt 2
    r = paired_t_test([1, 2, 3, 4, 5])
    assert r["t"] == pytest.approx(3 * math.sqrt(2)) and r["df"] == 4
    assert r["p"] == pytest.approx(1 - 2 * simpson(t_density(4), 0.0, 3 * math.sqrt(2)), abs=1e-11)
    assert paired_t_test([0.0, 0.0, 0.0])["p"] == 1.0 and paired_t_test([0.2, 0.2])["p"] == 0.0
    assert paired_t_test([0.5])["p"] is None


# ----------------------------------------------------------------------------------------------- Wilcoxon
def enumerated_p(d) -> float:
    """The two-sided exact p-value by brute force: every one of the 2^n sign patterns of the non-zero |d|'s average
    ranks (ranks computed here as count-below + (count-equal + 1) / 2, not by the function under test)."""
    nz = np.array([x for x in d if x != 0], dtype=np.float64)
    a = np.abs(nz)
    ranks = np.array([(a < v).sum() + ((a == v).sum() + 1) / 2 for v in a])
    w = ranks[nz > 0].sum()
    sums = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=len(a))])
    lower, upper = (sums <= w + 1e-9).mean(), (sums >= w - 1e-9).mean()
    return min(1.0, 2 * min(lower, upper))


@pytest.mark.parametrize("d", [
    [1.5, -0.5, 2.5, 3.0, -4.0, 6.0, 7.0, 8.5],                             # no ties, no zeros
    [0, 0, 1, -1, 2, 2, -2, 3, 3, 3, -4, 5],                                 # zeros dropped, ties: average ranks
    [-0.2, -0.1, -0.3, -0.4, 0.05, -0.6, -0.7, -0.8, -0.9, -1.0, -1.1, 0.0],  # nearly all negative
    [1, 1, 1, 1, 1, 1],                                                      # one tie group, all positive
])
def test_wilcoxon_exact_p_equals_brute_force_enumeration(d):
    r = wilcoxon_signed_rank(d)
    assert r["method"] == "exact" and r["zeros"] == sum(1 for x in d if x == 0)
    assert r["p"] == pytest.approx(enumerated_p(d), abs=1e-15)


# The published table of two-sided 5% critical values of the signed-rank statistic T = min(W+, W-) (untied):
# T <= critical is significant at 0.05. n = 6..20.
TABLE_W = {6: 0, 7: 2, 8: 3, 9: 5, 10: 8, 11: 10, 12: 13, 13: 17, 14: 21, 15: 25, 16: 29, 17: 34, 18: 40, 19: 46,
           20: 52}


def signs_for(n: int, w_plus: int) -> list[float]:
    """Differences with |d| = 1..n whose positive ranks sum to ``w_plus`` (greedy from the largest)."""
    pos, left = set(), w_plus
    for r in range(n, 0, -1):
        if r <= left:
            pos.add(r)
            left -= r
    assert left == 0
    return [float(r) if r in pos else -float(r) for r in range(1, n + 1)]


@pytest.mark.parametrize("n", sorted(TABLE_W))
def test_wilcoxon_exact_critical_values_match_the_published_table(n):
    p = {w: wilcoxon_signed_rank(signs_for(n, w))["p"] for w in range(0, TABLE_W[n] + 2)}
    significant = [w for w in p if p[w] <= 0.05]
    assert max(significant) == TABLE_W[n], p
    # and the classical count for n = 10: P(W+ <= 8) = 25 / 1024 (the 0.0244 of the tables)
    if n == 10:
        assert p[8] == 2 * 25 / 1024 and p[9] == 2 * 33 / 1024


def test_wilcoxon_normal_approximation_with_ties_and_zeros():
    """Beyond EXACT_MAX_N: z from the exact mean and variance of W+ under the sign flips (sum r / 2, sum r^2 / 4,
    computed here from the ranks), which the tie-corrected formula must equal; zeros are dropped first."""
    rng = np.random.default_rng(0)
    d = np.round(rng.normal(0.3, 1.0, 400) * 3) / 3  # many ties (a grid of 1/3), some zeros
    r = wilcoxon_signed_rank(d)
    nz = d[d != 0]
    ranks = average_ranks(np.abs(nz))
    assert r["method"] == "normal" and r["n"] == nz.size and r["zeros"] == (d == 0).sum() > 0 and r["ties"]
    z = (ranks[nz > 0].sum() - ranks.sum() / 2) / math.sqrt((ranks ** 2).sum() / 4)
    assert r["z"] == pytest.approx(z, rel=1e-12) and r["p"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))
    assert r["p"] < 1e-6  # a shift of 0.3 sd over 400 episodes


def test_wilcoxon_normal_approximation_is_close_to_exact_at_the_switch():
    """The module's claim: at n = EXACT_MAX_N the normal approximation is within 0.007 of the exact p."""
    from utils.stats import EXACT_MAX_N
    worst = 0.0
    for w in range(0, EXACT_MAX_N * (EXACT_MAX_N + 1) // 2 + 1):
        d = signs_for(EXACT_MAX_N, w)
        exact, normal = wilcoxon_signed_rank(d)["p"], wilcoxon_signed_rank(d, exact_max_n=0)["p"]
        worst = max(worst, abs(exact - normal))
    assert 0.003 < worst < 0.007, worst  # (measured: 0.0064)


def test_wilcoxon_all_zero_and_average_ranks():
    assert wilcoxon_signed_rank([0.0, 0.0])["p"] == 1.0
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


# ----------------------------------------------------------------------------------------------- the pair
def test_paired_comparison_rounds_float32_differences_into_ties():
    """Float32 accuracies k / 75: two differences of 5 / 75 computed from different pairs are not bit-equal in
    float64, but must tie (and rank together)."""
    a = np.float32([1 / 75, 3 / 75, 30 / 75, 40 / 75])
    b = np.float32([0 / 75, 2 / 75, 30 / 75, 45 / 75])
    raw = b.astype(np.float64) - a.astype(np.float64)
    assert raw[0] != raw[1]  # the float32 rounding this guards against
    r = paired_comparison(a, b)
    assert r["wilcoxon"]["ties"] and r["wilcoxon"]["zeros"] == 1 and r["wilcoxon"]["n"] == 3
    assert (r["b_better"], r["a_better"], r["ties"]) == (1, 2, 1)
    assert r["wilcoxon"]["statistic"] == 3.0  # ranks 1.5, 1.5 (the tie) for the two -1/75, 3 for +5/75
    d = np.round(raw, 6)
    assert (r["mean"], r["ci95"]) == mean_ci(d)
    assert r["t_test"] == paired_t_test(d)
