"""A whole sequential-editing experiment: edit, restrain, evaluate at checkpoints, write the trace.

Output folder: ``config.json`` (the settings), ``trace.jsonl`` (one JSON object per checkpoint:
``edits``, ``efficacy``, ``generalization``, ``locality``, each task's score, ``matrices`` with
``sigma_max`` / ``sigma_min`` / ``condition_number`` per edited matrix, and timings),
``results.json`` (the final checkpoint) and ``session.safetensors`` (the editing session, so that
an interrupted run resumes where it stopped).

With the paper's main schedule (restrain once, after the last edit) the restrained and the
unrestrained runs share every edit, so one editing pass can write both folders: ``out`` holds the
restrained model W'_N at every checkpoint, ``unrestrained_out`` the unrestrained W_N.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .session import EditingSession


class ExperimentError(ValueError):
    """A bad setting or input of an experiment, reported as one line by the command line."""


@dataclass
class ExperimentConfig:
    """The settings of one run (written to ``config.json``)."""

    out: str
    model: str = "smollm2-135m"
    editor: str = "rome"
    data: str | None = None  # CounterFact / zsRE file; None: the demo's built-in requests
    format: str = "counterfact"
    num_edits: int = 100
    batch_size: int = 1
    restrain: str = "log"
    alpha: float = 1.2
    beta: float = 2.0
    every: int | None = None  # None: once, after the last edit
    eval_every: int = 25
    tasks: list[str] = field(default_factory=list)
    task_data: str | None = None
    limit: int = 20
    seed: int = 0
    corpus: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    unrestrained_out: str | None = None
    only_known: bool = False  # keep only requests whose true answer the model prefers (demo)

    def validate(self) -> None:
        from .editing import EDITORS  # the registry: every registered editor is a valid --editor

        if self.editor not in EDITORS:
            raise ExperimentError(f"--editor must be one of {', '.join(sorted(EDITORS))}, got {self.editor!r}")
        known = {f.name for f in dataclasses.fields(EDITORS[self.editor].hparams_class)}
        if set(self.hparams) - known:
            raise ExperimentError(f"{self.editor} has no setting(s) {', '.join(sorted(set(self.hparams) - known))}")
        if self.format not in ("counterfact", "zsre"):
            raise ExperimentError(f"--format must be counterfact or zsre, got {self.format!r}")
        if self.restrain not in ("none", "log", "linear"):
            raise ExperimentError(f"--restrain must be none, log or linear, got {self.restrain!r}")
        for name in ("num_edits", "batch_size", "eval_every", "limit"):
            if getattr(self, name) < 1:
                raise ExperimentError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.every is not None and self.every < 1:
            raise ExperimentError(f"--every must be at least 1, got {self.every}")
        if self.restrain == "log" and not (self.alpha > 1 and math.isfinite(self.alpha)):
            raise ExperimentError(f"--alpha must be a finite number > 1, got {self.alpha}")
        if self.restrain == "linear" and not (self.beta > 1 and math.isfinite(self.beta)):
            raise ExperimentError(f"--beta must be a finite number > 1, got {self.beta}")
        if self.unrestrained_out is not None and (self.restrain == "none" or self.every is not None):
            raise ExperimentError("--unrestrained-out needs a restraint applied once at the end (no --every)")
        if self.data is not None and not Path(self.data).is_file():
            raise ExperimentError(f"--data: no such file: {self.data}")
        if self.editor == "rome" and self.batch_size != 1:
            raise ExperimentError("ROME edits one request at a time: use --batch-size 1 (or --editor memit)")


def load_requests(config: ExperimentConfig) -> list[Any]:
    from .editing import load_counterfact, load_zsre

    if config.data is None:
        from .demo_data import demo_requests

        return demo_requests()[: config.num_edits]
    loader = load_counterfact if config.format == "counterfact" else load_zsre
    try:
        return loader(config.data, limit=config.num_edits)
    except (ValueError, KeyError, OSError) as exc:
        raise ExperimentError(f"--data {config.data}: {exc}") from exc


def _known(model, tok, requests: Sequence[Any]) -> list[Any]:
    """The requests whose true answer the unedited model already prefers over the new one."""
    from .evaluation import evaluate_edits

    scores = evaluate_edits(model, tok, requests, "counterfact", per_edit=True, progress=False)["per_edit"]
    return [r for r, s in zip(requests, scores) if s["efficacy"] == 0.0]


class _Trace:
    """trace.jsonl of one output folder (appended, flushed, one line per checkpoint)."""

    def __init__(self, folder: Path, config: ExperimentConfig, resume: bool) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "trace.jsonl"
        self.done = {json.loads(line)["edits"] for line in self.path.read_text().splitlines() if line.strip()} \
            if resume and self.path.exists() else set()
        if not resume:
            self.path.write_text("")
        (folder / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tmp = self.folder / ".results.json.tmp"
        tmp.write_text(json.dumps(row, indent=2) + "\n")
        os.replace(tmp, self.folder / "results.json")


def run_experiment(config: ExperimentConfig, *, progress: bool = True, log=print) -> dict[str, Any]:
    """Run (or resume) the experiment described by ``config``; returns the final checkpoint."""
    from .editing import load_model
    from .evaluation import evaluate_edits, evaluate_tasks

    config.validate()
    out = Path(config.out)
    ckpt = out / "session.safetensors"
    resume = ckpt.exists()
    if resume:
        saved = json.loads((out / "config.json").read_text())
        if saved != asdict(config):
            changed = sorted(k for k in saved if saved[k] != asdict(config).get(k))
            raise ExperimentError(f"{out} holds a run with other settings ({', '.join(changed)}): "
                                  "use another --out")
        if (out / "results.json").exists() and json.loads((out / "results.json").read_text()).get("final"):
            log(f"{out}: this run is already complete")
            return json.loads((out / "results.json").read_text())
    torch.manual_seed(config.seed)
    try:
        requests = load_requests(config)
    except FileNotFoundError as exc:
        raise ExperimentError(str(exc)) from exc
    if config.tasks:  # check task names and files before any model work
        from .evaluation.tasks import _check_task, task_file

        for name in config.tasks:
            try:
                _check_task(name)
                task_file(name, config.task_data)
            except (ValueError, FileNotFoundError) as exc:
                raise ExperimentError(str(exc)) from exc
    log(f"loading {config.model} …")
    model, tok = load_model(config.model)
    if config.only_known:
        requests = _known(model, tok, requests)
        log(f"{len(requests)} requests whose true answer the model knows")
    if not requests:
        raise ExperimentError("no edit requests to run")
    style = "zsre" if config.format == "zsre" else "counterfact"
    baseline = None
    if style == "zsre":
        from .evaluation import locality_baseline

        baseline = locality_baseline(model, tok, requests, progress=progress)

    traces = [(_Trace(out, config, resume), True)]
    if config.unrestrained_out is not None:
        traces.append((_Trace(Path(config.unrestrained_out), config, resume), False))
    session = EditingSession(
        model, tok, config.editor, config.hparams or None, restrain=config.restrain, alpha=config.alpha,
        beta=config.beta, every=config.every, checkpoint=ckpt, save_every=max(1, config.eval_every),
        corpus=config.corpus, progress=progress,
    )
    if resume:
        log(f"resuming {out} after {session.edits_done} edits")

    def checkpoint(s: EditingSession) -> None:
        # the last edit's checkpoint comes before finish(): with the once-at-the-end schedule the
        # unrestrained ΔW is still there to evaluate next to the restrained one
        n = s.edits_done
        final = n == len(requests)
        if not final and n % config.eval_every != 0 and n != 0:
            return
        diags = s.diagnostics()
        for trace, restrained in traces:
            if n in trace.done:
                continue
            start = time.perf_counter()
            # once-at-the-end schedule: the restrained folder shows W'_N = W + restrained ΔW now (that
            # restraint happens here, not in the session, so it is timed here)
            restrain_now = restrained and config.every is None and config.restrain != "none"
            weights = s.weights(restrained=restrain_now)
            restrain_seconds = time.perf_counter() - start if restrain_now else 0.0
            with s.using(weights):
                row = {"edits": n, "final": final}
                row.update({k: v for k, v in evaluate_edits(model, tok, requests[:n], style, baseline=baseline,
                                                            progress=False).items()} if n else
                           {"efficacy": math.nan, "generalization": math.nan, "locality": math.nan})
                if config.tasks:
                    row.update(evaluate_tasks(model, tok, config.tasks, data_dir=config.task_data,
                                              limit=config.limit, seed=config.seed, progress=progress))
            use_restrained = restrained and config.restrain != "none"
            row["matrices"] = {
                name: {"sigma_max": d.sigma_max_restrained if use_restrained else d.sigma_max,
                       "sigma_min": d.sigma_min_restrained if use_restrained else d.sigma_min,
                       "condition_number": (d.condition_number_restrained if use_restrained
                                            else d.condition_number),
                       "delta_sigma_max": d.delta_sigma_max, "delta_rank": d.delta_rank,
                       "values_above_threshold": d.values_above_threshold, "threshold": d.threshold}
                for name, d in diags.items()
            }
            row["seconds"] = {"edit": s.edit_seconds,
                              "restrain": sum(r.get("seconds", 0.0) for r in s.restraints) + restrain_seconds,
                              "eval": time.perf_counter() - start}
            trace.write(row)
            trace.done.add(n)
            if progress:
                log(_summary_line(row))

    if session.edits_done == 0:
        checkpoint(session)
    session.run(requests, batch_size=config.batch_size, on_step=checkpoint)
    return json.loads((out / "results.json").read_text())


def _summary_line(row: dict[str, Any]) -> str:
    kappa = max((m["condition_number"] for m in row["matrices"].values()), default=math.nan)
    scores = " ".join(f"{k}={row[k]:.3f}" for k in ("efficacy", "generalization", "locality")
                      if isinstance(row.get(k), float) and not math.isnan(row[k]))
    return f"  edits={row['edits']:<4} {scores} κ_max={kappa:.1f}"
