"""Spectral restraints beyond PRUNE (prune_ext.spectral) against a float64 dense reference.

The reference is written independently of the module: W's singular subspaces come from the
eigenvectors of W Wᵀ and Wᵀ W (not from an SVD of W), the energy rank from those eigenvalues, the
projection is formed as a dense matrix, and the restraint is :func:`prune_ext.reference.restrain`
(full SVD, F on every value above c·σmax(W)).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import matrix_with_spectrum, spectrum

from prune_ext import reference
from prune_ext.spectral import (
    Restraint,
    apply_dense,
    apply_factors,
    dominant_subspace,
    energy_rank,
    parse_restraint,
    protect_factors,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_projectors(W: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Dense P_U, P_V of W's top-r subspaces (r by energy) from two symmetric eigenproblems."""
    W = W.to(torch.float64)
    lam_l, vec_l = torch.linalg.eigh(W @ W.T)  # ascending
    lam_r, vec_r = torch.linalg.eigh(W.T @ W)
    lam = lam_l.flip(0).clamp_min(0)
    total = float(lam.sum())
    running, r = 0.0, 0
    while running < energy * total * (1 - 1e-12):
        running += float(lam[r])
        r += 1
    U = vec_l.flip(1)[:, :r]
    V = vec_r.flip(1)[:, :r]
    return U @ U.T, V @ V.T, r


def _reference(delta, W, spec: Restraint) -> torch.Tensor:
    d = delta.to(torch.float64)
    if spec.protect_energy is not None:
        PU, PV, _ = _reference_projectors(W, spec.protect_energy)
        I_m, I_n = torch.eye(d.shape[0], dtype=torch.float64), torch.eye(d.shape[1], dtype=torch.float64)
        d = (I_m - spec.protect_damp * PU) @ d @ (I_n - spec.protect_damp * PV)
    if spec.fn == "none":
        return d
    sigma_w = float(torch.linalg.matrix_norm(W.to(torch.float64), ord=2))
    return reference.restrain(d, spec.threshold_scale * sigma_w, spec.alpha, fn=spec.fn, beta=spec.beta)


def _w_with_gapped_spectrum(m, n, seed, dtype=torch.float32):
    """W whose energy-fraction cuts fall well inside gaps: 5 large values, 10 middle ones, a tail."""
    k = min(m, n)
    g = torch.Generator().manual_seed(seed)
    s = torch.cat([torch.linspace(10, 8, 5, dtype=torch.float64), torch.linspace(4, 3, 10, dtype=torch.float64),
                   0.5 * torch.rand(k - 15, generator=g, dtype=torch.float64)]).sort(descending=True).values
    return matrix_with_spectrum(m, n, s, seed=seed, dtype=dtype), s


def _energy_between_steps(s: torch.Tensor, r: int) -> float:
    """An energy share whose cut is exactly r, half-way between the shares of r − 1 and r values."""
    s2 = s**2
    cum = torch.cumsum(s2, 0) / s2.sum()
    return float((cum[r - 2] + cum[r - 1]) / 2) if r > 1 else float(cum[0] / 2)


CASES = [  # (m, n, delta rank, delta spectrum kind, spec, protected rank of W or None)
    (64, 96, 8, "spikes", Restraint("log", 1.2, threshold_scale=0.5), None),
    (96, 64, 12, "decaying", Restraint("linear", beta=3.0, threshold_scale=2.0), None),
    (80, 120, 10, "huge", Restraint("log", math.e, threshold_scale=1.0), 5),
    (120, 80, 6, "spikes", Restraint("log", 1.5, threshold_scale=0.25, protect_damp=0.5), 15),
    (70, 70, 20, "decaying", Restraint("none", protect_damp=0.8), 5),
    (50, 150, 16, "clustered", Restraint("linear", beta=2.0, threshold_scale=0.8), 1),
]


def _spec_with_energy(spec: Restraint, s: torch.Tensor, rank: int | None) -> Restraint:
    """Protect W's top ``rank`` directions: the energy share half-way between rank − 1 and rank values."""
    return spec if rank is None else replace(spec, protect_energy=_energy_between_steps(s, rank))


