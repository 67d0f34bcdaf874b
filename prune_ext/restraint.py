"""Public API of the restraint: PRUNE's singular-value restraint of an edit's cumulative update ΔW.

Every singular value σ of ΔW above the threshold σ_W = σmax(W) of the original weight becomes F(σ):
  log    (paper Eq. 5):       F(σ) = log_α(σ) − log_α(σ_W) + σ_W,  α > 1
  linear (appendix C.3):      F(σ) = σ/β + (β − 1)/β · σ_W,         β > 1
All other singular values, and every singular vector, stay as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, overload

import torch

from . import ops

Fn = Literal["log", "linear"]

DEFAULT_SEED = 0x5EED
DEFAULT_OVERSAMPLE = 10
DEFAULT_POWER_ITERS = 8  # adaptive mode: the most subspace iterations spent before a dense SVD takes over

_METHODS = {0: "none", 1: "randomized", 2: "dense", 3: "norm-bound", 4: "gesvdr"}


@dataclass(frozen=True)
class RestrainInfo:
    """What a restraint did to one matrix.

    ``certified`` means ``sigma_next_bound <= threshold``: a proven upper bound on the largest singular
    value left unchanged, so no value above the threshold was missed (the bound is Weyl's inequality
    on the explored subspace plus the explicitly computed residual, see csrc/restrain.cpp). Like every
    computed singular value, it holds up to the working precision's rounding at ΔW's scale (about
    ε‖ΔW‖₂, ε = 1.2e-7 in float32): a value that close to the threshold may fall on either side, where
    F(σ) ≈ σ anyway.
    """

    threshold: float
    restrained: int
    sigma_before: torch.Tensor
    sigma_after: torch.Tensor
    rank_explored: int
    sigma_next_bound: float
    certified: bool
    method: str
    power_iters: int
    residual: float
    ritz_residual: float
    passes: int = 0  # passes over ΔW (its norm, each product with it, residuals, the correction); 0: not counted

    @classmethod
    def _from_op(cls, threshold: float, before: torch.Tensor, after: torch.Tensor, stats: torch.Tensor):
        s = stats.tolist()
        k = int(s[0])  # the op returns more values than the k changed ones in fixed-rank mode (no host read)
        return cls(
            threshold=threshold,
            restrained=k,
            sigma_before=before[:k].cpu(),
            sigma_after=after[:k].cpu(),
            rank_explored=int(s[1]),
            sigma_next_bound=s[2],
            certified=bool(s[3]),
            method=_METHODS[int(s[4])],
            power_iters=int(s[5]),
            residual=s[6],
            ritz_residual=s[7],
            passes=int(s[8]),
        )


def _fn_args(fn: str, alpha: float, beta: float) -> tuple[int, float]:
    if fn == "log":
        param, name = alpha, "alpha"
    elif fn == "linear":
        param, name = beta, "beta"
    else:
        raise ValueError(f"fn must be 'log' or 'linear', got {fn!r}")
    try:
        param = float(param)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(param).__name__}") from None
    if not math.isfinite(param) or param <= 1:
        raise ValueError(f"{name} must be a finite number > 1, got {param}")
    return (0 if fn == "log" else 1), param


def _threshold(W_sigma_max) -> float:
    if isinstance(W_sigma_max, torch.Tensor):
        if W_sigma_max.numel() != 1:
            raise ValueError(f"W_sigma_max must be a scalar, got a tensor of shape {tuple(W_sigma_max.shape)}")
        W_sigma_max = W_sigma_max.item()
    try:
        t = float(W_sigma_max)
    except (TypeError, ValueError):
        raise TypeError(f"W_sigma_max must be a number, got {type(W_sigma_max).__name__}") from None
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"W_sigma_max must be a finite positive number, got {t}")
    return t


def _as_matrix(x, name: str = "delta") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        if hasattr(x, "__dlpack__"):  # cupy, JAX, NumPy…: zero-copy, restrained in place
            x = torch.from_dlpack(x)
        else:
            raise TypeError(f"{name} must be a torch.Tensor or a DLPack array, got {type(x).__name__}")
    if x.dtype.is_complex or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a real floating-point tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.is_cuda and not ops.WITH_CUDA:
        raise RuntimeError("prune_ext was built without CUDA support; rebuild it with a CUDA toolkit")
    return x


def _rank_hint(rank_hint) -> int:
    if rank_hint is None:
        return 0
    if isinstance(rank_hint, bool) or not isinstance(rank_hint, int):
        raise TypeError(f"rank_hint must be an int, got {type(rank_hint).__name__}")
    if rank_hint <= 0:
        raise ValueError(f"rank_hint must be positive, got {rank_hint}")
    return rank_hint


def _seed(generator: torch.Generator | None, seed: int | None) -> int:
    if seed is not None:
        return int(seed)
    if generator is not None:
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return DEFAULT_SEED


@overload
def restrain(delta: torch.Tensor, W_sigma_max: float, alpha: float = ..., *, return_info: Literal[False] = ...,
             **kw) -> torch.Tensor: ...
@overload
def restrain(delta: torch.Tensor, W_sigma_max: float, alpha: float = ..., *, return_info: Literal[True],
             **kw) -> tuple[torch.Tensor, RestrainInfo]: ...


def restrain(
    delta: torch.Tensor,
    W_sigma_max: float | torch.Tensor,
    alpha: float = 1.2,
    *,
    fn: Fn = "log",
    beta: float = 2.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    rank: int | None = None,
    rank_hint: int | None = None,
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iters: int = DEFAULT_POWER_ITERS,
    method: Literal["auto", "gesvdr"] = "auto",
    return_info: bool = False,
):
    """Restrain the singular values of ``delta`` above ``W_sigma_max``, in place, and return ``delta``.

    Args:
        delta: the cumulative update ΔW (any 2-D float tensor, any strides, or a DLPack array).
        W_sigma_max: σmax of the ORIGINAL weight W (see :func:`spectral_norm`).
        alpha: base of the log restraint (> 1; the paper uses 1.2, 1.5 and e).
        fn: ``"log"`` (the paper's main F) or ``"linear"`` (appendix C.3, with ``beta``).
        generator / seed: the random sketch's seed; results are deterministic for a given seed
            (default: a fixed seed).
        rank: fix the sketch size instead of growing it until certified (no dense fallback). This mode
            reads nothing back to the host (on a GPU: no synchronisation, so it can be captured in a CUDA
            graph; pass ``W_sigma_max`` as a float there, since a tensor is read with ``.item()``); it
            therefore does not check ΔW for NaN or Inf (such a ΔW is left as it is, uncertified), and
            ``info.certified`` says whether the rank sufficed.
        rank_hint: adaptive mode: a bound on the rank of ``delta`` that the caller knows (an edit
            ledger's rank, say). The first subspace then has ``rank_hint + oversample`` columns instead
            of a blind first sketch of 64, so a ΔW of up to that rank is certified in one round: five
            passes over it (its norm, two products, the residual, the correction). The hint is checked
            like any subspace, never trusted: a wrong one only costs rounds. Ignored with ``rank``.
        oversample: extra sketch columns beyond the number of values above the threshold.
        power_iters: adaptive mode: the most subspace iterations before falling back to a dense SVD;
            fixed-rank mode: exactly this many.
        method: ``"auto"`` (the certified range finder) or ``"gesvdr"`` (CUDA tensors only: the top
            triplets from cuSOLVER's randomized SVD, ``cusolverDnXgesvdr``, with ``oversample`` and
            ``power_iters`` passed on; no certificate, ``info.certified`` is False; the sketch doubles
            while every value found is above the threshold, up to where the certified path takes over).
        return_info: also return a :class:`RestrainInfo`.

    If no singular value exceeds the threshold, ``delta`` is left bit-for-bit unchanged. Bad input
    raises before anything is written.
    """
    delta = _as_matrix(delta)
    t = _threshold(W_sigma_max)
    code, param = _fn_args(fn, alpha, beta)
    if rank is not None and rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    hint = _rank_hint(rank_hint)
    if method == "auto":
        op = ops.restrain_
    elif method == "gesvdr":
        if not delta.is_cuda:
            raise ValueError(f"method='gesvdr' (cuSOLVER's randomized SVD) needs a CUDA tensor, got {delta.device}")
        op = ops.restrain_gesvdr_
    else:
        raise ValueError(f"method must be 'auto' or 'gesvdr', got {method!r}")
    args = (delta, t, code, param, rank or 0, oversample, power_iters, _seed(generator, seed))
    with torch.no_grad():
        before, after, stats = op(*args, hint) if method == "auto" else op(*args)
    if return_info:
        return delta, RestrainInfo._from_op(t, before, after, stats)
    return delta


def restrain_many(
    deltas: Sequence[torch.Tensor],
    sigma_maxes: float | Sequence[float],
    alpha: float = 1.2,
    *,
    fn: Fn = "log",
    beta: float = 2.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    rank: int | None = None,
    rank_hint: int | None = None,
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iters: int = DEFAULT_POWER_ITERS,
    return_info: bool = False,
):
    """:func:`restrain` on several matrices in one call (the same result as calling it on each).

    ``sigma_maxes`` is one threshold per matrix, or one for all; ``rank_hint`` one bound for every
    matrix's rank. Every argument is checked before any matrix is touched.
    """
    mats = [_as_matrix(d, f"deltas[{i}]") for i, d in enumerate(deltas)]
    if isinstance(sigma_maxes, (int, float, torch.Tensor)) and not (
        isinstance(sigma_maxes, torch.Tensor) and sigma_maxes.numel() > 1
    ):
        thresholds = [_threshold(sigma_maxes)] * len(mats)
    else:
        thresholds = [_threshold(s) for s in sigma_maxes]
    if len(thresholds) != len(mats):
        raise ValueError(f"got {len(mats)} matrices but {len(thresholds)} thresholds")
    code, param = _fn_args(fn, alpha, beta)
    hint = _rank_hint(rank_hint)
    with torch.no_grad():
        before, after, stats = ops.restrain_many_(
            mats, thresholds, code, param, rank or 0, oversample, power_iters, _seed(generator, seed), hint
        )
    if return_info:
        infos = [RestrainInfo._from_op(t, b, a, s) for t, b, a, s in zip(thresholds, before, after, stats)]
        return mats, infos
    return mats


def restrain_values(sigma: torch.Tensor, W_sigma_max: float, alpha: float = 1.2, *, fn: Fn = "log",
                    beta: float = 2.0) -> torch.Tensor:
    """F applied to singular values (those at or below ``W_sigma_max`` pass through unchanged)."""
    code, param = _fn_args(fn, alpha, beta)
    return ops.restrain_values(sigma, _threshold(W_sigma_max), code, param)


def restrain_factors(
    left: torch.Tensor,
    right: torch.Tensor,
    W_sigma_max: float,
    alpha: float = 1.2,
    *,
    fn: Fn = "log",
    beta: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Restrain ΔW = ``left @ right.T`` without forming it: O((m + n) r²) instead of a dense SVD.

    Returns ``(new_left, new_right, sigma)`` with restrained ΔW = ``new_left @ new_right.T``: the
    compact SVD form (``new_right`` has orthonormal columns, ``new_left = U diag(F(σ))``) and the
    singular values σ of the unrestrained ΔW, descending. The rank never grows, so this also
    recompresses the factors.
    """
    left, right = _as_matrix(left, "left"), _as_matrix(right, "right")
    t = _threshold(W_sigma_max)
    code, param = _fn_args(fn, alpha, beta)
    with torch.no_grad():
        U, S, V = ops.factored_svd(left, right)
        return U * ops.restrain_values(S, t, code, param), V, S


def spectral_norm(W: torch.Tensor, rtol: float = 1e-7, max_iters: int | None = None, seed: int = DEFAULT_SEED
                  ) -> float:
    """σmax(W) by Golub–Kahan–Lanczos bidiagonalisation in float64, without a full SVD.

    Stops when the a-posteriori residual of the top Ritz triplet is at most ``rtol`` · σ: then a
    singular value of W lies within ``rtol`` (relative) of the result, and the result is a lower bound
    of σmax. That it is the *largest* one holds with probability 1 over the random start (exactly, if
    the iteration runs to min(m, n) steps, the default cap). Cost: a few dozen matrix–vector products.
    """
    W = _as_matrix(W, "W")
    steps = max(1, min(W.shape)) if max_iters is None else max_iters
    stats = ops.spectral_norm(W.detach(), float(rtol), int(steps), int(seed)).tolist()
    return stats[0]


def condition_number(W: torch.Tensor) -> float:
    """κ(W) = σmax/σmin, exact: all singular values in float64 (``inf`` if W is singular).

    Cost: one float64 copy of W and O(m n min(m, n)) flops (about a second at 1600 × 6400 on 2 CPU
    cores); for very large matrices compute it on a GPU.
    """
    W = _as_matrix(W, "W")
    if W.numel() == 0:
        raise ValueError("condition_number of an empty matrix is undefined")
    s = torch.linalg.svdvals(W.detach().to(torch.float64))
    smin = s[-1].item()
    return math.inf if smin == 0 else s[0].item() / smin
