"""SAMSum: greedy ``TL;DR:`` summary of a dialogue, scored by the mean of ROUGE-1/2/L F1.

The first non-empty line of the continuation is the summary; ROUGE uses Porter stemming
(``rouge-score``); an example's value is the mean of its three F1 scores.
"""

from __future__ import annotations

from pathlib import Path

from ..io import read_json
from .registry import Task, require

__all__ = ["PROMPT", "TASK", "rouge_mean", "samsum_prompt"]

PROMPT = "{DIALOGUE} TL;DR:"

_SCORER = None


def samsum_prompt(dialogue: str) -> str:
    """The paper's summarisation prompt (Windows line ends made plain)."""
    return PROMPT.replace("{DIALOGUE}", dialogue.replace("\r\n", "\n").strip())


def rouge_mean(prediction: str, reference: str) -> float:
    """Mean of the ROUGE-1, ROUGE-2 and ROUGE-L F1 scores (Porter stemming)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = _SCORER.score(reference, prediction)
    return (scores["rouge1"].fmeasure + scores["rouge2"].fmeasure + scores["rougeL"].fmeasure) / 3.0


def _load(path: Path) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list")  # noqa: TRY004 (malformed data)
    for n, r in enumerate(data, 1):
        require(path, n, r, ("dialogue", "summary"))
    return [{"id": r.get("id"), "dialogue": r["dialogue"], "summary": r["summary"]} for r in data]


def _score(record: dict, text: str) -> dict:
    rouge = rouge_mean(text.strip(), record["summary"])
    return {"prediction": text.strip(), "summary": record["summary"], "rouge": rouge, "value": rouge}


TASK = Task(
    name="samsum",
    file="samsum-test.json",
    load=_load,
    template=PROMPT,
    prompt=lambda r: samsum_prompt(r["dialogue"]),
    score=_score,
    max_new_tokens={"samsum": 48},
    source="SAMSum test dialogues",
)
