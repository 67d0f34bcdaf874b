"""The ``prune-ext`` command line: run, report, demo, bench, restrain, export, train-mend."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_EDITS = 111


def _tasks(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _limit(text: str) -> int | dict[str, int]:
    """``--limit``: ``N`` examples of every task, or ``task=N,...`` per task."""
    try:
        if "=" not in text:
            return int(text)
        pairs = [item.split("=") for item in text.split(",") if item.strip()]
        return {name.strip(): int(count) for name, count in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or task=N,..., got {text!r}") from None


def _placement(parser: argparse.ArgumentParser) -> None:
    """Where the model lives: --device, --dtype, --device-map, --store-device."""
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the loaded model (statistics, solves and the books stay float32)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--device-map", help="'auto' or a JSON file of module -> device (accelerate)")
    parser.add_argument("--store-device", help="where W and ΔW's factors live and the restraint runs "
                        "(default: each matrix's own GPU while it has room, else cpu)")


def _parser() -> argparse.ArgumentParser:
    from .editing import EDITORS

    ap = argparse.ArgumentParser(prog="prune-ext", description="Sequential model editing with PRUNE.")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a sequential-editing experiment")
    run.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' or a local Hugging Face folder")
    run.add_argument("--editor", choices=sorted(EDITORS), default="rome")
    run.add_argument("--data", help="CounterFact or zsRE JSON file (default: the demo's built-in requests)")
    run.add_argument("--format", choices=["counterfact", "zsre"], default="counterfact")
    run.add_argument("--num-edits", type=int, default=100)
    run.add_argument("--batch-size", type=int, default=1, help="requests per MEMIT / AlphaEdit step")
    run.add_argument("--mpes", action="store_true", help="most-probable early stopping of the value optimisation")
    run.add_argument("--norm-constraint", type=float, metavar="MU", help="ENCORE's norm penalty μ (MEMIT, AlphaEdit)")
    run.add_argument("--restrain", choices=["none", "log", "linear"], default="log")
    run.add_argument("--alpha", type=float, default=1.2)
    run.add_argument("--beta", type=float, default=2.0)
    run.add_argument("--every", type=int, help="restrain every K edits (default: once, after the last edit)")
    run.add_argument("--eval-every", type=int, default=25)
    run.add_argument("--tasks", type=_tasks, default=[], help="comma list of gsm8k,rte,nq,samsum,perplexity")
    run.add_argument("--task-data", help="folder of the task files (default $PRUNE_EXT_DATA or ../shared/data)")
    run.add_argument("--limit", type=_limit, default=20,
                     help="examples per task: N, or task=N,... (e.g. rte=400,samsum=100)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--corpus", help="text file or folder for the key statistics (default: model samples)")
    run.add_argument("--unrestrained-out", help="also write the unrestrained run here (same editing pass)")
    run.add_argument("--hparams", help="JSON/YAML file of editor hyper-parameters: our field names, or an "
                     "EasyEdit ROME/MEMIT/AlphaEdit YAML file (recognised by its alg_name)")
    run.add_argument("--live", action="store_true", help="also score edits by greedy decoding (live_efficacy)")
    run.add_argument("--eval-edits", type=int, metavar="N",
                     help="score a seeded sample of at most N of the edits so far at each checkpoint (default: all)")
    _placement(run)
    run.add_argument("--out", required=True)
    _variant_options(run)
    run.add_argument("--variant-out", action="append", default=[], metavar="DIR=SPEC", type=_variant_out,
                     help="also write the pass restrained once by another variant to DIR (repeatable); SPEC: "
                     "comma list of restrain=log|linear|none, alpha=, beta=, scale=, protect=, damp= (e.g. "
                     "'scale=0.5' or 'restrain=none,protect=0.5,damp=0.8'); may be added when resuming")

    rep = sub.add_parser("report", help="plots and a table from run folders")
    rep.add_argument("runs", nargs="+")
    rep.add_argument("--out", required=True)

    demo = sub.add_parser("demo", help="SmolLM2, built-in edits, with and without PRUNE (about 15 minutes)")
    demo.add_argument("--out", default="prune-ext-demo")
    demo.add_argument("--num-edits", type=int, default=DEMO_EDITS)
    _placement(demo)

    sub.add_parser("bench", help="the restraint benchmark table", add_help=False)

    res = sub.add_parser("restrain", help="PRUNE on any edited checkpoint: restrain edited − base, write a new folder")
    res.add_argument("--base", required=True, help="the unedited Hugging Face folder")
    res.add_argument("--edited", required=True, help="the edited Hugging Face folder (same architecture)")
    res.add_argument("--out", required=True, help="the new folder (must not exist)")
    res.add_argument("--fn", choices=["log", "linear"], default="log")
    res.add_argument("--alpha", type=float, default=1.2)
    res.add_argument("--beta", type=float, default=2.0)
    res.add_argument("--modules", help="comma list of globs over weight names (default: every 2-D weight)")
    _variant_options(res)

    exp = sub.add_parser("export", help="a run's edits as a PEFT LoRA adapter (--lora) or a full HF folder (--hf)")
    exp.add_argument("run", help="a run folder written by prune-ext run")
    dest = exp.add_mutually_exclusive_group(required=True)
    dest.add_argument("--lora", help="write a PEFT LoRA adapter folder here")
    dest.add_argument("--hf", help="write a full Hugging Face model folder here")
    which = exp.add_mutually_exclusive_group()
    which.add_argument("--restrained", dest="restrained", action="store_const", const=True,
                       help="check that RUN holds the restrained weights")
    which.add_argument("--unrestrained", dest="restrained", action="store_const", const=False,
                       help="check that RUN holds the unrestrained weights")

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


def _variant_options(parser: argparse.ArgumentParser) -> None:
    """The spectral variants of the restraint (prune_ext.spectral; docs/restraints.md)."""
    parser.add_argument("--threshold-scale", type=float, default=1.0, metavar="C",
                        help="restrain ΔW's values above C·σmax(W) (default 1: PRUNE)")
    parser.add_argument("--protect-energy", type=float, metavar="E",
                        help="first remove ΔW's component in W's top singular subspaces holding a share E of "
                        "W's energy (REVIVE/SPHERE-like; default: off)")
    parser.add_argument("--protect-damp", type=float, default=1.0, metavar="D",
                        help="damp that component by D in [0, 1] instead (default 1: remove it)")


def _variant_out(text: str) -> tuple[str, str]:
    folder, sep, spec = text.partition("=")
    if not sep or not folder or not spec:
        raise argparse.ArgumentTypeError(f"expected DIR=SPEC, got {text!r}")
    return folder, spec


def _variant_args(args: argparse.Namespace) -> dict[str, float | None]:
    return {"threshold_scale": args.threshold_scale, "protect_energy": args.protect_energy,
            "protect_damp": args.protect_damp}


def _placement_args(args: argparse.Namespace) -> dict[str, str | None]:
    return {"dtype": args.dtype, "device": args.device, "device_map": args.device_map,
            "store_device": args.store_device}


def _run(args: argparse.Namespace) -> int:
    from .editing.hparams import read_hparams_file
    from .experiment import ExperimentConfig, ExperimentError, run_experiment

    try:
        hparams = read_hparams_file(args.hparams, args.editor, model=args.model) if args.hparams else {}
    except ValueError as exc:
        raise ExperimentError(str(exc)) from None
    if args.mpes:
        hparams["mpes"] = True
    if args.norm_constraint is not None:
        hparams["norm_constraint"] = args.norm_constraint

    config = ExperimentConfig(
        out=args.out, model=args.model, editor=args.editor, data=args.data, format=args.format,
        num_edits=args.num_edits, batch_size=args.batch_size, restrain=args.restrain, alpha=args.alpha,
        beta=args.beta, every=args.every, eval_every=args.eval_every, tasks=args.tasks, task_data=args.task_data,
        limit=args.limit, seed=args.seed, corpus=args.corpus, unrestrained_out=args.unrestrained_out,
        live=args.live, eval_edits=args.eval_edits, hparams=hparams, **_placement_args(args),
        **_variant_args(args), variant_outs=dict(args.variant_out),
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
        corpus=corpus, **_placement_args(args),
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


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler, `kill`) ends a run like Ctrl-C: the session saves at a step boundary and
    the same command resumes. (A background job started by a shell ignores SIGINT, so this is how to
    stop one cleanly.)"""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _restrain(args: argparse.Namespace) -> int:
    from .posthoc import REPORT_NAME, format_table, restrain_folder

    reports = restrain_folder(args.base, args.edited, args.out, fn=args.fn, alpha=args.alpha, beta=args.beta,
                              modules=args.modules, log=print, **_variant_args(args))
    print()
    print(format_table(reports) if reports else "no 2-D weight differs between the two models")
    print(f"wrote {args.out} (table in {Path(args.out) / REPORT_NAME})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_hf, export_lora

    if args.lora:
        export_lora(args.run, args.lora, restrained=args.restrained, log=print)
    else:
        export_hf(args.run, args.hf, restrained=args.restrained, log=print)
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
    from .editing.easyedit import HParamsError
    from .experiment import ExperimentError
    from .export import ExportError
    from .posthoc import PosthocError

    try:
        if args.command == "run":
            _interrupt_on_sigterm()
            return _run(args)
        if args.command == "restrain":
            return _restrain(args)
        if args.command == "export":
            return _export(args)
        if args.command == "train-mend":
            return _train_mend(args)
        if args.command == "report":
            from .report import write_report

            for path in write_report(args.runs, args.out):
                print(path)
            return 0
        return _demo(args)
    except (ExperimentError, FileNotFoundError, HParamsError, PosthocError, ExportError) as exc:
        print(f"prune-ext: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prune-ext: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
