"""Paired tests for two methods scored on the same fixed episodes: the paired t-test and the Wilcoxon signed-rank
test, in numpy and the standard library (no scipy).

Both look at the per-episode differences ``d_i = acc_B(i) - acc_A(i)`` of two methods on the same episodes
(``--phase compare``, ``trainer/compare.py``); pairing removes the episode-to-episode variation that both methods
share, which is most of it (an easy episode is easy for every method).

* **Paired t-test** (:func:`paired_t_test`): ``t = mean(d) / (s / sqrt(n))`` with the sample standard deviation
  ``s`` (``ddof = 1``), ``n - 1`` degrees of freedom, two-sided p-value from Student's t distribution
  (:func:`student_t_two_sided_p`, through the regularized incomplete beta function :func:`betainc`, evaluated by its
  continued fraction). Assumes the episodes are independent (fixed episodes are drawn independently, with
  replacement across episodes) and the mean difference approximately normal: with hundreds of episodes the central
  limit theorem gives that even though each ``d_i`` takes few values (multiples of ``1 / (way * query)``).
* **Wilcoxon signed-rank test** (:func:`wilcoxon_signed_rank`): ``W+`` = sum of the ranks of ``|d_i|`` over the
  positive ``d_i``. Zero differences are dropped first (Wilcoxon's convention, scipy's default ``zero_method=
  "wilcox"``), ties among ``|d_i|`` get their average rank. Assumes independent episodes and a distribution of the
  differences symmetric about its median (the null: median 0); it does not assume normality. With at most
  :data:`EXACT_MAX_N` non-zero differences the p-value is exact: the distribution of ``W+`` over the ``2^n`` equally
  likely sign patterns given the observed ranks, counted by dynamic programming on the doubled ranks (an integer
  for average ranks too), which for untied data is the classical table of the statistic. Beyond that, the normal
  approximation: mean ``n (n + 1) / 4``, variance ``n (n + 1) (2n + 1) / 24 - sum(t^3 - t) / 48`` over the tie
  groups of size ``t`` (the tie correction; ``n`` counts the non-zero differences only, the zero correction of the
  convention), without a continuity correction (scipy's default), ``p = erfc(|z| / sqrt(2))``.

Per-episode accuracies are float32 fractions (``k / (way * query)`` rounded), so two equal differences can differ in
their last bits; :func:`paired_comparison` rounds the differences to ``decimals`` (6) places before testing, so that
equal differences tie as they should (float32 rounding is < 1e-7, the grid of accuracies >= 1e-4 for any protocol
of fewer than 10,000 queries per episode).

The 95% interval of the mean difference is the project's one interval, :func:`utils.misc.mean_ci`
(``1.96 * population std / sqrt(n)``, the official code's), as for every accuracy: for 600 episodes it is 0.3%
narrower than the t-based ``t_{0.975, n-1} * s / sqrt(n)`` (1.9640 * sqrt(600 / 599) = 1.9656 vs 1.96).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from utils.misc import mean_ci

__all__ = ["EXACT_MAX_N", "betainc", "student_t_two_sided_p", "paired_t_test", "average_ranks",
           "wilcoxon_signed_rank", "paired_comparison"]

EXACT_MAX_N = 50
"""The Wilcoxon test is exact for at most this many non-zero differences (the count table has ``n (n + 1) + 1``
entries of at most ``2^n``: exact in int64 up to n = 62), normal beyond: at n = 50 the normal p is within 0.0064 of
the exact one (measured over every W+ of untied data, ``tests/utils/test_stats.py``); a comparison of 600 episodes has a few
hundred non-zero differences."""


def _betacf(a: float, b: float, x: float, max_iter: int = 10_000, eps: float = 1e-15) -> float:
    """The continued fraction of the incomplete beta function (Abramowitz & Stegun 26.5.8), modified Lentz:
    ``I_x(a, b) = x^a (1 - x)^b / (a B(a, b)) * 1 / (1 + d_1 / (1 + d_2 / (1 + ...)))`` with
    ``d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))`` and ``d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m))``.
    Converges fast for ``x < (a + 1) / (a + b + 2)``."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, max_iter + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < eps:
            return f
    raise ArithmeticError(f"the incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b) = B(x; a, b) / B(a, b)`` for ``a, b > 0``,
    ``0 <= x <= 1``, to about 1e-14 relative (the continued fraction on whichever side converges fast; the other by
    ``I_x(a, b) = 1 - I_{1-x}(b, a)``)."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got {a}, {b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom: ``I_{df / (df + t^2)}(df / 2, 1 / 2)``
    (``t = inf``: 0; ``t = 0``: 1)."""
    if not df > 0:
        raise ValueError(f"the t distribution needs df > 0, got {df}")
    if math.isnan(t):
        raise ValueError("t is nan")
    if math.isinf(t):
        return 0.0
    return min(1.0, betainc(df / 2.0, 0.5, df / (df + t * t)))


def paired_t_test(d: Sequence[float] | np.ndarray) -> dict:
    """The paired t-test of the differences ``d`` (n,) against mean 0 (module docstring).

    Returns:
        ``{"t", "df", "p"}``; ``t`` is None below two differences (no p-value: ``p`` None). Differences that are all
        equal have ``s = 0``: ``p = 1`` when they are all 0 (the two methods agree on every episode), else ``p = 0``
        (``t = +-inf``).
    """
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    if n < 2:
        return {"t": None, "df": n - 1 if n else None, "p": None}
    mean, s = float(d.mean()), float(d.std(ddof=1))
    if s == 0.0:
        return {"t": 0.0 if mean == 0.0 else math.copysign(math.inf, mean), "df": n - 1,
                "p": 1.0 if mean == 0.0 else 0.0}
    t = mean / (s / math.sqrt(n))
    return {"t": t, "df": n - 1, "p": student_t_two_sided_p(t, n - 1)}


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` (n,), ties given the mean of the ranks they span (float64, multiples of 0.5)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0  # the mean of ranks s+1 .. e
    return ranks


def _exact_counts(doubled: np.ndarray) -> np.ndarray:
    """``c[s]`` = the number of sign patterns whose positive doubled ranks sum to ``s`` (int64, len sum + 1)."""
    counts = np.zeros(int(doubled.sum()) + 1, dtype=np.int64)
    counts[0] = 1
    top = 0
    for r in doubled.tolist():
        counts[r:top + r + 1] += counts[:top + 1].copy()
        top += r
    return counts


def wilcoxon_signed_rank(d: Sequence[float] | np.ndarray, exact_max_n: int = EXACT_MAX_N) -> dict:
    """The two-sided Wilcoxon signed-rank test of the differences ``d`` (n,) (module docstring).

    Returns:
        ``{"statistic": W+, "n": non-zero differences, "zeros": dropped, "ties": whether |d| had ties,
        "method": "exact" | "normal" | "none", "z": (normal only), "p"}``. No non-zero difference: ``p = 1``,
        ``method`` "none".
    """
    d = np.asarray(d, dtype=np.float64)
    if not np.all(np.isfinite(d)):
        raise ValueError("the differences must be finite")
    nz = d[d != 0.0]
    n, zeros = int(nz.size), int(d.size - nz.size)
    out = {"statistic": 0.0, "n": n, "zeros": zeros, "ties": False, "method": "none", "z": None, "p": 1.0}
    if n == 0:
        return out
    ranks = average_ranks(np.abs(nz))
    w_plus = float(ranks[nz > 0].sum())
    _, tie_sizes = np.unique(np.abs(nz), return_counts=True)
    out.update(statistic=w_plus, ties=bool((tie_sizes > 1).any()))
    if n <= exact_max_n:
        doubled = np.rint(2 * ranks).astype(np.int64)
        counts = _exact_counts(doubled)
        w2 = int(round(2 * w_plus))
        total = float(2 ** n)
        lower, upper = counts[:w2 + 1].sum() / total, counts[w2:].sum() / total
        out.update(method="exact", p=min(1.0, 2.0 * min(lower, upper)))
        return out
    mean = n * (n + 1) / 4.0
    var = n * (n + 1) * (2 * n + 1) / 24.0 - float((tie_sizes ** 3 - tie_sizes).sum()) / 48.0
    z = (w_plus - mean) / math.sqrt(var)
    out.update(method="normal", z=z, p=math.erfc(abs(z) / math.sqrt(2.0)))
    return out


def paired_comparison(acc_a: Sequence[float] | np.ndarray, acc_b: Sequence[float] | np.ndarray,
                      decimals: int = 6) -> dict:
    """Method B against method A on the same episodes: the differences ``d = acc_b - acc_a`` (E,) rounded to
    ``decimals`` (module docstring), their mean and 95% interval (:func:`utils.misc.mean_ci`, in the unit of the
    accuracies), both tests, and on how many episodes B won, lost, tied.

    Returns:
        ``{"n", "mean", "ci95", "t_test": paired_t_test, "wilcoxon": wilcoxon_signed_rank, "b_better", "a_better",
        "ties"}``.
    """
    a, b = np.asarray(acc_a, dtype=np.float64), np.asarray(acc_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"a paired comparison needs two (E,) arrays of the same episodes, got {a.shape}, {b.shape}")
    d = np.round(b - a, decimals)
    mean, ci = mean_ci(d)
    return {"n": int(d.size), "mean": mean, "ci95": ci, "t_test": paired_t_test(d), "wilcoxon": wilcoxon_signed_rank(d),
            "b_better": int((d > 0).sum()), "a_better": int((d < 0).sum()), "ties": int((d == 0).sum())}
