"""The task registry: one :class:`Task` per general-ability task, one small module per task.

Each task module (``gsm8k.py``, ``rte.py``, ``nq.py``, ``samsum.py``, ``perplexity_task.py``) defines
its ``TASK``; :mod:`.tasks` registers them with :func:`register`, in the paper's order, which is
the order of ``TASKS`` and of :data:`REGISTRY`. Another task is added the same way:
``register(Task(...))``, before ``evaluate_tasks`` is asked for it. :func:`get_task` is the one
place that turns a name into a task (an unknown name is a ``ValueError`` listing the known ones).

A task is run by :func:`run_task`: its ``run`` function (a custom evaluation: GSM8K's two stages,
RTE's scored choice, perplexity) or, without one, the plain recipe — the prompt of each record,
greedy generation of ``max_new_tokens[name]`` tokens (up to ``stop``), then ``score(record,
text)`` per record. Either way the outputs are one dict per record holding ``"value"``, the
example's contribution to the score; perplexity's hold ``"logprob"`` and ``"tokens"`` instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .generation import ContinuationScore, generate_greedy, pad_token_id, score_continuations

__all__ = ["REGISTRY", "Runner", "Task", "check_task", "get_task", "register", "require", "run_task"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Task:
    """One general-ability task.

    Attributes:
        name: registry key (lower-case letters, digits, ``_``; used on the command line).
        file: data file name, looked up in ``<data>/tasks/`` then ``<data>/``.
        load: reads every record of the file (``Path -> list[dict]``), validating each.
        template: the paper's prompt, verbatim (``None`` for a task without a prompt).
        prompt: builds one record's prompt from ``template`` (``None`` without a prompt).
        score: ``(record, generated text) -> output dict`` holding ``"value"`` (plain recipe).
        max_new_tokens: default generation lengths, by key (a task may have several stages).
        run: a custom evaluation ``(task, records, runner) -> outputs`` instead of the plain recipe.
        stop: stop strings of the plain recipe's generation.
        skip_prefix: regex of a leading label the generation skips (e.g. ``Answer:``).
        kind: ``"mean"`` (score = mean of the values, in [0, 1]) or ``"perplexity"``
            (token-weighted perplexity; lower is better).
        default: part of ``DEFAULT_TASKS``.
        source: what text is scored, in words (recorded in results, e.g. ``perplexity_source``).
        held_out: its texts must not come from the key-statistics corpus (records are dropped when
            their ``"text"`` occurs in the corpus passed as ``held_out_from``).
    """

    name: str
    file: str
    load: Callable[[Path], list[dict]]
    template: str | None = None
    prompt: Callable[[dict], str] | None = None
    score: Callable[[dict, str], dict] | None = None
    max_new_tokens: Mapping[str, int] = field(default_factory=dict)
    run: Callable[[Task, list[dict], Runner], list[dict]] | None = None
    stop: tuple[str, ...] = ("\n",)
    skip_prefix: str | None = None
    kind: str = "mean"
    default: bool = True
    source: str | None = None
    held_out: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"bad task name {self.name!r}: use lower-case letters, digits and '_'")
        if self.kind not in ("mean", "perplexity"):
            raise ValueError(f"task {self.name!r}: kind must be 'mean' or 'perplexity', got {self.kind!r}")
        if self.run is None and (self.prompt is None or self.score is None or self.name not in self.max_new_tokens):
            raise ValueError(
                f"task {self.name!r} needs either run= or all of prompt=, score= and max_new_tokens[{self.name!r}]"
            )


REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add ``task`` to :data:`REGISTRY` (a second task of the same name is a ``ValueError``)."""
    if task.name in REGISTRY and REGISTRY[task.name] != task:
        raise ValueError(f"task {task.name!r} is already registered")
    REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called ``name``; ``ValueError`` naming the known tasks otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(REGISTRY)}") from None


def check_task(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a registered task."""
    get_task(name)


@dataclass
class Runner:
    """What a task's evaluation needs from the caller: model, tokenizer and generation settings."""

    model: torch.nn.Module
    tokenizer: Any
    max_new_tokens: Mapping[str, int]
    batch_size: int = 16
    max_input_tokens: int = 1024
    progress: bool = False
    chat: bool = False

    def wrap(self, prompt: str) -> str:
        """The prompt, or (``chat=True``) the prompt as a user turn of the tokenizer's chat template."""
        if not self.chat:
            return prompt
        msgs = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        *,
        stop: Sequence[str] = (),
        skip_prefix: str | None = None,
        desc: str = "generating",
    ) -> list[str]:
        """Greedy continuations of the (wrapped) prompts; see :func:`.generation.generate_greedy`."""
        return generate_greedy(
            self.model,
            self.tokenizer,
            [self.wrap(p) for p in prompts],
            max_new_tokens=max_new_tokens,
            batch_size=self.batch_size,
            max_input_tokens=self.max_input_tokens,
            stop=stop,
            skip_prefix=skip_prefix,
            progress=self.progress,
            desc=desc,
        )

    def score(
        self, items: Sequence[tuple[Sequence[int], Sequence[int]]], *, rows_per_batch: int | None = None, desc: str
    ) -> list[ContinuationScore]:
        """Teacher-forced scores of ``(context ids, target ids)`` pairs."""
        return score_continuations(
            self.model,
            items,
            pad_id=pad_token_id(self.tokenizer),
            batch_size=rows_per_batch or self.batch_size,
            progress=self.progress,
            desc=desc,
        )


def require(path: Path, n: int, record: Any, keys: Sequence[str]) -> None:
    """``ValueError`` naming the file and the record number unless ``record`` is a mapping holding ``keys``."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{path}: record {n} is not an object")  # noqa: TRY004 (malformed data)
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{path}: record {n} lacks {', '.join(missing)}")


def run_task(task: Task, records: list[dict], runner: Runner) -> list[dict]:
    """One output dict per record (see the module docstring)."""
    if task.run is not None:
        return task.run(task, records, runner)
    texts = runner.generate(
        [task.prompt(r) for r in records],  # type: ignore[misc]
        runner.max_new_tokens[task.name],
        stop=task.stop,
        skip_prefix=task.skip_prefix,
        desc=task.name,
    )
    return [task.score(r, t) for r, t in zip(records, texts)]  # type: ignore[misc]
