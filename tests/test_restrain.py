"""The core operator against the float64 full-SVD reference, edge cases, bad input, opcheck."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SPECTRA, matrix_with_spectrum, spectrum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prune_ext
import prune_ext.ops  # noqa: F401  (loads _C, which registers torch.ops.prune_ext)
from prune_ext import reference
from prune_ext.bench import make_update

# Relative Frobenius error allowed against the float64 reference, per input dtype. Half types are
# compared with the reference of the rounded input, and can only be as exact as their rounding.
TOL = {torch.float32: 1e-4, torch.float64: 1e-7, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def within_tolerance(out: torch.Tensor, ref: torch.Tensor, delta_norm: float, dtype: torch.dtype,
                     rounding: float = 20) -> bool:
    """TOL relative to the reference, plus the rounding of the working precision at ΔW's own scale:
    when the restraint removes most of ΔW's norm (σ1 = 1e6 σ_W, say), a float32 ΔW carries an absolute
    error of ε‖ΔW‖ before anything is computed, and no float32 algorithm can do better."""
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    err = (out.double().cpu() - ref).norm().item()
    return err <= TOL[dtype] * ref.norm().item() + rounding * eps * delta_norm


def count_above(delta: torch.Tensor, t: float) -> tuple[int, int]:
    """How many singular values are surely above t, and how many may be: values within rounding of t
    fall on either side — rounding relative to t, and the working precision's rounding at ΔW's own
    scale (ε σ1: float32 cannot place a value of 33 to better than ±4 when σ1 = 3e7)."""
    sv = torch.linalg.svdvals(delta.double().cpu())
    eps = torch.finfo(torch.float64 if delta.dtype == torch.float64 else torch.float32).eps
    tol = t * (1e-9 if delta.dtype == torch.float64 else 1e-4) + 20 * eps * (sv[0].item() if sv.numel() else 0)
    return int((sv > t + tol).sum()), int((sv > t - tol).sum())


def check_against_reference(delta: torch.Tensor, t: float, **kw) -> prune_ext.RestrainInfo:
    ref = reference.restrain(delta, t, kw.get("alpha", 1.2), fn=kw.get("fn", "log"), beta=kw.get("beta", 2.0))
    n_sure, n_maybe = count_above(delta, t)
    norm = delta.double().norm().item()
    out, info = prune_ext.restrain(delta, t, return_info=True, **kw)
    assert out is delta
    assert within_tolerance(delta, ref, norm, delta.dtype), (info, rel_err(delta, ref))
    assert info.certified and info.sigma_next_bound <= t * (1 + 1e-5)
    if delta.dtype in (torch.float32, torch.float64):
        assert n_sure <= info.restrained <= n_maybe, (n_sure, n_maybe, info)
    return info


@pytest.mark.parametrize("kind", SPECTRA)
@pytest.mark.parametrize("shape,rank", [((300, 500), 20), ((500, 300), 150), ((160, 120), 120), ((40, 70), 30)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(device, kind, shape, rank, dtype):
    t = 2.5
    d = matrix_with_spectrum(*shape, spectrum(kind, rank, t, seed=rank), seed=rank, dtype=dtype, device=device)
    check_against_reference(d, t)


@pytest.mark.parametrize("fn,kw", [("log", {"alpha": math.e}), ("log", {"alpha": 1.5}), ("linear", {"beta": 2.0}),
                                   ("linear", {"beta": 5.0})])
def test_restraint_functions(device, fn, kw):
    d = matrix_with_spectrum(400, 256, spectrum("spikes", 40, 1.0), device=device, dtype=torch.float64)
    check_against_reference(d, 1.0, fn=fn, **kw)


def test_steep_log_restraint_at_a_tiny_threshold_is_computed_in_float64(device):
    """F'(t) = 1/(t ln α) ≈ 960 here: float32 rounding of the values clustered at t would be magnified
    past the tolerance (a case the long property runs found), so the restraint runs in float64."""
    t, alpha = 0.01953125, 1.0546875
    d = matrix_with_spectrum(520, 520, spectrum("clustered", 32, t, seed=1), seed=1, device=device)
    info = check_against_reference(d, t, alpha=alpha)
    assert info.method == "randomized" and d.dtype == torch.float32


def test_randomized_path_grows_and_certifies(device):
    # rank 200 > the first sketch (64): the subspace must grow, and stay well below min(m, n). It may
    # certify below the rank (the last values are 0.01 t, so a residual of ~0.1 certifies), and then the
    # changed triplets are sharpened until accurate, which check_against_reference checks.
    t = 3.0
    d = matrix_with_spectrum(1200, 1600, spectrum("decaying", 200, t), device=device)
    info = check_against_reference(d, t)
    assert info.method == "randomized" and 64 < info.rank_explored < 600 and info.certified
    assert info.ritz_residual < 1e-5 * d.norm().item()


def test_full_rank_falls_back_to_dense(device):
    g = torch.Generator().manual_seed(3)
    d = torch.randn(300, 200, generator=g, dtype=torch.float64).to(device)
    t = 0.5 * torch.linalg.svdvals(d)[0].item()
    info = check_against_reference(d, t)
    assert info.method == "dense"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(device, dtype):
    t = 1.0
    d = matrix_with_spectrum(200, 320, spectrum("decaying", 30, t), device=device, dtype=dtype)
    check_against_reference(d, t)
    assert d.dtype == dtype


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_any_strides(device, layout):
    t = 2.0
    base = matrix_with_spectrum(320, 600, spectrum("decaying", 25, t), device=device)
    if layout == "transposed":  # GPT-2's Conv1D stores W as in × out: restrain a .T view
        storage = base.T.contiguous()
        view = storage.T
    else:
        storage = torch.zeros(320, 1200, device=device)
        storage[:, ::2] = base
        view = storage[:, ::2]
    ref = reference.restrain(view, t)
    out = prune_ext.restrain(view, t)
    assert out is view and out.data_ptr() == view.data_ptr()
    assert rel_err(view, ref) <= 1e-4
    if layout == "strided":
        assert torch.count_nonzero(storage[:, 1::2]) == 0  # untouched between the strides


def test_nothing_above_threshold_is_bitwise_noop(device):
    t = 1.0
    # Frobenius norm far above t but σmax below it: the randomized path must prove it and write nothing
    d = matrix_with_spectrum(300, 400, spectrum("below", 100, t), device=device)
    assert d.norm() > t
    before = d.clone()
    _, info = prune_ext.restrain(d, t, return_info=True)
    assert info.restrained == 0 and info.certified
    assert torch.equal(d, before)
    small = matrix_with_spectrum(50, 60, torch.tensor([0.5, 0.1]), device=device)
    keep = small.clone()
    _, info = prune_ext.restrain(small, t, return_info=True)
    assert info.method == "norm-bound" and torch.equal(small, keep)


def test_info_reports_what_changed(device):
    t = 1.0
    sig = torch.tensor([5.0, 3.0, 2.0, 0.5, 0.25], dtype=torch.float64)
    d = matrix_with_spectrum(200, 150, sig, device=device, dtype=torch.float64)
    _, info = prune_ext.restrain(d, t, 1.5, return_info=True)
    assert info.restrained == 3
    torch.testing.assert_close(info.sigma_before, sig[:3], rtol=1e-10, atol=0)
    torch.testing.assert_close(info.sigma_after, reference.restrained_values(sig[:3], t, 1.5), rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.linalg.svdvals(d.cpu())[:3], info.sigma_after, rtol=1e-10, atol=0)
    assert info.sigma_next_bound >= 0.5 - 1e-9


def test_deterministic_for_a_seed(device):
    t = 2.0
    d = matrix_with_spectrum(400, 500, spectrum("decaying", 60, t), device=device)
    a, b, c = d.clone(), d.clone(), d.clone()
    prune_ext.restrain(a, t, generator=torch.Generator().manual_seed(7))
    prune_ext.restrain(b, t, generator=torch.Generator().manual_seed(7))
    prune_ext.restrain(c, t, seed=123)
    assert torch.equal(a, b)
    assert rel_err(c, a.double().cpu()) < 1e-5


def test_fixed_rank(device):
    t = 2.0
    d = matrix_with_spectrum(400, 500, spectrum("decaying", 30, t), device=device)
    ref = reference.restrain(d, t)
    _, info = prune_ext.restrain(d, t, rank=40, power_iters=1, return_info=True)
    assert info.rank_explored == 40 and info.power_iters == 1 and info.certified
    assert rel_err(d, ref) < 1e-4


def test_fixed_rank_reads_nothing_back_and_says_when_the_rank_is_too_small(device):
    """Fixed rank: the op returns all `rank` Ritz values (a static shape) and its certificate says whether
    the rank sufficed; too small a rank still restrains the values it found, never any below t."""
    t = 1.0
    d = matrix_with_spectrum(300, 400, spectrum("decaying", 60, t), device=device)
    before, after, stats = prune_ext.ops.restrain_(d.clone(), t, 0, 1.2, 16, 10, 2, 0)
    assert before.shape == after.shape == (16,) and stats[1].item() == 16
    k = int(stats[0].item())
    assert stats[3].item() == 0 and k == 16  # 20 values are above t: the bound cannot certify
    assert torch.equal(before[k:], after[k:]) and bool((after[:k] != before[:k]).all())
    sv = torch.linalg.svdvals(d.double().cpu())
    assert bool((before.cpu() <= sv[:16] * (1 + 1e-5)).all())  # Ritz values are lower bounds
    assert torch.allclose(before[:8].cpu(), sv[:8], rtol=1e-3)  # the top ones accurate after 2 iterations


def test_fixed_rank_nothing_above_is_bitwise_noop(device):
    d = matrix_with_spectrum(300, 200, spectrum("below", 50, 1.0), device=device)
    keep = d.clone()
    _, info = prune_ext.restrain(d, 1.0, rank=64, return_info=True)  # ΔW has rank 50: certified
    assert torch.equal(d, keep) and info.restrained == 0 and info.certified


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fixed_rank_non_finite_input_is_left_alone_and_not_certified(device, bad):
    """No host read in fixed-rank mode, so no error: the matrix stays as it was and the info says so."""
    d = _with(torch.randn(300, 400, generator=torch.Generator().manual_seed(3)), (5, 6), bad).to(device)
    keep = d.clone()
    _, info = prune_ext.restrain(d, 0.5, rank=32, return_info=True)
    assert torch.equal(d.isnan(), keep.isnan()) and torch.equal(d.nan_to_num(), keep.nan_to_num())
    assert not info.certified and info.restrained == 0 and math.isnan(info.sigma_next_bound)


def test_sketch_is_random_signs_deterministic_and_addressed_by_entry(device):
    like = torch.empty(0, device=device)
    a = prune_ext.ops._ops._sketch(like, 300, 200, 7, 0)
    assert a.device.type == device and a.dtype == torch.float32
    assert torch.equal(a.abs(), torch.ones_like(a))
    assert torch.equal(a, prune_ext.ops._ops._sketch(like, 300, 200, 7, 0))
    assert not torch.equal(a, prune_ext.ops._ops._sketch(like, 300, 200, 8, 0))
    # entry i of the stream for a seed is the same whatever the shape and offset it is drawn with
    assert torch.equal(a[200:], prune_ext.ops._ops._sketch(like, 100, 200, 7, 200 * 200))
    assert torch.equal(a.flatten()[37:], prune_ext.ops._ops._sketch(like, 1, 300 * 200 - 37, 7, 37).flatten())
    x = prune_ext.ops._ops._sketch(torch.empty(0, dtype=torch.float64, device=device), 500, 400, 1, 0).cpu()
    assert x.dtype == torch.float64
    # balanced signs (|mean| is about 1/sqrt(2e5) = 0.0022), nearly orthogonal columns, no repeats
    assert abs(x.mean().item()) < 0.01
    gram = x.T @ x / x.shape[0]
    assert (gram - torch.eye(400, dtype=torch.float64)).abs().max().item() < 0.25
    assert torch.unique(x, dim=1).shape[1] == 400


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,cols", [(50, 333, 40), (7, 40, 40), (3, 39, 40), (20, 1000, 64), (9, 130, 1)])
def test_fold_sketch_matches_its_definition(device, dtype, m, n, cols):
    """_fold_sketch(A) = A S: S has one ±1 per row, its signs the sketch entries offset…offset + n − 1, and
    block f (rows f·cols…) is a rotation of the identity; row-major and column-major A give the same Y."""
    fold = prune_ext.ops._ops._fold_sketch
    S = fold(torch.eye(n, dtype=dtype, device=device), cols, 7, 123).cpu()
    assert S.shape == (n, cols)
    assert torch.equal((S != 0).sum(1), torch.ones(n, dtype=torch.long))
    signs = prune_ext.ops._ops._sketch(torch.empty(0, dtype=dtype), 1, n, 7, 123)[0]
    assert torch.equal(S.sum(1), signs)
    where = S.abs().argmax(1)
    for f0 in range(0, n, cols):
        block = where[f0 : f0 + cols]
        rotation = block[0].item()
        assert torch.equal(block, (torch.arange(len(block)) + rotation) % cols)
    assert not torch.equal(S, fold(torch.eye(n, dtype=dtype, device=device), cols, 8, 123).cpu())
    A = torch.randn(m, n, dtype=dtype, generator=torch.Generator().manual_seed(m)).to(device)
    Y = fold(A, cols, 7, 123)
    assert Y.dtype == dtype and Y.shape == (m, cols)
    torch.testing.assert_close(Y.cpu(), A.cpu() @ S)
    torch.testing.assert_close(fold(A.t().contiguous().t(), cols, 7, 123), Y)  # the ATen composition


def test_delta_on_columns_that_collide_in_the_first_fold_is_still_exact(device):
    """A ΔW whose row space lies on columns the first fold sketch adds together is certified and exact all
    the same: the certificate never depends on the sketch. (Every 64th column: each is the first of its
    block, so the first, 64-column sketch puts the 30 of them where 30 random rotations say, and some
    collide: that sketch sees less than the rank of ΔW, checked below.)"""
    t, n = 1.0, 64 * 40
    g = torch.Generator().manual_seed(5)
    cols = torch.arange(0, n, 64)[:30]
    U = torch.linalg.qr(torch.randn(300, 30, generator=g, dtype=torch.float64))[0]
    d = torch.zeros(300, n, dtype=torch.float64)
    d[:, cols] = U * torch.logspace(1, -1, 30, dtype=torch.float64)
    first = prune_ext.ops._ops._fold_sketch(d, 64, prune_ext.restraint.DEFAULT_SEED, 0)
    assert torch.linalg.matrix_rank(first).item() < 30
    info = check_against_reference(d.to(device=device, dtype=torch.float32), t)
    assert info.restrained > 0


def test_summary_of_a_round_matches_its_definition(device):
    """_summarize_rounds against the definition: k, F, coefficients, the Weyl bound, norm-bound and NaN rows."""
    t, band = [1.0, 2.0, 5.0, 1.0], 1 + 1e-6
    s = torch.tensor([[3.0, 2.0, 0.5, 0.1], [3.0, 2.5, 2.0, 1.0], [4.0, 3.0, 1.0, 0.0], [2.0, 1.0, 0.0, 0.0]],
                     dtype=torch.float64, device=device)
    resid_sq = torch.tensor([0.25, 0.0, 0.0, 1.0], dtype=torch.float64, device=device)
    frob = torch.tensor([4.0, 5.0, 4.9, float("nan")], dtype=torch.float64, device=device)
    before, after, coeff, stats = prune_ext.ops._ops._summarize_rounds(s, resid_sq, frob, t, band, 0, 1.2, 3)
    before, after, coeff, stats = before.cpu(), after.cpu(), coeff.cpu(), stats.cpu()
    sc = s.cpu()
    assert torch.equal(before, sc)
    ref = prune_ext.restrain_values(sc[0], 1.0)
    assert torch.allclose(after[0], ref) and torch.allclose(coeff[0, :2], (sc[0, :2] - ref[:2]) / sc[0, :2])
    assert coeff[0, 2:].abs().sum() == 0
    assert stats[0].tolist()[:7] == [2, 4, pytest.approx(math.sqrt(0.5**2 + 0.25)), 1, 1, 3, 0.5]
    assert stats[1, 0] == 2 and stats[1, 2] == 2.0 and stats[1, 3] == 1  # 2.0 is not above t = 2.0
    assert stats[2, 4] == 3 and stats[2, 0] == 0 and coeff[2].abs().sum() == 0  # ‖ΔW‖_F ≤ t: norm bound
    assert stats[3, 0] == 0 and stats[3, 3] == 0 and math.isnan(stats[3, 2]) and coeff[3].abs().sum() == 0


def test_small_svd_matches_svd_and_flags_nan(device):
    T = torch.randn(3, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    T[2] = T[2] @ torch.diag(torch.logspace(0, -12, 20, dtype=torch.float64, device=device))  # graded
    U, S, Vh, info = prune_ext.ops._ops._small_svd(T)
    assert torch.allclose(S, torch.linalg.svdvals(T), rtol=1e-10)
    assert torch.allclose(U @ torch.diag_embed(S) @ Vh, T, atol=1e-12)
    eye = torch.eye(20, dtype=torch.float64, device=device)
    assert torch.allclose(U.mT @ U, eye.expand(3, 20, 20), atol=1e-12)
    assert torch.allclose(Vh @ Vh.mT, eye.expand(3, 20, 20), atol=1e-12)
    assert info.tolist() == [0, 0, 0]
    T[1, 0, 0] = float("nan")
    *_, info = prune_ext.ops._ops._small_svd(T)
    assert info[1] != 0 and info[0] == 0 and info[2] == 0


def test_empty_is_noop(device):
    d = torch.empty(0, 5, device=device)
    _, info = prune_ext.restrain(d, 1.0, return_info=True)
    assert info.restrained == 0 and d.shape == (0, 5)


GOOD = dict(W_sigma_max=1.0, alpha=1.2)


def _with(t: torch.Tensor, at: tuple[int, int], value: float) -> torch.Tensor:
    t[at] = value
    return t


@pytest.mark.parametrize(
    "make,kwargs,exc,match",
    [
        (lambda: torch.tensor([[1.0, float("nan")], [0.0, 1.0]]) * 10, GOOD, ValueError, "NaN or Inf"),
        (lambda: torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), GOOD, ValueError, "NaN or Inf"),
        # large enough for the randomized path (adaptive and fixed rank), float64 too
        (lambda: _with(torch.randn(300, 400, generator=torch.Generator().manual_seed(1)), (7, 9), float("nan")),
         GOOD, ValueError, "NaN or Inf"),
        (lambda: _with(torch.randn(400, 300, dtype=torch.float64), (0, 0), float("inf")), GOOD, ValueError,
         "NaN or Inf"),
        (lambda: torch.ones(4), GOOD, ValueError, "2-D"),
        (lambda: torch.ones(2, 3, 4), GOOD, ValueError, "2-D"),
        (lambda: torch.ones(3, 3, dtype=torch.int64), GOOD, TypeError, "floating"),
        (lambda: torch.ones(3, 3, dtype=torch.bool), GOOD, TypeError, "floating"),
        (lambda: torch.ones(3, 3, dtype=torch.complex64), GOOD, TypeError, "floating"),
        (lambda: torch.ones(3, 3), dict(W_sigma_max=1.0, alpha=1.0), ValueError, "alpha"),
        (lambda: torch.ones(3, 3), dict(W_sigma_max=1.0, alpha=0.5), ValueError, "alpha"),
        (lambda: torch.ones(3, 3), dict(W_sigma_max=1.0, alpha=float("nan")), ValueError, "alpha"),
        (lambda: torch.ones(3, 3), dict(W_sigma_max=1.0, alpha=float("inf")), ValueError, "alpha"),
        (lambda: torch.ones(3, 3), dict(W_sigma_max=1.0, fn="linear", beta=1.0), ValueError, "beta"),
        (lambda: torch.ones(3, 3), dict(W_sigma_max=0.0), ValueError, "W_sigma_max"),
        (lambda: torch.ones(3, 3), dict(W_sigma_max=-1.0), ValueError, "W_sigma_max"),
        (lambda: torch.ones(3, 3), dict(W_sigma_max=float("nan")), ValueError, "W_sigma_max"),
        (lambda: torch.ones(3, 3), dict(W_sigma_max=float("inf")), ValueError, "W_sigma_max"),
        (lambda: torch.ones(3, 3), dict(W_sigma_max=1.0, fn="cubic"), ValueError, "fn"),
        (lambda: [[1.0, 2.0]], GOOD, TypeError, "Tensor"),
    ],
)
def test_bad_input_is_rejected_and_leaves_delta_untouched(make, kwargs, exc, match):
    delta = make()
    before = delta.clone() if isinstance(delta, torch.Tensor) else None
    with pytest.raises(exc, match=match):
        prune_ext.restrain(delta, **kwargs)
    if before is not None:
        assert torch.equal(delta.view(torch.uint8) if delta.dtype == torch.bool else delta, before) or (
            torch.isnan(before).any())
        if torch.isnan(before).any():
            assert torch.equal(torch.isnan(delta), torch.isnan(before))
            assert torch.equal(delta.nan_to_num(), before.nan_to_num())


def test_cuda_tensor_on_cpu_build_is_a_clear_error(monkeypatch):
    if prune_ext.WITH_CUDA or not torch.cuda.is_available():
        pytest.skip("needs a CUDA device and a CPU-only build of prune_ext")
    with pytest.raises(RuntimeError, match="built without CUDA support"):
        prune_ext.restrain(torch.ones(3, 3, device="cuda"), 1.0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 260),
    n=st.integers(1, 260),
    rank_frac=st.floats(0.05, 1.0),
    kind=st.sampled_from(SPECTRA),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    fn=st.sampled_from(["log", "linear"]),
    param=st.floats(1.05, 5.0),
    t=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(m, n, rank_frac, kind, dtype, fn, param, t, seed):
    r = max(1, int(rank_frac * min(m, n)))
    d = matrix_with_spectrum(m, n, spectrum(kind, r, t, seed=seed), seed=seed, dtype=dtype)
    kw = {"alpha": param} if fn == "log" else {"fn": "linear", "beta": param}
    check_against_reference(d, t, **kw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(2, 300),
    n=st.integers(2, 300),
    rank_frac=st.floats(0.05, 1.0),
    extra=st.integers(-30, 30),
    power_iters=st.integers(0, 3),
    kind=st.sampled_from(SPECTRA),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    t=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_property_fixed_rank_certificate_is_sound(m, n, rank_frac, extra, power_iters, kind, dtype, t, seed):
    """Fixed rank, too small or large enough: a certificate is never wrong about how many values exceed
    t, and with the whole range of ΔW in the subspace the result is the reference's."""
    r = max(1, int(rank_frac * min(m, n)))
    d = matrix_with_spectrum(m, n, spectrum(kind, r, t, seed=seed), seed=seed, dtype=dtype)
    fixed = max(1, r + extra)
    n_sure, n_maybe = count_above(d, t)
    ref = reference.restrain(d, t)
    norm = d.double().norm().item()
    sv = torch.linalg.svdvals(d.double())
    above = sv[sv > t]
    # how much F magnifies errors: of a Ritz pair by |σ − F(σ)| / σ, of a value by F'(σ) = 1 / (σ ln α)
    amp = max(((above - reference.restrained_values(above, t)).abs() / above).max().item(),
              1 / (above.min().item() * math.log(1.2))) if above.numel() else 0
    _, info = prune_ext.restrain(d, t, rank=fixed, power_iters=power_iters, return_info=True)
    assert info.rank_explored == min(fixed, m, n)
    if info.certified:
        assert info.sigma_next_bound <= t * (1 + 1e-5)
        assert n_sure <= info.restrained <= n_maybe, (n_sure, n_maybe, info)
    if info.certified and fixed >= r:
        # The fixed-rank mode works in the input's precision with no accuracy check or fallback (the
        # adaptive one checks Ritz residuals and takes small float32 matrices to float64): the range
        # finder places direction i to about ε σ1 / σ_i and value i to about ε σ1, and F scales those
        # by |σ_i − F(σ_i)| / σ_i and F'(σ_i) — large for the log F at a small threshold, where
        # F'(t) = 1 / (t ln α) reaches 10³.
        assert within_tolerance(d, ref, norm, dtype, rounding=20 * max(1.0, amp)), rel_err(d, ref)