@pytest.mark.parametrize("m,n,r,kind,spec,rank", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_factored_variants_match_the_dense_reference(m, n, r, kind, spec, rank, seed):
    W, s = _w_with_gapped_spectrum(m, n, seed)
    spec = _spec_with_energy(spec, s, rank)
    sigma_w = float(s[0])
    # ΔW = A Bᵀ with a prescribed spectrum scaled around the (relative) threshold
    values = spectrum(kind, r, spec.threshold_scale * sigma_w, seed=seed)
    target = matrix_with_spectrum(m, n, values, seed=seed + 100, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(target, full_matrices=False)
    g = torch.Generator().manual_seed(seed)
    mix = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]  # factors not in SVD form
    dtype = torch.float64 if kind == "huge" else torch.float32  # float32 cannot resolve a 1e7 range
    left = ((U[:, :r] * S[:r]) @ mix).to(dtype)
    right = (Vh[:r].T @ mix).to(dtype)
    delta = (left.double() @ right.double().T)
    ref = _reference(delta, W, spec)
    k, (new_left, new_right) = apply_factors(left, right, sigma_w, spec, W=W)
    got = new_left.double() @ new_right.double().T
    # rounding at ΔW's own scale (ε‖ΔW‖) plus float32's relative error on the result
    eps = torch.finfo(dtype).eps
    tol = 2e-5 * float(torch.linalg.matrix_norm(ref, 2)) + 50 * eps * float(torch.linalg.matrix_norm(delta, 2))
    assert tol < 0.01 * float(torch.linalg.matrix_norm(ref, 2))  # the check means something
    assert float(torch.linalg.matrix_norm(got - ref, 2)) <= tol
    # the count is the number of values of the protected ΔW above c·σ_W
    protected = _reference(delta, W, Restraint("none", protect_energy=spec.protect_energy,
                                                protect_damp=spec.protect_damp)) if spec.protects else delta
    if spec.fn != "none":
        sv = torch.linalg.svdvals(protected)
        t = spec.threshold_scale * sigma_w
        clear = (sv - t).abs() > 1e-5 * float(sv[0])
        assert int((sv[clear] > t).sum()) <= k <= int((sv > t - 1e-5 * float(sv[0])).sum())
    # the dense path gives the same matrix
    k_dense, out = apply_dense(delta.to(dtype).clone(), sigma_w, spec, W=W)
    assert float(torch.linalg.matrix_norm(out.double() - ref, 2)) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_subspace_of_a_low_precision_w_is_that_of_w_as_stored(dtype):
    W, s = _w_with_gapped_spectrum(48, 72, seed=3, dtype=dtype)
    energy = _energy_between_steps(torch.linalg.svdvals(W.double()), 5)
    sub = dominant_subspace(W, energy)
    PU, PV, r = _reference_projectors(W.double(), energy)
    assert sub.rank == r == 5
    torch.testing.assert_close(sub.left @ sub.left.T, PU, atol=1e-9, rtol=0)
    torch.testing.assert_close(sub.right @ sub.right.T, PV, atol=1e-9, rtol=0)
    assert sub.captured >= energy and sub.sigma_r > sub.sigma_next


@pytest.mark.parametrize(("m", "n"), [(48, 72), (72, 48), (40, 40)])
def test_subspace_certificate_bounds_the_true_angle(m, n):
    W, s = _w_with_gapped_spectrum(m, n, seed=11)
    for r in (1, 5, 12):
        sub = dominant_subspace(W, _energy_between_steps(s, r))
        PU, PV, r_ref = _reference_projectors(W.double(), sub.energy)
        assert sub.rank == r_ref == r
        # both sides orthonormal, and within the certified angle of the exact subspaces
        for basis, P in ((sub.left, PU), (sub.right, PV)):
            torch.testing.assert_close(basis.T @ basis, torch.eye(r, dtype=torch.float64), atol=1e-12, rtol=0)
            sin = float(torch.linalg.matrix_norm(basis @ basis.T - P, 2))
            assert sin <= sub.angle_bound + 1e-13 and sub.angle_bound < 1e-9
        assert sub.sigma_r == pytest.approx(float(torch.linalg.svdvals(W.double())[r - 1]), rel=1e-12)


def test_subspace_certificate_is_void_when_the_cut_splits_equal_values():
    s = torch.tensor([5.0, 3.0, 3.0, 3.0, 1.0, 0.5], dtype=torch.float64)
    W = matrix_with_spectrum(30, 20, s, seed=4, dtype=torch.float64)
    sub = dominant_subspace(W, float((s[:2] ** 2).sum() / (s**2).sum()))  # r = 2: inside the 3-fold value
    assert sub.rank == 2 and sub.angle_bound == 1.0 and sub.sigma_r == pytest.approx(sub.sigma_next)


def test_energy_rank_by_hand():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 9 / 14 + 1e-6) == 2
    assert energy_rank(s, 13 / 14) == 2
    assert energy_rank(s, 1.0) == 3  # the zero value is never needed
    assert energy_rank(torch.zeros(3), 0.5) == 0


