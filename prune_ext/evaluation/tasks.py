"""General-ability evaluation with the PRUNE paper's prompts (verbatim) and metrics.

=========== ============================================================= ==========================
task        prompt                                                        score (in [0, 1])
=========== ============================================================= ==========================
gsm8k       ``Q: {QUESTION} A: Let's think step by step. {HINT}            solve rate: first number
            Therefore, the answer (arabic numerals) is:``                  of the answer == gold
rte         ``{SENTENCE1} entails the {SENTENCE2}. True or False?          two-way accuracy
            answer:``
nq          ``Refer to the passage below and answer the following          exact match after
            question. Passage: {DOCUMENT} Question: {QUESTION}``           normalisation
samsum      ``{DIALOGUE} TL;DR:``                                          mean of ROUGE-1/2/L F1
perplexity  held-out text: RTE premises (``sentence1``), never the key-    perplexity (lower is
            statistics corpus                                              better; not in [0, 1])
=========== ============================================================= ==========================

Each task lives in its own module (:mod:`.gsm8k`, :mod:`.rte`, :mod:`.nq`, :mod:`.samsum`,
:mod:`.perplexity_task`: the choices made where the paper leaves room are documented there) and is
registered here in :mod:`.registry`; this module is the front door: the data files, the seeded
samples, and the evaluators.

* Every score comes with its sample size and a 95 % interval (:mod:`.intervals`: Wilson for 0/1
  scores, percentile bootstrap over examples otherwise, over passages for perplexity).
* Greedy decoding on a CPU is bound by reading the weights once per step, so a step costs about
  the same for 1 or 16 rows: prefer large ``batch_size`` (rows are sorted by length first).
* Prompts are raw text (no chat template), as in the paper; ``chat=True`` wraps them in the
  tokenizer's chat template (instruction-tuned models such as SmolLM2-Instruct answer NQ only
  then; with the raw prompt it writes "A:" and stops). Inputs longer than
  ``max_input_tokens`` keep their last tokens.
* ``limit`` examples are drawn with a seeded shuffle, so a smaller limit is a prefix of a larger
  one with the same seed.

Data files are read from ``data_dir`` (argument), else the ``PRUNE_EXT_DATA`` environment
variable, else ``<repo>/../shared/data``; each file is looked up in ``<dir>/tasks/`` and then
``<dir>/``.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import gsm8k, nq, perplexity_task, rte, samsum
from .gsm8k import extract_number, gsm8k_cot_prompt, gsm8k_gold, gsm8k_prompt, numbers_match
from .intervals import mean_interval, perplexity_interval
from .nq import contains_answer, exact_match, normalize_answer, nq_prompt
from .perplexity_task import perplexity
from .registry import REGISTRY, Runner, Task, check_task, get_task, register, run_task
from .rte import rte_label, rte_prompt
from .samsum import rouge_mean, samsum_prompt

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_TASKS",
    "ENV_VAR",
    "PROMPTS",
    "TASKS",
    "TaskResult",
    "check_task",
    "contains_answer",
    "default_data_dir",
    "evaluate_task",
    "evaluate_tasks",
    "exact_match",
    "extract_number",
    "gsm8k_cot_prompt",
    "gsm8k_gold",
    "gsm8k_prompt",
    "load_task",
    "normalize_answer",
    "nq_prompt",
    "numbers_match",
    "perplexity",
    "resolve_data_dir",
    "rouge_mean",
    "rte_label",
    "rte_prompt",
    "samsum_prompt",
    "task_file",
]

ENV_VAR = "PRUNE_EXT_DATA"
for _module in (gsm8k, rte, nq, samsum, perplexity_task):  # the paper's order
    register(_module.TASK)
TASKS = tuple(REGISTRY)
DEFAULT_TASKS = tuple(name for name, task in REGISTRY.items() if task.default)
TASK_FILES = {name: task.file for name, task in REGISTRY.items()}
# The paper's prompts, verbatim (../shared/data/README.md).
PROMPTS = {name: task.template for name, task in REGISTRY.items() if task.template is not None}
DEFAULT_MAX_NEW_TOKENS = {k: v for task in REGISTRY.values() for k, v in task.max_new_tokens.items()}  # built-ins

_check_task = check_task  # the name the experiment runner imports


# --- data ---------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """``<checkout>/../shared/data`` when prune_ext runs from its source checkout (the folder above
    ``prune_ext/`` holds ``pyproject.toml``); an installed package has no default data folder, and this
    raises ``FileNotFoundError`` naming ``--task-data`` and ``$PRUNE_EXT_DATA``."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "prune_ext").is_dir():
        return checkout.parent / "shared" / "data"
    raise FileNotFoundError(f"no data folder: pass --task-data DIR (in Python, data_dir=) or set {ENV_VAR}; "
                            "only a source checkout has a default (its sibling shared/data)")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$PRUNE_EXT_DATA``, else :func:`default_data_dir`."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else default_data_dir()