def test_restrain_many_equals_one_by_one(device):
    t = [1.0, 2.0, 0.5, 1.0, 1.5]
    mats = [matrix_with_spectrum(300, 200, spectrum(k, 40, tt, seed=i), seed=i, device=device)
            for i, (k, tt) in enumerate(zip(["decaying", "spikes", "below", "decaying", "huge"], t))]
    singles = [m.clone() for m in mats]
    for s, tt in zip(singles, t):
        prune_ext.restrain(s, tt)
    out, infos = prune_ext.restrain_many(mats, t, return_info=True)
    assert all(o is m for o, m in zip(out, mats))
    for a, b in zip(mats, singles):
        assert torch.equal(a, b)
    assert [i.threshold for i in infos] == t


@pytest.mark.parametrize("rank", [None, 48])
def test_restrain_many_batches_equal_shapes_like_one_by_one(device, rank):
    """Mixed shapes and dtypes in one call; the equal ones share batched factorisations."""
    shapes = [(300, 200), (200, 300), (300, 200), (300, 200), (120, 90)]
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float32, torch.float32]
    mats = [matrix_with_spectrum(*sh, spectrum("spikes", 40, 1.0, seed=i), seed=i, dtype=dt, device=device)
            for i, (sh, dt) in enumerate(zip(shapes, dtypes))]
    singles = [m.clone() for m in mats]
    single_infos = [prune_ext.restrain(s, 1.0, rank=rank, return_info=True)[1] for s in singles]
    _, infos = prune_ext.restrain_many(mats, 1.0, rank=rank, return_info=True)
    for a, b, i, j in zip(mats, singles, infos, single_infos):
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * b.norm().item())
        assert (i.restrained, i.method, i.certified, i.rank_explored) == (j.restrained, j.method, j.certified,
                                                                          j.rank_explored)


