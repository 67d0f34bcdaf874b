"""The restraint benchmark table (same as `prune-ext bench`); see prune_ext/bench.py for what it measures.

    python benchmarks/bench_restrain.py [--shapes 1600x6400,4096x11008,4096x14336] [--ranks 10,100,200,1000]
"""

from prune_ext.bench import main

if __name__ == "__main__":
    main()