def task_file(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of a task's data file; FileNotFoundError (naming the path and the env var) if absent."""
    file = get_task(name).file
    base = resolve_data_dir(data_dir)
    candidates = [base / "tasks" / file, base / file]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"data for task {name!r} not found: {candidates[0]} (nor {candidates[1]}); "
        f"pass data_dir= or set {ENV_VAR} to the folder holding tasks/{file}"
    )


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _drop_corpus_texts(name: str, records: list[dict], corpus: str | os.PathLike) -> tuple[list[dict], int]:
    """``records`` without those whose ``"text"`` occurs in a document of the statistics ``corpus``."""
    from ..editing.covariance import iter_corpus_texts  # the reader the key statistics use

    blob = "\n".join(_collapse(doc) for doc in iter_corpus_texts(corpus))
    kept = [r for r in records if _collapse(r["text"]) not in blob]
    if not kept:
        raise ValueError(f"every {name} text occurs in the key-statistics corpus {corpus}: nothing is held out")
    return kept, len(records) - len(kept)


def load_task(
    name: str,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    *,
    held_out_from: str | os.PathLike | None = None,
) -> list[dict]:
    """Records of a task, ``limit`` of them drawn by a seeded shuffle (all, shuffled, if None).

    Fields: gsm8k ``question, gold, rationale``; rte ``sentence1, sentence2, label`` (bool);
    nq ``question, answers, passage``; samsum ``id, dialogue, summary``; perplexity ``text``.
    ``held_out_from`` (the key-statistics corpus) drops, before sampling, the perplexity texts
    that occur in it.
    """
    records, _ = _load(name, data_dir, limit, seed, held_out_from)
    return records


def _load(name, data_dir, limit, seed, held_out_from) -> tuple[list[dict], int]:
    task = get_task(name)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    records = task.load(task_file(name, data_dir))
    dropped = 0
    if held_out_from is not None and task.held_out:
        records, dropped = _drop_corpus_texts(name, records, held_out_from)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    return [records[i] for i in order], dropped


# --- evaluation ---------------------------------------------------------------------------------


@dataclass
class TaskResult:
    """Score of one task with its sample size, 95 % interval, text source and per-example outputs."""

    name: str
    score: float
    n: int
    seconds: float
    outputs: list[dict] = field(default_factory=list)
    interval: tuple[float, float] = (math.nan, math.nan)
    source: str | None = None


def _max_new(overrides: Mapping[str, int] | None) -> dict[str, int]:
    """Every registered task's generation lengths (the registry now, not at import), then ``overrides``."""
    out = {k: v for task in REGISTRY.values() for k, v in task.max_new_tokens.items()}
    for k, v in (overrides or {}).items():
        if k not in out:
            raise ValueError(f"unknown max_new_tokens key {k!r}; expected one of {', '.join(out)}")
        out[k] = int(v)
    return out


def _aggregate(task: Task, outputs: list[dict], seed: int) -> tuple[float, tuple[float, float]]:
    if task.kind == "perplexity":
        sums = [o["logprob"] for o in outputs]
        counts = [o["tokens"] for o in outputs]
        return math.exp(-sum(sums) / sum(counts)), perplexity_interval(sums, counts, seed=seed)
    values = [o["value"] for o in outputs]
    return sum(values) / len(values), mean_interval(values, seed=seed)


