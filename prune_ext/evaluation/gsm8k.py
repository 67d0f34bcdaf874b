"""GSM8K: two-stage zero-shot chain of thought, scored by solve rate.

The model first continues ``Q: {QUESTION} A: Let's think step by step.`` for up to
``max_new_tokens["gsm8k_cot"]`` tokens (stopping at a new ``Q:``); that text is the ``{HINT}`` of
the paper's prompt, which is then continued for ``max_new_tokens["gsm8k"]`` tokens, and the first
number of that answer is compared with the gold number (after ``#### ``). ``gsm8k_cot=0`` is a
cheap single-stage variant with an empty HINT.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..io import read_jsonl
from .registry import Runner, Task, require

__all__ = ["PROMPT", "TASK", "extract_number", "gsm8k_cot_prompt", "gsm8k_gold", "gsm8k_prompt", "numbers_match"]

PROMPT = "Q: {QUESTION} A: Let's think step by step. {HINT} Therefore, the answer (arabic numerals) is:"


def gsm8k_prompt(question: str, hint: str = "") -> str:
    """The reasoning prompt; with an empty hint the doubled space is collapsed."""
    hint = hint.strip()
    template = PROMPT if hint else PROMPT.replace(" {HINT}", "")
    return template.replace("{QUESTION}", question.strip()).replace("{HINT}", hint)


def gsm8k_cot_prompt(question: str) -> str:
    """First stage of zero-shot CoT: the part of the prompt before ``{HINT}``."""
    return PROMPT.split(" {HINT}")[0].replace("{QUESTION}", question.strip())


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_number(text: str, which: str = "first") -> str | None:
    """The first (or last) number in ``text`` as a canonical string, or None.

    Thousands separators are removed (``1,234`` → ``1234``), a trailing ``.`` is not part of the
    number, and integral values lose their decimals (``18.00`` → ``18``).
    """
    if which not in ("first", "last"):
        raise ValueError(f"which must be 'first' or 'last', got {which!r}")
    cleaned = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    found = _NUMBER.findall(cleaned)
    if not found:
        return None
    value = float(found[0] if which == "first" else found[-1])
    return str(int(value)) if value.is_integer() else repr(value)


def gsm8k_gold(answer: str) -> str:
    """The gold number of a GSM8K answer: what follows ``#### ``, canonicalised."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer without '####': {answer[-60:]!r}")
    gold = answer.split("####")[-1].strip().replace(",", "")
    num = extract_number(gold)
    if num is None:
        raise ValueError(f"GSM8K answer without a number after '####': {gold!r}")
    return num


def numbers_match(prediction: str | None, gold: str) -> bool:
    """Whether two canonical numbers are equal (within 1e-6); a missing prediction never matches."""
    if prediction is None:
        return False
    return math.isclose(float(prediction), float(gold), rel_tol=0.0, abs_tol=1e-6)


def _load(path: Path) -> list[dict]:
    out = []
    for n, r in enumerate(read_jsonl(path), 1):
        require(path, n, r, ("question", "answer"))
        try:
            gold = gsm8k_gold(r["answer"])
        except ValueError as e:
            raise ValueError(f"{path}: record {n}: {e}") from None
        out.append({"question": r["question"], "gold": gold, "rationale": r["answer"]})
    return out


def _run(task: Task, records: list[dict], runner: Runner) -> list[dict]:
    questions = [r["question"] for r in records]
    hints = [""] * len(records)
    if runner.max_new_tokens["gsm8k_cot"] > 0:
        hints = runner.generate(
            [gsm8k_cot_prompt(q) for q in questions],
            runner.max_new_tokens["gsm8k_cot"],
            stop=("Q:",),
            desc="gsm8k (reasoning)",
        )
    answers = runner.generate(
        [gsm8k_prompt(q, h) for q, h in zip(questions, hints)],
        runner.max_new_tokens["gsm8k"],
        stop=("\n",),
        desc="gsm8k (answer)",
    )
    outputs = []
    for r, h, a in zip(records, hints, answers):
        pred = extract_number(a)
        correct = numbers_match(pred, r["gold"])
        outputs.append(
            {"hint": h, "output": a, "prediction": pred, "gold": r["gold"], "correct": correct, "value": float(correct)}
        )
    return outputs


TASK = Task(
    name="gsm8k",
    file="gsm8k-test.jsonl",
    load=_load,
    template=PROMPT,
    max_new_tokens={"gsm8k_cot": 64, "gsm8k": 16},
    run=_run,
    source="GSM8K test questions",
)
