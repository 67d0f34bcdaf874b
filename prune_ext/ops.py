"""Typed wrappers over the compiled operators, and their fake kernels for torch.compile / opcheck.

Argument checking and defaults live one level up, in :mod:`prune_ext.restraint`.
"""

from __future__ import annotations

import torch

from . import _C  # loading the library registers the operators

WITH_CUDA: bool = bool(_C.WITH_CUDA)
NUM_STATS = 9  # length of the stats vector, see csrc/restrain_math.h

_ops = torch.ops.prune_ext


def restrain_(
    delta: torch.Tensor, threshold: float, fn: int, param: float, rank: int, oversample: int, power_iters: int,
    seed: int, rank_hint: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place on ``delta``; returns (sigma_before, sigma_after, stats), all float64 on delta's device.

    sigma_before / sigma_after hold the k changed values; in fixed-rank mode (rank > 0) all min(rank,
    min(m, n)) Ritz values instead (a shape known in advance, no host read), of which the first k changed.
    rank_hint > 0 (adaptive mode) sizes the first subspace for a ΔW of at most that rank (checked).
    """
    return _ops.restrain_.default(delta, threshold, fn, param, rank, oversample, power_iters, seed, rank_hint)


def restrain_many_(
    deltas: list[torch.Tensor], thresholds: list[float], fn: int, param: float, rank: int, oversample: int,
    power_iters: int, seed: int, rank_hint: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place on every matrix; returns sigma_before / sigma_after as (L, kmax) zero-padded rows, and
    the (L, NUM_STATS) stats."""
    return _ops.restrain_many_.default(deltas, thresholds, fn, param, rank, oversample, power_iters, seed,
                                       rank_hint)


def restrain_values(sigma: torch.Tensor, threshold: float, fn: int, param: float) -> torch.Tensor:
    """F applied elementwise (values at or below the threshold pass through)."""
    return _ops.restrain_values.default(sigma, threshold, fn, param)


def factored_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, V) of ``left @ right.T`` from its factors."""
    return _ops.factored_svd.default(left, right)


def spectral_norm(W: torch.Tensor, rtol: float, max_iters: int, seed: int) -> torch.Tensor:
    """float64 [sigma, residual bound, iterations, converged]."""
    return _ops.spectral_norm.default(W, rtol, max_iters, seed)


def restrain_gesvdr_(
    delta: torch.Tensor, threshold: float, fn: int, param: float, rank: int, oversample: int, power_iters: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA only: restrain_ with the top triplets from cusolverDnXgesvdr (no certificate); same outputs."""
    return _ops.restrain_gesvdr_.default(delta, threshold, fn, param, rank, oversample, power_iters, seed)


def _stats_like(t: torch.Tensor, *shape: int) -> torch.Tensor:
    return t.new_empty(shape, dtype=torch.float64)


@torch.library.register_fake("prune_ext::restrain_")
def _(delta, threshold, fn, param, rank, oversample, power_iters, seed, rank_hint=0):
    k = torch.library.get_ctx().new_dynamic_size()
    return _stats_like(delta, k), _stats_like(delta, k), _stats_like(delta, NUM_STATS)


if hasattr(_ops, "restrain_gesvdr_"):  # absent from a _C built before the op was added

    @torch.library.register_fake("prune_ext::restrain_gesvdr_")
    def _(delta, threshold, fn, param, rank, oversample, power_iters, seed):
        k = torch.library.get_ctx().new_dynamic_size()
        return _stats_like(delta, k), _stats_like(delta, k), _stats_like(delta, NUM_STATS)


@torch.library.register_fake("prune_ext::restrain_many_")
def _(deltas, thresholds, fn, param, rank, oversample, power_iters, seed, rank_hint=0):
    kmax = torch.library.get_ctx().new_dynamic_size()
    device = deltas[0].device if deltas else "cpu"
    padded = torch.empty(len(deltas), kmax, dtype=torch.float64, device=device)
    return padded, torch.empty_like(padded), torch.empty(len(deltas), NUM_STATS, dtype=torch.float64, device=device)


@torch.library.register_fake("prune_ext::restrain_values")
def _(sigma, threshold, fn, param):
    return torch.empty_like(sigma)


@torch.library.register_fake("prune_ext::factored_svd")
def _(left, right):
    dtype = torch.promote_types(
        torch.float64 if left.dtype == torch.float64 else torch.float32,
        torch.float64 if right.dtype == torch.float64 else torch.float32,
    )
    q = min(left.shape[0], right.shape[0], left.shape[1])
    return (
        left.new_empty(left.shape[0], q, dtype=dtype),
        left.new_empty(q, dtype=dtype),
        left.new_empty(right.shape[0], q, dtype=dtype),
    )


@torch.library.register_fake("prune_ext::spectral_norm")
def _(W, rtol, max_iters, seed):
    return _stats_like(W, 4)