def test_full_damp_removes_exactly_the_protected_components():
    W, s = _w_with_gapped_spectrum(40, 60, seed=5)
    sub = dominant_subspace(W, _energy_between_steps(s, 5))
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(40, 7, generator=g), torch.randn(60, 7, generator=g)
    A2, B2 = protect_factors(A, B, sub, 1.0)
    new = A2.double() @ B2.double().T
    assert float((sub.left.T @ new).abs().max()) < 1e-5
    assert float((new @ sub.right).abs().max()) < 1e-5
    # d = 0 changes nothing; the rank never grows
    A0, B0 = protect_factors(A, B, sub, 0.0)
    torch.testing.assert_close(A0 @ B0.T, A @ B.T)
    assert A2.shape == A.shape


def test_no_op_returns_the_same_factors():
    W, s = _w_with_gapped_spectrum(30, 40, seed=7)
    g = torch.Generator().manual_seed(1)
    left, right = 1e-3 * torch.randn(30, 3, generator=g), torch.randn(40, 3, generator=g)
    k, (a, b) = apply_factors(left, right, float(s[0]), Restraint("log", threshold_scale=1.0))
    assert k == 0 and a is left and b is right


def test_threshold_scale_one_is_prune():
    W, s = _w_with_gapped_spectrum(64, 48, seed=2)
    values = spectrum("spikes", 8, float(s[0]))
    delta = matrix_with_spectrum(64, 48, values, seed=9, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    left, right = (U[:, :8] * S[:8]).float(), Vh[:8].T.float()
    _, (a, b) = apply_factors(left, right, float(s[0]), Restraint("log", 1.2))
    ref = reference.restrain(delta, float(s[0]), 1.2)
    assert float(torch.linalg.matrix_norm(a.double() @ b.double().T - ref, 2)) < 2e-5 * float(ref.norm())


def test_parse_restraint_and_errors():
    base = Restraint("log", 1.5)
    assert parse_restraint("scale=0.5", base) == Restraint("log", 1.5, threshold_scale=0.5)
    spec = parse_restraint("restrain=none, protect=0.9, damp=1", base)
    assert spec == Restraint("none", 1.5, protect_energy=0.9, protect_damp=1.0)
    assert parse_restraint(spec.spec(), Restraint()) == Restraint("none", protect_energy=0.9)
    assert parse_restraint("protect=none", spec).protect_energy is None
    assert Restraint().label() == "PRUNE log α=1.2"
    for bad in ("scale", "size=2", "alpha=x", "scale=0", "protect=1.5", "damp=2", "restrain=cubic", "alpha=1"):
        with pytest.raises(ValueError):
            parse_restraint(bad, base)
    with pytest.raises(ValueError, match="subspace"):
        apply_factors(torch.ones(3, 1), torch.ones(4, 1), 1.0, Restraint(protect_energy=0.5))


def test_restrain_model_with_a_variant_matches_the_reference():
    from prune_ext.posthoc import PosthocError, restrain_model

    W, s = _w_with_gapped_spectrum(48, 64, seed=11)
    spec = Restraint("log", 1.5, threshold_scale=0.5, protect_energy=_energy_between_steps(s, 5), protect_damp=0.7)
    values = spectrum("spikes", 6, 0.5 * float(s[0]), seed=4)
    delta = matrix_with_spectrum(48, 64, values, seed=12, dtype=torch.float64)
    edited = {"w": (W.double() + delta).float()}
    delta_stored = edited["w"].double() - W.double()  # ΔW as the float32 checkpoints hold it
    restrain_model({"w": W}, edited, alpha=1.5, threshold_scale=0.5, protect_energy=spec.protect_energy,
                   protect_damp=0.7)
    want = W.double() + _reference(delta_stored, W, spec)
    assert float((edited["w"].double() - want).abs().max()) <= 1e-5 * float(want.abs().max())
    with pytest.raises(PosthocError, match="threshold_scale"):
        restrain_model({"w": W}, {"w": W + 1}, threshold_scale=-1.0)
