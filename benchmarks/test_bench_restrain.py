"""pytest-benchmark suite of the restraint (not part of the test run; ratios against baselines in one run):

    .venv/bin/python -m pytest benchmarks/test_bench_restrain.py --benchmark-only --benchmark-group-by=param:case

Every benchmark first checks its result against the exact float64 answer, then times.
"""

from __future__ import annotations

import pytest

import prune_ext
from prune_ext.bench import ALPHA, make_update, rel_error, with_full_svd, with_svd_lowrank

T = 20.0
CASES = {"1600x6400-r100": (1600, 6400, 100), "1600x6400-r10": (1600, 6400, 10)}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    m, n, r = CASES[request.param]
    return make_update(m, n, r, T, seed=r)


def test_prune_ext(benchmark, case):
    delta, U, s, V = case
    out = prune_ext.restrain(delta.clone(), T, ALPHA)
    assert rel_error(out, U, s, V, T) < 1e-4
    benchmark.pedantic(lambda d: prune_ext.restrain(d, T, ALPHA), setup=lambda: ((delta.clone(),), {}),
                       rounds=3)


def test_factored(benchmark, case):
    delta, U, s, V = case
    left, right, _ = prune_ext.restrain_factors(U * s, V, T, ALPHA)
    assert rel_error(left @ right.T, U, s, V, T) < 1e-4
    benchmark(prune_ext.restrain_factors, U * s, V, T, ALPHA)


def test_svd_lowrank(benchmark, case):
    delta, U, s, V = case
    assert rel_error(with_svd_lowrank(delta, T, s.numel() + 10), U, s, V, T) < 1e-3
    benchmark.pedantic(with_svd_lowrank, args=(delta, T, s.numel() + 10), rounds=3)


def test_full_svd(benchmark, case):
    delta, U, s, V = case
    out = benchmark.pedantic(with_full_svd, args=(delta, T), rounds=1)
    assert rel_error(out, U, s, V, T) < 1e-3


# Five MEMIT-sized layers (SmolLM2-135M down_proj, 576 × 1536, ΔW of rank 200): one restrain_many call
# against five restrain calls, and the fixed-rank mode (no host read) against the adaptive one.
LAYER = (576, 1536, 200)


@pytest.fixture(scope="module")
def layers():
    return [make_update(*LAYER[:2], LAYER[2], T, seed=i) for i in range(5)]


@pytest.mark.parametrize("how", ["restrain_many", "one_by_one"])
def test_five_layers(benchmark, layers, how):
    def run(ds):
        if how == "restrain_many":
            prune_ext.restrain_many(ds, T, ALPHA)
        else:
            for d in ds:
                prune_ext.restrain(d, T, ALPHA)
        return ds

    for out, (_, U, s, V) in zip(run([d.clone() for d, *_ in layers]), layers):
        assert rel_error(out, U, s, V, T) < 1e-4
    benchmark.pedantic(run, setup=lambda: (([d.clone() for d, *_ in layers],), {}), rounds=5)


@pytest.mark.parametrize("rank", [None, 256])
def test_fixed_rank(benchmark, layers, rank):
    delta, U, s, V = layers[0]
    kw = {"rank": rank, "power_iters": 0} if rank else {}  # rank 256 > rank(ΔW): no power iterations needed
    out, info = prune_ext.restrain(delta.clone(), T, ALPHA, return_info=True, **kw)
    assert info.certified and rel_error(out, U, s, V, T) < 1e-4
    benchmark.pedantic(lambda d: prune_ext.restrain(d, T, ALPHA, **kw), setup=lambda: ((delta.clone(),), {}),
                       rounds=5)
