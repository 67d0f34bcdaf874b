"""Paired tests between two runs on the same items (prune_ext.evaluation.intervals)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from prune_ext.evaluation.intervals import mcnemar_exact, paired_difference, paired_perplexity


def _binomial_two_sided(a_only: int, b_only: int) -> float:
    """The exact McNemar p-value written independently: Pascal's triangle, rational arithmetic."""
    n, k = a_only + b_only, min(a_only, b_only)
    row = [1]
    for _ in range(n):
        row = [x + y for x, y in zip([0, *row], [*row, 0])]
    tail = sum(Fraction(row[i], 2**n) for i in range(k + 1))
    return float(min(Fraction(1), 2 * tail))


def test_mcnemar_by_hand():
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 0 of 5 discordant pairs for a: 2 · (1/2)^5
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 1) == 1.0  # one discordant pair can never be significant
    for a, b in [(2, 17), (40, 61), (120, 160), (7, 0), (250, 199)]:
        assert mcnemar_exact(a, b) == pytest.approx(_binomial_two_sided(a, b), rel=1e-12)
        assert mcnemar_exact(a, b) == mcnemar_exact(b, a)


def test_paired_difference_of_flags_is_mcnemar_with_its_counts():
    a = [1, 1, 1, 0, 0, 1, 0, 1, 1, 1] * 4
    b = [1, 0, 0, 0, 1, 1, 0, 0, 0, 1] * 4
    r = paired_difference(a, b)
    assert r["test"] == "mcnemar" and r["discordant"] == [16, 4] and r["n"] == 40
    assert r["difference"] == pytest.approx((sum(b) - sum(a)) / 40)
    assert r["p"] == pytest.approx(_binomial_two_sided(16, 4))
    lo, hi = r["interval"]
    assert lo <= r["difference"] <= hi < 0
    same = paired_difference(a, a)
    assert same["difference"] == 0 and same["interval"] == [0.0, 0.0] and same["p"] == 1.0
    with pytest.raises(ValueError):
        paired_difference([1, 0], [1])


def test_nan_items_pair_with_nothing():
    r = paired_difference([0.5, math.nan, 0.25, 1.0], [0.75, 0.0, math.nan, 0.5])
    assert r["n"] == 2 and r["difference"] == pytest.approx((0.25 - 0.5) / 2)


def test_paired_bootstrap_covers_the_true_difference_at_its_rate():
    """Synthetic paired data whose true mean difference is known: the 95 % interval holds it in
    about 95 % of 300 draws (binomial sd of the rate 1.3 %), and the sign-flip test rejects a true
    null about 5 % of the time and a clear difference always."""
    rng = np.random.default_rng(7)
    delta, trials, n = 0.3, 300, 80
    covered = rejected_null = 0
    for t in range(trials):
        base = rng.normal(size=n)
        a = base + rng.normal(scale=0.5, size=n)
        b = base + delta + rng.normal(scale=0.5, size=n)  # mean(b − a) = delta exactly in expectation
        lo, hi = paired_difference(a, b, seed=t)["interval"]
        covered += lo <= delta <= hi
        null_b = base + rng.normal(scale=0.5, size=n)
        rejected_null += paired_difference(a, null_b, seed=t, resamples=1000)["p"] < 0.05
    assert 0.90 <= covered / trials <= 0.985
    assert 0.01 <= rejected_null / trials <= 0.10
    a = rng.normal(size=n)
    assert paired_difference(a, a + 1.0 + 0.1 * rng.normal(size=n))["p"] < 0.001


def test_paired_perplexity():
    rng = np.random.default_rng(3)
    tokens = rng.integers(5, 50, size=60)
    lp_a = -2.0 * tokens + rng.normal(size=60)
    same = paired_perplexity(lp_a, lp_a, tokens)
    assert same["ratio"] == 1.0 and same["interval"] == [1.0, 1.0] and same["p"] == 1.0
    lp_b = lp_a - 0.1 * tokens  # every token 0.1 nats less likely: ratio exactly e^0.1
    r = paired_perplexity(lp_a, lp_b, tokens)
    assert r["ratio"] == pytest.approx(math.exp(0.1), rel=1e-12)
    ppl_a = math.exp(-float(lp_a.sum()) / float(tokens.sum()))
    assert r["difference"] == pytest.approx(ppl_a * (math.exp(0.1) - 1), rel=1e-12)
    lo, hi = r["interval"]
    assert lo == pytest.approx(math.exp(0.1), rel=1e-9) and hi == pytest.approx(math.exp(0.1), rel=1e-9)
    assert r["p"] < 0.001
    with pytest.raises(ValueError):
        paired_perplexity([1.0], [1.0, 2.0], [3, 4])
