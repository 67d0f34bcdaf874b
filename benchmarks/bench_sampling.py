"""Throughput of the model-sampled key statistics' text sampler on SmolLM2-135M (CPU).

    python benchmarks/bench_sampling.py --threads 1 --seq-len 256 --tokens 16384

Samples the same number of tokens twice: with the statistics batch as the sampling batch (before:
``batch_tokens // seq_len`` = 16 sequences at 256 tokens) and with :func:`sample_rows` (as many
sequences as a 1 GiB KV cache holds, at most 64). Reports CPU time (this process, less sensitive
to other processes on a shared machine than wall time) and wall time, and checks that a second
run with the same seed gives the same tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

from prune_ext.editing import load_model
from prune_ext.editing.covariance import _sampled_token_lists, sample_rows


def _run(model, tok, seq_len: int, rows: int, tokens: int) -> tuple[list[list[int]], float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    seqs = list(_sampled_token_lists(model, tok, seq_len, rows, seed=0, n_tokens=tokens))
    return seqs, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--batch-tokens", type=int, default=4096, help="key_statistics' batch_tokens")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    before = max(1, args.batch_tokens // args.seq_len)
    after = sample_rows(model, args.seq_len, before)
    print("| sampler | sequences at once | tokens | CPU s | tok/s (CPU) | wall s | tok/s (wall) |")
    print("|---|---|---|---|---|---|---|")
    rates = {}
    for label, rows in (("before", before), ("after", after)):
        seqs, cpu, wall = _run(model, tok, args.seq_len, rows, args.tokens)
        n = sum(len(s) for s in seqs)
        rates[label] = n / cpu
        print(f"| {label} | {rows} | {n} | {cpu:.1f} | {n / cpu:.0f} | {wall:.1f} | {n / wall:.0f} |", flush=True)
    again, _, _ = _run(model, tok, args.seq_len, after, min(args.tokens, after * args.seq_len))
    same = again == seqs[: len(again)]
    print(f"\nspeedup (CPU time): {rates['after'] / rates['before']:.2f}x; same seed, same tokens: {same}")


if __name__ == "__main__":
    main()