def host_reads(fn) -> int:
    """Reads of decisions back to the host during fn() (one device-to-host transfer each on a GPU)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name == "prune_ext::host_read" for e in prof.events())


def test_host_reads_per_call(device):
    """The synchronisation budget, counted on any device: one read per call in the common case (low
    rank, certified at once) however many matrices, none in fixed-rank mode, one more per extra round."""
    low = [matrix_with_spectrum(*sh, spectrum("spikes", 40, 1.0, seed=i), seed=i, device=device)
           for i, sh in enumerate([(300, 200), (300, 200), (200, 300), (400, 500), (300, 200)])]
    assert host_reads(lambda: prune_ext.restrain(low[0].clone(), 1.0)) == 1
    assert host_reads(lambda: prune_ext.restrain_many([m.clone() for m in low], 1.0)) == 1
    below = matrix_with_spectrum(300, 200, spectrum("below", 40, 1.0), device=device)
    assert host_reads(lambda: prune_ext.restrain(below.clone(), 1.0)) == 1
    for rank in (32, 64):
        assert host_reads(lambda r=rank: prune_ext.restrain(low[0].clone(), 1.0, rank=r)) == 0
        assert host_reads(lambda r=rank: prune_ext.restrain_many([m.clone() for m in low], 1.0, rank=r)) == 0
    wide = matrix_with_spectrum(400, 500, spectrum("decaying", 100, 1.0), device=device)  # rank 100 > 64
    _, info = prune_ext.restrain(wide.clone(), 1.0, return_info=True)
    assert info.rank_explored == 128 and host_reads(lambda: prune_ext.restrain(wide.clone(), 1.0)) == 2


def test_restrain_many_searches_in_lockstep(device):
    """Matrices that need more rounds advance together: one host read per round for all of them (not per
    round and matrix), with each matrix's result exactly what a call on it alone gives."""
    kinds = [("decaying", 100), ("decaying", 150), ("spikes", 40), ("decaying", 120)]  # three need 2+ rounds
    mats = [matrix_with_spectrum(400, 500, spectrum(k, r, 1.0, seed=i), seed=i, device=device)
            for i, (k, r) in enumerate(kinds)]
    singles = [m.clone() for m in mats]
    single_reads = [host_reads(lambda s=s: prune_ext.restrain(s, 1.0)) for s in singles]
    assert max(single_reads) >= 2 and sum(single_reads) >= 7  # several rounds each, alone
    many = [m.clone() for m in mats]
    reads = host_reads(lambda: prune_ext.restrain_many(many, 1.0))
    assert reads == max(single_reads)  # the rounds of the slowest matrix, not the sum
    for a, b in zip(many, singles):
        assert torch.equal(a, b)
    _, infos = prune_ext.restrain_many([m.clone() for m in mats], 1.0, return_info=True)
    for m, i in zip(mats, infos):
        ref = reference.restrain(m, 1.0)
        assert i.certified and within_tolerance(
            prune_ext.restrain(m.clone(), 1.0), ref, m.double().norm().item(), m.dtype)


