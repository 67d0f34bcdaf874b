"""Natural Questions (open): greedy answer to the paper's passage prompt, scored by exact match.

The first non-empty line of the continuation, a leading ``Answer:`` / ``A:`` removed, is compared
after SQuAD normalisation (lower-case, punctuation and articles removed, whitespace collapsed)
with every accepted answer. The passage is the record's ``output[0]``. Each output also records a
lenient ``contains`` flag (an answer inside the prediction), for inspection; the score is exact
match.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from pathlib import Path

from ..io import read_jsonl
from .registry import Task, require

__all__ = ["PROMPT", "TASK", "contains_answer", "exact_match", "normalize_answer", "nq_prompt"]

PROMPT = "Refer to the passage below and answer the following question. Passage: {DOCUMENT} Question: {QUESTION}"

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
ANSWER_PREFIX = r"(answer|a)\s*:"


def nq_prompt(passage: str, question: str) -> str:
    """The paper's open-domain QA prompt."""
    return PROMPT.replace("{DOCUMENT}", passage.strip()).replace("{QUESTION}", question.strip())


def normalize_answer(text: str) -> str:
    """SQuAD/NQ normalisation: lower-case, drop punctuation, drop articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised accepted answer."""
    if isinstance(answers, str):
        answers = [answers]
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def contains_answer(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when a normalised accepted answer occurs (on word boundaries) in the normalised prediction.

    A lenient companion of :func:`exact_match`, recorded per example for inspection only.
    """
    if isinstance(answers, str):
        answers = [answers]
    pred = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(a) and f" {normalize_answer(a)} " in pred for a in answers))


def _strip_answer_prefix(text: str) -> str:
    return re.sub(r"^\s*" + ANSWER_PREFIX + r"\s*", "", text.strip(), flags=re.IGNORECASE).strip()


def _load(path: Path) -> list[dict]:
    out = []
    for n, r in enumerate(read_jsonl(path), 1):
        require(path, n, r, ("question", "answer", "output"))
        answers = [r["answer"]] if isinstance(r["answer"], str) else list(r["answer"])
        passages = [r["output"]] if isinstance(r["output"], str) else list(r["output"])
        if not answers or not passages:
            raise ValueError(f"{path}: record {n} has no answer or no passage")
        out.append({"question": r["question"], "answers": answers, "passage": passages[0].strip()})
    return out


def _score(record: dict, text: str) -> dict:
    pred = _strip_answer_prefix(text)
    em = exact_match(pred, record["answers"])
    return {
        "output": text,
        "prediction": pred,
        "answers": record["answers"],
        "em": em,
        "contains": contains_answer(pred, record["answers"]),
        "value": em,
    }


TASK = Task(
    name="nq",
    file="nq-open.jsonl",
    load=_load,
    template=PROMPT,
    prompt=lambda r: nq_prompt(r["passage"], r["question"]),
    score=_score,
    max_new_tokens={"nq": 24},
    skip_prefix=ANSWER_PREFIX,
    source="NQ-open questions with their passage",
)
