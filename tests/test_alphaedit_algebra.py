"""AlphaEdit's projector and solve, and ENCORE's norm-constrained MEMIT solve, by their defining algebra.

Fresh random inputs, float64 references: P is the projector onto the eigenvectors of E[kkᵀ] below
the threshold; Δ = R K₁ᵀ P (K_pK_pᵀP + K₁K₁ᵀP + ρI)⁻¹ against a dense solve of that very formula;
Δ P⊥ = 0; the objective's gradient vanishes at the returned update; later batches spare earlier keys.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prune_ext.editing.alphaedit import AlphaEdit
from prune_ext.editing.hparams import AlphaEditHyperParams
from prune_ext.editing.memit import memit_right_factor
from prune_ext.editing.nullspace import NullSpace, ProjectedGram, projected_solve

D = torch.float64


def second_moment(n: int, small: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E[kkᵀ] = U diag(λ) Uᵀ with ``small`` eigenvalues in [1e-4, 1e-3) and the rest in [0.1, 2)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))[0]
    lam = torch.cat([1e-4 + 9e-4 * torch.rand(small, generator=g, dtype=D),
                     0.1 + 1.9 * torch.rand(n - small, generator=g, dtype=D)])
    return (u * lam) @ u.T, u[:, :small], lam


def dense_reference(
    p: torch.Tensor, k_prev: torch.Tensor, k1: torch.Tensor, r: torch.Tensor, rho: float
) -> torch.Tensor:
    """R K₁ᵀ P (K_pK_pᵀP + K₁K₁ᵀP + ρI)⁻¹, literally (X M = B solved as Mᵀ Xᵀ = Bᵀ)."""
    m = k_prev @ k_prev.T @ p + k1 @ k1.T @ p + rho * torch.eye(p.shape[0], dtype=D)
    b = r @ k1.T @ p
    return torch.linalg.solve(m.T, b.T).T


@pytest.mark.parametrize(("n", "small"), [(40, 9), (40, 31), (33, 33 // 2)])
def test_null_space_is_the_small_eigenvectors_stored_by_the_smaller_factor(n: int, small: int) -> None:
    mom2, u_small, _ = second_moment(n, small, seed=n + small)
    space = NullSpace.from_second_moment(mom2, threshold=1e-2)
    assert space.dim == small
    assert space.basis.shape == (n, min(small, n - small))  # O(n · min(r, n − r)), never n × n
    assert space.complement == (small > n - small)
    p = space.dense()
    torch.testing.assert_close(p, u_small @ u_small.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(p @ p, p, rtol=0, atol=1e-12)
    x = torch.randn(n, 5, dtype=D)
    torch.testing.assert_close(space.project(x), p @ x, rtol=0, atol=1e-12)


def test_energy_selection_and_bad_thresholds() -> None:
    mom2, _, lam = second_moment(30, 6, seed=3)
    space = NullSpace.from_second_moment(mom2, energy=0.05)
    evals = torch.sort(lam).values
    share = torch.cumsum(evals, 0) / evals.sum()
    assert share[space.dim - 1] <= 0.05 < share[space.dim]
    with pytest.raises(ValueError, match="empty null space"):
        NullSpace.from_second_moment(mom2, threshold=1e-5)  # below every eigenvalue
    with pytest.raises(ValueError, match="empty null space"):
        NullSpace.from_second_moment(mom2, energy=1e-9)
    with pytest.raises(ValueError, match="exactly one"):
        NullSpace.from_second_moment(mom2)
    with pytest.raises(ValueError, match="square"):
        NullSpace.from_second_moment(mom2[:, :5], threshold=1.0)


@pytest.mark.parametrize(("n", "small"), [(48, 10), (48, 40)])
@pytest.mark.parametrize("rho", [10.0, 1e-3])
def test_projected_solve_matches_the_dense_formula(n: int, small: int, rho: float) -> None:
    g = torch.Generator().manual_seed(7 * n + small)
    mom2, _, _ = second_moment(n, small, seed=n * small)
    space = NullSpace.from_second_moment(mom2, threshold=1e-2)
    p = space.dense()
    k_prev = torch.randn(n, 13, generator=g, dtype=D)
    k1 = torch.randn(n, 4, generator=g, dtype=D)
    r = torch.randn(7, 4, generator=g, dtype=D)
    previous = ProjectedGram.empty(space)
    previous.add(space, k_prev[:, :6])
    previous.add(space, k_prev[:, 6:])  # accumulated over two earlier batches
    assert previous.count == 13
    left, right = projected_solve(space, previous, k1, r, rho)
    delta = left @ right.T
    reference = dense_reference(p, k_prev, k1, r, rho)
    gram = k_prev @ k_prev.T + k1 @ k1.T
    cond = float(torch.linalg.cond(p @ gram @ p + rho * torch.eye(n, dtype=D)))  # the reference's own error
    tol = 100 * torch.finfo(D).eps * cond * reference.abs().max().item()
    torch.testing.assert_close(delta, reference, rtol=0, atol=tol)
    # Δ P⊥ = 0 to rounding: keys outside the null space are never touched
    p_perp = torch.eye(n, dtype=D) - p
    assert (delta @ p_perp).abs().max() <= 1e-12 * delta.abs().max()
    # the gradient of ‖ΔK₁ − R‖² + ‖ΔK_p‖² + ρ‖Δ‖² over Δ = Δ'P vanishes (∂/∂Δ' = 2(ΔG + ρΔ − RK₁ᵀ)P)
    grad = (delta @ gram + rho * delta - r @ k1.T) @ p
    assert grad.abs().max() <= 1e-9 * (r @ k1.T).abs().max()


def test_objective_gradient_by_autograd() -> None:
    """The same stationarity, by autograd on the objective itself (Δ = Δ'P, Δ' free)."""
    g = torch.Generator().manual_seed(11)
    n, rho = 20, 0.5
    mom2, _, _ = second_moment(n, 8, seed=5)
    space = NullSpace.from_second_moment(mom2, threshold=1e-2)
    p = space.dense()
    k_prev, k1, r = (torch.randn(*s, generator=g, dtype=D) for s in ((n, 9), (n, 3), (5, 3)))
    previous = ProjectedGram.empty(space)
    previous.add(space, k_prev)
    left, right = projected_solve(space, previous, k1, r, rho)
    free = (left @ right.T).clone().requires_grad_(True)
    delta = free @ p
    loss = ((delta @ k1 - r) ** 2).sum() + ((delta @ k_prev) ** 2).sum() + rho * (delta**2).sum()
    loss.backward()
    assert free.grad is not None and free.grad.abs().max() <= 1e-10 * (r @ k1.T).abs().max()


def test_later_batches_spare_earlier_keys() -> None:
    """After batch 2, Δ₂ k ≈ 0 for batch 1's keys (to the ridge's effect, ρ / (ρ + ‖Pk‖²))."""
    g = torch.Generator().manual_seed(2)
    n, rho = 64, 1e-2
    mom2, u_small, _ = second_moment(n, 40, seed=9)
    space = NullSpace.from_second_moment(mom2, threshold=1e-2)
    k_a = u_small @ torch.randn(40, 5, generator=g, dtype=D) + 0.1 * torch.randn(n, 5, generator=g, dtype=D)
    k_b = u_small @ torch.randn(40, 5, generator=g, dtype=D) + 0.1 * torch.randn(n, 5, generator=g, dtype=D)
    r_a, r_b = torch.randn(8, 5, generator=g, dtype=D), torch.randn(8, 5, generator=g, dtype=D)
    gram = ProjectedGram.empty(space)
    left, right = projected_solve(space, gram, k_a, r_a, rho)
    delta_a = left @ right.T
    torch.testing.assert_close(delta_a @ k_a, r_a, rtol=0, atol=1e-2)  # batch 1 is written
    gram.add(space, k_a)
    left, right = projected_solve(space, gram, k_b, r_b, rho)
    delta_b = left @ right.T
    torch.testing.assert_close(delta_b @ k_b, r_b, rtol=0, atol=1e-2)  # batch 2 is written ...
    assert (delta_b @ k_a).norm() < 1e-3 * (delta_b @ k_b).norm()  # ... and spares batch 1
    forgetful = projected_solve(space, ProjectedGram.empty(space), k_b, r_b, rho)
    assert ((forgetful[0] @ forgetful[1].T) @ k_a).norm() > 1e2 * (delta_b @ k_a).norm()


def test_memit_norm_constraint_closed_form() -> None:
    """ENCORE's μ: Δ = R Kᵀ (λC + KKᵀ + μI)⁻¹ zeroes the gradient of λ tr(ΔCΔᵀ) + ‖ΔK − R‖² + μ‖Δ‖²,
    and shrinks ‖Δ‖_F as μ grows."""
    g = torch.Generator().manual_seed(4)
    n, b, d_out, lam = 30, 4, 9, 3.0
    mom2, _, _ = second_moment(n, 10, seed=1)
    keys, resid = torch.randn(b, n, generator=g, dtype=D), torch.randn(b, d_out, generator=g, dtype=D)
    norms = []
    for mu in (0.0, 0.7, 5.0):
        hp = SimpleNamespace(mom2_update_weight=lam, norm_constraint=mu)
        delta = (resid.T @ memit_right_factor(hp, keys, mom2).T).clone().requires_grad_(True)
        fit = ((delta @ keys.T - resid.T) ** 2).sum()
        loss = lam * torch.trace(delta @ mom2 @ delta.T) + fit + mu * (delta**2).sum()
        loss.backward()
        assert delta.grad is not None and delta.grad.abs().max() <= 1e-10 * resid.abs().max() * keys.abs().max()
        norms.append(float(delta.detach().norm()))
    assert norms[0] > norms[1] > norms[2]


def test_hparams_reject_bad_values() -> None:
    base = {"layers": (1,), "module_template": "m.{}", "block_template": "b.{}"}
    assert AlphaEditHyperParams(**base).nullspace_threshold == 2e-2 and AlphaEditHyperParams(**base).l2 == 10.0
    for bad, match in [({"l2": 0.0}, "l2"), ({"nullspace_threshold": -1.0}, "nullspace_threshold"),
                       ({"nullspace_energy": 1.5}, "nullspace_energy"), ({"mom2_adjustment": False}, "statistics"),
                       ({"norm_constraint": -1.0}, "norm_constraint"), ({"mpes_patience": 0}, "mpes_patience")]:
        with pytest.raises(ValueError, match=match):
            AlphaEditHyperParams(**base, **bad)
    assert AlphaEdit.name == "alphaedit" and AlphaEdit.hparams_class is AlphaEditHyperParams