def test_rank_hint_sizes_the_first_round_and_is_checked_not_trusted(device):
    """A caller that knows a bound on the rank (an edit ledger) gets one round of rank_hint + oversample
    columns and one host read; a hint that is too small only costs rounds, never the certificate."""
    t = 1.0
    d = matrix_with_spectrum(400, 600, spectrum("decaying", 150, t), device=device)  # rank 150 > 64
    ref = reference.restrain(d, t)
    _, blind = prune_ext.restrain(d.clone(), t, return_info=True)
    assert blind.rank_explored > 64 and blind.certified
    out, info = prune_ext.restrain(d.clone(), t, rank_hint=150, return_info=True)
    assert info.rank_explored == 160 and info.certified and info.passes == 5
    assert rel_err(out, ref) < 1e-4
    assert host_reads(lambda: prune_ext.restrain(d.clone(), t, rank_hint=150)) == 1
    out, info = prune_ext.restrain(d.clone(), t, rank_hint=20, return_info=True)  # wrong: too small
    assert info.certified and info.rank_explored > 150 and rel_err(out, ref) < 1e-4
    mats, infos = prune_ext.restrain_many([d.clone(), d.clone()], t, rank_hint=150, return_info=True)
    assert all(i.rank_explored == 160 and i.certified for i in infos)
    assert all(rel_err(m, ref) < 1e-4 for m in mats)
    for bad, exc in [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)]:
        with pytest.raises(exc, match="rank_hint"):
            prune_ext.restrain(d.clone(), t, rank_hint=bad)


