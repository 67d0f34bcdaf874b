"""95 % intervals of every score, and the ``"n"`` / ``"intervals"`` keys of a result dict.

One rule, :func:`mean_interval`, for a score that is a mean over examples (edits, questions):

* every value is 0 or 1 (a plain proportion: CounterFact efficacy, RTE, GSM8K, NQ exact match):
  the **Wilson** score interval (exact formula; sensible at 0 and 1, where a bootstrap collapses
  to a point);
* otherwise (ROUGE, generalization over several paraphrases, zsRE token accuracy): the
  **percentile bootstrap** over examples.

Perplexity is not a mean of per-passage values: :func:`perplexity_interval` bootstraps passages
and recomputes the token-weighted ``exp(-Σ log p / Σ tokens)`` of each resample.

Two runs scored on the same items (the same edits of one pass, the same seeded task examples) are
compared by **paired** tests of their difference b − a, item by item (:func:`paired_difference`,
:func:`paired_perplexity`): McNemar's exact test for 0/1 outcomes (a two-sided binomial test on the
discordant pairs), else a sign-flip permutation test of the mean difference; the 95 % interval of the
difference is a paired percentile bootstrap (``PAIRED_RESAMPLES`` = 2000 resamples of the items).

The bootstrap draws ``rng.integers(0, n, size=(resamples, n))`` from
``numpy.random.default_rng(seed)`` (default 1000 resamples, seed 0) and takes the 2.5 and 97.5
percentiles (numpy's default linear interpolation) of the resampled statistics: the same data
always gives the same interval. With no values the interval is ``[nan, nan]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "CONFIDENCE",
    "PAIRED_RESAMPLES",
    "RESAMPLES",
    "bootstrap_mean",
    "mean_interval",
    "mcnemar_exact",
    "merge_results",
    "paired_difference",
    "paired_perplexity",
    "perplexity_interval",
    "wilson",
]

CONFIDENCE = 0.95
RESAMPLES = 1000
PAIRED_RESAMPLES = 2000
_Z = 1.959963984540054  # the 97.5 % quantile of the standard normal


def wilson(successes: float, n: int, z: float = _Z) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (``[nan, nan]`` when ``n == 0``)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)  # exact ends: no 1e-17 from rounding
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return (lo, hi)


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(stats: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return (float(lo), float(hi))


def bootstrap_mean(values: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap 95 % interval of the mean of ``values`` (resampling the values)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    return _percentiles(x[_indices(x.size, resamples, seed)].mean(axis=1))


def mean_interval(values: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the mean of per-example ``values``: Wilson if all are 0/1, else bootstrap."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    if np.all((x == 0.0) | (x == 1.0)):
        return wilson(float(x.sum()), int(x.size))
    return bootstrap_mean(x, resamples=resamples, seed=seed)


def perplexity_interval(
    logprob_sums: Sequence[float],
    token_counts: Sequence[int],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap 95 % interval of the token-weighted perplexity, resampling passages.

    ``logprob_sums[i]`` is Σ log p over passage ``i``'s scored tokens, ``token_counts[i]`` their
    number; each resample's perplexity is ``exp(-Σ logprob / Σ tokens)`` over its passages.
    """
    s = np.asarray(logprob_sums, dtype=np.float64)
    c = np.asarray(token_counts, dtype=np.float64)
    if s.shape != c.shape:
        raise ValueError(f"{s.size} log-prob sums but {c.size} token counts")
    if s.size == 0:
        return (math.nan, math.nan)
    idx = _indices(s.size, resamples, seed)
    return _percentiles(np.exp(-s[idx].sum(axis=1) / c[idx].sum(axis=1)))


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: ``a_only`` items a got right and b
    wrong, ``b_only`` the reverse. Under the null each discordant pair is a fair coin, so
    p = min(1, 2 · P(Binomial(a_only + b_only, 1/2) ≤ min(a_only, b_only))), summed exactly in integers."""
    if a_only < 0 or b_only < 0:
        raise ValueError(f"counts must be non-negative, got {a_only}, {b_only}")
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired values must be two lists of one length, got {x.shape} and {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))  # an item without a score in either run pairs with nothing
    return x[keep], y[keep]


def _sign_flip_p(d: np.ndarray, statistic, resamples: int, seed: int) -> float:
    """Permutation p-value of ``statistic(d)`` under random sign flips of the paired differences."""
    observed = abs(statistic(d))
    if observed == 0:
        return 1.0
    signs = np.random.default_rng(seed + 1).choice([-1.0, 1.0], size=(resamples, d.size))
    flipped = np.abs(statistic(signs * d))
    return float((1 + np.sum(flipped >= observed * (1 - 1e-12))) / (resamples + 1))


def paired_difference(a: Sequence[float], b: Sequence[float], *, resamples: int = PAIRED_RESAMPLES,
                      seed: int = 0) -> dict:
    """The paired difference of two runs' per-item values (same items, same order): mean(b − a),
    its 95 % paired-bootstrap interval, and a p-value for "no difference" — McNemar's exact test
    when every value is 0 or 1 (then also the discordant counts), else a sign-flip permutation
    test of the mean difference. Items that are NaN in either run are left out."""
    x, y = _paired(a, b)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "difference": math.nan, "interval": [math.nan, math.nan], "p": math.nan, "test": None}
    d = y - x
    stats = d[_indices(n, resamples, seed)].mean(axis=1)
    out = {"n": n, "difference": float(d.mean()), "interval": list(_percentiles(stats))}
    if np.all(np.isin(x, (0.0, 1.0))) and np.all(np.isin(y, (0.0, 1.0))):
        a_only, b_only = int(np.sum((x == 1) & (y == 0))), int(np.sum((x == 0) & (y == 1)))
        out.update(p=mcnemar_exact(a_only, b_only), test="mcnemar", discordant=[a_only, b_only])
    else:
        out.update(p=_sign_flip_p(d, lambda v: v.mean(axis=-1), resamples, seed), test="sign-flip")
    return out


def paired_perplexity(logprob_a: Sequence[float], logprob_b: Sequence[float], tokens: Sequence[int], *,
                      resamples: int = PAIRED_RESAMPLES, seed: int = 0) -> dict:
    """Two runs' token-weighted perplexities on the same passages: ``ratio`` ppl_b / ppl_a, the
    ``difference`` ppl_b − ppl_a, the ratio's 95 % paired-bootstrap interval (passages resampled
    together) and a sign-flip permutation p-value of the log-ratio Σ(logprob_a − logprob_b) / Σ tokens."""
    s_a, s_b, c = (np.asarray(v, dtype=np.float64) for v in (logprob_a, logprob_b, tokens))
    if not (s_a.shape == s_b.shape == c.shape) or s_a.ndim != 1:
        raise ValueError(f"{s_a.size} and {s_b.size} passages but {c.size} token counts")
    keep = ~(np.isnan(s_a) | np.isnan(s_b))
    s_a, s_b, c = s_a[keep], s_b[keep], c[keep]
    if s_a.size == 0:
        return {"n": 0, "ratio": math.nan, "difference": math.nan, "interval": [math.nan, math.nan],
                "p": math.nan, "test": None}
    ppl_a, ppl_b = math.exp(-s_a.sum() / c.sum()), math.exp(-s_b.sum() / c.sum())
    idx = _indices(s_a.size, resamples, seed)
    ratios = np.exp((s_a[idx].sum(axis=1) - s_b[idx].sum(axis=1)) / c[idx].sum(axis=1))
    d = s_a - s_b  # per passage: how much less likely its text is under b
    p = _sign_flip_p(d, lambda v: v.sum(axis=-1) / c.sum(), resamples, seed)
    return {"n": int(s_a.size), "ratio": ppl_b / ppl_a, "difference": ppl_b - ppl_a,
            "interval": list(_percentiles(ratios)), "p": p, "test": "sign-flip"}


def merge_results(*results: Mapping) -> dict:
    """One dict from several evaluator results (``evaluate_edits``, ``evaluate_tasks``).

    Plain keys are taken as they are (a later result wins); the nested ``"n"`` and
    ``"intervals"`` dicts are merged metric by metric instead of the later one replacing the
    earlier, so ``row.update(merge_results(edits, tasks))`` keeps every metric's interval.
    """
    out: dict = {}
    for result in results:
        for key, value in result.items():
            if key in ("n", "intervals"):
                out.setdefault(key, {}).update(value)
            else:
                out[key] = value
    return out
