"""CUDA kernels: every op on the GPU against the float64 reference, the cusolverDnXgesvdr path, many layers
per call, DLPack arrays, streams and device guards.

Everything that needs a GPU is skipped unless one is visible and prune_ext was built with CUDA; the few
tests at the end that check argument handling run everywhere. (The generic tests in test_restrain.py also
run on `cuda` through the `device` parameter when a GPU is there.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import SPECTRA, matrix_with_spectrum, spectrum

import prune_ext
import prune_ext.ops  # noqa: F401  (loads _C, which registers torch.ops.prune_ext)
from prune_ext import reference


def _cuda_ready() -> bool:
    return bool(prune_ext.WITH_CUDA) and torch.cuda.is_available()


needs_cuda = pytest.mark.skipif("not _cuda_ready()", reason="needs a CUDA device and prune_ext built with CUDA")

# Relative Frobenius error allowed against the float64 reference (plus rounding at ΔW's own scale).
TOL = {torch.float32: 1e-4, torch.float64: 1e-7, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# gesvdr certifies nothing and converges like any randomized SVD: looser, and only on spectra it resolves.
GESVDR_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}


def close_to(out: torch.Tensor, ref: torch.Tensor, delta_norm: float, tol: float) -> bool:
    eps = torch.finfo(torch.float64 if out.dtype == torch.float64 else torch.float32).eps
    err = (out.detach().double().cpu() - ref).norm().item()
    return err <= tol * ref.norm().item() + 20 * eps * delta_norm


def ref_of(delta: torch.Tensor, t: float, **kw) -> tuple[torch.Tensor, int, float]:
    d = delta.detach().double().cpu()
    ref = reference.restrain(d, t, kw.get("alpha", 1.2), fn=kw.get("fn", "log"), beta=kw.get("beta", 2.0))
    return ref, int((torch.linalg.svdvals(d) > t).sum()), d.norm().item()


def count_above(delta: torch.Tensor, t: float) -> tuple[int, int]:
    """How many singular values are surely above t, and how many may be: a value within rounding of t
    (relative to t, and ε σ1 at ΔW's own scale) falls on either side in any SVD (as in test_restrain.py;
    tests/test_gpu_paths_cpu.py shows two spectra below that put a value exactly at t)."""
    sv = torch.linalg.svdvals(delta.detach().double().cpu())
    eps = torch.finfo(torch.float64 if delta.dtype == torch.float64 else torch.float32).eps
    tol = t * (1e-9 if delta.dtype == torch.float64 else 1e-4) + 20 * eps * (sv[0].item() if sv.numel() else 0)
    return int((sv > t + tol).sum()), int((sv > t - tol).sum())


# --- the certified path (the device-generic algorithm) on CUDA ------------------------------------------


@needs_cuda
@pytest.mark.parametrize("kind", SPECTRA)
@pytest.mark.parametrize("shape,rank", [((300, 500), 20), ((500, 300), 150), ((1024, 2816), 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_restrain_matches_reference(kind, shape, rank, dtype):
    t = 2.5
    d = matrix_with_spectrum(*shape, spectrum(kind, rank, t, seed=rank), seed=rank, dtype=dtype, device="cuda")
    ref, _, norm = ref_of(d, t)
    n_sure, n_maybe = count_above(d, t)
    ptr = d.data_ptr()
    out, info = prune_ext.restrain(d, t, return_info=True)
    assert out is d and d.data_ptr() == ptr and d.is_cuda
    assert close_to(d, ref, norm, TOL[dtype]), info
    assert info.certified and info.sigma_next_bound <= t * (1 + 1e-5)
    assert n_sure <= info.restrained <= n_maybe, (n_sure, n_maybe, info)
    assert info.sigma_before.device.type == "cpu"


@needs_cuda
@pytest.mark.parametrize("fn,kw", [("log", {"alpha": 1.5}), ("linear", {"beta": 2.0})])
def test_restraint_functions(fn, kw):
    d = matrix_with_spectrum(400, 256, spectrum("spikes", 40, 1.0), dtype=torch.float64, device="cuda")
    ref, _, norm = ref_of(d, 1.0, fn=fn, **kw)
    prune_ext.restrain(d, 1.0, fn=fn, **kw)
    assert close_to(d, ref, norm, TOL[torch.float64])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_half_types_and_strides(dtype, transposed):
    t = 1.0
    base = matrix_with_spectrum(384, 256, spectrum("spikes", 30, t), dtype=dtype, device="cuda")
    d = base.t() if transposed else base
    ref, _, norm = ref_of(d, t)  # the reference of the rounded input
    prune_ext.restrain(d, t)
    assert close_to(d, ref, norm, TOL[dtype])


@needs_cuda
def test_fixed_rank():
    t = 1.0
    d = matrix_with_spectrum(800, 600, spectrum("spikes", 60, t, seed=3), seed=3, device="cuda")
    ref, n_above, norm = ref_of(d, t)
    _, info = prune_ext.restrain(d, t, rank=64, power_iters=4, return_info=True)
    assert info.rank_explored == 64 and info.power_iters == 4
    assert info.restrained == n_above
    assert close_to(d, ref, norm, TOL[torch.float32])


@needs_cuda
def test_nothing_above_is_bitwise_noop():
    d = matrix_with_spectrum(300, 200, spectrum("below", 50, 1.0), device="cuda")
    before = d.clone()
    _, info = prune_ext.restrain(d, 1.0, return_info=True)
    assert torch.equal(d, before) and info.restrained == 0


@needs_cuda
def test_deterministic_and_same_as_cpu():
    t = 1.0
    a = matrix_with_spectrum(500, 400, spectrum("decaying", 80, t), dtype=torch.float64, device="cuda")
    b, c = a.clone(), a.cpu()
    _, ia = prune_ext.restrain(a, t, seed=7, return_info=True)
    prune_ext.restrain(b, t, seed=7)
    _, ic = prune_ext.restrain(c, t, seed=7, return_info=True)
    assert torch.equal(a, b)
    # the same counter-based sketch on both devices; rounding differs between devices, the outcome does not
    assert ia.restrained == ic.restrained and ia.certified and ic.certified
    assert torch.allclose(a.cpu(), c, rtol=0, atol=1e-9 * c.norm().item())


# --- fixed rank: no synchronisation, CUDA graphs ------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("many", [False, True])
def test_fixed_rank_never_synchronizes(many):
    t = 1.0
    d = matrix_with_spectrum(1024, 2816, spectrum("spikes", 48, t), device="cuda")
    ref, _, norm = ref_of(d, t)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host synchronisation raises
    try:
        if many:
            prune_ext.restrain_many([d], t, rank=64, power_iters=1)
        else:
            prune_ext.restrain(d, t, rank=64, power_iters=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert close_to(d, ref, norm, TOL[torch.float32])


@needs_cuda
def test_fixed_rank_in_a_cuda_graph():
    """Captured once, replayed on new inputs: each replay restrains what is in the buffer then."""
    t = 1.0
    inputs = [matrix_with_spectrum(1024, 2816, spectrum("spikes", 48, t, seed=i), seed=i, device="cuda")
              for i in range(3)]
    buf = inputs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (workspaces, handles)
        prune_ext.restrain(buf.clone(), t, rank=64, power_iters=1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        before, after, stats = prune_ext.ops.restrain_(buf, t, 0, 1.2, 64, 10, 1, 0)
    for x in inputs:
        buf.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        ref, n_above, norm = ref_of(x, t)
        assert close_to(buf, ref, norm, TOL[torch.float32])
        assert int(stats[0].item()) == n_above and stats[3].item() == 1
        assert before.shape == (64,)


@needs_cuda
@pytest.mark.parametrize("many", [False, True])
def test_fixed_rank_graph_replays_on_new_inputs_of_every_kind(many):
    """Capture once, replay on inputs of other spectra (and a NaN one): each replay's outputs are those of
    a fresh call on the buffer's contents then, NaN is reported in the stats instead of raising."""
    t = 1.0
    kinds = ["decaying", "spikes", "below", "clustered"]
    inputs = [matrix_with_spectrum(512, 1376, spectrum(k, 40, t, seed=i), seed=i, device="cuda")
              for i, k in enumerate(kinds)]
    bufs = [inputs[0].clone() for _ in range(2 if many else 1)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            prune_ext.ops.restrain_many_([b.clone() for b in bufs], [t] * len(bufs), 0, 1.2, 64, 10, 1, 0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        if many:
            before, after, stats = prune_ext.ops.restrain_many_(bufs, [t] * len(bufs), 0, 1.2, 64, 10, 1, 0)
        else:
            before, after, stats = prune_ext.ops.restrain_(bufs[0], t, 0, 1.2, 64, 10, 1, 0)
            stats = stats.reshape(1, -1)
    for x in inputs:
        for b in bufs:
            b.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        ref, _, norm = ref_of(x, t)
        n_sure, n_maybe = count_above(x, t)
        for i, b in enumerate(bufs):
            assert close_to(b, ref, norm, TOL[torch.float32])
            assert n_sure <= int(stats[i, 0].item()) <= n_maybe and stats[i, 3].item() == 1
    bad = inputs[1].clone()
    bad[3, 4] = float("nan")
    for b in bufs:
        b.copy_(bad)
    graph.replay()
    torch.cuda.synchronize()
    assert (stats[:, 3] == 0).all() and (stats[:, 0] == 0).all()  # not certified, nothing restrained


@needs_cuda
@pytest.mark.parametrize("size", [1, 2, 17, 64, 75, 130, 256])
def test_jacobi_svd_cuda_matches_cpu_and_lapack(size):
    l = size  # noqa: E741
    g = torch.Generator().manual_seed(l)
    T = torch.randn(3, l, l, generator=g, dtype=torch.float64)
    T[1] = T[1] @ torch.diag(torch.logspace(0, -10, l, dtype=torch.float64))  # graded
    if l > 2:
        T[2, :, l // 2:] = 0  # rank deficient
    S, V, info = torch.ops.prune_ext._jacobi_svd(T.cuda(), 30)
    Sc, Vc, info_c = torch.ops.prune_ext._jacobi_svd(T, 30)
    assert info.cpu().tolist() == info_c.tolist() == [0, 0, 0]
    ref = torch.linalg.svdvals(T)
    eps = torch.finfo(torch.float64).eps
    assert ((S.cpu() - ref).abs() <= 64 * l * eps * ref[:, :1]).all()
    assert torch.allclose(S.cpu(), Sc, rtol=0, atol=64 * l * eps * ref[:, :1].max().item())
    eye = torch.eye(l, dtype=torch.float64).expand(3, l, l)
    assert torch.allclose(V.cpu().mT @ V.cpu(), eye, atol=64 * l * eps)


@needs_cuda
def test_jacobi_svd_cuda_flags_instead_of_raising_and_captures():
    T = torch.randn(2, 40, 40, dtype=torch.float64, device="cuda")
    _, _, info = torch.ops.prune_ext._jacobi_svd(T, 1)
    assert info.cpu().tolist() == [1, 1]
    T[1, 0, 0] = float("nan")
    S, _, info = torch.ops.prune_ext._jacobi_svd(T, 30)
    assert info.cpu().tolist() == [0, 2] and S[1].isnan().all().item()
    buf = torch.randn(4, 64, 64, dtype=torch.float64, device="cuda")
    torch.ops.prune_ext._jacobi_svd(buf, 30)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        S, V, info = torch.ops.prune_ext._jacobi_svd(buf, 30)
    for seed in range(2):
        buf.copy_(torch.randn(4, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.allclose(S.cpu(), torch.linalg.svdvals(buf.cpu()), rtol=1e-12)


@needs_cuda
def test_a_failed_check_in_a_cuda_kernel_wrapper_raises_with_its_numbers():
    """The first GPU run died (SIGSEGV) formatting a failed check's message: now a ValueError with numbers."""
    T = torch.zeros(2, 5, 5, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match=r"1 <= sweeps <= 1000, got 0 \(for 2 matrices of size 5\)"):
        torch.ops.prune_ext._jacobi_svd(T, 0)
    with pytest.raises(ValueError, match=r"got l = 1025"):
        torch.ops.prune_ext._jacobi_svd(torch.zeros(1, 1025, 1025, dtype=torch.float64, device="cuda"), 3)
    torch.ops.prune_ext._jacobi_svd(T, 3)  # the process and the device are still fine


@needs_cuda
def test_internal_ops_agree_with_the_cpu():
    """The sketch and the round summary run the shared host/device code of restrain_math.h."""
    ops = torch.ops.prune_ext
    for dtype in (torch.float32, torch.float64):
        a = ops._sketch(torch.empty(0, dtype=dtype, device="cuda"), 257, 129, 11, 5).cpu()
        b = ops._sketch(torch.empty(0, dtype=dtype), 257, 129, 11, 5)
        torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=1e-12)
    s = torch.rand(6, 80, dtype=torch.float64).sort(dim=1, descending=True).values * 4
    resid, frob = torch.rand(6, dtype=torch.float64), 10 * torch.rand(6, dtype=torch.float64)
    th = [0.5, 1.0, 2.0, 3.0, 3.5, 11.0]
    cpu = ops._summarize_rounds(s, resid, frob, th, 1 + 1e-6, 1, 2.0, 2)
    gpu = ops._summarize_rounds(s.cuda(), resid.cuda(), frob.cuda(), th, 1 + 1e-6, 1, 2.0, 2)
    for x, y in zip(cpu, gpu):
        torch.testing.assert_close(y.cpu(), x, rtol=1e-14, atol=0)


# --- cusolverDnXgesvdr --------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fn,kw", [("log", {"alpha": 1.2}), ("linear", {"beta": 2.0})])
@pytest.mark.parametrize("shape", [(600, 400), (400, 600)])
def test_gesvdr_matches_reference(dtype, fn, kw, shape):
    t = 1.0
    d = matrix_with_spectrum(*shape, spectrum("spikes", 60, t, seed=5), seed=5, dtype=dtype, device="cuda")
    ref, n_above, norm = ref_of(d, t, fn=fn, **kw)
    ptr = d.data_ptr()
    out, info = prune_ext.restrain(d, t, fn=fn, method="gesvdr", return_info=True, **kw)
    assert out is d and d.data_ptr() == ptr
    assert info.method == "gesvdr" and not info.certified
    assert info.restrained == n_above
    assert torch.allclose(info.sigma_after, reference.restrained_values(info.sigma_before, t, fn=fn, **kw))
    assert close_to(d, ref, norm, GESVDR_TOL[dtype]), info


@needs_cuda
def test_gesvdr_grows_until_a_value_below_is_seen():
    t = 1.0
    # 45 well-separated values above the threshold: more than the first sketch (32) holds
    s = torch.cat([torch.linspace(40.0, 2.0, 45, dtype=torch.float64), torch.linspace(0.5, 0.01, 100)])
    d = matrix_with_spectrum(700, 500, s, seed=11, device="cuda")
    ref, n_above, norm = ref_of(d, t)
    _, info = prune_ext.restrain(d, t, method="gesvdr", return_info=True)
    assert info.method == "gesvdr" and info.rank_explored >= 64 and info.restrained == n_above == 45
    assert close_to(d, ref, norm, GESVDR_TOL[torch.float32])


@needs_cuda
def test_gesvdr_fixed_rank_and_half_input():
    t = 1.0
    d = matrix_with_spectrum(512, 384, spectrum("spikes", 40, t, seed=2), seed=2, dtype=torch.bfloat16,
                             device="cuda")
    ref, _, norm = ref_of(d, t)
    _, info = prune_ext.restrain(d, t, method="gesvdr", rank=16, return_info=True)
    assert info.rank_explored == 16 and d.dtype == torch.bfloat16
    assert close_to(d, ref, norm, TOL[torch.bfloat16])


@needs_cuda
def test_gesvdr_nothing_above_leaves_delta_unchanged():
    d = matrix_with_spectrum(300, 200, spectrum("below", 50, 1.0), device="cuda")
    before = d.clone()
    _, info = prune_ext.restrain(d, 1.0, method="gesvdr", return_info=True)
    assert info.restrained == 0 and torch.equal(d, before)


# --- many layers per call -----------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_restrain_many_five_equal_layers_equals_one_by_one(dtype):
    ts = [1.0, 2.0, 0.5, 1.0, 1.5]
    kinds = ["decaying", "spikes", "below", "spikes", "huge"]
    mats = [matrix_with_spectrum(512, 1376, spectrum(k, 48, t, seed=i), seed=i, dtype=dtype, device="cuda")
            for i, (k, t) in enumerate(zip(kinds, ts))]
    singles = [m.clone() for m in mats]
    single_infos = [prune_ext.restrain(s, t, return_info=True)[1] for s, t in zip(singles, ts)]
    refs = [ref_of(m, t) for m, t in zip(mats, ts)]
    out, infos = prune_ext.restrain_many(mats, ts, return_info=True)
    assert all(o is m for o, m in zip(out, mats))
    # equal shapes share batched factorisations: the same decisions, values equal to rounding
    for a, b, (ref, _, norm) in zip(mats, singles, refs):
        assert close_to(a, b.double().cpu(), norm, 1e-6)
        assert close_to(a, ref, norm, TOL[dtype])
    for i, j in zip(infos, single_infos):
        assert (i.restrained, i.method, i.certified) == (j.restrained, j.method, j.certified)
        assert torch.allclose(i.sigma_before, j.sigma_before, rtol=1e-6)


@needs_cuda
def test_restrain_many_reads_back_once():
    """Five low-rank layers: one device-to-host transfer for the whole call (the adaptive decision)."""
    mats = [matrix_with_spectrum(512, 1376, spectrum("spikes", 48, 1.0, seed=i), seed=i, device="cuda")
            for i in range(5)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning, match="synchroniz") as record:
            prune_ext.restrain_many(mats, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in record if "synchroniz" in str(w.message)]) == 1


@needs_cuda
def test_restrain_many_mixed_shapes():
    mats = [matrix_with_spectrum(*shape, spectrum("spikes", 20, 1.0, seed=i), seed=i, device="cuda")
            for i, shape in enumerate([(200, 300), (300, 200), (200, 300), (64, 64)])]
    singles = [m.clone() for m in mats]
    for s in singles:
        prune_ext.restrain(s, 1.0)
    prune_ext.restrain_many(mats, 1.0)
    for a, b in zip(mats, singles):
        assert torch.equal(a, b)


@needs_cuda
def test_restrain_many_rejects_mixed_devices():
    a = matrix_with_spectrum(60, 40, spectrum("spikes", 10, 1.0), device="cuda")
    b = matrix_with_spectrum(60, 40, spectrum("spikes", 10, 1.0))
    a0, b0 = a.clone(), b.clone()
    with pytest.raises((ValueError, RuntimeError)):
        prune_ext.restrain_many([a, b], 1.0)
    assert torch.equal(a, a0) and torch.equal(b, b0)


# --- the other ops ------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn,kw", [("log", {"alpha": 1.2}), ("linear", {"beta": 3.0})])
def test_restrain_values(dtype, fn, kw):
    t = 2.0
    s = torch.cat([torch.linspace(0, 10, 1001), torch.tensor([t, 1e4])]).to(dtype)
    gpu = prune_ext.restrain_values(s.cuda(), t, fn=fn, **kw)
    cpu = prune_ext.restrain_values(s, t, fn=fn, **kw)
    ref = reference.restrained_values(s.double(), t, fn=fn, **kw)
    assert gpu.dtype == dtype and gpu.is_cuda
    rtol = {torch.float64: 1e-13, torch.float32: 1e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(gpu.cpu().double(), ref, rtol=rtol, atol=0)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=rtol, atol=0)  # the same F on both devices
    assert torch.equal(gpu[s <= t].cpu(), s[s <= t])  # at or below the threshold: untouched


@needs_cuda
@pytest.mark.parametrize("m,n,r", [(500, 300, 12), (64, 900, 64)])
def test_factored_svd_and_restrain_factors(m, n, r):
    g = torch.Generator().manual_seed(r)
    L = torch.randn(m, r, generator=g, dtype=torch.float64).cuda()
    R = torch.randn(n, r, generator=g, dtype=torch.float64).cuda()
    U, S, V = torch.ops.prune_ext.factored_svd(L, R)
    assert U.is_cuda and S.is_cuda and V.is_cuda
    dense = (L @ R.T).cpu()
    torch.testing.assert_close(S.cpu(), torch.linalg.svdvals(dense)[:r], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(((U * S) @ V.T).cpu(), dense, rtol=1e-10, atol=1e-9)
    t = S[r // 3].item()
    nl, nr, _ = prune_ext.restrain_factors(L, R, t)
    torch.testing.assert_close((nl @ nr.T).cpu(), reference.restrain(dense, t), rtol=1e-9, atol=1e-9)


@needs_cuda
@pytest.mark.parametrize("shape", [(300, 200), (200, 700)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectral_norm(shape, dtype):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    exact = torch.linalg.svdvals(W.double())[0].item()
    got = prune_ext.spectral_norm(W.cuda(), rtol=1e-9)
    assert got == pytest.approx(exact, rel=1e-6)


@needs_cuda
def test_opcheck_cuda():
    t = 1.0
    d = matrix_with_spectrum(200, 150, spectrum("decaying", 20, t), dtype=torch.float64, device="cuda")
    ops = torch.ops.prune_ext
    torch.library.opcheck(ops.restrain_.default, (d.clone(), t, 0, 1.2, 0, 10, 8, 0))
    torch.library.opcheck(ops.restrain_gesvdr_.default, (d.clone(), t, 0, 1.2, 0, 10, 4, 0))
    torch.library.opcheck(ops.restrain_many_.default, ([d.clone(), d.clone()], [t, 2 * t], 1, 2.0, 0, 10, 8, 0))
    torch.library.opcheck(ops.restrain_values.default,
                          (torch.linspace(0, 5, 11, dtype=torch.float64, device="cuda"), t, 0, 1.2))
    torch.library.opcheck(ops.factored_svd.default,
                          (torch.randn(40, 5, device="cuda"), torch.randn(30, 5, device="cuda")))
    torch.library.opcheck(ops.spectral_norm.default, (d, 1e-6, 50, 0))


# --- streams, devices, DLPack ---------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("method", ["auto", "gesvdr"])
def test_runs_on_the_current_stream(method):
    t = 1.0
    src = matrix_with_spectrum(1024, 768, spectrum("spikes", 40, t), device="cuda")
    ref, _, norm = ref_of(src, t)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        d = src.clone()  # produced on the side stream: the op must order itself after it
        prune_ext.restrain(d, t, method=method)
        vals = prune_ext.restrain_values(torch.linspace(0, 3, 7, device="cuda"), t)
    side.synchronize()
    assert close_to(d, ref, norm, GESVDR_TOL[torch.float32] if method == "gesvdr" else TOL[torch.float32])
    torch.testing.assert_close(vals.cpu().double(), reference.restrained_values(torch.linspace(0, 3, 7), t),
                               rtol=1e-6, atol=0)


@needs_cuda
@pytest.mark.skipif("not _cuda_ready() or torch.cuda.device_count() < 2", reason="needs two GPUs")
@pytest.mark.parametrize("method", ["auto", "gesvdr"])
def test_tensor_on_another_device_than_the_current_one(method):
    t = 1.0
    d = matrix_with_spectrum(400, 300, spectrum("spikes", 30, t), device="cuda:1")
    ref, _, norm = ref_of(d, t)
    with torch.cuda.device(0):
        prune_ext.restrain(d, t, method=method)
        out = prune_ext.restrain_values(torch.linspace(0, 3, 7, device="cuda:1"), t)
    assert d.device.index == 1 and out.device.index == 1
    assert close_to(d, ref, norm, GESVDR_TOL[torch.float32])


class _DLPackOnly:
    """Any array that speaks DLPack (and nothing else torch knows)."""

    def __init__(self, t: torch.Tensor):
        self._t = t

    def __dlpack__(self, **kwargs):
        return self._t.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


@needs_cuda
def test_dlpack_array_zero_copy_in_place():
    t = 1.0
    d = matrix_with_spectrum(300, 500, spectrum("spikes", 30, t), device="cuda")
    ref, _, norm = ref_of(d, t)
    out = prune_ext.restrain(_DLPackOnly(d), t)
    assert out.data_ptr() == d.data_ptr()  # the caller's memory, restrained in place
    assert close_to(d, ref, norm, TOL[torch.float32])


@needs_cuda
@pytest.mark.parametrize("method", ["auto", "gesvdr"])
def test_cupy_array_zero_copy_in_place(method):
    cupy = pytest.importorskip("cupy")
    t = 1.0
    host = matrix_with_spectrum(400, 300, spectrum("spikes", 30, t), dtype=torch.float64)
    ref, _, norm = ref_of(host, t)
    a = cupy.asarray(host.numpy())
    out = prune_ext.restrain(a, t, method=method)
    assert out.data_ptr() == a.data.ptr
    got = torch.from_numpy(cupy.asnumpy(a))
    assert close_to(got, ref, norm, GESVDR_TOL[torch.float64] if method == "gesvdr" else TOL[torch.float64])


# --- argument handling: runs on every machine ----------------------------------------------------------


def test_gesvdr_on_cpu_tensor_is_a_clear_error():
    d = torch.ones(4, 3)
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        prune_ext.restrain(d, 1.0, method="gesvdr")
    with pytest.raises(ValueError, match="method must be"):
        prune_ext.restrain(d, 1.0, method="svd")
    assert torch.equal(d, torch.ones(4, 3))


class _LooksLikeCuda(torch.Tensor):
    """A CPU tensor that claims to live on a GPU: the CPU-only-build check without a GPU."""

    @property
    def is_cuda(self):
        return True


def test_cuda_tensor_on_a_build_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(prune_ext.ops, "WITH_CUDA", False)
    d = torch.ones(3, 3).as_subclass(_LooksLikeCuda)
    assert d.is_cuda
    with pytest.raises(RuntimeError, match="prune_ext was built without CUDA support"):
        prune_ext.restrain(d, 1.0)
    with pytest.raises(RuntimeError, match="prune_ext was built without CUDA support"):
        prune_ext.restrain_many([d], 1.0)