def test_passes_over_delta_are_counted(device):
    """info.passes: ‖ΔW‖_F, each product with ΔW, residuals and the correction. One certified round is
    five (four when nothing changes); fixed rank adds two per power iteration."""
    t = 1.0
    low = matrix_with_spectrum(300, 200, spectrum("spikes", 40, t), device=device)
    assert prune_ext.restrain(low.clone(), t, return_info=True)[1].passes == 5
    below = matrix_with_spectrum(300, 200, spectrum("below", 40, t), device=device)
    assert prune_ext.restrain(below.clone(), t, return_info=True)[1].passes == 4
    assert prune_ext.restrain(low.clone(), t, rank=64, power_iters=0, return_info=True)[1].passes == 5
    assert prune_ext.restrain(low.clone(), t, rank=64, power_iters=2, return_info=True)[1].passes == 9


def test_a_round_that_cannot_certify_skips_its_residual_on_the_cpu():
    """On the CPU a round whose unexplained energy ‖ΔW‖_F² − ‖B‖_F² is far above t² makes no residual
    pass (it could not change the answer); the next round is sized from the first one's evidence."""
    t = 20.0
    d = make_update(500, 900, 200, t, seed=2)[0]  # the benchmark's spectra: rank 200, so 64 is hopeless
    ref = reference.restrain(d, t)
    out, info = prune_ext.restrain(d, t, return_info=True)
    # norm, first round (sketch, B: no residual), growth (sketch, B, residual), correction
    assert info.certified and info.passes == 7 and 200 <= info.rank_explored <= 250
    assert rel_err(out, ref) < 1e-4


