"""RTE: two-way entailment, scored (not generated) with the paper's prompt.

The prediction is "True" when ``log P(" True" | prompt) > log P(" False" | prompt)``: the two-way
decision the prompt asks for, without parsing free text, one forward pass per example.
``entailment`` is True, ``not_entailment`` False.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .registry import Runner, Task, require

__all__ = ["PROMPT", "TASK", "read_rte", "rte_label", "rte_prompt"]

PROMPT = "{SENTENCE1} entails the {SENTENCE2}. True or False? answer:"


def rte_prompt(sentence1: str, sentence2: str) -> str:
    """The paper's NLI prompt for one sentence pair."""
    return PROMPT.replace("{SENTENCE1}", sentence1.strip()).replace("{SENTENCE2}", sentence2.strip())


def rte_label(label: str) -> bool:
    """``entailment`` → True, ``not_entailment`` → False (also accepts 0/1 and True/False)."""
    key = str(label).strip().lower()
    if key in ("entailment", "true", "0"):
        return True
    if key in ("not_entailment", "false", "1"):
        return False
    raise ValueError(f"unknown RTE label {label!r}")


def read_rte(path: Path) -> list[dict]:
    """Rows of an RTE TSV file (header ``index, sentence1, sentence2, label``), labels as bools."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    out = []
    for n, r in enumerate(rows, 1):
        require(path, n, r, ("sentence1", "sentence2", "label"))
        try:
            label = rte_label(r["label"])
        except ValueError as e:
            raise ValueError(f"{path}: row {n}: {e}") from None
        out.append({"sentence1": r["sentence1"], "sentence2": r["sentence2"], "label": label})
    return out


def _run(task: Task, records: list[dict], runner: Runner) -> list[dict]:
    tok = runner.tokenizer
    yes = tok(" True", add_special_tokens=False).input_ids
    no = tok(" False", add_special_tokens=False).input_ids
    items = []
    for r in records:
        ctx = tok(runner.wrap(rte_prompt(r["sentence1"], r["sentence2"]))).input_ids[-runner.max_input_tokens :]
        items += [(ctx, yes), (ctx, no)]
    scores = runner.score(items, rows_per_batch=2 * runner.batch_size, desc="rte")
    outputs = []
    for i, r in enumerate(records):
        pred = scores[2 * i].sum_logprob > scores[2 * i + 1].sum_logprob
        correct = pred == r["label"]
        outputs.append({"prediction": pred, "label": r["label"], "correct": correct, "value": float(correct)})
    return outputs


TASK = Task(name="rte", file="rte.tsv", load=read_rte, template=PROMPT, run=_run, source="RTE sentence pairs")
