"""Spectral restraints beyond PRUNE: a relative threshold and dominant-subspace protection.

A :class:`Restraint` says what is done to an edit's cumulative update ΔW of a weight W, in this order:

1. **protection** (``protect_energy`` e, ``protect_damp`` d; off when e is None): with U_r, V_r the
   top-r left and right singular vectors of W, r the smallest rank whose singular values hold a
   share e of W's energy (Σ_{i≤r} σ_i² ≥ e Σ σ_i²),

       ΔW ← (I − d U_r U_rᵀ) ΔW (I − d V_r V_rᵀ),

   so d = 1 removes every component of ΔW that touches W's dominant directions on either side, d = 0
   does nothing, and in between they are damped (by 1 − d on one side, (1 − d)² inside both);
2. **restraint** (``fn`` "log" / "linear", or "none"): PRUNE's F on every singular value of the
   (protected) ΔW above ``threshold_scale`` · σmax(W) instead of σmax(W) (c = 1 is PRUNE):
   log: F(σ) = log_α σ − log_α(cσ_W) + cσ_W;  linear: F(σ) = σ/β + (β − 1)/β · cσ_W.

Why protect first: the restraint then acts on the ΔW that is added, so every value of the result
above the threshold is exactly F of a value of the ΔW that reaches the model (the projections are
contractions, ‖I − dP‖₂ = 1 for d in [0, 1], so the other order also bounds the values, but could
leave them below F's range for no reason).

Both steps work on factored ΔW = A Bᵀ without forming it: A ← A − d U_r(U_rᵀA), B ← B − d V_r(V_rᵀB)
(O((m + n) r r_Δ)), then :func:`prune_ext.restraint.restrain_factors`. W's subspace is computed once
per matrix from W's float64 Gram matrix with a Davis–Kahan certificate (:func:`dominant_subspace`,
cached by the session's ledgers); see
docs/restraints.md for why, for the cost, and for how these rules differ from REVIVE's and SPHERE's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch

from . import restraint

__all__ = [
    "Restraint",
    "Subspace",
    "apply_dense",
    "apply_factors",
    "dominant_subspace",
    "energy_rank",
    "parse_restraint",
    "protect_dense",
    "protect_factors",
]

Fn = Literal["none", "log", "linear"]


@dataclass(frozen=True)
class Restraint:
    """What a restraint does to ΔW (see the module docstring). The default is PRUNE's log restraint."""

    fn: Fn = "log"
    alpha: float = 1.2
    beta: float = 2.0
    threshold_scale: float = 1.0
    protect_energy: float | None = None
    protect_damp: float = 1.0

    def __post_init__(self) -> None:
        if self.fn not in ("none", "log", "linear"):
            raise ValueError(f"restrain must be 'none', 'log' or 'linear', got {self.fn!r}")
        if self.fn != "none":
            restraint._fn_args(self.fn, self.alpha, self.beta)  # alpha / beta > 1, finite
        if not (isinstance(self.threshold_scale, (int, float)) and math.isfinite(self.threshold_scale)
                and self.threshold_scale > 0):
            raise ValueError(f"threshold_scale must be a finite number > 0, got {self.threshold_scale!r}")
        e = self.protect_energy
        if e is not None and not (isinstance(e, (int, float)) and 0 < e <= 1):
            raise ValueError(f"protect_energy must be None or a number in (0, 1], got {e!r}")
        d = self.protect_damp
        if not (isinstance(d, (int, float)) and 0 <= d <= 1):
            raise ValueError(f"protect_damp must be a number in [0, 1], got {d!r}")

    @property
    def protects(self) -> bool:
        return self.protect_energy is not None and self.protect_damp > 0

    @property
    def active(self) -> bool:
        """Does this restraint ever change a ΔW?"""
        return self.fn != "none" or self.protects

    @property
    def is_prune(self) -> bool:
        """PRUNE as the paper has it: F above σmax(W), nothing else."""
        return self.fn != "none" and self.threshold_scale == 1.0 and not self.protects

    def spec(self) -> str:
        """The canonical text form, read back by :func:`parse_restraint` (``restrain=log,alpha=1.2``…)."""
        parts = [f"restrain={self.fn}"]
        if self.fn == "log":
            parts.append(f"alpha={self.alpha:g}")
        elif self.fn == "linear":
            parts.append(f"beta={self.beta:g}")
        if self.fn != "none" and self.threshold_scale != 1.0:
            parts.append(f"scale={self.threshold_scale:g}")
        if self.protect_energy is not None:
            parts += [f"protect={self.protect_energy:g}", f"damp={self.protect_damp:g}"]
        return ",".join(parts)

    def label(self) -> str:
        """A short human label: ``PRUNE log α=1.2``, ``log α=1.2 above 0.5σ_W``, ``protect 90 % (d=1)``…"""
        parts = []
        if self.protect_energy is not None:
            parts.append(f"protect {100 * self.protect_energy:g} % (d={self.protect_damp:g})")
        if self.fn != "none":
            f = f"{self.fn} α={self.alpha:g}" if self.fn == "log" else f"linear β={self.beta:g}"
            parts.append(f"PRUNE {f}" if self.threshold_scale == 1.0 else f"{f} above {self.threshold_scale:g}σ_W")
        return " + ".join(parts) or "none"

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_KEYS = {"restrain": "fn", "alpha": "alpha", "beta": "beta", "scale": "threshold_scale",
         "protect": "protect_energy", "damp": "protect_damp"}


