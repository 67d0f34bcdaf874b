"""Wall time of ROME, MEMIT and AlphaEdit edits and of the key statistics, on SmolLM2-135M (CPU).

    python benchmarks/bench_editing.py                 # 2 threads, defaults below
    python benchmarks/bench_editing.py --rome-edits 5 --threads 2 --n-samples 50000
    python benchmarks/bench_editing.py --rome-edits 0 --session-edits 0 --memit-batch1 0 \
        --memit-batch 100 --large-batches 2 --editors memit,alphaedit --mpes both \
        --corpus ../shared/data/tasks/nq-open.jsonl   # batch-100 mode: MEMIT and AlphaEdit, ± MPES

Prints a Markdown table. Each editing row first checks that the edits took (CounterFact
efficacy: P(new target) > P(true target) on the edit prompt) and that the returned factors
reproduce the change of the weights, then reports the time. The model is restored between rows.
Key statistics are computed cold in a fresh temporary cache folder (all MEMIT layers, which
include the ROME layer, in one pass) and then loaded from it. A count of 0 skips a row group.
The large-batch rows run ``--large-batches`` sequential batches of ``--memit-batch`` requests per
editor (each editor on the unedited model), with and/or without MPES, and report seconds per edit,
the share spent in the value optimisation, the process CPU time per edit (all threads: on a machine
that others load, the wall time is not the editor's), the mean number of Adam steps per request, and
the peak resident memory.

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

import prune_ext.editing.memit as memit_module
from prune_ext.editing import (
    AlphaEdit,
    AlphaEditHyperParams,
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


def peak_rss_gb() -> float:
    """The process's peak resident memory so far (Linux: ru_maxrss in kB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class ValueTimer:
    """Seconds spent in MEMIT's (and AlphaEdit's) value optimisation, by wrapping it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._inner = memit_module.optimize_values

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def cpu_timed(fn: Any) -> tuple[Any, float, float]:
    """``fn()``, its wall time and the process's CPU time (all threads) while it ran."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rome-edits", type=int, default=3, help="sequential ROME edits to time")
    parser.add_argument("--memit-batch1", type=int, default=2, help="MEMIT batches of 1 to time")
    parser.add_argument("--memit-batch", type=int, default=10, help="size of the large MEMIT/AlphaEdit batch")
    parser.add_argument("--large-batches", type=int, default=1, help="sequential large batches per editor")
    parser.add_argument("--editors", default="memit", help="comma list of memit,alphaedit for the large batches")
    parser.add_argument("--mpes", choices=["off", "on", "both"], default="off", help="MPES in the large batches")
    parser.add_argument("--nullspace-energy", type=float, help="AlphaEdit's nullspace_energy (default: its own)")
    parser.add_argument("--cache-dir", help="statistics cache to reuse (default: a fresh one, timed cold)")
    parser.add_argument("--n-samples", type=int, default=50_000, help="tokens in the key statistics")
    parser.add_argument("--session-edits", type=int, default=5, help="ROME edits with PRUNE after every edit")
    parser.add_argument(
        "--corpus", default=None, help="statistics corpus (default: ../shared/data/tasks if present, else samples)"
    )
    args = parser.parse_args(argv)
    counts = ("threads", "rome_edits", "memit_batch1", "memit_batch", "large_batches", "n_samples", "session_edits")
    for name in counts:
        if getattr(args, name) < (1 if name in ("threads", "n_samples") else 0):
            parser.error(f"--{name.replace('_', '-')} must be at least {1 if name in ('threads', 'n_samples') else 0}")
    torch.set_num_threads(args.threads)
    corpus = args.corpus
    if corpus is None and (data_dir() / "tasks").is_dir():
        corpus = str(data_dir() / "tasks")
    wanted = max(args.rome_edits, args.session_edits if args.rome_edits else 0, args.memit_batch1,
                 args.memit_batch * args.large_batches)
    requests = load_counterfact(limit=wanted) if wanted else []

    (model, tok), t_load = timed(lambda: load_model(args.model))
    rome_hp = RomeHyperParams.for_model(model, mom2_n_samples=args.n_samples)
    memit_hp = MemitHyperParams.for_model(model, mom2_n_samples=args.n_samples)
    rows: list[tuple[str, str, str]] = [("load model", f"{t_load:.1f} s", args.model)]

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or tmp
        names = [memit_hp.module_name(layer) for layer in memit_hp.layers]

        def stats() -> Any:
            return key_statistics(model, tok, names, n_samples=args.n_samples, corpus=corpus, cache_dir=cache)

        cold, t_cold = timed(stats)
        warm, t_warm = timed(stats)
        assert all(s.cached for s in warm.values())
        what = f"{len(names)} layers {memit_hp.layers[0]}-{memit_hp.layers[-1]}, {args.n_samples} tokens"
        if not any(s.cached for s in cold.values()):  # a --cache-dir that already holds them: no cold row
            rows.append(
                (
                    "key statistics, cold",
                    f"{t_cold:.1f} s",
                    f"{what}, corpus={Path(corpus).name if corpus else 'model samples'}",
                )
            )
        rows.append(("key statistics, cached", f"{t_warm:.2f} s", what))

        if args.rome_edits > 0:
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
        if args.rome_edits > 0 and args.session_edits > 0:
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
            decay = torch.logspace(1, -2, 200)[None] * ledger.sigma_w
            left = torch.linalg.qr(torch.randn(m, 200, generator=g))[0] * decay
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
        for size, batches in ((1, args.memit_batch1), (args.memit_batch, 1 if args.large_batches else 0)):
            if batches == 0 or size == 0 or "memit" not in args.editors.split(",") and size != 1:
                continue
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

        if args.memit_batch and args.large_batches and (
            args.large_batches > 1 or "alphaedit" in args.editors.split(",") or args.mpes != "off"
        ):
            rows += large_batch_rows(args, model, tok, requests, corpus, cache, names)

    print(f"\nSmolLM2 editing benchmark: {args.model}, float32, torch {torch.__version__}, {args.threads} threads\n")
    width = max(len(r[0]) for r in rows)
    print(f"| {'what':<{width}} | time | notes |")
    print(f"|{'-' * (width + 2)}|------|-------|")
    for what, t, note in rows:
        print(f"| {what:<{width}} | {t} | {note} |")
    return 0