def test_restrain_many_with_nan_anywhere_writes_nothing():
    mats = [matrix_with_spectrum(300, 200, spectrum("spikes", 40, 1.0, seed=i), seed=i) for i in range(3)]
    mats[2][4, 4] = float("nan")
    keep = [m.clone() for m in mats]
    with pytest.raises(ValueError, match="NaN or Inf"):
        prune_ext.restrain_many(mats, 1.0)
    for a, b in zip(mats[:2], keep[:2]):
        assert torch.equal(a, b)


def test_restrain_many_fixed_rank_leaves_a_non_finite_matrix_alone(device):
    """No host read in fixed-rank mode, so no error: the bad matrix is untouched and uncertified, the
    others are restrained as usual."""
    t = 1.0
    mats = [matrix_with_spectrum(300, 200, spectrum("spikes", 40, t, seed=i), seed=i, device=device) for i in range(3)]
    mats[1][4, 4] = float("inf")
    refs = [reference.restrain(m, t) for m in (mats[0], mats[2])]
    keep = mats[1].clone()
    _, infos = prune_ext.restrain_many(mats, t, rank=64, return_info=True)
    assert torch.equal(mats[1], keep) and not infos[1].certified and infos[1].restrained == 0
    for m, ref, info in zip((mats[0], mats[2]), refs, (infos[0], infos[2])):
        assert info.certified and rel_err(m, ref) < 1e-4


