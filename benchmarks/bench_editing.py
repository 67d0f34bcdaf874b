"""Wall time of ROME and MEMIT edits and of the key statistics, on SmolLM2-135M (CPU).

    python benchmarks/bench_editing.py                 # 2 threads, defaults below
    python benchmarks/bench_editing.py --rome-edits 5 --threads 2 --n-samples 50000

Prints a Markdown table. Each editing row first checks that the edits took (CounterFact
efficacy: P(new target) > P(true target) on the edit prompt) and that the returned factors
reproduce the change of the weights, then reports the time. The model is restored between rows.
Key statistics are computed cold in a fresh temporary cache folder (all MEMIT layers, which
include the ROME layer, in one pass) and then loaded from it.

On a 2-core machine that other processes also use, two torch threads make the small sequential
steps (sampling the context prefixes, MEMIT batches of 1) an order of magnitude slower than
one thread (OpenMP threads waiting for a busy core); compare ``--threads 1``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from prune_ext.editing import (
    EditRequest,
    Memit,
    MemitHyperParams,
    Rome,
    RomeHyperParams,
    apply_update,
    key_statistics,
    load_counterfact,
    load_model,
)
from prune_ext.editing.requests import data_dir
from prune_ext.session import EditingSession
from prune_ext.updates import LowRankUpdate


def edit_in_place(model: Any, editor: Any, step: Any) -> list[LowRankUpdate]:
    """The editor's updates for one step, applied (the editors themselves never write the model)."""
    updates = editor.compute(step)
    for update in updates:
        apply_update(model, update)
    return updates


def target_logprob(model: Any, tok: Any, prompt: str, target: str) -> float:
    ids = tok(prompt)["input_ids"]
    tgt = tok(prompt + " " + target)["input_ids"][len(ids) :]
    with torch.no_grad():
        logp = model(torch.tensor([ids + tgt])).logits.float().log_softmax(-1)[0]
    return sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(tgt)) / len(tgt)


def efficacy(model: Any, tok: Any, requests: list[EditRequest]) -> int:
    return sum(
        target_logprob(model, tok, r.prompt, r.target_new) > target_logprob(model, tok, r.prompt, r.target_true or "")
        for r in requests
    )


class Snapshot:
    """Weights of some modules, to check updates against and to restore."""

    def __init__(self, model: Any, names: list[str]) -> None:
        self.model = model
        self.weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}

    def check(self, updates: list[LowRankUpdate]) -> None:
        expected = {n: w.clone() for n, w in self.weights.items()}
        for u in updates:
            expected[u.module] += u.dense()
        for n, w in expected.items():
            if not torch.equal(self.model.get_submodule(n).weight.detach(), w):
                raise AssertionError(f"factors do not reproduce the change of {n}")

    @torch.no_grad()
    def restore(self) -> None:
        for n, w in self.weights.items():
            self.model.get_submodule(n).weight.copy_(w)


def timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rome-edits", type=int, default=3, help="sequential ROME edits to time")
    parser.add_argument("--memit-batch1", type=int, default=2, help="MEMIT batches of 1 to time")
    parser.add_argument("--memit-batch", type=int, default=10, help="size of the large MEMIT batch")
    parser.add_argument("--n-samples", type=int, default=50_000, help="tokens in the key statistics")
    parser.add_argument("--session-edits", type=int, default=5, help="ROME edits with PRUNE after every edit")
    parser.add_argument(
        "--corpus", default=None, help="statistics corpus (default: ../shared/data/tasks if present, else samples)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = args.corpus
    if corpus is None and (data_dir() / "tasks").is_dir():
        corpus = str(data_dir() / "tasks")
    requests = load_counterfact(limit=max(args.rome_edits, args.memit_batch1, args.memit_batch))

    (model, tok), t_load = timed(lambda: load_model(args.model))
    rome_hp = RomeHyperParams.for_model(model, mom2_n_samples=args.n_samples)
    memit_hp = MemitHyperParams.for_model(model, mom2_n_samples=args.n_samples)
    rows: list[tuple[str, str, str]] = [("load model", f"{t_load:.1f} s", args.model)]

    with tempfile.TemporaryDirectory() as cache:
        names = [memit_hp.module_name(layer) for layer in memit_hp.layers]

        def stats() -> Any:
            return key_statistics(model, tok, names, n_samples=args.n_samples, corpus=corpus, cache_dir=cache)

        cold, t_cold = timed(stats)
        warm, t_warm = timed(stats)
        assert not any(s.cached for s in cold.values()) and all(s.cached for s in warm.values())
        what = f"{len(names)} layers {memit_hp.layers[0]}-{memit_hp.layers[-1]}, {args.n_samples} tokens"
        rows.append(
            (
                "key statistics, cold",
                f"{t_cold:.1f} s",
                f"{what}, corpus={Path(corpus).name if corpus else 'model samples'}",
            )
        )
        rows.append(("key statistics, cached", f"{t_warm:.2f} s", what))

        rome = Rome(model, tok, rome_hp, corpus=corpus, cache_dir=cache, progress=False)
        _, t_prefix = timed(lambda: rome.prefixes)
        rows.append(("ROME context prefixes (once)", f"{t_prefix:.1f} s", f"{len(rome.prefixes)} prefixes"))
        snap = Snapshot(model, [rome_hp.module_name])
        times, updates = [], []
        for request in requests[: args.rome_edits]:
            ups, dt = timed(lambda request=request: edit_in_place(model, rome, request))
            updates += ups
            times.append(dt)
        snap.check(updates)
        ok = efficacy(model, tok, requests[: args.rome_edits])
        snap.restore()
        rows.append(
            (
                "ROME, per edit",
                f"{statistics.mean(times):.1f} s",
                f"{len(times)} sequential edits (min {min(times):.1f} s), layer {rome_hp.layer}, "
                f"efficacy {ok}/{len(times)}",
            )
        )

        # PRUNE after every edit (the paper's "multiple"): the session's restraint time per edit, and
        # the cost of a restraint that does change values (a factored ΔW of rank 200, decaying across σ_W)
        session = EditingSession(model, tok, rome, restrain="log", alpha=1.2, every=1, progress=False)
        session.run(requests[: args.session_edits])
        restrain_s = [r["seconds"] for r in session.restraints]  # one per edit (finish() adds none)
        per_edit = session.edit_seconds / session.edits_done
        rows.append(
            (
                "PRUNE after every edit, per edit",
                f"{1e3 * statistics.mean(restrain_s):.2f} ms",
                f"{100 * statistics.mean(restrain_s) / per_edit:.3f} % of the ROME edit ({per_edit:.1f} s), "
                f"{session.edits_done} edits",
            )
        )
        snap.restore()
        ledger = session.ledgers[rome_hp.module_name]
        g = torch.Generator().manual_seed(0)
        m, n = ledger.original.shape
        left = torch.linalg.qr(torch.randn(m, 200, generator=g))[0] * torch.logspace(1, -2, 200)[None] * ledger.sigma_w
        right = torch.linalg.qr(torch.randn(n, 200, generator=g))[0]
        ledger.left, ledger.right = left, right
        _, t_heavy = timed(session.restrain_now)
        snap.restore()
        k = session.restraints[-1]["restrained"][rome_hp.module_name]
        rows.append(
            (
                "PRUNE restraint that changes values",
                f"{1e3 * t_heavy:.1f} ms",
                f"{m}x{n}, ΔW of rank 200 with {k} values above σ_W, "
                f"{100 * t_heavy / per_edit:.2f} % of the ROME edit",
            )
        )

        memit = Memit(model, tok, memit_hp, corpus=corpus, cache_dir=cache, progress=False)
        memit.prefixes  # noqa: B018 - generate once, outside the timings
        snap = Snapshot(model, names)
        for size, batches in ((1, args.memit_batch1), (args.memit_batch, 1)):
            times, updates = [], []
            for b in range(batches):
                batch = requests[b * size : (b + 1) * size]
                ups, dt = timed(lambda batch=batch: edit_in_place(model, memit, batch))
                updates += ups
                times.append(dt)
            snap.check(updates)
            ok = efficacy(model, tok, requests[: size * batches])
            snap.restore()
            rows.append(
                (
                    f"MEMIT batch {size}, per edit",
                    f"{statistics.mean(times) / size:.1f} s",
                    f"{batches} batch(es), {statistics.mean(times):.1f} s per batch, layers "
                    f"{memit_hp.layers[0]}-{memit_hp.layers[-1]}, efficacy {ok}/{size * batches}",
                )
            )

    print(f"\nSmolLM2 editing benchmark: {args.model}, float32, torch {torch.__version__}, {args.threads} threads\n")
    width = max(len(r[0]) for r in rows)
    print(f"| {'what':<{width}} | time | notes |")
    print(f"|{'-' * (width + 2)}|------|-------|")
    for what, t, note in rows:
        print(f"| {what:<{width}} | {t} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