def evaluate_task(
    model: torch.nn.Module,
    tokenizer,
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = 50,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    max_new_tokens: Mapping[str, int] | None = None,
    max_input_tokens: int = 1024,
    chat: bool = False,
    held_out_from: str | os.PathLike | None = None,
) -> TaskResult:
    """Run one task (see the module docstring) and return its score, size, interval, time and outputs.

    ``chat=True`` wraps each prompt (the paper's prompt, unchanged) as a user turn of the
    tokenizer's chat template, for instruction-tuned models that do not answer raw prompts; the
    default is the paper's raw prompt. Perplexity never uses the template. ``held_out_from`` is
    the key-statistics corpus: perplexity texts found in it are not scored. The interval's
    bootstrap is seeded with ``seed``.
    """
    task = get_task(name)
    limits = _max_new(max_new_tokens)
    if chat and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat=True but the tokenizer has no chat template")
    records, dropped = _load(name, data_dir, limit, seed, held_out_from)
    start = time.perf_counter()
    runner = Runner(model, tokenizer, limits, batch_size=batch_size, max_input_tokens=max_input_tokens,
                    progress=progress, chat=chat and task.kind != "perplexity")
    outputs = run_task(task, records, runner)
    score, interval = _aggregate(task, outputs, seed)
    source = task.source
    if task.held_out and held_out_from is not None:
        source = f"{source}; held out from the statistics corpus {Path(held_out_from).name} ({dropped} dropped)"
    return TaskResult(name=name, score=float(score), n=len(outputs), seconds=time.perf_counter() - start,
                      outputs=outputs, interval=interval, source=source)


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | Mapping[str, int] | None = 50,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    max_new_tokens: Mapping[str, int] | None = None,
    max_input_tokens: int = 1024,
    chat: bool = False,
    held_out_from: str | os.PathLike | None = None,
) -> dict:
    """Score of each task in ``tasks`` (``gsm8k``, ``rte``, ``nq``, ``samsum``, ``perplexity``).

    ``limit`` is the number of examples of every task, or a mapping task -> number (a task it does
    not name is a ``ValueError``); None: all.

    Returns ``{task: score, ..., "n": {task: examples}, "intervals": {task: [lo, hi]}}`` and, for
    perplexity, ``"perplexity_source"`` (what text was scored), and ``"per_item"``: per task, its
    per-example values (``value``; perplexity: ``logprob`` and ``tokens``). Merge it with
    :func:`~prune_ext.evaluation.evaluate_edits`'s result through
    :func:`~prune_ext.evaluation.intervals.merge_results`, which merges the nested dicts.
    All names and data files are checked before any model work starts.
    """
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    for name in tasks:
        check_task(name)
    for name in tasks:
        task_file(name, data_dir)
    _max_new(max_new_tokens)
    if isinstance(limit, Mapping) and set(tasks) - set(limit):
        raise ValueError(f"limit names no count for {', '.join(sorted(set(tasks) - set(limit)))}")
    results: dict = {"n": {}, "intervals": {}}
    for name in tqdm(list(tasks), desc="tasks", disable=not progress or len(tasks) < 2, leave=False):
        res = evaluate_task(
            model,
            tokenizer,
            name,
            data_dir=data_dir,
            limit=limit[name] if isinstance(limit, Mapping) else limit,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            max_new_tokens=max_new_tokens,
            max_input_tokens=max_input_tokens,
            chat=chat,
            held_out_from=held_out_from,
        )
        results[name] = res.score
        results["n"][name] = res.n
        results["intervals"][name] = list(res.interval)
        # per-example values, in the seeded sample's order (the same in every run): paired tests
        keys = ("logprob", "tokens") if get_task(name).kind == "perplexity" else ("value",)
        results.setdefault("per_item", {})[name] = {k: [o[k] for o in res.outputs] for k in keys}
        if get_task(name).held_out:
            results[f"{name}_source"] = res.source
    return results