def test_restrain_many_checks_everything_first():
    a, b = torch.randn(20, 30), torch.ones(3)
    keep = a.clone()
    with pytest.raises(ValueError, match="2-D"):
        prune_ext.restrain_many([a, b], 0.1)
    assert torch.equal(a, keep)
    with pytest.raises(ValueError, match="thresholds"):
        prune_ext.restrain_many([a], [1.0, 2.0])


@pytest.mark.parametrize("m,n,r", [(500, 300, 7), (64, 900, 40), (30, 40, 60)])
def test_restrain_factors(device, m, n, r):
    g = torch.Generator().manual_seed(r)
    left = (torch.randn(m, r, generator=g) * 2).to(device)
    right = torch.randn(n, r, generator=g).to(device)
    dense = left @ right.T
    t = 0.3 * torch.linalg.svdvals(dense.double())[0].item()
    new_left, new_right, sigma = prune_ext.restrain_factors(left, right, t, 1.5)
    ref = reference.restrain(dense, t, 1.5)
    assert rel_err(new_left @ new_right.T, ref) < 1e-5
    torch.testing.assert_close(sigma.double().cpu(), torch.linalg.svdvals(dense.double())[: sigma.numel()].cpu(),
                               rtol=1e-4, atol=1e-4)
    assert new_left.shape[1] <= min(m, n, r)


