"""Perplexity on held-out text: the RTE premises (``sentence1`` of ``rte.tsv``), de-duplicated.

(The module is not called ``perplexity`` so as not to shadow the :func:`perplexity` function
that ``prune_ext.evaluation`` exports.)

The text source is chosen so that it is never the key-statistics corpus: the statistics
(:mod:`prune_ext.editing.covariance`) read ``.txt`` / ``.jsonl`` / ``.json`` corpora, and the
reproduction and the demo use the NQ-open passages (``tasks/nq-open.jsonl``); a ``.tsv`` file is
not even a corpus format there. On top of that, ``held_out_from=<corpus>`` (in ``load_task`` /
``evaluate_task(s)``) drops every premise that occurs (whitespace-collapsed) inside a document of
that corpus, read by the statistics' own reader, so a text used for the statistics is never
scored. (On ../shared/data, none of the 2 378 distinct premises occurs in the NQ or SAMSum texts.)

The score is the token-weighted perplexity ``exp(-Σ log p / Σ tokens)`` over all passages, each
truncated to ``max_input_tokens`` and scored from its second token on; lower is better.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .generation import pad_token_id, score_continuations
from .registry import Runner, Task
from .rte import read_rte

__all__ = ["SOURCE", "TASK", "passage_logprobs", "perplexity"]

SOURCE = "RTE premises (sentence1 of rte.tsv)"


def passage_logprobs(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """``(Σ log p, number of scored tokens)`` of each text of two or more tokens (others are skipped).

    Each text is truncated to ``max_length`` tokens; its first token is the context, the rest are
    scored.
    """
    encoded = [tokenizer(t).input_ids[:max_length] for t in texts]
    items = [(ids[:1], ids[1:]) for ids in encoded if len(ids) >= 2]
    if not items:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    scores = score_continuations(
        model, items, pad_id=pad_token_id(tokenizer), batch_size=batch_size, progress=progress, desc="perplexity"
    )
    return [(s.sum_logprob, len(s.target)) for s in scores]


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = False,
) -> float:
    """Token-weighted perplexity of ``texts`` (each truncated to ``max_length`` tokens)."""
    parts = passage_logprobs(model, tokenizer, texts, batch_size=batch_size, max_length=max_length, progress=progress)
    return math.exp(-sum(s for s, _ in parts) / sum(n for _, n in parts))


def _load(path: Path) -> list[dict]:
    seen: dict[str, None] = {}
    for r in read_rte(path):
        seen.setdefault(r["sentence1"].strip(), None)
    return [{"text": t} for t in seen if t]


def _run(task: Task, records: list[dict], runner: Runner) -> list[dict]:
    texts = [r["text"] for r in records]
    encoded = [runner.tokenizer(t).input_ids[: runner.max_input_tokens] for t in texts]
    kept = [t for t, ids in zip(texts, encoded) if len(ids) >= 2]
    parts = passage_logprobs(
        runner.model,
        runner.tokenizer,
        kept,
        batch_size=runner.batch_size,
        max_length=runner.max_input_tokens,
        progress=runner.progress,
    )
    return [{"text": t, "logprob": s, "tokens": n} for t, (s, n) in zip(kept, parts)]


TASK = Task(
    name="perplexity",
    file="rte.tsv",
    load=_load,
    run=_run,
    kind="perplexity",
    default=False,
    source=SOURCE,
    held_out=True,
)