def parse_restraint(spec: str, default: Restraint = Restraint()) -> Restraint:
    """A restraint from ``key=value`` pairs separated by commas, the rest from ``default``.

    Keys: ``restrain`` (log, linear, none), ``alpha``, ``beta``, ``scale`` (threshold_scale),
    ``protect`` (protect_energy; ``none`` for off), ``damp`` (protect_damp). Example:
    ``"scale=0.5"``, ``"restrain=none,protect=0.5,damp=0.8"``.
    """
    values: dict = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in _KEYS:
            raise ValueError(f"restraint spec {spec!r}: expected key=value with key one of "
                             f"{', '.join(_KEYS)}, got {part!r}")
        if key == "restrain":
            values["fn"] = value
        elif key == "protect" and value.lower() == "none":
            values["protect_energy"] = None
        else:
            try:
                values[_KEYS[key]] = float(value)
            except ValueError:
                raise ValueError(f"restraint spec {spec!r}: {key} must be a number, got {value!r}") from None
    return replace(default, **values)


# -- W's dominant subspace ------------------------------------------------------------------------


@dataclass(frozen=True)
class Subspace:
    """W's top-r singular subspaces (float64, orthonormal columns) for an energy share."""

    left: torch.Tensor  # m × r
    right: torch.Tensor  # n × r
    energy: float  # the share asked for
    captured: float  # the share the r values hold (≥ energy)
    sigma_r: float  # the smallest protected singular value
    sigma_next: float  # the largest unprotected one (0 if none); the gap to sigma_r says how well defined it is
    # a bound on sin θ between each computed subspace and the exact one (Davis–Kahan, from the computed
    # residual; 1 when the gap σ_r − σ_{r+1} is too small to bound anything)
    angle_bound: float = 1.0

    @property
    def rank(self) -> int:
        return self.left.shape[1]