def test_restrain_values_matches_reference_formula(device):
    s = torch.logspace(-2, 3, 200, dtype=torch.float64, device=device)
    for fn, kw in [("log", {"alpha": 1.2}), ("log", {"alpha": math.e}), ("linear", {"beta": 3.0})]:
        got = prune_ext.restrain_values(s, 5.0, fn=fn, **kw)
        want = reference.restrained_values(s.cpu(), 5.0, kw.get("alpha", 1.2), fn, kw.get("beta", 2.0))
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=0)
        assert torch.all(got.cpu()[s.cpu() <= 5.0] == s.cpu()[s.cpu() <= 5.0])
        assert torch.all(got.cpu().diff() > 0)  # monotone, and continuous at the threshold:
        assert prune_ext.restrain_values(torch.tensor([5.0 + 1e-9], dtype=torch.float64), 5.0, fn=fn, **kw).item() \
            == pytest.approx(5.0, abs=1e-7)


@pytest.mark.parametrize("shape", [(576, 1536), (300, 40), (1, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_spectral_norm(device, shape, dtype):
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(*shape, generator=g) / math.sqrt(shape[1])).to(device=device, dtype=dtype)
    want = torch.linalg.svdvals(W.double().cpu())[0].item()
    assert prune_ext.spectral_norm(W) == pytest.approx(want, rel=1e-6)


def test_condition_number():
    sig = torch.tensor([10.0, 3.0, 0.25], dtype=torch.float64)
    W = matrix_with_spectrum(30, 3, sig, dtype=torch.float64)
    assert prune_ext.condition_number(W) == pytest.approx(40.0, rel=1e-10)
    assert prune_ext.condition_number(torch.zeros(3, 3)) == math.inf


def test_opcheck():
    t = 1.0
    d = matrix_with_spectrum(200, 150, spectrum("decaying", 20, t), dtype=torch.float64)
    ops = torch.ops.prune_ext
    torch.library.opcheck(ops.restrain_.default, (d.clone(), t, 0, 1.2, 0, 10, 8, 0))
    torch.library.opcheck(ops.restrain_many_.default, ([d.clone(), d.clone()], [t, 2 * t], 1, 2.0, 0, 10, 8, 0))
    torch.library.opcheck(ops.restrain_.default, (d.clone(), t, 0, 1.2, 0, 10, 8, 0, 30))  # rank_hint
    torch.library.opcheck(ops.restrain_many_.default, ([d.clone(), d.clone()], [t, 2 * t], 0, 1.2, 0, 10, 8, 0, 30))
    torch.library.opcheck(ops.restrain_values.default, (torch.linspace(0, 5, 11, dtype=torch.float64), t, 0, 1.2))
    torch.library.opcheck(ops.factored_svd.default, (torch.randn(40, 5), torch.randn(30, 5)))
    torch.library.opcheck(ops.spectral_norm.default, (d, 1e-6, 50, 0))
