"""95 % intervals of every score, and the ``"n"`` / ``"intervals"`` keys of a result dict.

One rule, :func:`mean_interval`, for a score that is a mean over examples (edits, questions):

* every value is 0 or 1 (a plain proportion: CounterFact efficacy, RTE, GSM8K, NQ exact match):
  the **Wilson** score interval (exact formula; sensible at 0 and 1, where a bootstrap collapses
  to a point);
* otherwise (ROUGE, generalization over several paraphrases, zsRE token accuracy): the
  **percentile bootstrap** over examples.

Perplexity is not a mean of per-passage values: :func:`perplexity_interval` bootstraps passages
and recomputes the token-weighted ``exp(-Σ log p / Σ tokens)`` of each resample.

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
    "RESAMPLES",
    "bootstrap_mean",
    "mean_interval",
    "merge_results",
    "perplexity_interval",
    "wilson",
]

CONFIDENCE = 0.95
RESAMPLES = 1000
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