def energy_rank(sigma: torch.Tensor, energy: float) -> int:
    """The smallest r with Σ_{i≤r} σ_i² ≥ energy · Σ σ_i² (σ descending; 0 for an all-zero σ)."""
    s2 = sigma.to(torch.float64) ** 2
    total = float(s2.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(s2, 0) / total
    # a relative slack of 1e-12 so that energy = 1 (every nonzero direction) is not lost to rounding
    return min(int((cum < energy - 1e-12).sum()) + 1, sigma.numel())


def dominant_subspace(W: torch.Tensor, energy: float) -> Subspace:
    """U_r, V_r of W for an energy share, with a certificate of their accuracy (``angle_bound``).

    With k = min(m, n) and X the k-row side of W: the eigendecomposition of the float64 Gram matrix
    G = X Xᵀ (k × k) gives σ_i² and that side's vectors U_r; the other side is span(Xᵀ U_r),
    orthonormalised. 5–6× cheaper than an SVD of W (docs/restraints.md: an energy cut needs the whole
    spectrum, and on LLM weights a large r, where a randomized range finder costs as much as either).
    Squaring loses nothing here: the protected values are the large ones (σ_i² ≥ σ_r², far above the
    rounding ε σ₁² of G). The certificate: with R = G U_r − U_r Λ_r (computed) and δ the gap from λ_r
    to the rest of G's spectrum (λ_{r+1} plus eigh's backward error), sin θ_U ≤ ‖R‖_F / δ
    (Davis–Kahan), and the other side's tan θ is at most U's tan θ · σ_{r+1}/σ_r. Cache the result:
    it depends on W only.
    """
    if not (0 < energy <= 1):
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    W = restraint._as_matrix(W, "W")
    W64 = W.detach().to(torch.float64)
    tall = W64.shape[0] > W64.shape[1]
    X = W64.T if tall else W64  # k × N: G is on W's shorter side
    k = X.shape[0]
    G = X @ X.T
    lam, Q = torch.linalg.eigh(G)  # ascending
    lam, Q = lam.flip(0).clamp_min(0), Q.flip(1)
    r = energy_rank(lam.sqrt(), energy)
    total = float(lam.sum())
    near = Q[:, :r].contiguous()
    far = torch.linalg.qr(X.T @ near).Q.contiguous() if r else X.new_zeros(X.shape[1], 0)
    angle = 1.0
    if r:
        residual = float(torch.linalg.matrix_norm(G @ near - near * lam[:r]))
        backward = 4 * k * torch.finfo(torch.float64).eps * float(lam[0])  # eigh's backward error, generously
        gap = float(lam[r - 1]) - (float(lam[r]) if r < k else 0.0) - backward - residual
        sin = (residual + backward) / gap if gap > 0 else 1.0
        angle = sin / math.sqrt(1 - sin * sin) if sin < 0.5 else 1.0  # tan θ ≥ sin θ covers both sides
    left, right = (far, near) if tall else (near, far)
    return Subspace(left=left, right=right, energy=float(energy),
                    captured=float(lam[:r].sum()) / total if total else 1.0,
                    sigma_r=float(lam[r - 1].sqrt()) if r else 0.0,
                    sigma_next=float(lam[r].sqrt()) if r < k else 0.0, angle_bound=angle)


# -- protection -----------------------------------------------------------------------------------


def _check_pair(sub: Subspace, m: int, n: int) -> None:
    if sub.left.shape[0] != m or sub.right.shape[0] != n:
        raise ValueError(f"subspace of a {sub.left.shape[0]} × {sub.right.shape[0]} W for a {m} × {n} ΔW")


def _deflate(x: torch.Tensor, basis: torch.Tensor, damp: float) -> torch.Tensor:
    """x − d · Q(Qᵀx), in float64, returned in x's dtype."""
    x64 = x.to(torch.float64)
    q = basis.to(x64.device)
    return (x64 - damp * (q @ (q.T @ x64))).to(x.dtype)


def protect_factors(left: torch.Tensor, right: torch.Tensor, sub: Subspace, damp: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of (I − d U_rU_rᵀ) A Bᵀ (I − d V_rV_rᵀ): new (A, B), without forming A Bᵀ."""
    _check_pair(sub, left.shape[0], right.shape[0])
    if left.shape[1] != right.shape[1]:
        raise ValueError(f"factors of rank {left.shape[1]} and {right.shape[1]}")
    return _deflate(left, sub.left, damp), _deflate(right, sub.right, damp)


def protect_dense(delta: torch.Tensor, sub: Subspace, damp: float = 1.0) -> torch.Tensor:
    """(I − d U_rU_rᵀ) ΔW (I − d V_rV_rᵀ) as a new tensor in ΔW's dtype (computed in float64)."""
    _check_pair(sub, *delta.shape)
    d64 = delta.to(torch.float64)
    u, v = sub.left.to(d64.device), sub.right.to(d64.device)
    d64 = d64 - damp * (u @ (u.T @ d64))
    d64 = d64 - damp * ((d64 @ v) @ v.T)
    return d64.to(delta.dtype)


# -- the whole restraint --------------------------------------------------------------------------


def _subspace_for(spec: Restraint, sub: Subspace | None, W: torch.Tensor | None) -> Subspace | None:
    if not spec.protects:
        return None
    if sub is not None:
        if sub.energy != spec.protect_energy:
            raise ValueError(f"subspace computed for energy {sub.energy}, restraint asks {spec.protect_energy}")
        return sub
    if W is None:
        raise ValueError("protection needs W's subspace (subspace=...) or W itself (W=...)")
    return dominant_subspace(W, spec.protect_energy)


def apply_factors(left: torch.Tensor, right: torch.Tensor, W_sigma_max: float, spec: Restraint, *,
                  subspace: Subspace | None = None, W: torch.Tensor | None = None
                  ) -> tuple[int, tuple[torch.Tensor, torch.Tensor]]:
    """``spec`` on ΔW = ``left @ right.T``: (number of values above the threshold, new factors).

    ``subspace`` (from :func:`dominant_subspace`, for ``spec.protect_energy``) or ``W`` is needed
    when ``spec`` protects. When nothing changes (no protection, no value above the threshold) the
    factors come back as they are (the same tensors), so W + result is bit for bit W + ΔW.
    """
    sub = _subspace_for(spec, subspace, W)
    if left.shape[1] == 0:
        return 0, (left, right)
    if sub is not None:
        left, right = protect_factors(left, right, sub, spec.protect_damp)
    if spec.fn == "none":
        return 0, (left, right)
    t = spec.threshold_scale * W_sigma_max
    new_left, new_right, sigma = restraint.restrain_factors(left, right, t, spec.alpha, fn=spec.fn, beta=spec.beta)
    k = int((sigma > t).sum())
    return (k, (new_left, new_right)) if k else (0, (left, right))


def apply_dense(delta: torch.Tensor, W_sigma_max: float, spec: Restraint, *, subspace: Subspace | None = None,
                W: torch.Tensor | None = None, seed: int | None = None, return_info: bool = False
                ) -> tuple[int, torch.Tensor] | tuple[restraint.RestrainInfo | None, torch.Tensor]:
    """``spec`` on a dense ΔW, in place where possible: (values above the threshold, new ΔW).

    Protection makes a new tensor; the restraint (:func:`prune_ext.restraint.restrain`, certified)
    then works in place on it. With nothing to do ΔW is returned untouched. With ``return_info``
    the first item is the restraint's :class:`~prune_ext.restraint.RestrainInfo` (``None`` when
    ``spec.fn`` is ``"none"``: protection alone is an exact projection, nothing to certify).
    """
    sub = _subspace_for(spec, subspace, W)
    if sub is not None:
        delta = protect_dense(delta, sub, spec.protect_damp)
    if spec.fn == "none":
        return (None if return_info else 0), delta
    t = spec.threshold_scale * W_sigma_max
    out, info = restraint.restrain(delta, t, spec.alpha, fn=spec.fn, beta=spec.beta, seed=seed, return_info=True)
    return (info if return_info else info.restrained), out
