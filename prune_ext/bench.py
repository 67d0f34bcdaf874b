"""Restraint benchmark on the CPU: prune_ext.restrain against the ways people do this today.

For each shape and ΔW rank, in one run and on the same input:
  prune_ext     prune_ext.restrain (certified randomized, in place), knowing nothing about ΔW; `passes`
                counts its passes over ΔW (‖ΔW‖_F, each product with ΔW, residuals, the correction) and
                `floor` is what one certified round of the right size takes (those five, four if nothing
                is above the threshold)
  hint          the same with rank_hint=r (the caller knows a bound on the rank, as an editing session
                knows its ledger's): one round of r + oversample columns when that certifies
  factored      prune_ext.restrain_factors on the rank-r factors (when the update is kept factored)
  svd (a)       full torch.linalg.svd, restrain, reconstruct (float32)
  lowrank (b)   torch.svd_lowrank(q = r + 10, niter = 2), restrain, correct (uncertified)
  numpy (c)     the public PRUNE code's path: NumPy full SVDs of W, ΔW, W_N and W'_N plus a rank
                computation, float32 (slow: run on the first shape only unless --numpy-all)
Every result is checked against the exact float64 answer first (ΔW is built from known factors, so
the reference is exact: U F(Σ) Vᵀ in float64). The dense baselines do not depend on the rank, so
they are timed once per shape and the ratio uses that time.

    prune-ext bench                                        # the README table
    prune-ext bench --shapes 1600x6400 --ranks 100 --repeat 3
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from functools import partial

import numpy as np
import torch

import prune_ext
from prune_ext import reference

ALPHA = 1.2


def make_update(m: int, n: int, r: int, threshold: float, seed: int):
    """ΔW = U diag(s) Vᵀ (float32) with a third or so of the r values above the threshold, and its factors."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, r, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
    s = torch.logspace(math.log10(5 * threshold), math.log10(0.05 * threshold), r)
    return (U * s) @ V.T, U, s, V


def rel_error(out: torch.Tensor, U, s, V, threshold: float) -> float:
    """‖out − U F(s) Vᵀ‖_F / ‖U F(s) Vᵀ‖_F in float64, in row blocks."""
    f = reference.restrained_values(s, threshold, ALPHA).to(torch.float64)
    Ud, Vd = U.double(), V.double()
    err2, ref2 = 0.0, float((f**2).sum())
    for r0 in range(0, out.shape[0], 512):
        blk = (Ud[r0 : r0 + 512] * f) @ Vd.T
        err2 += float(((out[r0 : r0 + 512].double() - blk) ** 2).sum())
    return math.sqrt(err2 / ref2)


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def with_full_svd(delta: torch.Tensor, t: float) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return (U * reference.restrained_values(S, t, ALPHA).to(S.dtype)) @ Vh


def with_svd_lowrank(delta: torch.Tensor, t: float, q: int) -> torch.Tensor:
    U, S, V = torch.svd_lowrank(delta, q=min(q, *delta.shape), niter=2)
    shrink = S - reference.restrained_values(S, t, ALPHA).to(S.dtype)
    return torch.addmm(delta, U * shrink, V.T, alpha=-1)


