"""A whole sequential-editing experiment: edit, restrain, evaluate at checkpoints, write the trace.

Output folder: ``config.json`` (the settings, and fingerprints of the inputs), ``trace.jsonl`` (one
JSON object per checkpoint: ``edits``, ``efficacy``, ``generalization``, ``locality``, each task's
score, ``n`` and ``intervals`` per score, ``matrices`` with the spectral state of every edited matrix
*as the model held it when it was evaluated* (``held``, ``dtype``, ``sigma_max``, ``sigma_min``,
``condition_number``, ΔW's ``delta_sigma_max``, ``delta_fro``, rank, count above σmax(W), ``sha256``),
and timings), ``results.json`` (the last row), ``weights.safetensors`` (the final evaluated matrices
under their parameter names) and ``session.safetensors`` (the editing session's books, so that an
interrupted run resumes where it stopped).

With the paper's main schedule (restrain once, after the last edit) the restrained and the
unrestrained runs share every edit, so one editing pass can write both folders: ``out`` is evaluated
holding W + F(ΔW) at every checkpoint (the run as if it ended there), ``unrestrained_out`` holding
W + ΔW. With ``every`` k, ``out`` is evaluated on the weights the schedule produced (restrained at
every k-th edit, and once more at the end if edits came after the last restraint). Where both folders
hold bit-identical weights at a checkpoint (before the first edit, or while no value of ΔW exceeds
σmax(W), so that F(ΔW) = ΔW), the model is evaluated once and the second row repeats those scores,
saying so (``scores_from``: the variant that was evaluated).

A checkpoint scores every edit so far, or with ``eval_edits`` a seeded sample of that many of them
(``edits_scored``; the same sample in both folders).

Every write is atomic, so a kill at any moment loses nothing: the run resumes from its last session
save, skips the rows already written and ends with the same weights and rows.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .io import append_jsonl, atomic_write, atomic_write_text, json_text, read_json, read_jsonl, write_json
from .session import EditingSession, diagnostics_as_dict


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
    limit: int | dict[str, int] = 20  # examples per task, or per task by name
    seed: int = 0
    corpus: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    unrestrained_out: str | None = None
    only_known: bool = False  # keep only requests whose true answer the model prefers (demo)
    live: bool = False  # also score edits by greedy decoding (live_efficacy)
    eval_edits: int | None = None  # score a seeded sample of at most this many of the edits so far
    dtype: str = "float32"  # of the loaded model: float32, bfloat16 or float16
    device: str | None = None  # cpu, cuda, cuda:N (default: where transformers loads it, the CPU)
    device_map: str | None = None  # "auto" or a JSON file of module -> device
    store_device: str | None = None  # where the books live (default: each matrix's GPU, else the CPU)
    threshold_scale: float = 1.0  # the restraint's variant (prune_ext.spectral.Restraint); 1, None, 1: PRUNE
    protect_energy: float | None = None
    protect_damp: float = 1.0
    # extra once-at-the-end outputs of the same editing pass: folder -> restraint spec ("scale=0.5", …)
    variant_outs: dict[str, str] = field(default_factory=dict)

    def restraint(self):
        """The main folder's restraint (:class:`prune_ext.spectral.Restraint`)."""
        from .spectral import Restraint

        return Restraint(self.restrain, self.alpha, self.beta, self.threshold_scale,  # type: ignore[arg-type]
                         self.protect_energy, self.protect_damp)

    def variants(self) -> dict[str, Any]:
        """The extra outputs' restraints, by folder (unset keys from the main restraint's F)."""
        from .spectral import Restraint, parse_restraint

        base = Restraint(self.restrain if self.restrain != "none" else "log", self.alpha, self.beta)
        return {folder: parse_restraint(spec, base) for folder, spec in self.variant_outs.items()}

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
        for name in ("num_edits", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ExperimentError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        limits = self.limit if isinstance(self.limit, dict) else {"": self.limit}
        if any(not isinstance(n, int) or n < 1 for n in limits.values()):
            raise ExperimentError(f"--limit: every count must be at least 1, got {self.limit}")
        if isinstance(self.limit, dict) and set(self.tasks) - set(self.limit):
            raise ExperimentError(f"--limit names no count for {', '.join(sorted(set(self.tasks) - set(self.limit)))}")
        if self.eval_edits is not None and self.eval_edits < 1:
            raise ExperimentError(f"--eval-edits must be at least 1, got {self.eval_edits}")
        if self.every is not None and self.every < 1:
            raise ExperimentError(f"--every must be at least 1, got {self.every}")
        if self.restrain == "log" and not (self.alpha > 1 and math.isfinite(self.alpha)):
            raise ExperimentError(f"--alpha must be a finite number > 1, got {self.alpha}")
        if self.restrain == "linear" and not (self.beta > 1 and math.isfinite(self.beta)):
            raise ExperimentError(f"--beta must be a finite number > 1, got {self.beta}")
        try:
            self.restraint()
            variants = self.variants()
        except ValueError as exc:
            raise ExperimentError(str(exc)) from exc
        main_acts = self.restrain != "none" or self.protect_energy is not None
        if self.unrestrained_out is not None and (not main_acts or self.every is not None):
            raise ExperimentError("--unrestrained-out needs a restraint applied once at the end (no --every)")
        if variants and self.every is not None:
            raise ExperimentError("--variant-out writes once-at-the-end variants of the same pass: not with --every")
        folders = [Path(self.out).resolve()] + [Path(f).resolve() for f in [self.unrestrained_out, *variants] if f]
        if len(set(folders)) != len(folders):
            raise ExperimentError("--out, --unrestrained-out and every --variant-out folder must differ")
        if self.data is not None and not Path(self.data).is_file():
            raise ExperimentError(f"--data: no such file: {self.data}")
        if self.corpus is not None and not Path(self.corpus).exists():
            raise ExperimentError(f"--corpus: no such file or folder: {self.corpus}")
        from .editing.models import DTYPES

        if self.dtype not in DTYPES:
            raise ExperimentError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device is not None and self.device_map is not None:
            raise ExperimentError("give --device or --device-map, not both")
        for name in ("device", "store_device"):
            value = getattr(self, name)
            if value is not None and str(value).startswith("cuda") and not torch.cuda.is_available():
                raise ExperimentError(f"--{name.replace('_', '-')} {value}: this torch sees no CUDA device")
        if self.device_map not in (None, "auto") and not Path(self.device_map).is_file():
            raise ExperimentError(f"--device-map must be 'auto' or a JSON file, got {self.device_map!r}")
        for name in ("device", "store_device"):
            value = getattr(self, name)
            if value is not None:
                try:
                    torch.device(value)
                except RuntimeError:
                    raise ExperimentError(f"--{name.replace('_', '-')}: not a device: {value!r}") from None
        if not EDITORS[self.editor].batched and self.batch_size != 1:
            raise ExperimentError(f"{self.editor} edits one request at a time: use --batch-size 1")


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


def _file_sha256(path: str | None) -> str | None:
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_fingerprints(config: ExperimentConfig, n_requests: int) -> dict[str, Any]:
    """What, besides the settings, decides the result: the data file's and the corpus's content
    and the number of requests. Resume refuses a folder whose fingerprints differ."""
    from .editing.covariance import corpus_digest

    return {"data_sha256": _file_sha256(config.data), "corpus_digest": corpus_digest(config.corpus, config.seed),
            "requests": n_requests}


def _device_map(value: str | None) -> str | dict[str, Any] | None:
    """``--device-map``: ``"auto"``, or a JSON file of module name → device."""
    if value is None or value == "auto":
        return value
    try:
        mapping = read_json(value)
    except (OSError, ValueError) as exc:
        raise ExperimentError(f"--device-map {value}: {exc}") from exc
    if not isinstance(mapping, dict) or not all(isinstance(v, (str, int)) for v in mapping.values()):
        raise ExperimentError(f"--device-map {value}: expected a JSON object of module name -> device")
    return mapping


def _known(model, tok, requests: Sequence[Any]) -> list[Any]:
    """The requests whose true answer the unedited model already prefers over the new one."""
    from .evaluation import evaluate_edits

    scores = evaluate_edits(model, tok, requests, "counterfact", per_edit=True, progress=False)["per_edit"]
    return [r for r, s in zip(requests, scores) if s["efficacy"] == 0.0]


class _Trace:
    """One output folder: ``config.json``, ``trace.jsonl``, ``results.json``, ``weights.safetensors``.

    ``variant``: a ``--variant-out`` folder, evaluated holding W + variant(ΔW) (a
    :class:`~prune_ext.spectral.Restraint`) at every checkpoint from the one it was added at."""

    def __init__(self, folder: Path, restrained: bool, variant: Any = None) -> None:
        self.folder, self.restrained, self.variant = folder, restrained, variant
        self.fresh = False  # started here (not resumed): a variant records where its rows begin
        self.path = folder / "trace.jsonl"
        self.done: set[int] = set()
        self.rows: list[dict[str, Any]] = []  # rows already written (a resumed run's)

    def start(self, settings: dict[str, Any], resume: bool) -> None:
        """Check a folder being resumed against ``settings``, or start it afresh."""
        config_path = self.folder / "config.json"
        if resume and config_path.exists():
            saved = {**_DEFAULTS, **read_json(config_path)}  # a setting newer than the folder: its default
            rows = read_jsonl(self.path) if self.path.exists() else []
            kept = {k: saved[k] for k in _FOLDER_KEYS if k in saved}  # this folder's own record
            if _comparable(saved) != _comparable(settings):
                if not _only_count_differs(_comparable(saved), _comparable(settings)):
                    a, b = _comparable(saved), _comparable(settings)
                    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                    raise ExperimentError(f"{self.folder} holds a run with other settings or inputs "
                                          f"({', '.join(changed)}): use another --out")
                if max((r["edits"] for r in rows), default=0) > settings["num_edits"]:
                    raise ExperimentError(f"{self.folder} holds {max(r['edits'] for r in rows)} edits, more than "
                                          f"--num-edits {settings['num_edits']}")
                # a longer (or, before it got there, shorter) run of the same requests: go on from here
                for row in rows:
                    row["final"] = False
                atomic_write_text(self.path, "".join(json_text(row) + "\n" for row in rows))
                (self.folder / "results.json").unlink(missing_ok=True)
            write_json(config_path, {**settings, **self._own(), **kept})  # (variants added on resume too)
            self.done = {row["edits"] for row in rows}
            self.rows = rows
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fresh = True
        write_json(config_path, {**settings, **self._own()})
        for stale in (self.path, self.folder / "results.json", self.folder / "weights.safetensors"):
            stale.unlink(missing_ok=True)

    def _own(self) -> dict[str, Any]:
        """What only this folder's config records: the restraint its rows were evaluated under."""
        if self.variant is None:
            return {}
        return {"variant": {**self.variant.as_dict(), "spec": self.variant.spec(), "label": self.variant.label()}}

    def record_start(self, edits: int) -> None:
        """A variant folder started on a resumed pass: its rows begin at the next checkpoint after ``edits``."""
        if self.variant is not None and self.fresh:
            config_path = self.folder / "config.json"
            write_json(config_path, {**read_json(config_path), "added_after_edits": edits})

    def record_threads(self, edits: int, threads: int) -> int | None:
        """Note the CPU thread count a pass starts with (float summation order, hence the last bits of
        every result, depends on it); returns the count the run used before, None for a new run."""
        config_path = self.folder / "config.json"
        config = read_json(config_path)
        passes = config.get("threads", [])
        before = passes[-1]["threads"] if passes else None
        if before != threads:
            write_json(config_path, {**config, "threads": [*passes, {"from_edits": edits, "threads": threads}]})
        return before

    def complete(self) -> bool:
        results = self.folder / "results.json"
        return results.exists() and bool(read_json(results).get("final"))

    def write(self, row: dict[str, Any], weights: dict[str, torch.Tensor] | None) -> None:
        """The row (and, for the final one, the evaluated weights first) — each write atomic."""
        if weights is not None:
            tensors = {f"{name}.weight": w.detach().cpu().contiguous() for name, w in weights.items()}
            with atomic_write(self.folder / "weights.safetensors") as tmp:
                save_file(tensors, str(tmp), metadata={"edits": str(row["edits"]), "held": _held(row)})
        append_jsonl(self.path, row)
        write_json(self.folder / "results.json", row)
        self.done.add(row["edits"])


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ExperimentConfig)
             if f.default is not dataclasses.MISSING}
