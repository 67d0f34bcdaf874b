"""CPU micro-benchmark of the spectral restraints (prune_ext.spectral) on factored ΔW.

    OMP_NUM_THREADS=1 python benchmarks/bench_spectral.py [--shapes 576x1536,4096x11008] [--rank 200]

Per shape: W with a flat spectrum like SmolLM2's MLP down-projections (a few large values over a slowly
falling bulk: σ_i = 9 (1 − i/2k) + 15/(1 + i/3), k = min(m, n)), ΔW = A Bᵀ of rank ``--rank``
with values around σmax(W). Reported, in milliseconds (median of ``--repeat`` calls):

* ``subspace``: W's top subspaces for energy 0.5 (dominant_subspace: float64 Gram eigendecomposition
  with its certificate; once per matrix, cached);
* ``W's SVD``: the baseline for it, one float64 SVD of W (what dominant_subspace did until 2026-12-04);
* ``prune``: PRUNE on the factors (restrain_factors), the reference point of the family;
* ``scale=0.5``: F above 0.5·σmax(W);
* ``protect``: protection (e = 0.5, d = 1) alone, the subspace cached;
* ``protect+prune``: protection, then PRUNE;
* ``dense f64 SVD``: the baseline, reference.restrain of the formed ΔW (full float64 SVD).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prune_ext import reference
from prune_ext.spectral import Restraint, apply_factors, dominant_subspace


def _timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench(m: int, n: int, rank: int, repeat: int, dense_repeat: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
    i = torch.arange(k, dtype=torch.float32)
    sigma = 9 * (1 - i / (2 * k)) + 15 / (1 + i / 3)
    W = (U * sigma) @ V.T
    sigma_w = float(sigma[0])
    A = torch.randn(m, rank, generator=g) * (sigma_w / (m * rank) ** 0.5) * 3
    B = torch.randn(n, rank, generator=g)
    out: dict[str, float] = {}
    out["subspace"] = _timed(lambda: dominant_subspace(W, 0.5), 1)
    out["W's SVD"] = _timed(lambda: torch.linalg.svd(W.double(), full_matrices=False), 1)
    sub = dominant_subspace(W, 0.5)
    out["protected rank"] = sub.rank
    specs = {"prune": Restraint(), "scale=0.5": Restraint(threshold_scale=0.5),
             "protect": Restraint("none", protect_energy=0.5), "protect+prune": Restraint(protect_energy=0.5)}
    for name, spec in specs.items():
        out[name] = _timed(lambda spec=spec: apply_factors(A, B, sigma_w, spec, subspace=sub), repeat)
    out["dense f64 SVD"] = _timed(lambda: reference.restrain(A.double() @ B.double().T, sigma_w), dense_repeat)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="576x1536,4096x11008")
    ap.add_argument("--rank", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dense-repeat", type=int, default=1)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), rank {args.rank}; milliseconds per call")
    cols = ["subspace", "W's SVD", "prune", "scale=0.5", "protect", "protect+prune", "dense f64 SVD"]
    print(f"| shape | protected rank (e=0.5) | {' | '.join(cols)} |")
    print("|---|---|" + "---|" * len(cols))
    for shape in args.shapes.split(","):
        m, n = (int(x) for x in shape.split("x"))
        r = bench(m, n, args.rank, args.repeat, args.dense_repeat)
        print(f"| {m}×{n} | {int(r['protected rank'])} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |",
              flush=True)


if __name__ == "__main__":
    main()