def public_prune_numpy(delta: torch.Tensor, W: np.ndarray, t: float) -> np.ndarray:
    """What the public PRUNE code does per matrix: NumPy SVDs of W, ΔW, W_N = W + ΔW and W'_N."""
    d = delta.numpy()
    np.linalg.svd(W, full_matrices=False, compute_uv=False)  # σmax(W)
    u, s, vh = np.linalg.svd(d, full_matrices=False)
    s = np.where(s > t, np.log(np.maximum(s, t)) / np.log(ALPHA) - np.log(t) / np.log(ALPHA) + t, s)
    restrained = (u * s.astype(d.dtype)) @ vh
    np.linalg.svd(W + d, full_matrices=False, compute_uv=False)  # κ(W_N)
    np.linalg.svd(W + restrained, full_matrices=False, compute_uv=False)  # κ(W'_N)
    np.linalg.matrix_rank(d)
    return restrained


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1600x6400,4096x11008,4096x14336")
    ap.add_argument("--ranks", default="10,100,200,1000")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs of prune_ext per case (median)")
    ap.add_argument("--no-dense", action="store_true", help="skip the full-SVD baselines (a) and (c)")
    ap.add_argument("--numpy-all", action="store_true", help="run baseline (c) on every shape")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    t = 20.0  # σmax(W) of SmolLM2's down_proj is about 23
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, log restraint α={ALPHA}")
    header = (f"{'shape':>11} {'rank':>5} {'k':>4} {'l':>5} {'prune_ext s':>11} {'err':>8} {'passes':>6} "
              f"{'floor':>5} {'hint s':>7} {'l':>5} {'passes':>6} {'err':>8} {'factored s':>10} "
              f"{'err':>8} {'svd (a) s':>9} {'×(a)':>7} {'×(a) hint':>9} {'lowrank s':>9} {'err':>8} {'×(b)':>6} "
              f"{'numpy (c) s':>11} {'×(c)':>7}")
    print(header)
    print("-" * len(header))
    for si, (m, n) in enumerate(shapes):
        dense_time = numpy_time = None
        for r in ranks:
            if r > min(m, n):
                continue
            delta0, U, s, V = make_update(m, n, r, t, seed=r)
            # prune_ext (correctness first, then time on fresh copies)
            work = delta0.clone()
            _, info = prune_ext.restrain(work, t, ALPHA, return_info=True)
            err = rel_error(work, U, s, V, t)
            assert err < 1e-4 and info.certified, (err, info)
            copies = [delta0.clone() for _ in range(args.repeat)]
            t_ext, _ = timed(partial(lambda c: prune_ext.restrain(c.pop(), t, ALPHA), copies), args.repeat)
            work = delta0.clone()
            _, info_h = prune_ext.restrain(work, t, ALPHA, rank_hint=r, return_info=True)
            err_h = rel_error(work, U, s, V, t)
            assert err_h < 1e-4 and info_h.certified, (err_h, info_h)
            del work
            copies = [delta0.clone() for _ in range(args.repeat)]
            t_hint, _ = timed(partial(lambda c, r=r: prune_ext.restrain(c.pop(), t, ALPHA, rank_hint=r), copies),
                              args.repeat)
            del copies
            t_fac, (fl, fr, _) = timed(partial(prune_ext.restrain_factors, U * s, V, t, ALPHA), args.repeat)
            err_fac = rel_error(fl @ fr.T, U, s, V, t)
            t_low, low = timed(partial(with_svd_lowrank, delta0, t, r + 10), 1)
            err_low = rel_error(low, U, s, V, t)
            del low
            if not args.no_dense and dense_time is None:
                dense_time, full = timed(partial(with_full_svd, delta0, t), 1)
                assert rel_error(full, U, s, V, t) < 1e-3
                del full
            if not args.no_dense and numpy_time is None and (si == 0 or args.numpy_all):
                W = np.random.default_rng(0).standard_normal((m, n)).astype(np.float32)
                W *= t / np.linalg.norm(W, 2)
                numpy_time, _ = timed(partial(public_prune_numpy, delta0, W, t), 1)
                del W

            def ratio(base, t_ext=t_ext, width=7):
                return f"{base / t_ext:{width}.0f}" if base else f"{'—':>{width}}"

            floor = 5 if info.restrained else 4
            print(f"{m:>5}x{n:<5} {r:>5} {info.restrained:>4} {info.rank_explored:>5} {t_ext:>11.3f} {err:>8.1e} "
                  f"{info.passes:>6} {floor:>5} {t_hint:>7.3f} {info_h.rank_explored:>5} {info_h.passes:>6} "
                  f"{err_h:>8.1e} {t_fac:>10.3f} {err_fac:>8.1e} {dense_time or float('nan'):>9.2f} "
                  f"{ratio(dense_time)} {ratio(dense_time, t_hint, 9)} "
                  f"{t_low:>9.3f} {err_low:>8.1e} {t_low / t_ext:>6.1f} "
                  f"{numpy_time or float('nan'):>11.1f} {ratio(numpy_time)}", flush=True)


if __name__ == "__main__":
    main()
