"""Statistics of an evaluation, each with its uncertainty: pure numpy/scipy functions, no torch, no ray.

- `win_rate`, `mean_difference`, `mean_interval`: a statistic over prompts with a 95 % paired bootstrap
  interval. Both policies answer the same prompts, so a prompt's win (or score difference) is one
  observation, and resampling prompts keeps each pair together (paired bootstrap; Efron & Tibshirani 1993,
  ch. 13). Percentile intervals: unlike BCa they stay defined on degenerate samples (every prompt a tie).
- `accuracy_vs_chance`: a held-out pair accuracy against 0.5 with an exact one-sided binomial test and a
  two-sided Clopper-Pearson interval.
- `equal_length_win_rate`, `win_rate_by_length`: a win rate with length held fixed. A logistic regression
  P(win) = sigmoid(b0 + b1 * d) on the per-prompt length difference d (tokens, a minus b); sigmoid(b0) is
  the win probability at equal length, with a bootstrap interval (the regression refitted per resample).

Every interval is deterministic: resampling draws from `numpy.random.default_rng(seed)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
N_RESAMPLES = 2000
TIE_TOLERANCE = 1e-9  # scores this close are a tie (half a win)
# Inclusive ranges of the length difference (tokens, a minus b) for `win_rate_by_length`.
LENGTH_BINS: tuple[tuple[float, float], ...] = ((-math.inf, -11), (-10, -3), (-2, 2), (3, 10), (11, math.inf))
_RIDGE = 1e-2  # weak L2 penalty: keeps the logistic fit finite when wins are separable (e.g. every prompt won)


@dataclass(frozen=True)
class Estimate:
    """A statistic over n prompts with its interval at `CONFIDENCE`; the interval is nan where n < 2."""

    value: float
    ci_low: float
    ci_high: float
    n: int

    def includes(self, x: float) -> bool:
        """Whether x lies in the interval (False where there is none)."""
        return self.ci_low <= x <= self.ci_high


@dataclass(frozen=True)
class AccuracyTest:
    """`correct` of `n` pairs right: exact one-sided binomial test of accuracy > 0.5, Clopper-Pearson interval."""

    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    p_value: float  # P(at least `correct` of n right | chance, p = 0.5)
    lower_bound: float  # one-sided 95 % (exact) lower bound: above 0.5 exactly when p_value < 0.05

    @property
    def better_than_chance(self) -> bool:
        return self.p_value < 1 - CONFIDENCE


@dataclass(frozen=True)
class LengthControlled:
    """Win probability at equal length (sigmoid(b0)) with its interval, and b1: log-odds of a win per token
    that a is longer than b."""

    equal_length: Estimate
    slope_per_token: float


def wins(a, b) -> np.ndarray:
    """(n,) per prompt: 1 where a beats b, 0.5 on a tie, 0 where b wins."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.where(np.abs(a - b) <= TIE_TOLERANCE, 0.5, (a > b).astype(float))


def _interval(data: tuple[np.ndarray, ...], statistic, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(*data, axis=-1)` over prompts, resampled jointly."""
    if len(data[0]) < 2:
        return math.nan, math.nan
    res = stats.bootstrap(data, statistic, n_resamples=N_RESAMPLES, confidence_level=CONFIDENCE, method="percentile",
                          paired=True, vectorized=True, batch=500, random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean_interval(x, seed: int) -> Estimate:
    """Mean of per-prompt values with its bootstrap interval over prompts (nan value where there are none)."""
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    low, high = _interval((x,), np.mean, seed)
    return Estimate(float(x.mean()), low, high, len(x))


def win_rate(a, b, seed: int) -> Estimate:
    """Share of prompts where a's score beats b's (ties count half), interval paired over prompts."""
    return mean_interval(wins(a, b), seed)


def mean_difference(a, b, seed: int) -> Estimate:
    """Mean over prompts of a - b, interval paired over prompts."""
    return mean_interval(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), seed)


def accuracy_vs_chance(correct: int, n: int) -> AccuracyTest:
    """Binomial test of `correct` right out of `n` against chance (0.5), one-sided: is the evaluator better?"""
    one_sided = stats.binomtest(correct, n, 0.5, alternative="greater")
    # the interval of a one-sided test is one-sided: the two-sided test gives the usual exact interval
    ci = stats.binomtest(correct, n, 0.5).proportion_ci(CONFIDENCE, method="exact")
    lower = one_sided.proportion_ci(CONFIDENCE, method="exact").low  # the test's own bound: its verdict's
    return AccuracyTest(correct / n, float(ci.low), float(ci.high), n, float(one_sided.pvalue), float(lower))


def logistic_fit(y: np.ndarray, x: np.ndarray, iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(b0, b1) of P(y) = sigmoid(b0 + b1 x) by Newton's method on the Bernoulli log-likelihood (a fractional
    y, a tie's 0.5, is a quasi-likelihood outcome), with a weak ridge penalty. Batched: y, x (..., n) ->
    b0, b1 (...), as the vectorized bootstrap calls it."""
    b0, b1 = np.zeros(x.shape[:-1]), np.zeros(x.shape[:-1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(b0[..., None] + b1[..., None] * x)))  # (..., n)
        r, v = p - y, p * (1 - p)
        # gradient g and Hessian H of the penalised negative log-likelihood; step = H^-1 g (2 x 2, in closed form)
        g0, g1 = r.sum(-1) + _RIDGE * b0, (r * x).sum(-1) + _RIDGE * b1
        h00, h01, h11 = v.sum(-1) + _RIDGE, (v * x).sum(-1), (v * x * x).sum(-1) + _RIDGE
        det = h00 * h11 - h01 * h01
        s0, s1 = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
        b0, b1 = b0 - s0, b1 - s1
        if max(np.abs(s0).max(), np.abs(s1).max()) < 1e-10:
            break
    return b0, b1


def equal_length_win_rate(w, length_diff, seed: int) -> LengthControlled:
    """Win probability at zero length difference from the logistic regression of the per-prompt wins `w`
    (1 / 0.5 / 0) on the length difference (tokens, a minus b), with a bootstrap interval over prompts. A
    win rate driven by length alone gives ~0.5 here however often the longer side won."""
    w, d = np.asarray(w, dtype=float), np.asarray(length_diff, dtype=float)
    if len(w) == 0:
        return LengthControlled(Estimate(math.nan, math.nan, math.nan, 0), math.nan)
    scale = max(float(d.std()), 1.0)  # fixed from the sample, so the penalty is the same in every resample

    def at_equal_length(w_, d_, axis=-1):
        b0, _ = logistic_fit(w_, d_ / scale)
        return 1.0 / (1.0 + np.exp(-b0))

    b0, b1 = logistic_fit(w, d / scale)
    low, high = _interval((w, d), at_equal_length, seed)
    return LengthControlled(Estimate(float(1.0 / (1.0 + np.exp(-b0))), low, high, len(w)), float(b1) / scale)


def win_rate_by_length(w, length_diff, seed: int, bins: tuple[tuple[float, float], ...] = LENGTH_BINS
                       ) -> list[tuple[tuple[float, float], Estimate]]:
    """Mean win within each inclusive range of the length difference (tokens, a minus b); empty bins left out."""
    w, d = np.asarray(w, dtype=float), np.asarray(length_diff, dtype=float)
    out = []
    for low, high in bins:
        inside = (d >= low) & (d <= high)
        if inside.any():
            out.append(((low, high), mean_interval(w[inside], seed)))
    return out