_FOLDER_KEYS = ("variant", "added_after_edits", "threads")  # recorded by one folder, not settings of the run


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide a folder's rows: not which extra variant folders the pass also writes
    (one may be added on resume), nor what a folder records about itself."""
    return {k: v for k, v in settings.items() if k not in ("variant_outs", *_FOLDER_KEYS)}


def scored_indices(n: int, sample: int | None, seed: int) -> list[int]:
    """The positions in the stream of the edits a checkpoint after ``n`` edits scores: all of
    ``range(n)``, or a seeded sample of ``sample`` of them (in edit order; the same for every folder
    of a run at the same ``n``)."""
    if sample is None or n <= sample:
        return list(range(n))
    import random

    return sorted(random.Random(f"{seed}:{n}").sample(range(n), sample))


def scored_edits(requests: Sequence[Any], n: int, sample: int | None, seed: int) -> list[Any]:
    """The edits at :func:`scored_indices`."""
    return [requests[i] for i in scored_indices(n, sample, seed)]


def _task_limits(config: ExperimentConfig) -> dict[str, int]:
    if isinstance(config.limit, dict):
        return config.limit
    return dict.fromkeys(config.tasks, config.limit)


_NOT_SCORES = {"edits", "final", "restrained", "edits_scored", "matrices", "restraints", "seconds", "scores_from",
               "variant"}


def _variant(trace: _Trace) -> str:
    """The name of what a folder holds, for ``scores_from``: restrained, unrestrained, or variant:<spec>."""
    if trace.variant is not None:
        return f"variant:{trace.variant.spec()}"
    return "restrained" if trace.restrained else "unrestrained"


def _compact_per_edit(ids: list[int], case_ids: list[Any], rows: list[dict[str, float]]) -> dict[str, list]:
    """Per-edit outcomes as one list per field (ids: the edits' positions in the stream), floats
    rounded to 6 significant digits: rows of two folders of a pass pair by ``ids``."""
    out: dict[str, list] = {"ids": ids}
    if any(c is not None for c in case_ids):
        out["case_ids"] = case_ids
    for key in rows[0] if rows else []:
        out[key] = [None if math.isnan(r[key]) else float(f"{r[key]:.6g}") for r in rows]
    return out


def _held_key(edits: int, matrices: dict[str, dict[str, Any]]) -> tuple:
    """A checkpoint's identity: the edit count and the digests of the matrices the model held."""
    return edits, tuple(sorted((name, m["sha256"]) for name, m in matrices.items()))


def _scores_of(row: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's part of a trace row (scores, their n, intervals and sources)."""
    return {k: v for k, v in row.items() if k not in _NOT_SCORES}


def _only_count_differs(saved: dict[str, Any], settings: dict[str, Any]) -> bool:
    """True when two runs' settings differ only in how many of the same requests they edit."""
    def strip(d: dict[str, Any]) -> dict[str, Any]:
        inputs = {k: v for k, v in d.get("inputs", {}).items() if k != "requests"}
        return {**{k: v for k, v in d.items() if k not in ("num_edits", "inputs")}, "inputs": inputs}

    return strip(saved) == strip(settings)


def _held(row: dict[str, Any]) -> str:
    return ",".join(sorted({m["held"] for m in row["matrices"].values()}))


def _new_folders(folders: Sequence[Path]) -> list[Path]:
    """The topmost folders that do not exist yet on the way to each of ``folders``."""
    tops = []
    for folder in folders:
        top = None
        for candidate in [folder.absolute(), *folder.absolute().parents]:
            if candidate.exists():
                break
            top = candidate
        if top is not None and top not in tops:
            tops.append(top)
    return tops


def _check_inputs(config: ExperimentConfig) -> None:
    """What :meth:`ExperimentConfig.validate` cannot check without reading files: the tasks and their
    data files, the extras they need, and the model (without loading it)."""
    from .editing.models import check_model
    from .extras import MissingExtraError, require

    try:
        if config.tasks:
            from .evaluation.tasks import _check_task, task_file

            for name in config.tasks:
                _check_task(name)
                task_file(name, config.task_data)
            if "samsum" in config.tasks:
                require("rouge_score", "the samsum task (ROUGE)")
        check_model(config.model)
    except (ValueError, FileNotFoundError, MissingExtraError) as exc:
        raise ExperimentError(str(exc)) from exc


def run_experiment(config: ExperimentConfig, *, progress: bool = True, log=print) -> dict[str, Any]:
    """Run (or resume) the experiment described by ``config``; returns the final checkpoint."""
    from .editing import load_model
    from .evaluation import evaluate_edits, evaluate_tasks, merge_results

    config.validate()
    out = Path(config.out)
    ckpt = out / "session.safetensors"
    resume = ckpt.exists()
    try:
        requests = load_requests(config)
    except FileNotFoundError as exc:
        raise ExperimentError(str(exc)) from exc
    _check_inputs(config)  # tasks, their files and the model: before anything is written
    settings = {**asdict(config), "inputs": input_fingerprints(config, len(requests))}
    main_acts = config.restrain != "none" or config.protect_energy is not None
    traces = [_Trace(out, restrained=main_acts)]
    if config.unrestrained_out is not None:
        traces.append(_Trace(Path(config.unrestrained_out), restrained=False))
    for folder, spec in config.variants().items():
        traces.append(_Trace(Path(folder), restrained=True, variant=spec))
    # a start that fails before the first row is written leaves no folder it created behind
    created = _new_folders([t.folder for t in traces])
    try:
        for trace in traces:
            trace.start(settings, resume)
        if resume and all(t.complete() for t in traces):
            log(f"{out}: this run is already complete")
            return read_json(out / "results.json")
        log(f"loading {config.model} ({config.dtype}) …")
        try:
            model, tok = load_model(config.model, config.dtype, device=config.device,
                                    device_map=_device_map(config.device_map))
        except ValueError as exc:
            raise ExperimentError(str(exc)) from exc
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

        torch.manual_seed(config.seed)
        try:
            session = EditingSession(
                model, tok, config.editor, config.hparams or None, restrain=config.restrain, alpha=config.alpha,
                beta=config.beta, every=config.every, checkpoint=ckpt, save_every=min(10, config.eval_every),
                corpus=config.corpus, progress=progress, store_device=config.store_device,
                threshold_scale=config.threshold_scale, protect_energy=config.protect_energy,
                protect_damp=config.protect_damp,
            )
        except ValueError as exc:
            raise ExperimentError(str(exc)) from exc
    except BaseException:
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    threads = torch.get_num_threads()
    used_before = [trace.record_threads(session.edits_done, threads) for trace in traces][0]
    if resume:
        log(f"resuming {out} after {session.edits_done} edits")
        if used_before is not None and used_before != threads:
            log(f"note: this pass runs on {threads} CPU thread(s), the run so far on {used_before}: its results "
                "equal an uninterrupted run's only to rounding (summation order), not bit for bit")
        for trace in traces:
            trace.record_start(session.edits_done)
        if session.finished and session.edits_done < len(requests):
            session.reopen()  # the same run, extended to more edits
            log(f"extending {out} from {session.edits_done} to {len(requests)} edits")
    once = config.every is None and main_acts
    # (scores, the folder that computed them) by (edits, digests of the held matrices)
    scored_weights: dict[tuple, tuple[dict[str, Any], str]] = {}
    for trace in traces:  # rows written before a resume count too (so a resumed run writes the same rows)
        for row in trace.rows:
            if not all(m.get("sha256") for m in row.get("matrices", {}).values()):
                continue  # a row of an older writer, without digests
            key = _held_key(row["edits"], row["matrices"])
            scored_weights.setdefault(key, (_scores_of(row), row.get("scores_from", _variant(trace))))

    def evaluate(s: EditingSession, trace: _Trace, final: bool) -> None:
        n = s.edits_done
        if n in trace.done:
            return
        start = time.perf_counter()
        # once-at-the-end schedule: the restrained folder holds W + F(ΔW) now, the run as if it
        # ended here (that restraint happens here, so it is timed here); a variant folder W + R(ΔW)
        if trace.variant is not None:
            s.hold_variant(trace.variant)
        else:
            s.hold(restrained=trace.restrained and once)
        restrain_seconds = time.perf_counter() - start
        row: dict[str, Any] = {"edits": n, "final": final, "restrained": trace.restrained}
        if trace.variant is not None:
            row["variant"] = trace.variant.spec()
        indices = scored_indices(n, config.eval_edits, config.seed)
        scored = [requests[i] for i in indices]
        if config.eval_edits is not None:
            row["edits_scored"] = len(scored)
        matrices = diagnostics_as_dict(s.diagnostics())  # of the weights about to be evaluated
        # the other folder already scored bit-identical weights at this checkpoint (no edits yet, or a
        # restraint with no value above σmax(W)): the session writes nothing else, so the model is the same
        held = _held_key(n, matrices)
        if held in scored_weights:
            scores_held, folder = scored_weights[held]
            row.update(copy.deepcopy(scores_held), scores_from=folder)
        else:
            scores = [evaluate_edits(model, tok, scored, style, baseline=baseline, live=config.live,
                                     progress=False, per_edit=True) if n else
                      {"efficacy": math.nan, "generalization": math.nan, "locality": math.nan}]
            if n:  # per-edit outcomes, compactly (see _compact_per_edit)
                rows = scores[0].pop("per_edit")
                scores[0]["per_edit"] = _compact_per_edit(indices, [getattr(r, "case_id", None) for r in scored],
                                                          rows)
            if config.tasks:  # perplexity never scores a text the key statistics were computed from
                scores.append(evaluate_tasks(model, tok, config.tasks, data_dir=config.task_data,
                                             limit=_task_limits(config), seed=config.seed, progress=progress,
                                             held_out_from=config.corpus))
            merged = merge_results(*scores)
            scored_weights[held] = merged, _variant(trace)
            row.update(copy.deepcopy(merged))
        row["matrices"] = matrices
        row["restraints"] = len(s.restraints)
        row["seconds"] = {"edit": s.edit_seconds,
                          "restrain": sum(r.get("seconds", 0.0) for r in s.restraints)
                          + (restrain_seconds if trace.restrained and (once or trace.variant) else 0.0),
                          "eval": time.perf_counter() - start}
        for key in ("per_edit", "per_item"):  # the long lists last: the row stays readable
            if key in row:
                row[key] = row.pop(key)
        trace.write(row, s.held_weights() if final else None)
        if progress:
            log(f"{trace.folder.name}: {_summary_line(row)}")

    from .editing import EDITORS

    step = config.batch_size if EDITORS[config.editor].batched else 1

    def is_checkpoint(n: int) -> bool:
        """0, and every step that reaches or crosses a multiple of ``eval_every`` (the final one aside)."""
        return n == 0 or (n < len(requests) and n // config.eval_every > (n - step) // config.eval_every)

    def checkpoint(s: EditingSession) -> None:
        if is_checkpoint(s.edits_done):
            if s.saved_edits != s.edits_done:
                s.save()  # the books of this checkpoint first: a resume then redoes no edit
            for trace in traces:
                evaluate(s, trace, final=False)

    if not session.finished:
        checkpoint(session)  # the unedited model, or rows a kill left unwritten at the resumed point
    session.run(requests, batch_size=config.batch_size, on_step=checkpoint, finish=False)
    # the end: the unrestrained folder before finish() (while ΔW is still unrestrained), then the
    # schedule's last restraint, saved, then the restrained folder on the final weights
    if not session.finished:
        if session.saved_edits != session.edits_done:
            session.save()
        for trace in traces:
            if not trace.restrained:
                evaluate(session, trace, final=True)
        session.finish()
    for trace in traces:
        if trace.restrained:
            evaluate(session, trace, final=True)
    if any(t.variant is not None for t in traces):
        session.hold(restrained=True)  # the model ends holding the main folder's final weights
    return read_json(out / "results.json")


def _summary_line(row: dict[str, Any]) -> str:
    kappa = max((m["condition_number"] for m in row["matrices"].values()), default=math.nan)
    scores = " ".join(f"{k}={row[k]:.3f}" for k in ("efficacy", "generalization", "locality")
                      if isinstance(row.get(k), float) and not math.isnan(row[k]))
    return f"edits={row['edits']:<4} {scores} κ_max={kappa:.1f}"
