"""The ``prune-ext`` command line: run, report, demo, bench, train-mend."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_EDITS = 111


def _tasks(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prune-ext", description="Sequential model editing with PRUNE.")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a sequential-editing experiment")
    run.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' or a local Hugging Face folder")
    run.add_argument("--editor", choices=["rome", "memit"], default="rome")
    run.add_argument("--data", help="CounterFact or zsRE JSON file (default: the demo's built-in requests)")
    run.add_argument("--format", choices=["counterfact", "zsre"], default="counterfact")
    run.add_argument("--num-edits", type=int, default=100)
    run.add_argument("--batch-size", type=int, default=1, help="requests per MEMIT step")
    run.add_argument("--restrain", choices=["none", "log", "linear"], default="log")
    run.add_argument("--alpha", type=float, default=1.2)
    run.add_argument("--beta", type=float, default=2.0)
    run.add_argument("--every", type=int, help="restrain every K edits (default: once, after the last edit)")
    run.add_argument("--eval-every", type=int, default=25)
    run.add_argument("--tasks", type=_tasks, default=[], help="comma list of gsm8k,rte,nq,samsum,perplexity")
    run.add_argument("--task-data", help="folder of the task files (default $PRUNE_EXT_DATA or ../shared/data)")
    run.add_argument("--limit", type=int, default=20, help="examples per task")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--corpus", help="text file or folder for the key statistics (default: model samples)")
    run.add_argument("--unrestrained-out", help="also write the unrestrained run here (same editing pass)")
    run.add_argument("--out", required=True)

    rep = sub.add_parser("report", help="plots and a table from run folders")
    rep.add_argument("runs", nargs="+")
    rep.add_argument("--out", required=True)

    demo = sub.add_parser("demo", help="SmolLM2, built-in edits, with and without PRUNE (about 15 minutes)")
    demo.add_argument("--out", default="prune-ext-demo")
    demo.add_argument("--num-edits", type=int, default=DEMO_EDITS)

    sub.add_parser("bench", help="the restraint benchmark table", add_help=False)

    tm = sub.add_parser("train-mend", help="train (or resume) MEND's editor networks for a model")
    tm.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' or a local Hugging Face folder")
    tm.add_argument("--data", required=True, help="CounterFact or zsRE JSON file of edit records")
    tm.add_argument("--out", required=True, help="output folder; an unfinished run there resumes")
    tm.add_argument("--steps", type=int, help="optimiser steps of 10 edits each (default 400)")
    tm.add_argument("--val-size", type=int, help="records held out for validation (default 100)")
    tm.add_argument("--seed", type=int)
    tm.add_argument("--rank", type=int, help="inner rank of the editor networks (default 256)")
    tm.add_argument("--val-every", type=int, help="validate every N steps (default 100)")
    tm.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    return ap


def _run(args: argparse.Namespace) -> int:
    from .experiment import ExperimentConfig, run_experiment

    config = ExperimentConfig(
        out=args.out, model=args.model, editor=args.editor, data=args.data, format=args.format,
        num_edits=args.num_edits, batch_size=args.batch_size, restrain=args.restrain, alpha=args.alpha,
        beta=args.beta, every=args.every, eval_every=args.eval_every, tasks=args.tasks, task_data=args.task_data,
        limit=args.limit, seed=args.seed, corpus=args.corpus, unrestrained_out=args.unrestrained_out,
    )
    final = run_experiment(config)
    print(f"done: {final['edits']} edits; trace in {args.out}/trace.jsonl, results in {args.out}/results.json")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .evaluation.tasks import resolve_data_dir, task_file
    from .experiment import ExperimentConfig, run_experiment
    from .report import load_run, summary_table, write_report

    out = Path(args.out)
    try:  # perplexity on held-out text, and NQ passages for the key statistics, when the data is there
        task_file("perplexity", None)
        tasks = ["perplexity"]
    except (FileNotFoundError, ValueError):
        tasks = []
        print(f"(no task data at {resolve_data_dir(None)}: skipping perplexity; key statistics from model samples)")
    nq = resolve_data_dir(None) / "tasks" / "nq-open.jsonl"
    corpus = str(nq) if nq.is_file() else None
    config = ExperimentConfig(
        out=str(out / "prune"), unrestrained_out=str(out / "no-prune"), editor="rome", num_edits=args.num_edits,
        restrain="log", alpha=1.2, eval_every=max(1, args.num_edits // 3), tasks=tasks, limit=20, only_known=True,
        corpus=corpus,
    )
    run_experiment(config)
    folders = [out / "prune", out / "no-prune"]
    files = write_report(folders, out / "report")
    print()
    print(summary_table([load_run(f) for f in folders]))
    print("plots:")
    for f in files:
        print(f"  {f}")
    return 0


def _train_mend(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .editing.mend.train import config_from_args, train_mend

    try:
        config = config_from_args(model=args.model, data=args.data, out=args.out, steps=args.steps,
                                  val_size=args.val_size, seed=args.seed, rank=args.rank, val_every=args.val_every)
        result = train_mend(config)
    except ValueError as exc:  # bad settings or data: one line
        print(f"prune-ext: error: {exc}", file=sys.stderr)
        return 2
    last = result.val_curve[-1] if result.val_curve else {}
    print(f"done: {result.steps} steps; editor in {result.editor_dir}; validation (n={last.get('n', 0)}): "
          f"efficacy {last.get('efficacy', float('nan')):.3f}, loss {last.get('loss', float('nan')):.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        bench_main(argv[1:])
        return 0
    args = _parser().parse_args(argv)
    from .experiment import ExperimentError

    try:
        if args.command == "run":
            return _run(args)
        if args.command == "train-mend":
            return _train_mend(args)
        if args.command == "report":
            from .report import write_report

            for path in write_report(args.runs, args.out):
                print(path)
            return 0
        return _demo(args)
    except (ExperimentError, FileNotFoundError) as exc:
        print(f"prune-ext: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prune-ext: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