def large_batch_rows(
    args: argparse.Namespace, model: Any, tok: Any, requests: list[EditRequest], corpus: str | None, cache: str,
    names: list[str],
) -> list[tuple[str, str, str]]:
    """``--large-batches`` batches of ``--memit-batch`` for each editor and MPES setting, each run on the
    unedited model: seconds per edit, value-optimisation share, Adam steps, efficacy."""
    rows = []
    size, batches = args.memit_batch, args.large_batches
    timer = ValueTimer()
    memit_module.optimize_values = timer  # type: ignore[assignment]
    try:
        for editor_name in [e for e in args.editors.split(",") if e]:
            for mpes in {"off": [False], "on": [True], "both": [False, True]}[args.mpes]:
                cls, hp_cls = {"memit": (Memit, MemitHyperParams), "alphaedit": (AlphaEdit, AlphaEditHyperParams)}[
                    editor_name
                ]
                extra = {}
                if cls is AlphaEdit and args.nullspace_energy is not None:
                    extra["nullspace_energy"] = args.nullspace_energy
                hp = hp_cls.for_model(model, mom2_n_samples=args.n_samples, mpes=mpes, **extra)
                editor = cls(model, tok, hp, corpus=corpus, cache_dir=cache, progress=False)
                editor.prefixes  # noqa: B018 - generated once, outside the timings
                if cls is AlphaEdit:
                    for name in names:  # P's eigendecomposition once per layer, outside the timings too
                        editor.null_space(name)
                snap = Snapshot(model, names)
                times, cpus, updates, steps = [], [], [], []
                timer.seconds = 0.0
                for b in range(batches):
                    batch = requests[b * size : (b + 1) * size]
                    ups, dt, cpu = cpu_timed(lambda batch=batch, editor=editor: edit_in_place(model, editor, batch))
                    updates += ups
                    times.append(dt)
                    cpus.append(cpu)
                    assert editor.last_values is not None
                    steps += editor.last_values.steps
                snap.check(updates)
                ok = efficacy(model, tok, requests[: size * batches])
                snap.restore()
                total = sum(times)
                label = {"memit": "MEMIT", "alphaedit": "AlphaEdit"}[editor_name]
                rows.append(
                    (
                        f"{label} batch {size}{', MPES' if mpes else ''}, per edit",
                        f"{total / (size * batches):.2f} s",
                        f"{batches} batch(es), {statistics.mean(times):.0f} s per batch "
                        f"(values {100 * timer.seconds / total:.0f} %), CPU {sum(cpus) / (size * batches):.2f} s "
                        f"per edit, {statistics.mean(steps):.1f} Adam steps per request, efficacy "
                        f"{ok}/{size * batches}, peak RSS {peak_rss_gb():.1f} GB",
                    )
                )
                print("| " + " | ".join(rows[-1]) + " |", flush=True)
    finally:
        memit_module.optimize_values = timer._inner  # type: ignore[assignment]
    return rows


if __name__ == "__main__":
    sys.exit(main())
