"""The literal full-SVD implementation of PRUNE's restraint in float64: the test oracle and a baseline."""

from __future__ import annotations

import math

import torch


def restrained_values(sigma: torch.Tensor, W_sigma_max: float, alpha: float = 1.2, fn: str = "log",
                      beta: float = 2.0) -> torch.Tensor:
    """The paper's F on a vector of singular values (float64), written out independently of the C++."""
    s = sigma.to(torch.float64)
    if fn == "log":
        f = torch.log(s) / math.log(alpha) - math.log(W_sigma_max) / math.log(alpha) + W_sigma_max
    elif fn == "linear":
        f = s / beta + (beta - 1) / beta * W_sigma_max
    else:
        raise ValueError(f"fn must be 'log' or 'linear', got {fn!r}")
    return torch.where(s > W_sigma_max, f, s)


def restrain(delta: torch.Tensor, W_sigma_max: float, alpha: float = 1.2, *, fn: str = "log",
             beta: float = 2.0) -> torch.Tensor:
    """Restrained ΔW as a new float64 tensor: full SVD, F on every value above σ_W, reconstruction."""
    U, S, Vh = torch.linalg.svd(delta.detach().to(torch.float64), full_matrices=False)
    return (U * restrained_values(S, W_sigma_max, alpha, fn, beta)) @ Vh
